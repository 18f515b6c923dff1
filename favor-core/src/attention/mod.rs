//! The attention core in f64, one (batch, head) problem at a time. This is the oracle every
//! backend is tested against, so it is written for clarity, not speed.
//!
//! With Q' = φ(Q), K' = φ(K) (L×M) and the key padding mask zeroing the rows of padded keys:
//!
//! * **Bidirectional**: N = Q'(K'ᵀV), R = Q'(K'ᵀ1), out = N / R. Time O(L·M·(d + d_v)), memory
//!   O(L·M + M·d_v).
//! * **Causal** (prefix sums): S_i = Σ_{j≤i} k'_j v_jᵀ, z_i = Σ_{j≤i} k'_j,
//!   out_i = S_iᵀq'_i / q'_iᵀz_i.
//!
//! # The causal stabiliser
//! Key j's features are computed against the running maximum c_j = max_{l≤j} s(k_l) of the
//! key log-scales (see [`crate::features`]). Query i then sees key j with weight
//! exp(c_j − c_i)·k'_j, a factor ≤ 1 that is applied to the prefix state when the maximum grows:
//! S ← exp(c_old − c_new)·S. So the state never looks ahead, never overflows, and
//! full attention, chunked prefill and the step-by-step decoder ([`CausalState`]) compute the same
//! function. Mathematically query i sees, for the positive map, exp(−c_i)·φ̂(k_j) with the
//! unstabilised features φ̂ of [`crate::features`]: the common factor exp(−c_i) cancels, so the
//! output does not depend on the stabilisers at all (ε included).
//!
//! # Denominators
//! A denominator R with |R| ≤ δ (the guard) becomes R + 2δ. A denominator of exactly zero (a query
//! that sees no unpadded key, or features that all underflowed) gives an output row of zero and
//! zero gradients.
//!
//! # Backward
//! With G = ∂ℒ/∂out, x̄_i = G_i/R_i and ḡ_i = −⟨G_i, out_i⟩/R_i:
//! * bidirectional: dq'_i = (K'ᵀV)x̄_i + (K'ᵀ1)ḡ_i, dk'_j = (Σ_i q'_i x̄_iᵀ)v_j + Σ_i q'_i ḡ_i,
//!   dv_j = (Σ_i q'_i x̄_iᵀ)ᵀk'_j;
//! * causal: dq'_i = S_i x̄_i + z_i ḡ_i by a forward sweep that recomputes the prefix states;
//!   dk'_j = P_j v_j + p_j and dv_j = P_jᵀk'_j with the suffix sums
//!   P_j = q'_j x̄_jᵀ + exp(c_j − c_{j+1})P_{j+1} (p likewise with ḡ) by a reverse sweep. No state
//!   is rebuilt by subtraction, and memory is O(L·(d + d_v + M) + M·d_v).
//!
//! Then ∂ℒ/∂q and ∂ℒ/∂k go through the feature map's backward with stabilisers held constant,
//! which is the exact gradient because the output does not depend on them.
//! Rows whose denominator is hundreds of orders of magnitude below their features (extreme
//! inputs only) are differentiated pair by pair so that no cotangent overflows (`at_risk`).

mod bidirectional;
mod causal;
pub mod softmax;

pub use bidirectional::{bidirectional_backward, bidirectional_forward};
pub use causal::{CausalState, causal_backward, causal_forward};

use crate::FeatureMap;
use crate::features::ParamGradsF64;

/// One (batch, head) problem in f64: Q is L×d, K is L_kv×d, V is L_kv×d_v, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    /// Queries L.
    pub len: usize,
    /// Keys L_kv (= L for self-attention; causal attention requires that).
    pub kv_len: usize,
    /// Query/key dimension d.
    pub d: usize,
    /// Value dimension d_v.
    pub dv: usize,
    /// Queries (L×d).
    pub q: &'a [f64],
    /// Keys (L_kv×d).
    pub k: &'a [f64],
    /// Values (L_kv×d_v).
    pub v: &'a [f64],
    /// Key padding mask (L_kv, true = keep).
    pub mask: Option<&'a [bool]>,
}

impl<'a> Head<'a> {
    /// Tokens `r0..r1` of a self-attention head (`r0 ≤ r1 ≤ len = kv_len`): one sequence of a
    /// packed call, as a head of its own.
    pub fn tokens(&self, r0: usize, r1: usize) -> Head<'a> {
        debug_assert!(self.kv_len == self.len && r0 <= r1 && r1 <= self.len);
        let (d, dv) = (self.d, self.dv);
        Head {
            len: r1 - r0,
            kv_len: r1 - r0,
            d,
            dv,
            q: &self.q[r0 * d..r1 * d],
            k: &self.k[r0 * d..r1 * d],
            v: &self.v[r0 * dv..r1 * dv],
            mask: self.mask.map(|m| &m[r0..r1]),
        }
    }

    pub(crate) fn keep(&self, j: usize) -> bool {
        self.mask.is_none_or(|m| m[j])
    }
    pub(crate) fn q_row(&self, i: usize) -> &[f64] {
        &self.q[i * self.d..(i + 1) * self.d]
    }
    pub(crate) fn k_row(&self, i: usize) -> &[f64] {
        &self.k[i * self.d..(i + 1) * self.d]
    }
    pub(crate) fn v_row(&self, i: usize) -> &[f64] {
        &self.v[i * self.dv..(i + 1) * self.dv]
    }
}

/// Gradients of one head.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeadGrads {
    /// ∂ℒ/∂Q (L×d).
    pub dq: Vec<f64>,
    /// ∂ℒ/∂K (L_kv×d).
    pub dk: Vec<f64>,
    /// ∂ℒ/∂V (L_kv×d_v).
    pub dv: Vec<f64>,
    /// Parameter gradients of a learned map.
    pub params: Option<ParamGradsF64>,
}

/// Query features: each row against its own log-scale. Returns (L×M features, per-row c).
pub(crate) fn query_features(map: &FeatureMap, h: &Head<'_>) -> (Vec<f64>, Vec<f64>) {
    let mf = map.feature_dim(h.d);
    let mut phi = vec![0.0; h.len * mf];
    let mut c = vec![0.0; h.len];
    for i in 0..h.len {
        c[i] = map.log_scale(h.q_row(i));
        map.features(h.q_row(i), c[i], &mut phi[i * mf..(i + 1) * mf]);
    }
    (phi, c)
}

/// The guarded denominator: |R| ≤ δ becomes R + 2δ.
pub(crate) fn guard(r: f64, delta: f64) -> f64 {
    if guard_fires(r, delta) { r + 2.0 * delta } else { r }
}

/// Whether the guard changes R. A row whose guard does not fire is invariant to the scale of
/// its query features (its output is a ratio of two sums linear in them).
pub(crate) fn guard_fires(r: f64, delta: f64) -> bool {
    delta > 0.0 && r.abs() <= delta
}

/// exp(c_old − c_new), with 1 for equal values (also when both are −∞: no key seen yet).
pub(crate) fn decay(c_old: f64, c_new: f64) -> f64 {
    if c_old == c_new { 1.0 } else { (c_old - c_new).exp() }
}

/// Cotangents of the numerator and denominator of row `i`: (x̄ = G/R, ḡ = −⟨G, out⟩/R), both
/// zero for a zero denominator (whose output row is defined as zero).
pub(crate) fn row_cotangents(g: &[f64], out: &[f64], r: f64) -> (Vec<f64>, f64) {
    if r == 0.0 {
        return (vec![0.0; g.len()], 0.0);
    }
    let xbar = g.iter().map(|&x| x / r).collect();
    let gbar = -g.iter().zip(out).map(|(a, b)| a * b).sum::<f64>() / r;
    (xbar, gbar)
}

/// A row is *at risk* when its denominator is tiny in absolute terms or next to its own
/// features, |R_i| < 1e-100·max(1, max_f |q'_if|). That happens only at extreme input
/// magnitudes, when features underflow towards the subnormal range or a query's features and the
/// keys' features live at scales hundreds of orders of magnitude apart: the
/// cotangents q'_i/R_i and G_i/R_i would then overflow before the feature-map backward multiplies
/// them by features that are just as tiny (the true gradient is finite). Such rows are
/// differentiated pair by pair instead, forming every product with the features before dividing
/// by R_i ([`add_scaled_backward`]). Ordinary inputs never take this path.
pub(crate) fn at_risk(qf: &[f64], r: f64) -> bool {
    const RISK_RATIO: f64 = 1e-100;
    r != 0.0 && r.abs() < RISK_RATIO * qf.iter().fold(1.0f64, |a, &b| a.max(b.abs()))
}

/// dx += (J_φ(x; c)ᵀ·dphi / divisor)·factor, and the parameter gradients likewise: the
/// product with the features is formed before the division, so a tiny divisor cannot overflow.
/// `invariant`: the token is a query whose output does not depend on its feature scale (see
/// [`FeatureMap::features_backward_scale_invariant`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_scaled_backward(
    map: &FeatureMap,
    x: &[f64],
    c: f64,
    dphi: &[f64],
    divisor: f64,
    factor: f64,
    invariant: bool,
    dx: &mut [f64],
    params: &mut Option<ParamGradsF64>,
) {
    let mut tmp = vec![0.0; x.len()];
    let mut tmp_params = params.as_ref().and_then(|_| map.param_grads_f64());
    if invariant {
        map.features_backward_scale_invariant(x, c, dphi, &mut tmp, tmp_params.as_mut());
    } else {
        map.features_backward(x, c, dphi, &mut tmp, tmp_params.as_mut());
    }
    let add = |acc: &mut [f64], part: &[f64]| acc.iter_mut().zip(part).for_each(|(a, &p)| *a += p / divisor * factor);
    add(dx, &tmp);
    if let (Some(acc), Some(part)) = (params.as_mut(), tmp_params) {
        add(&mut acc.w, &part.w);
        if let (Some(a), Some(p)) = (acc.bias.as_mut(), part.bias.as_ref()) {
            add(a, p);
        }
        if let (Some(a), Some(p)) = (acc.w_gate.as_mut(), part.w_gate.as_ref()) {
            add(a, p);
        }
    }
}

/// Backward through the feature map for every kept row of `x` (L×d) given per-row stabilisers;
/// rows flagged in `invariant` (queries whose guard did not fire) take the scale-invariant form.
#[allow(clippy::too_many_arguments)]
pub(crate) fn features_backward_rows(
    map: &FeatureMap,
    x: &[f64],
    d: usize,
    c: &[f64],
    keep: Option<&[bool]>,
    invariant: Option<&[bool]>,
    dphi: &[f64],
    params: &mut Option<ParamGradsF64>,
) -> Vec<f64> {
    let mf = dphi.len() / c.len();
    let mut dx = vec![0.0; x.len()];
    // Padded rows have no features and no gradient (their stabiliser may be undefined).
    for i in (0..c.len()).filter(|&i| keep.is_none_or(|k| k[i])) {
        let (xi, gi, dxi) = (&x[i * d..(i + 1) * d], &dphi[i * mf..(i + 1) * mf], &mut dx[i * d..(i + 1) * d]);
        if invariant.is_some_and(|v| v[i]) {
            map.features_backward_scale_invariant(xi, c[i], gi, dxi, params.as_mut());
        } else {
            map.features_backward(xi, c[i], gi, dxi, params.as_mut());
        }
    }
    dx
}

#[cfg(test)]
mod tests;
