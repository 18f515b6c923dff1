//! Bidirectional FAVOR attention in f64: out = D⁻¹Q'(K'ᵀV).

use super::{
    Head, HeadGrads, add_scaled_backward, at_risk, features_backward_rows, guard, guard_fires, query_features,
    row_cotangents,
};
use crate::FeatureMap;

/// Key features against the shared stabiliser c = max over unpadded keys; padded rows are zero.
fn key_features(map: &FeatureMap, h: &Head<'_>) -> (Vec<f64>, f64) {
    let mf = map.feature_dim(h.d);
    let c = (0..h.kv_len).filter(|&j| h.keep(j)).map(|j| map.log_scale(h.k_row(j))).fold(f64::NEG_INFINITY, f64::max);
    let mut phi = vec![0.0; h.kv_len * mf];
    for j in (0..h.kv_len).filter(|&j| h.keep(j)) {
        map.features(h.k_row(j), c, &mut phi[j * mf..(j + 1) * mf]);
    }
    (phi, c)
}

struct Forward {
    qf: Vec<f64>,
    qc: Vec<f64>,
    kf: Vec<f64>,
    kc: f64,
    /// K'ᵀV (M×d_v).
    kv: Vec<f64>,
    /// K'ᵀ1 (M).
    ks: Vec<f64>,
    out: Vec<f64>,
    den: Vec<f64>,
    /// Rows whose guard did not fire (scale-invariant queries).
    invariant: Vec<bool>,
}

fn forward(map: &FeatureMap, delta: f64, h: &Head<'_>) -> Forward {
    let mf = map.feature_dim(h.d);
    let (qf, qc) = query_features(map, h);
    let (kf, kc) = key_features(map, h);
    let mut kv = vec![0.0; mf * h.dv];
    let mut ks = vec![0.0; mf];
    for j in 0..h.kv_len {
        for f in 0..mf {
            let kjf = kf[j * mf + f];
            ks[f] += kjf;
            for (e, &v) in h.v_row(j).iter().enumerate() {
                kv[f * h.dv + e] += kjf * v;
            }
        }
    }
    let mut out = vec![0.0; h.len * h.dv];
    let mut den = vec![0.0; h.len];
    let mut invariant = vec![true; h.len];
    for i in 0..h.len {
        let q = &qf[i * mf..(i + 1) * mf];
        let raw: f64 = q.iter().zip(&ks).map(|(a, b)| a * b).sum();
        invariant[i] = !guard_fires(raw, delta);
        let r = guard(raw, delta);
        den[i] = r;
        if r != 0.0 {
            for e in 0..h.dv {
                let n: f64 = (0..mf).map(|f| q[f] * kv[f * h.dv + e]).sum();
                out[i * h.dv + e] = n / r;
            }
        }
    }
    Forward { qf, qc, kf, kc, kv, ks, out, den, invariant }
}

/// Output (L×d_v) of bidirectional attention with denominator guard `delta` (any L_kv).
pub fn bidirectional_forward(map: &FeatureMap, delta: f64, h: &Head<'_>) -> Vec<f64> {
    forward(map, delta, h).out
}

/// Gradients of bidirectional attention given ∂ℒ/∂out (L×d_v).
pub fn bidirectional_backward(map: &FeatureMap, delta: f64, h: &Head<'_>, dout: &[f64]) -> HeadGrads {
    let mf = map.feature_dim(h.d);
    let fw = forward(map, delta, h);
    let mut dqf = vec![0.0; h.len * mf];
    // Σ_i q'_i x̄_iᵀ (M×d_v) and Σ_i q'_i ḡ_i (M).
    let mut dkv = vec![0.0; mf * h.dv];
    let mut dks = vec![0.0; mf];
    let risky: Vec<usize> = (0..h.len).filter(|&i| at_risk(&fw.qf[i * mf..(i + 1) * mf], fw.den[i])).collect();
    for i in (0..h.len).filter(|i| !risky.contains(i)) {
        let (xbar, gbar) =
            row_cotangents(&dout[i * h.dv..(i + 1) * h.dv], &fw.out[i * h.dv..(i + 1) * h.dv], fw.den[i]);
        for f in 0..mf {
            let kv_x: f64 = (0..h.dv).map(|e| fw.kv[f * h.dv + e] * xbar[e]).sum();
            dqf[i * mf + f] = kv_x + fw.ks[f] * gbar;
            let q = fw.qf[i * mf + f];
            dks[f] += q * gbar;
            for e in 0..h.dv {
                dkv[f * h.dv + e] += q * xbar[e];
            }
        }
    }
    let mut dkf = vec![0.0; h.kv_len * mf];
    let mut dv = vec![0.0; h.kv_len * h.dv];
    for j in (0..h.kv_len).filter(|&j| h.keep(j)) {
        for f in 0..mf {
            dkf[j * mf + f] = (0..h.dv).map(|e| dkv[f * h.dv + e] * h.v_row(j)[e]).sum::<f64>() + dks[f];
            for e in 0..h.dv {
                dv[j * h.dv + e] += dkv[f * h.dv + e] * fw.kf[j * mf + f];
            }
        }
    }
    let mut params = map.param_grads_f64();
    let mut dq = features_backward_rows(map, h.q, h.d, &fw.qc, None, Some(&fw.invariant), &dqf, &mut params);
    let mut dk = features_backward_rows(map, h.k, h.d, &vec![fw.kc; h.kv_len], h.mask, None, &dkf, &mut params);
    for &i in &risky {
        let g = &dout[i * h.dv..(i + 1) * h.dv];
        let out = &fw.out[i * h.dv..(i + 1) * h.dv];
        let q = &fw.qf[i * mf..(i + 1) * mf];
        let r = fw.den[i];
        let g_out: f64 = g.iter().zip(out).map(|(a, b)| a * b).sum();
        // dq_i = J_iᵀ(K'ᵀV·G_i − K'ᵀ1·⟨G_i, out_i⟩) / R_i.
        let y: Vec<f64> =
            (0..mf).map(|f| (0..h.dv).map(|e| fw.kv[f * h.dv + e] * g[e]).sum::<f64>() - fw.ks[f] * g_out).collect();
        let dqi = &mut dq[i * h.d..(i + 1) * h.d];
        add_scaled_backward(map, h.q_row(i), fw.qc[i], &y, r, 1.0, fw.invariant[i], dqi, &mut params);
        // dk_j += J_jᵀq'_i·(⟨G_i, v_j⟩ − ⟨G_i, out_i⟩)/R_i, dv_j += (q'_i·k'_j / R_i)·G_i.
        for j in (0..h.kv_len).filter(|&j| h.keep(j)) {
            let t = g.iter().zip(h.v_row(j)).map(|(a, b)| a * b).sum::<f64>() - g_out;
            add_scaled_backward(map, h.k_row(j), fw.kc, q, r, t, false, &mut dk[j * h.d..(j + 1) * h.d], &mut params);
            let w = q.iter().zip(&fw.kf[j * mf..(j + 1) * mf]).map(|(a, b)| a * b).sum::<f64>() / r;
            for e in 0..h.dv {
                dv[j * h.dv + e] += w * g[e];
            }
        }
    }
    HeadGrads { dq, dk, dv, params }
}
