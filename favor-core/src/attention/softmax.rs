//! Exact softmax attention in f64: out_i = Σ_j softmax_j(q_iᵀk_j/√d)·v_j over the unpadded keys
//! j (and j ≤ i when causal). The accuracy reference for FAVOR and its speed baseline's oracle.
//! A row that sees no key outputs zero. Scores are shifted by their row maximum, so any finite
//! input gives a finite output.

use super::{Head, HeadGrads};

fn visible<'a>(h: &'a Head<'_>, causal: bool, i: usize) -> impl Iterator<Item = usize> + 'a {
    let end = if causal { i + 1 } else { h.kv_len };
    (0..end).filter(move |&j| h.keep(j))
}

/// Row i's attention probabilities (length L_kv, zero where not visible).
fn probabilities(h: &Head<'_>, causal: bool, i: usize) -> Vec<f64> {
    let scale = (h.d as f64).sqrt().recip();
    let mut p = vec![0.0; h.kv_len];
    let mut max = f64::NEG_INFINITY;
    for j in visible(h, causal, i) {
        p[j] = scale * h.q_row(i).iter().zip(h.k_row(j)).map(|(a, b)| a * b).sum::<f64>();
        max = max.max(p[j]);
    }
    let mut sum = 0.0;
    for j in visible(h, causal, i) {
        p[j] = (p[j] - max).exp();
        sum += p[j];
    }
    for j in visible(h, causal, i) {
        p[j] /= sum;
    }
    p
}

/// Exact softmax attention output (L×d_v).
pub fn softmax_forward(h: &Head<'_>, causal: bool) -> Vec<f64> {
    let mut out = vec![0.0; h.len * h.dv];
    for i in 0..h.len {
        let p = probabilities(h, causal, i);
        for j in visible(h, causal, i) {
            for e in 0..h.dv {
                out[i * h.dv + e] += p[j] * h.v_row(j)[e];
            }
        }
    }
    out
}

/// Gradients of exact softmax attention given ∂ℒ/∂out:
/// dV = PᵀG, dP = GVᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = dS·K/√d, dK = dSᵀQ/√d.
pub fn softmax_backward(h: &Head<'_>, causal: bool, dout: &[f64]) -> HeadGrads {
    let scale = (h.d as f64).sqrt().recip();
    let mut dq = vec![0.0; h.len * h.d];
    let mut dk = vec![0.0; h.kv_len * h.d];
    let mut dv = vec![0.0; h.kv_len * h.dv];
    for i in 0..h.len {
        let p = probabilities(h, causal, i);
        let g = &dout[i * h.dv..(i + 1) * h.dv];
        let dp: Vec<f64> = (0..h.kv_len).map(|j| g.iter().zip(h.v_row(j)).map(|(a, b)| a * b).sum()).collect();
        let row: f64 = visible(h, causal, i).map(|j| p[j] * dp[j]).sum();
        for j in visible(h, causal, i) {
            for e in 0..h.dv {
                dv[j * h.dv + e] += p[j] * g[e];
            }
            let ds = p[j] * (dp[j] - row) * scale;
            for t in 0..h.d {
                dq[i * h.d + t] += ds * h.k_row(j)[t];
                dk[j * h.d + t] += ds * h.q_row(i)[t];
            }
        }
    }
    HeadGrads { dq, dk, dv, params: None }
}
