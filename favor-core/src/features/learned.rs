//! Learned feature maps (Yorsh & Kovalenko 2022): softplus(xWᵀ + b) and the gated
//! softplus(xW_fᵀ) ⊙ σ(xW_gᵀ). No randomness and no redraw; W is a trainable parameter and the
//! backward returns ∂ℒ/∂W (softplus' = σ) as well as ∂ℒ/∂x.

use super::ParamGradsF64;
use super::generalized::{sigmoid, softplus};
use crate::{FavorError, Result};

/// A linear layer y = xWᵀ + b with W row-major m×d.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Output features m.
    pub m: usize,
    /// Input dimension d.
    pub d: usize,
    /// Row-major m×d weights.
    pub w: Vec<f32>,
    /// Optional bias of length m.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// A linear layer from its weights (and optional bias).
    pub fn new(m: usize, d: usize, w: Vec<f32>, bias: Option<Vec<f32>>) -> Result<Self> {
        let l = Self { m, d, w, bias };
        l.validate("w")?;
        Ok(l)
    }

    pub(super) fn validate(&self, name: &'static str) -> Result<()> {
        if self.m == 0 {
            return Err(FavorError::ZeroSize { arg: "m" });
        }
        if self.d == 0 {
            return Err(FavorError::ZeroSize { arg: "d" });
        }
        if self.w.len() != crate::validate::checked_len(name, &[self.m, self.d])? {
            return Err(FavorError::shape(name, format!("{}×{} elements", self.m, self.d), self.w.len()));
        }
        if let Some(i) = self.w.iter().position(|x| !x.is_finite()) {
            return Err(FavorError::NonFinite { arg: name, index: i, value: self.w[i] });
        }
        super::check_entries(name, &self.w)?;
        if let Some(b) = &self.bias {
            if b.len() != self.m {
                return Err(FavorError::shape("bias", self.m, b.len()));
            }
            if let Some(i) = b.iter().position(|x| !x.is_finite()) {
                return Err(FavorError::NonFinite { arg: "bias", index: i, value: b[i] });
            }
            super::check_entries("bias", b)?;
        }
        Ok(())
    }

    fn apply(&self, x: &[f64]) -> Vec<f64> {
        (0..self.m)
            .map(|j| {
                let b = self.bias.as_ref().map_or(0.0, |b| b[j] as f64);
                b + self.w[j * self.d..(j + 1) * self.d].iter().zip(x).map(|(&w, &v)| w as f64 * v).sum::<f64>()
            })
            .collect()
    }

    /// dx += Wᵀ dy; dW += dy xᵀ; db += dy.
    fn backward(&self, x: &[f64], dy: &[f64], dx: &mut [f64], dw: Option<&mut [f64]>, db: Option<&mut [f64]>) {
        for (t, dxt) in dx.iter_mut().enumerate() {
            *dxt += (0..self.m).map(|j| self.w[j * self.d + t] as f64 * dy[j]).sum::<f64>();
        }
        if let Some(dw) = dw {
            for j in 0..self.m {
                for t in 0..self.d {
                    dw[j * self.d + t] += dy[j] * x[t];
                }
            }
        }
        if let Some(db) = db {
            db.iter_mut().zip(dy).for_each(|(a, &b)| *a += b);
        }
    }
}

/// Parameters of the gated map (both branches without bias).
#[derive(Debug, Clone, PartialEq)]
pub struct GatedSoftplusParams {
    /// Filter branch W_f (softplus).
    pub filter: Linear,
    /// Gate branch W_g (sigmoid).
    pub gate: Linear,
}

pub(super) fn softplus_forward(l: &Linear, x: &[f64], out: &mut [f64]) {
    for (o, y) in out.iter_mut().zip(l.apply(x)) {
        *o = softplus(y);
    }
}

pub(super) fn softplus_backward(l: &Linear, x: &[f64], g: &[f64], dx: &mut [f64], grads: Option<&mut ParamGradsF64>) {
    let dy: Vec<f64> = l.apply(x).iter().zip(g).map(|(&y, &gj)| gj * sigmoid(y)).collect();
    match grads {
        Some(pg) => l.backward(x, &dy, dx, Some(&mut pg.w), pg.bias.as_deref_mut()),
        None => l.backward(x, &dy, dx, None, None),
    }
}

pub(super) fn gated_forward(p: &GatedSoftplusParams, x: &[f64], out: &mut [f64]) {
    let yf = p.filter.apply(x);
    let yg = p.gate.apply(x);
    for j in 0..out.len() {
        out[j] = softplus(yf[j]) * sigmoid(yg[j]);
    }
}

pub(super) fn gated_backward(
    p: &GatedSoftplusParams,
    x: &[f64],
    g: &[f64],
    dx: &mut [f64],
    grads: Option<&mut ParamGradsF64>,
) {
    let yf = p.filter.apply(x);
    let yg = p.gate.apply(x);
    let mut dyf = vec![0.0; yf.len()];
    let mut dyg = vec![0.0; yg.len()];
    for j in 0..yf.len() {
        let sg = sigmoid(yg[j]);
        dyf[j] = g[j] * sg * sigmoid(yf[j]);
        dyg[j] = g[j] * softplus(yf[j]) * sg * (1.0 - sg);
    }
    match grads {
        Some(pg) => {
            p.filter.backward(x, &dyf, dx, Some(&mut pg.w), None);
            p.gate.backward(x, &dyg, dx, pg.w_gate.as_deref_mut(), None);
        }
        None => {
            p.filter.backward(x, &dyf, dx, None, None);
            p.gate.backward(x, &dyg, dx, None, None);
        }
    }
}
