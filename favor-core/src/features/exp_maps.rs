//! The exponential (softmax-kernel) maps in f64: positive, hyperbolic, trigonometric.
//!
//! Notation: x̃ = d^{-1/4}x, a_j = ω_jᵀx̃, h = ‖x̃‖²/2.
//! * positive:    φ_j = m^{-1/2}(exp(a_j − h − c) + ε)
//! * hyperbolic:  φ = (2m)^{-1/2}[exp(a − h − c) + ε, exp(−a − h − c) + ε]
//! * trigonometric: φ = m^{-1/2}[cos a, sin a]·exp(h − c)
//!
//! Backward with c constant, writing ψ for the exp part of each feature and ḡ = ∂ℒ/∂φ:
//! ∂ℒ/∂a and ∂ℒ/∂h follow per map, then ∂ℒ/∂x = d^{-1/4}(Wᵀ ∂ℒ/∂a + x̃ ∂ℒ/∂h).

use super::data_normalizer;
use crate::Projection;

fn normalized(d: usize, x: &[f64]) -> Vec<f64> {
    let s = data_normalizer(d);
    x.iter().map(|&v| v * s).collect()
}

/// a = W x̃.
fn project(p: &Projection, xt: &[f64]) -> Vec<f64> {
    (0..p.m()).map(|j| p.row(j).iter().zip(xt).map(|(&w, &x)| w as f64 * x).sum()).collect()
}

/// h = ‖x̃‖²/2.
pub(super) fn half_sq_norm(d: usize, x: &[f64]) -> f64 {
    normalized(d, x).iter().map(|v| v * v).sum::<f64>() / 2.0
}

/// dx += d^{-1/4}(Wᵀ da + x̃ dh).
fn chain_to_x(p: &Projection, xt: &[f64], da: &[f64], dh: f64, dx: &mut [f64]) {
    let s = data_normalizer(p.d());
    for (t, dxt) in dx.iter_mut().enumerate() {
        let wt_da: f64 = (0..p.m()).map(|j| p.row(j)[t] as f64 * da[j]).sum();
        *dxt += s * (wt_da + xt[t] * dh);
    }
}

pub(super) fn positive_log_scale(p: &Projection, x: &[f64]) -> f64 {
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    project(p, &xt).into_iter().fold(f64::NEG_INFINITY, f64::max) - h
}

pub(super) fn hyperbolic_log_scale(p: &Projection, x: &[f64]) -> f64 {
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    project(p, &xt).into_iter().map(f64::abs).fold(f64::NEG_INFINITY, f64::max) - h
}

pub(super) fn positive(p: &Projection, eps: f32, x: &[f64], c: f64, out: &mut [f64]) {
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = (p.m() as f64).sqrt().recip();
    for (o, a) in out.iter_mut().zip(project(p, &xt)) {
        *o = ratio * ((a - h - c).exp() + eps as f64);
    }
}

pub(super) fn positive_backward(p: &Projection, x: &[f64], c: f64, g: &[f64], dx: &mut [f64]) {
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = (p.m() as f64).sqrt().recip();
    let da: Vec<f64> = project(p, &xt).iter().zip(g).map(|(&a, &gj)| gj * ratio * (a - h - c).exp()).collect();
    let dh = -da.iter().sum::<f64>();
    chain_to_x(p, &xt, &da, dh, dx);
}

pub(super) fn hyperbolic(p: &Projection, eps: f32, x: &[f64], c: f64, out: &mut [f64]) {
    let m = p.m();
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = ((2 * m) as f64).sqrt().recip();
    for (j, a) in project(p, &xt).into_iter().enumerate() {
        out[j] = ratio * ((a - h - c).exp() + eps as f64);
        out[m + j] = ratio * ((-a - h - c).exp() + eps as f64);
    }
}

pub(super) fn hyperbolic_backward(p: &Projection, x: &[f64], c: f64, g: &[f64], dx: &mut [f64]) {
    let m = p.m();
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let ratio = ((2 * m) as f64).sqrt().recip();
    let mut da = vec![0.0; m];
    let mut dh = 0.0;
    for (j, a) in project(p, &xt).into_iter().enumerate() {
        let plus = g[j] * ratio * (a - h - c).exp();
        let minus = g[m + j] * ratio * (-a - h - c).exp();
        da[j] = plus - minus;
        dh -= plus + minus;
    }
    chain_to_x(p, &xt, &da, dh, dx);
}

pub(super) fn trigonometric(p: &Projection, x: &[f64], c: f64, out: &mut [f64]) {
    let m = p.m();
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let scale = (h - c).exp() / (m as f64).sqrt();
    for (j, a) in project(p, &xt).into_iter().enumerate() {
        out[j] = scale * a.cos();
        out[m + j] = scale * a.sin();
    }
}

pub(super) fn trigonometric_backward(p: &Projection, x: &[f64], c: f64, g: &[f64], dx: &mut [f64]) {
    let m = p.m();
    let xt = normalized(p.d(), x);
    let h = xt.iter().map(|v| v * v).sum::<f64>() / 2.0;
    let scale = (h - c).exp() / (m as f64).sqrt();
    let mut da = vec![0.0; m];
    let mut dh = 0.0;
    for (j, a) in project(p, &xt).into_iter().enumerate() {
        let (s, co) = a.sin_cos();
        da[j] = scale * (g[m + j] * co - g[j] * s);
        dh += scale * (g[j] * co + g[m + j] * s);
    }
    chain_to_x(p, &xt, &da, dh, dx);
}
