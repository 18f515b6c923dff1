//! Causal FAVOR attention in f64 by prefix sums with a running-maximum stabiliser.

use super::{
    Head, HeadGrads, add_scaled_backward, at_risk, decay, features_backward_rows, guard, guard_fires, query_features,
    row_cotangents,
};
use crate::validate::{checked_len, try_zeroed};
use crate::{FeatureMap, Result};

/// The recurrent state of one (batch, head): S (M×d_v), z (M) and the running key maximum c,
/// with S and z expressed relative to exp(c). A fresh state has c = −∞ (no key seen).
#[derive(Debug, Clone, PartialEq)]
pub struct CausalState {
    /// Feature count M.
    pub mf: usize,
    /// Value dimension d_v.
    pub dv: usize,
    /// Σ exp(c_j − c)·k'_j v_jᵀ, row-major M×d_v.
    pub s: Vec<f64>,
    /// Σ exp(c_j − c)·k'_j.
    pub z: Vec<f64>,
    /// Running maximum of the key log-scales.
    pub c: f64,
    /// Tokens consumed so far.
    pub tokens: usize,
}

impl CausalState {
    /// An empty state for `mf` features and value dimension `dv`;
    /// [`SizeOverflow`](crate::FavorError::SizeOverflow) or
    /// [`OutOfMemory`](crate::FavorError::OutOfMemory) (never an abort) when its M×d_v sums
    /// cannot be allocated.
    pub fn new(mf: usize, dv: usize) -> Result<Self> {
        let s = try_zeroed("state", checked_len("state", &[mf, dv])?)?;
        Ok(Self { mf, dv, s, z: try_zeroed("state", mf)?, c: f64::NEG_INFINITY, tokens: 0 })
    }

    /// [`CausalState::new`] without the error, for the whole-sequence functions below: their
    /// signatures, shared with other backends' f64 paths, have no error to return.
    fn empty(mf: usize, dv: usize) -> Self {
        Self { mf, dv, s: vec![0.0; mf * dv], z: vec![0.0; mf], c: f64::NEG_INFINITY, tokens: 0 }
    }

    /// Add key j: raise the maximum if needed (rescaling the state), then add k'_j v_jᵀ.
    /// Returns the key's features k'_j and its stabiliser c_j.
    fn push_key(&mut self, map: &FeatureMap, k: &[f64], v: &[f64]) -> (Vec<f64>, f64) {
        let s_j = map.log_scale(k);
        if s_j > self.c {
            let f = decay(self.c, s_j);
            self.s.iter_mut().for_each(|x| *x *= f);
            self.z.iter_mut().for_each(|x| *x *= f);
            self.c = s_j;
        }
        let mut kf = vec![0.0; self.mf];
        map.features(k, self.c, &mut kf);
        for (f, &kff) in kf.iter().enumerate() {
            self.z[f] += kff;
            for (s, &ve) in self.s[f * self.dv..(f + 1) * self.dv].iter_mut().zip(v) {
                *s += kff * ve;
            }
        }
        (kf, self.c)
    }

    /// Read out query i against the current state: (output row, guarded denominator).
    fn read(&self, qf: &[f64], delta: f64) -> (Vec<f64>, f64) {
        let r = guard(self.raw_denominator(qf), delta);
        let mut out = vec![0.0; self.dv];
        if r != 0.0 {
            for (e, o) in out.iter_mut().enumerate() {
                *o = (0..self.mf).map(|f| qf[f] * self.s[f * self.dv + e]).sum::<f64>() / r;
            }
        }
        (out, r)
    }

    /// q'·z before the guard.
    fn raw_denominator(&self, qf: &[f64]) -> f64 {
        qf.iter().zip(&self.z).map(|(a, b)| a * b).sum()
    }

    /// Consume a chunk of tokens (`h.len` of them), writing their outputs: chunked prefill, and
    /// with one token, a decoding step. Padded keys are skipped but their queries are answered.
    pub fn advance(&mut self, map: &FeatureMap, delta: f64, h: &Head<'_>) -> Vec<f64> {
        let (qf, _) = query_features(map, h);
        let mut out = vec![0.0; h.len * h.dv];
        for i in 0..h.len {
            if h.keep(i) {
                self.push_key(map, h.k_row(i), h.v_row(i));
            }
            let (o, _) = self.read(&qf[i * self.mf..(i + 1) * self.mf], delta);
            out[i * h.dv..(i + 1) * h.dv].copy_from_slice(&o);
        }
        self.tokens += h.len;
        out
    }
}

/// Output (L×d_v) of causal attention with denominator guard `delta`; `h.kv_len` must equal
/// `h.len` (query i sees keys 0..=i), as [`crate::Problem::validate`] ensures.
pub fn causal_forward(map: &FeatureMap, delta: f64, h: &Head<'_>) -> Vec<f64> {
    debug_assert_eq!(h.kv_len, h.len, "causal attention with unequal lengths");
    CausalState::empty(map.feature_dim(h.d), h.dv).advance(map, delta, h)
}

/// Gradients of causal attention given ∂ℒ/∂out (L×d_v): a forward sweep that recomputes the
/// prefix states for dq', then a reverse sweep of decayed suffix sums for dk' and dv
/// (`h.kv_len == h.len`, as for [`causal_forward`]).
pub fn causal_backward(map: &FeatureMap, delta: f64, h: &Head<'_>, dout: &[f64]) -> HeadGrads {
    debug_assert_eq!(h.kv_len, h.len, "causal attention with unequal lengths");
    let mf = map.feature_dim(h.d);
    let (qf, qc) = query_features(map, h);
    let mut state = CausalState::empty(mf, h.dv);
    let mut kf = vec![0.0; h.len * mf];
    let mut kc = vec![f64::NEG_INFINITY; h.len];
    let mut xbar = vec![0.0; h.len * h.dv];
    let mut gbar = vec![0.0; h.len];
    let mut dqf = vec![0.0; h.len * mf];
    let mut invariant = vec![true; h.len];
    // Rows at risk (see `at_risk`): (i, R_i, out_i, y_i = S_i G_i − z_i⟨G_i, out_i⟩).
    let mut risky = Vec::new();
    for i in 0..h.len {
        if h.keep(i) {
            let (f, _) = state.push_key(map, h.k_row(i), h.v_row(i));
            kf[i * mf..(i + 1) * mf].copy_from_slice(&f);
        }
        kc[i] = state.c;
        let q = &qf[i * mf..(i + 1) * mf];
        invariant[i] = !guard_fires(state.raw_denominator(q), delta);
        let (out, r) = state.read(q, delta);
        let g = &dout[i * h.dv..(i + 1) * h.dv];
        if at_risk(q, r) {
            let g_out: f64 = g.iter().zip(&out).map(|(a, b)| a * b).sum();
            let y: Vec<f64> = (0..mf)
                .map(|f| (0..h.dv).map(|e| state.s[f * h.dv + e] * g[e]).sum::<f64>() - state.z[f] * g_out)
                .collect();
            risky.push((i, r, out, y));
            continue;
        }
        let (xb, gb) = row_cotangents(g, &out, r);
        for f in 0..mf {
            let s_x: f64 = (0..h.dv).map(|e| state.s[f * h.dv + e] * xb[e]).sum();
            dqf[i * mf + f] = s_x + state.z[f] * gb;
        }
        xbar[i * h.dv..(i + 1) * h.dv].copy_from_slice(&xb);
        gbar[i] = gb;
    }
    // Reverse sweep: P_j = q'_j x̄_jᵀ + exp(c_j − c_{j+1}) P_{j+1}, likewise p with ḡ.
    let mut p_mat = vec![0.0; mf * h.dv];
    let mut p_vec = vec![0.0; mf];
    let mut dkf = vec![0.0; h.len * mf];
    let mut dv = vec![0.0; h.len * h.dv];
    for j in (0..h.len).rev() {
        if j + 1 < h.len {
            let f = decay(kc[j], kc[j + 1]);
            p_mat.iter_mut().for_each(|x| *x *= f);
            p_vec.iter_mut().for_each(|x| *x *= f);
        }
        for f in 0..mf {
            let q = qf[j * mf + f];
            p_vec[f] += q * gbar[j];
            for e in 0..h.dv {
                p_mat[f * h.dv + e] += q * xbar[j * h.dv + e];
            }
        }
        if h.keep(j) {
            for f in 0..mf {
                dkf[j * mf + f] = (0..h.dv).map(|e| p_mat[f * h.dv + e] * h.v_row(j)[e]).sum::<f64>() + p_vec[f];
                for e in 0..h.dv {
                    dv[j * h.dv + e] += p_mat[f * h.dv + e] * kf[j * mf + f];
                }
            }
        }
    }
    let mut params = map.param_grads_f64();
    let mut dq = features_backward_rows(map, h.q, h.d, &qc, None, Some(&invariant), &dqf, &mut params);
    let mut dk = features_backward_rows(map, h.k, h.d, &kc, h.mask, None, &dkf, &mut params);
    for (i, r, out, y) in risky {
        let g = &dout[i * h.dv..(i + 1) * h.dv];
        let q = &qf[i * mf..(i + 1) * mf];
        let g_out: f64 = g.iter().zip(&out).map(|(a, b)| a * b).sum();
        let dqi = &mut dq[i * h.d..(i + 1) * h.d];
        add_scaled_backward(map, h.q_row(i), qc[i], &y, r, 1.0, invariant[i], dqi, &mut params);
        // Key j ≤ i enters query i with weight exp(c_j − c_i), folded into the query features
        // before anything is divided by R_i (the decay may be what makes the product tiny).
        for j in (0..=i).filter(|&j| h.keep(j)) {
            let w_ij = decay(kc[j], kc[i]);
            let qw: Vec<f64> = q.iter().map(|&x| x * w_ij).collect();
            let t = g.iter().zip(h.v_row(j)).map(|(a, b)| a * b).sum::<f64>() - g_out;
            let dkj = &mut dk[j * h.d..(j + 1) * h.d];
            add_scaled_backward(map, h.k_row(j), kc[j], &qw, r, t, false, dkj, &mut params);
            let w = qw.iter().zip(&kf[j * mf..(j + 1) * mf]).map(|(a, b)| a * b).sum::<f64>() / r;
            for e in 0..h.dv {
                dv[j * h.dv + e] += w * g[e];
            }
        }
    }
    HeadGrads { dq, dk, dv, params }
}
