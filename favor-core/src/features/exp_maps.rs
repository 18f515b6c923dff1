//! The exponential (softmax-kernel) maps in f64: positive, hyperbolic, trigonometric.
//!
//! Notation: x̃ = √τ·x (τ the softmax scale, 1/√d by default), a_j = ω_jᵀx̃, h = ‖x̃‖²/2, s the token's own log-scale.
//! * positive:    φ_j = m^{-1/2}(exp(a_j − h − c) + ε·exp(s − c)), s = max_j a_j − h
//! * hyperbolic:  φ = (2m)^{-1/2}[exp(±a − h − c) + ε·exp(s − c)], s = max_j |a_j| − h
//! * trigonometric: φ = m^{-1/2}[cos a, sin a]·exp(h − c)
//!
//! Backward with c constant, writing ψ for the exp part of each feature and ḡ = ∂ℒ/∂φ:
//! ∂ℒ/∂a and ∂ℒ/∂h follow per map (the ε floor through s), then
//! ∂ℒ/∂x = √τ(Wᵀ ∂ℒ/∂a + x̃ ∂ℒ/∂h). h scales every feature of the token by exp(−h), so for a
//! token whose use is invariant to its own feature scale (a query) ∂ℒ/∂h is exactly zero: the
//! `invariant` backward leaves it out instead of forming it as a sum that cancels (whose rounding
//! residual, multiplied by x̃, would dominate the gradient of large-norm queries).

use crate::Projection;

#[cfg(test)]
thread_local! {
    /// Test switch: drop the gradient through the ε floor (the stop-gradient backward favor had
    /// before), so that the exactness tests can show they fail on such a backward.
    pub(crate) static DROP_FLOOR_GRADIENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the backward includes ∂ℒ/∂s (always, outside the tests' deliberately broken variant).
fn floor_gradient() -> bool {
    #[cfg(test)]
    {
        !DROP_FLOOR_GRADIENT.get()
    }
    #[cfg(not(test))]
    {
        true
    }
}

/// x̃ = nrm·x (nrm = √τ, the square root of the softmax scale).
fn normalized(nrm: f64, x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v * nrm).collect()
}

/// a = W x̃.
fn project(p: &Projection, xt: &[f64]) -> Vec<f64> {
    p.rows().map(|w| w.iter().zip(xt).map(|(&w, &x)| w as f64 * x).sum()).collect()
}

/// h = ‖x̃‖²/2.
pub(super) fn half_sq_norm(nrm: f64, x: &[f64]) -> f64 {
    normalized(nrm, x).iter().map(|v| v * v).sum::<f64>() / 2.0
}

/// dx += nrm·(Wᵀ da + x̃ dh).
fn chain_to_x(p: &Projection, nrm: f64, xt: &[f64], da: &[f64], dh: f64, dx: &mut [f64]) {
    let s = nrm;
    for (t, dxt) in dx.iter_mut().enumerate() {
        let wt_da: f64 = p.rows().zip(da).map(|(w, &a)| w[t] as f64 * a).sum();
        *dxt += s * (wt_da + xt[t] * dh);
    }
}

/// The largest projection (or |projection| for the hyperbolic map) and its feature index,
/// first one on ties: the token's own log-scale is s = a_{f*} − h (resp. |a_{f*}| − h).
fn arg_max(a: &[f64], abs: bool) -> (usize, f64) {
    let key = |v: f64| if abs { v.abs() } else { v };
    a.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &v)| if key(v) > bv { (i, key(v)) } else { (bi, bv) })
}

pub(super) fn positive_log_scale(p: &Projection, nrm: f64, x: &[f64]) -> f64 {
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    arg_max(&project(p, &xt), false).1 - h
}

pub(super) fn hyperbolic_log_scale(p: &Projection, nrm: f64, x: &[f64]) -> f64 {
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    arg_max(&project(p, &xt), true).1 - h
}

/// φ_f = ratio·(e^{a_f − h − c} + ε·e^{s − c}) with the token's own log-scale s.
pub(super) fn positive(p: &Projection, nrm: f64, eps: f32, x: &[f64], c: f64, out: &mut [f64]) {
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = (p.m() as f64).sqrt().recip();
    let a = project(p, &xt);
    let floor = eps as f64 * (arg_max(&a, false).1 - h - c).exp();
    for (o, a) in out.iter_mut().zip(a) {
        *o = ratio * ((a - h - c).exp() + floor);
    }
}

/// With ψ_f = ratio·e^{a_f − h − c}: ∂ℒ/∂a_f = ḡ_f ψ_f, ∂ℒ/∂h = −Σ_f ḡ_f ψ_f, and the ε floor
/// ratio·ε·e^{s − c} adds ∂ℒ/∂s = ratio·ε·e^{s − c}·Σ_f ḡ_f to a_{f*} and subtracts it from h.
#[allow(clippy::too_many_arguments)] // the map's parameters, the token, its stabiliser and the gradient
pub(super) fn positive_backward(
    p: &Projection,
    nrm: f64,
    eps: f32,
    x: &[f64],
    c: f64,
    g: &[f64],
    invariant: bool,
    dx: &mut [f64],
) {
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = (p.m() as f64).sqrt().recip();
    let a = project(p, &xt);
    let mut da: Vec<f64> = a.iter().zip(g).map(|(&a, &gj)| gj * ratio * (a - h - c).exp()).collect();
    let mut dh = -da.iter().sum::<f64>();
    let (star, amax) = arg_max(&a, false);
    if floor_gradient() {
        let ds = ratio * eps as f64 * (amax - h - c).exp() * g.iter().sum::<f64>();
        da[star] += ds;
        dh -= ds;
    }
    chain_to_x(p, nrm, &xt, &da, if invariant { 0.0 } else { dh }, dx);
}

/// φ = (2m)^{-1/2}[e^{a − h − c} + ε·e^{s − c}, e^{−a − h − c} + ε·e^{s − c}].
pub(super) fn hyperbolic(p: &Projection, nrm: f64, eps: f32, x: &[f64], c: f64, out: &mut [f64]) {
    let m = p.m();
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = ((2 * m) as f64).sqrt().recip();
    let a = project(p, &xt);
    let floor = eps as f64 * (arg_max(&a, true).1 - h - c).exp();
    for (j, a) in a.into_iter().enumerate() {
        out[j] = ratio * ((a - h - c).exp() + floor);
        out[m + j] = ratio * ((-a - h - c).exp() + floor);
    }
}

/// As [`positive_backward`], with s = |a_{f*}| − h: ∂ℒ/∂s goes to a_{f*} with the sign of a_{f*}.
#[allow(clippy::too_many_arguments)] // the map's parameters, the token, its stabiliser and the gradient
pub(super) fn hyperbolic_backward(
    p: &Projection,
    nrm: f64,
    eps: f32,
    x: &[f64],
    c: f64,
    g: &[f64],
    invariant: bool,
    dx: &mut [f64],
) {
    let m = p.m();
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = ((2 * m) as f64).sqrt().recip();
    let a = project(p, &xt);
    let mut da = vec![0.0; m];
    let mut dh = 0.0;
    for (j, &a) in a.iter().enumerate() {
        let plus = g[j] * ratio * (a - h - c).exp();
        let minus = g[m + j] * ratio * (-a - h - c).exp();
        da[j] = plus - minus;
        dh -= plus + minus;
    }
    let (star, amax) = arg_max(&a, true);
    if floor_gradient() {
        let ds = ratio * eps as f64 * (amax - h - c).exp() * g.iter().sum::<f64>();
        da[star] += a[star].signum() * ds;
        dh -= ds;
    }
    chain_to_x(p, nrm, &xt, &da, if invariant { 0.0 } else { dh }, dx);
}

pub(super) fn trigonometric(p: &Projection, nrm: f64, x: &[f64], c: f64, out: &mut [f64]) {
    let m = p.m();
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let scale = (h - c).exp() / (m as f64).sqrt();
    for (j, a) in project(p, &xt).into_iter().enumerate() {
        out[j] = scale * a.cos();
        out[m + j] = scale * a.sin();
    }
}

pub(super) fn trigonometric_backward(
    p: &Projection,
    nrm: f64,
    x: &[f64],
    c: f64,
    g: &[f64],
    invariant: bool,
    dx: &mut [f64],
) {
    let m = p.m();
    let xt = normalized(nrm, x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let scale = (h - c).exp() / (m as f64).sqrt();
    let mut da = vec![0.0; m];
    let mut dh = 0.0;
    for (j, a) in project(p, &xt).into_iter().enumerate() {
        let (s, co) = a.sin_cos();
        da[j] = scale * (g[m + j] * co - g[j] * s);
        dh += scale * (g[j] * co + g[m + j] * s);
    }
    chain_to_x(p, nrm, &xt, &da, if invariant { 0.0 } else { dh }, dx);
}
