//! Generalized kernel features φ(x) = f(scale·W x̂) + κ (or f(x̂) + κ without a projection).

use crate::Projection;

/// Elementwise nonlinearity of [`super::FeatureMap::Generalized`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elementwise {
    /// max(y, 0): Performer-ReLU.
    Relu,
    /// ELU(y) + 1 = y + 1 for y > 0, e^y otherwise: positive, the linear-transformer map.
    EluPlusOne,
    /// ln(1 + e^y).
    Softplus,
}

impl Elementwise {
    /// f(y) in f64.
    pub fn apply(self, y: f64) -> f64 {
        match self {
            Elementwise::Relu => y.max(0.0),
            Elementwise::EluPlusOne => {
                if y > 0.0 {
                    y + 1.0
                } else {
                    y.exp()
                }
            }
            Elementwise::Softplus => softplus(y),
        }
    }

    /// f'(y) in f64 (0 at the ReLU kink).
    pub fn derivative(self, y: f64) -> f64 {
        match self {
            Elementwise::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Elementwise::EluPlusOne => {
                if y > 0.0 {
                    1.0
                } else {
                    y.exp()
                }
            }
            Elementwise::Softplus => sigmoid(y),
        }
    }
}

/// ln(1 + e^y) without overflow for large y or loss for very negative y.
pub(crate) fn softplus(y: f64) -> f64 {
    y.max(0.0) + (-y.abs()).exp().ln_1p()
}

/// 1/(1 + e^{-y}) without overflow.
pub(crate) fn sigmoid(y: f64) -> f64 {
    if y >= 0.0 {
        1.0 / (1.0 + (-y).exp())
    } else {
        let e = y.exp();
        e / (1.0 + e)
    }
}

/// y = scale·W(nrm·x), or scale·nrm·x without a projection.
fn pre_activation(p: Option<&Projection>, nrm: f64, scale: f32, x: &[f64]) -> Vec<f64> {
    let s = scale as f64 * nrm;
    match p {
        Some(p) => p.rows().map(|w| s * w.iter().zip(x).map(|(&w, &v)| w as f64 * v).sum::<f64>()).collect(),
        None => x.iter().map(|&v| s * v).collect(),
    }
}

pub(super) fn forward(
    f: Elementwise,
    p: Option<&Projection>,
    nrm: f64,
    scale: f32,
    kappa: f32,
    x: &[f64],
    out: &mut [f64],
) {
    for (o, y) in out.iter_mut().zip(pre_activation(p, nrm, scale, x)) {
        *o = f.apply(y) + kappa as f64;
    }
}

pub(super) fn backward(
    f: Elementwise,
    p: Option<&Projection>,
    nrm: f64,
    scale: f32,
    x: &[f64],
    g: &[f64],
    dx: &mut [f64],
) {
    let s = scale as f64 * nrm;
    let dy: Vec<f64> = pre_activation(p, nrm, scale, x).iter().zip(g).map(|(&y, &gj)| gj * f.derivative(y)).collect();
    match p {
        Some(p) => {
            for (t, dxt) in dx.iter_mut().enumerate() {
                *dxt += s * p.rows().zip(&dy).map(|(w, &g)| w[t] as f64 * g).sum::<f64>();
            }
        }
        None => dx.iter_mut().zip(&dy).for_each(|(d, &v)| *d += s * v),
    }
}
