//! Tests of the f64 attention core: brute-force evaluations of the documented definitions,
//! masks, central finite-difference gradients for every map in both directions, exact softmax
//! attention, convergence of FAVOR+ to softmax as m grows, and extreme magnitudes.

use super::softmax::{softmax_backward, softmax_forward};
use super::*;
use crate::testing::{self, TestRng, assert_gradient, central_difference, dot, gaussian, rel_frobenius};
use crate::{Linear, Projection, ProjectionConfig};

/// Owned inputs of one head.
#[derive(Clone)]
struct Data {
    len: usize,
    d: usize,
    dv: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Option<Vec<bool>>,
}

impl Data {
    fn random(r: &mut TestRng, len: usize, d: usize, dv: usize, std: f64) -> Self {
        let q = gaussian(r, len * d, std);
        let k = gaussian(r, len * d, std);
        let v = gaussian(r, len * dv, 1.0);
        Self { len, d, dv, q, k, v, mask: None }
    }

    fn head(&self) -> Head<'_> {
        Head {
            len: self.len,
            kv_len: self.len,
            d: self.d,
            dv: self.dv,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            mask: self.mask.as_deref(),
        }
    }

    fn keep(&self, j: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[j])
    }
}

fn forward(map: &FeatureMap, delta: f64, causal: bool, h: &Head<'_>) -> Vec<f64> {
    if causal { causal_forward(map, delta, h) } else { bidirectional_forward(map, delta, h) }
}

fn backward(map: &FeatureMap, delta: f64, causal: bool, h: &Head<'_>, g: &[f64]) -> HeadGrads {
    if causal { causal_backward(map, delta, h, g) } else { bidirectional_backward(map, delta, h, g) }
}

fn features_of(map: &FeatureMap, x: &[f64], c: f64) -> Vec<f64> {
    let mut out = vec![0.0; map.feature_dim(x.len())];
    map.features(x, c, &mut out);
    out
}

/// The documented denominator rule, written out again: |R| ≤ δ → R + 2δ (δ > 0).
fn guarded(r: f64, delta: f64) -> f64 {
    if delta > 0.0 && r.abs() <= delta { r + 2.0 * delta } else { r }
}

/// Σ_j w_ij v_j / Σ_j w_ij, zero when the denominator is zero.
fn normalise(weights: &[(usize, f64)], data: &Data, delta: f64) -> Vec<f64> {
    let den = guarded(weights.iter().map(|w| w.1).sum(), delta);
    let mut out = vec![0.0; data.dv];
    if den != 0.0 {
        for &(j, w) in weights {
            let vj = &data.v[j * data.dv..(j + 1) * data.dv];
            out.iter_mut().zip(vj).for_each(|(o, &v)| *o += w * v / den);
        }
    }
    out
}

/// Bidirectional attention by its definition: query i weights kept key j by q'_i·k'_j with
/// q'_i = φ(q_i; s(q_i)) and k'_j = φ(k_j; max over kept keys of s(k)). O(L²).
fn brute_bidirectional(map: &FeatureMap, delta: f64, data: &Data) -> Vec<f64> {
    let h = data.head();
    let kept: Vec<usize> = (0..data.len).filter(|&j| data.keep(j)).collect();
    let ck = kept.iter().map(|&j| map.log_scale(h.k_row(j))).fold(f64::NEG_INFINITY, f64::max);
    (0..data.len)
        .flat_map(|i| {
            let qf = features_of(map, h.q_row(i), map.log_scale(h.q_row(i)));
            let w: Vec<(usize, f64)> = kept.iter().map(|&j| (j, dot(&qf, &features_of(map, h.k_row(j), ck)))).collect();
            normalise(&w, data, delta)
        })
        .collect()
}

/// Causal attention by its documented definition (module docs of `attention`): query i sees kept
/// key j ≤ i with weight exp(c_j − c_i)·q'_i·φ(k_j; c_j), c_j = max_{kept l ≤ j} s(k_l). O(L²).
fn brute_causal(map: &FeatureMap, delta: f64, data: &Data) -> Vec<f64> {
    let h = data.head();
    let mut c = vec![f64::NEG_INFINITY; data.len];
    for j in 0..data.len {
        let prev = if j > 0 { c[j - 1] } else { f64::NEG_INFINITY };
        c[j] = if data.keep(j) { prev.max(map.log_scale(h.k_row(j))) } else { prev };
    }
    (0..data.len)
        .flat_map(|i| {
            let qf = features_of(map, h.q_row(i), map.log_scale(h.q_row(i)));
            let w: Vec<(usize, f64)> = (0..=i)
                .filter(|&j| data.keep(j))
                .map(|j| (j, (c[j] - c[i]).exp() * dot(&qf, &features_of(map, h.k_row(j), c[j]))))
                .collect();
            normalise(&w, data, delta)
        })
        .collect()
}

/// How often the causal running maximum of the kept keys' log-scales rises after the first
/// kept key: the decay exp(c_j − c_i) is only exercised when this is positive.
fn running_max_jumps(map: &FeatureMap, data: &Data) -> usize {
    let mut c = f64::NEG_INFINITY;
    let mut jumps = 0;
    for j in (0..data.len).filter(|&j| data.keep(j)) {
        let s = map.log_scale(&data.k[j * data.d..(j + 1) * data.d]);
        if s > c {
            jumps += usize::from(c > f64::NEG_INFINITY);
            c = s;
        }
    }
    jumps
}

/// A mask with both kept and padded keys, the first key padded (so early causal queries see
/// nothing).
fn some_mask(len: usize) -> Vec<bool> {
    (0..len).map(|j| j % 3 != 0 || j == 3).collect()
}

#[test]
fn prefix_sum_and_linear_forms_equal_the_brute_force_definitions() {
    let (len, d, dv, m) = (11, 4, 3, 6);
    for (name, map) in testing::feature_map_catalog(d, m, 41) {
        // A larger ε than the default so that the ε·exp(c_j − c_i) terms are visible.
        for eps in [0.0, 1e-2] {
            let map = testing::with_epsilon(&map, eps);
            for masked in [false, true] {
                let mut r = testing::rng(7);
                let mut data = Data::random(&mut r, len, d, dv, 0.6);
                // Growing key norms make the causal running maximum jump several times.
                for j in 0..len {
                    for t in 0..d {
                        data.k[j * d + t] *= 1.0 + 0.3 * j as f64;
                    }
                }
                data.mask = masked.then(|| some_mask(len));
                if map.is_stabilised() {
                    assert!(running_max_jumps(&map, &data) >= 2, "{name}: the running maximum barely moves");
                }
                let delta = map.default_denominator_guard() as f64;
                let bi = bidirectional_forward(&map, delta, &data.head());
                let err = rel_frobenius(&bi, &brute_bidirectional(&map, delta, &data));
                assert!(err < 1e-12, "{name} ε={eps} mask={masked}: bidirectional vs definition {err:e}");
                let ca = causal_forward(&map, delta, &data.head());
                let err = rel_frobenius(&ca, &brute_causal(&map, delta, &data));
                assert!(err < 1e-12, "{name} ε={eps} mask={masked}: causal vs definition {err:e}");
                if masked {
                    // Query 0 sees no key (key 0 is padded): output row zero.
                    assert!(ca[..dv].iter().all(|&x| x == 0.0));
                }
            }
        }
    }
}

/// Padded keys are left out of the features and of the stabiliser: a padded key that would have
/// the largest log-scale (and would dominate the output if it were kept) changes nothing.
#[test]
fn masked_attention_equals_attention_over_the_kept_keys() {
    let (len, d, dv, m) = (9, 4, 3, 8);
    let mask = vec![true, false, true, true, false, true, true, false, true];
    for (name, map) in testing::feature_map_catalog(d, m, 43) {
        let map = testing::with_epsilon(&map, 1e-3);
        let delta = map.default_denominator_guard() as f64;
        let mut r = testing::rng(8);
        let mut data = Data::random(&mut r, len, d, dv, 0.5);
        // Padded key 4 gets the largest log-scale if it were (wrongly) included: for the
        // positive and hyperbolic maps s(k) = max_j ω_jᵀk̃ − ‖k̃‖²/2 peaks at k̃ = ω_j (value
        // ‖ω_j‖²/2), for trigonometric features s = ‖k̃‖²/2 grows with the norm.
        let padded: Vec<f64> = match &map {
            FeatureMap::Positive { projection: p, .. } | FeatureMap::Hyperbolic { projection: p, .. } => {
                let norm = |w: &[f32]| w.iter().map(|&w| (w as f64).powi(2)).sum::<f64>();
                let best = p.rows().max_by(|a, b| norm(a).total_cmp(&norm(b))).unwrap();
                best.iter().map(|&w| w as f64 * (d as f64).powf(0.25)).collect()
            }
            _ => (0..d).map(|t| 3.0 * (t as f64 - 1.5)).collect(),
        };
        data.k[4 * d..5 * d].copy_from_slice(&padded);
        let kept: Vec<usize> = (0..len).filter(|&j| mask[j]).collect();
        let pick =
            |x: &[f64], w: usize| kept.iter().flat_map(|&j| x[j * w..(j + 1) * w].to_vec()).collect::<Vec<f64>>();
        let compact =
            Data { len: kept.len(), d, dv, q: pick(&data.q, d), k: pick(&data.k, d), v: pick(&data.v, dv), mask: None };
        data.mask = Some(mask.clone());

        // Bidirectional: every query (padded positions included) against the kept keys only.
        let full = bidirectional_forward(&map, delta, &data.head());
        let full_bidirectional = full.clone();
        for i in 0..len {
            let single = Data {
                q: (0..kept.len()).flat_map(|_| data.q[i * d..(i + 1) * d].to_vec()).collect(),
                ..compact.clone()
            };
            let want = bidirectional_forward(&map, delta, &single.head());
            let err = rel_frobenius(&full[i * dv..(i + 1) * dv], &want[..dv]);
            assert!(err < 1e-12, "{name}: bidirectional masked row {i} vs kept keys only: {err:e}");
        }
        // Causal: the queries at kept positions equal causal attention over the kept tokens.
        let full = causal_forward(&map, delta, &data.head());
        let want = causal_forward(&map, delta, &compact.head());
        let err = rel_frobenius(&pick(&full, dv), &want);
        assert!(err < 1e-12, "{name}: causal masked vs kept tokens only: {err:e}");

        // The check can fail: keeping the padded key changes the result far beyond the tolerance.
        let unmasked = bidirectional_forward(&map, delta, &Data { mask: None, ..data.clone() }.head());
        assert!(rel_frobenius(&unmasked, &full_bidirectional) > 1e-3, "{name}: the padded key does not matter");
    }
}

/// Loss ⟨G, out⟩ and its gradients by central differences in f64, against the analytic
/// backward, for q, k, v and learned parameters.
/// Returns the worst relative gradient error found.
fn check_attention_gradients(name: &str, map: &FeatureMap, causal: bool, data: &Data, rtol: f64) -> f64 {
    let delta = map.default_denominator_guard() as f64;
    let g = gaussian(&mut testing::rng(99), data.len * data.dv, 1.0);
    let grads = backward(map, delta, causal, &data.head(), &g);
    let label = |what: &str| {
        format!("{name} {} mask={} d{what}", if causal { "causal" } else { "bidirectional" }, data.mask.is_some())
    };
    let h = 1e-5;
    let loss_at = |d2: &Data| dot(&g, &forward(map, delta, causal, &d2.head()));
    let numeric = central_difference(&data.q, h, |x| loss_at(&Data { q: x.to_vec(), ..data.clone() }));
    assert_gradient(&label("q"), &grads.dq, &numeric, rtol);
    let mut worst = testing::gradient_error(&grads.dq, &numeric);
    let numeric = central_difference(&data.k, h, |x| loss_at(&Data { k: x.to_vec(), ..data.clone() }));
    assert_gradient(&label("k"), &grads.dk, &numeric, rtol);
    worst = worst.max(testing::gradient_error(&grads.dk, &numeric));
    let numeric = central_difference(&data.v, h, |x| loss_at(&Data { v: x.to_vec(), ..data.clone() }));
    assert_gradient(&label("v"), &grads.dv, &numeric, rtol);
    worst = worst.max(testing::gradient_error(&grads.dv, &numeric));
    if map.has_params() {
        let numeric = testing::param_gradient(map, |m2| dot(&g, &forward(m2, delta, causal, &data.head())));
        let analytic = testing::flat_param_grads(grads.params.as_ref().expect("parameter gradients"));
        assert_gradient(&label("θ"), &analytic, &numeric, rtol.max(1e-7));
        worst = worst.max(testing::gradient_error(&analytic, &numeric));
    } else {
        assert!(grads.params.is_none());
    }
    worst
}

/// Inputs for gradient checks, redrawn until every ReLU/ELU pre-activation is away from its
/// kink (a central difference across a kink is wrong, not the backward).
fn gradient_data(map: &FeatureMap, seed: u64, masked: bool) -> Data {
    let (len, d, dv) = (6, 4, 3);
    let mut r = testing::rng(seed);
    loop {
        let mut data = Data::random(&mut r, len, d, dv, 0.5);
        data.mask = masked.then(|| some_mask(len));
        let away_from_kinks =
            testing::min_abs_preactivation(map, &data.q, d).min(testing::min_abs_preactivation(map, &data.k, d)) > 1e-3;
        // The causal backward's decayed suffix sums only matter when the running maximum rises.
        if away_from_kinks && (!map.is_stabilised() || running_max_jumps(map, &data) >= 1) {
            return data;
        }
    }
}

/// Every map, both directions, with and without a key mask, ε = 0: the stabilisers then cancel
/// exactly, so the backward (which holds them constant) is the exact gradient.
#[test]
fn attention_gradients_match_finite_differences() {
    let (d, m) = (4, 8);
    let mut worst = 0.0f64;
    for (name, map) in testing::feature_map_catalog(d, m, 51) {
        let map = testing::with_epsilon(&map, 0.0);
        for causal in [false, true] {
            for masked in [false, true] {
                let data = gradient_data(&map, 60 + masked as u64, masked);
                let err = check_attention_gradients(name, &map, causal, &data, 1e-6);
                worst = worst.max(err);
            }
        }
    }
    println!(
        "attention gradients vs central differences (9 maps × 2 directions × mask, ε = 0): worst relative error {worst:.2e}"
    );
}

/// With the default ε the computed function still does not depend on the shared stabilisers
/// (the ε floor of each token scales with its own log-scale), and the backward differentiates
/// the floor through that log-scale: the gradient is exact, to the same tolerance as with ε = 0.
#[test]
fn attention_gradients_with_default_epsilon_are_exact() {
    let (d, m) = (4, 8);
    for (name, map) in testing::feature_map_catalog(d, m, 52).into_iter().take(2) {
        for causal in [false, true] {
            let data = gradient_data(&map, 70, true);
            let err = check_attention_gradients(name, &map, causal, &data, 1e-6);
            println!(
                "attention gradient vs central differences, {name}, default ε, causal={causal}: worst relative error {err:.2e}"
            );
        }
    }
}

#[test]
fn softmax_attention_hand_computed_case() {
    // d = 1: scores q·k. Keys 0 and ln 3 with q = 1 give probabilities 1/4, 3/4.
    let data = Data { len: 2, d: 1, dv: 1, q: vec![1.0, 1.0], k: vec![0.0, 3f64.ln()], v: vec![1.0, 5.0], mask: None };
    let close = |a: &[f64], b: &[f64]| rel_frobenius(a, b) < 1e-15;
    assert!(close(&softmax_forward(&data.head(), false), &[4.0, 4.0]));
    assert!(close(&softmax_forward(&data.head(), true), &[1.0, 4.0]));
    let masked = Data { mask: Some(vec![true, false]), ..data.clone() };
    assert!(close(&softmax_forward(&masked.head(), false), &[1.0, 1.0]));
    // A query that sees no key outputs zero.
    let none = Data { mask: Some(vec![false, true]), ..data.clone() };
    assert!(close(&softmax_forward(&none.head(), true), &[0.0, 5.0]));
    // d = 4: the 1/√d scale. q·k = 2 ln 3 → score ln 3 → probabilities 1/4, 3/4 again.
    let l3 = 3f64.ln();
    let data4 = Data {
        len: 2,
        d: 4,
        dv: 1,
        q: vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
        k: vec![0.0, 0.0, 0.0, 0.0, l3, l3, 0.0, 0.0],
        v: vec![1.0, 5.0],
        mask: None,
    };
    assert!(close(&softmax_forward(&data4.head(), false), &[4.0, 4.0]));
    // Gradient w.r.t. v of out_1 in the causal case: p = (1/4, 3/4).
    let g = softmax_backward(&data.head(), true, &[0.0, 1.0]);
    assert!(close(&g.dv, &[0.25, 0.75]));
    // ∂out_1/∂k_j = q_1·p_j·(v_j − out_1)/√d: 0.25·(1 − 4) = −0.75 and 0.75·(5 − 4) = 0.75;
    // ∂out_1/∂q_1 = Σ_j p_j (v_j − out_1) k_j = 0.75·ln 3.
    assert!(close(&g.dk, &[-0.75, 0.75]));
    assert!(close(&g.dq, &[0.0, 0.75 * 3f64.ln()]));
}

#[test]
fn softmax_gradients_match_finite_differences() {
    for causal in [false, true] {
        for masked in [false, true] {
            let mut r = testing::rng(5);
            let mut data = Data::random(&mut r, 7, 5, 3, 1.0);
            data.mask = masked.then(|| some_mask(7));
            let g = gaussian(&mut r, 7 * 3, 1.0);
            let grads = softmax_backward(&data.head(), causal, &g);
            let loss = |d2: &Data| dot(&g, &softmax_forward(&d2.head(), causal));
            let label = |w: &str| format!("softmax causal={causal} mask={masked} d{w}");
            let n = central_difference(&data.q, 1e-5, |x| loss(&Data { q: x.to_vec(), ..data.clone() }));
            assert_gradient(&label("q"), &grads.dq, &n, 1e-7);
            let n = central_difference(&data.k, 1e-5, |x| loss(&Data { k: x.to_vec(), ..data.clone() }));
            assert_gradient(&label("k"), &grads.dk, &n, 1e-7);
            let n = central_difference(&data.v, 1e-5, |x| loss(&Data { v: x.to_vec(), ..data.clone() }));
            assert_gradient(&label("v"), &grads.dv, &n, 1e-7);
        }
    }
}

/// FAVOR+ (positive features, orthogonal projections) converges to exact softmax attention
/// with error ∝ m^{-1/2}: the least-squares slope of log(error) on log(m) over m = 16..1024,
/// errors averaged (root mean square) over seeds, must be −1/2 ± 0.1.
#[test]
fn favor_converges_to_softmax_as_m_grows() {
    let (len, d, dv, seeds) = (32, 8, 8, 16u64);
    let data = Data::random(&mut testing::rng(2024), len, d, dv, 0.35);
    let ms = [16usize, 32, 64, 128, 256, 512, 1024];
    for causal in [false, true] {
        let exact = softmax_forward(&data.head(), causal);
        let mut table = Vec::new();
        for &m in &ms {
            let mse: f64 = (0..seeds)
                .map(|s| {
                    let p = Projection::draw(ProjectionConfig::new(m, d, 10_000 * m as u64 + s)).unwrap();
                    let map = FeatureMap::Positive { projection: p, epsilon: 0.0, softmax_scale: None };
                    rel_frobenius(&forward(&map, 0.0, causal, &data.head()), &exact).powi(2)
                })
                .sum::<f64>()
                / seeds as f64;
            table.push((m, mse.sqrt()));
        }
        let xs: Vec<f64> = table.iter().map(|t| (t.0 as f64).ln()).collect();
        let ys: Vec<f64> = table.iter().map(|t| t.1.ln()).collect();
        let (mx, my) = (xs.iter().sum::<f64>() / xs.len() as f64, ys.iter().sum::<f64>() / ys.len() as f64);
        let slope = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum::<f64>()
            / xs.iter().map(|x| (x - mx).powi(2)).sum::<f64>();
        let dir = if causal { "causal" } else { "bidirectional" };
        println!("FAVOR+ vs exact softmax ({dir}, L={len}, d={d}, orthogonal, RMS over {seeds} seeds):");
        for (m, e) in &table {
            println!("  m = {m:>5}: relative Frobenius error {e:.4e}");
        }
        println!("  log-log slope {slope:.3} (theory −0.5)");
        assert!((slope + 0.5).abs() < 0.1, "{dir}: error ∝ m^{slope:.3}, not m^-0.5");
        assert!(table.last().unwrap().1 < 0.03, "{dir}: error at m = 1024 too large: {:e}", table.last().unwrap().1);
    }
}

/// Finite inputs of any magnitude give finite outputs and gradients for every map in both
/// directions (f64). For maps with non-negative features the output is a convex combination
/// of the values, so it is also bounded by max |v|.
#[test]
fn attention_is_finite_at_extreme_magnitudes() {
    let (len, d, dv, m) = (7, 4, 3, 6);
    let mut r = testing::rng(13);
    let mut mixed = |n: usize| -> Vec<f64> {
        (0..n).map(|i| [1e4, -1e4, 1e-30, 1.0, -3.0][i % 5] * testing::uniform(&mut r, 1, 0.5, 1.5)[0]).collect()
    };
    let mixed_q = mixed(len * d);
    let mixed_k = mixed(len * d);
    let mut r = testing::rng(14);
    let cases: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("1e4", gaussian(&mut r, len * d, 1e4), gaussian(&mut r, len * d, 1e4)),
        ("1e-30", gaussian(&mut r, len * d, 1e-30), gaussian(&mut r, len * d, 1e-30)),
        ("mixed", mixed_q, mixed_k),
        ("q 1e4, k 1e-30", gaussian(&mut r, len * d, 1e4), gaussian(&mut r, len * d, 1e-30)),
        ("zeros", vec![0.0; len * d], vec![0.0; len * d]),
    ];
    let v = gaussian(&mut r, len * dv, 1.0);
    let vmax = testing::max_abs(&v);
    let g = gaussian(&mut r, len * dv, 1.0);
    for (name, map) in testing::feature_map_catalog(d, m, 61) {
        for (case, q, k) in &cases {
            for causal in [false, true] {
                for mask in [None, Some(some_mask(len))] {
                    let data = Data { len, d, dv, q: q.clone(), k: k.clone(), v: v.clone(), mask };
                    let delta = map.default_denominator_guard() as f64;
                    let out = forward(&map, delta, causal, &data.head());
                    let gr = backward(&map, delta, causal, &data.head(), &g);
                    let pg = gr.params.as_ref().map(testing::flat_param_grads).unwrap_or_default();
                    let what = format!("{name} [{case}] causal={causal} mask={}", data.mask.is_some());
                    assert!(out.iter().all(|x| x.is_finite()), "{what}: non-finite output {out:?}");
                    assert!(
                        gr.dq.iter().chain(&gr.dk).chain(&gr.dv).chain(&pg).all(|x| x.is_finite()),
                        "{what}: non-finite gradient {gr:?}"
                    );
                    if name != "trigonometric" {
                        assert!(testing::max_abs(&out) <= vmax * (1.0 + 1e-9), "{what}: output outside the hull of v");
                    }
                    if name == "positive" {
                        // Exact softmax attention on the same inputs.
                        let exact = softmax_forward(&data.head(), causal);
                        let sg = softmax_backward(&data.head(), causal, &g);
                        assert!(
                            exact.iter().chain(&sg.dq).chain(&sg.dk).chain(&sg.dv).all(|x| x.is_finite()),
                            "softmax [{case}] causal={causal}: non-finite"
                        );
                        assert!(testing::max_abs(&exact) <= vmax * (1.0 + 1e-9));
                    }
                }
            }
        }
    }
}

/// Rows whose denominator is far below their features (`at_risk`) take the pairwise backward
/// path. Build such rows with products of features that stay normal f64 numbers (so central
/// differences are exact), check the path is taken, and check its gradients.
#[test]
fn tiny_denominator_rows_get_exact_gradients() {
    let (len, d, dv) = (6, 2, 2);
    let mut r = testing::rng(404);
    let mut cases: Vec<(&str, FeatureMap, Data)> = Vec::new();
    // ELU+1 with every query coordinate near −300: q' ≈ e^{−300}, so R ≈ 1e-130·Σ k'.
    let mut elu = Data::random(&mut r, len, d, dv, 0.5);
    elu.q.iter_mut().for_each(|x| *x -= 300.0);
    elu.k.iter_mut().for_each(|x| *x = x.abs() + 0.1);
    cases.push(("elu+1", FeatureMap::elu_plus_one(), elu));
    // Learned softplus with bias −150 on both branches: softplus(y) ≈ e^y ≈ 1e-65 per feature.
    let m = 3;
    let w: Vec<f32> = testing::gaussian(&mut r, m * d, 0.5).into_iter().map(testing::quantize).collect();
    let sp = FeatureMap::Softplus(Linear::new(m, d, w, Some(vec![-150.0; m])).unwrap());
    cases.push(("learned-softplus", sp, Data::random(&mut r, len, d, dv, 0.5)));
    // Positive features with ω = ±e₁, e₂ and q̃ ≈ (250, β), k̃_j ≈ (α_j, 250): a query's weight
    // sits on feature 0 and a key's on feature 1, so every query-key product is ~e^{−250} (still
    // normal) while max q' ≈ 0.58. The two features contribute comparably, so the output depends
    // on α, β at O(1). Key norms shrink slowly: the log-scale t − t²/2 rises by ~1 per key and the
    // causal running maximum moves at every key.
    let p = Projection::from_matrix(3, 2, vec![1.0, 0.0, 0.0, 1.0, -1.0, 0.0]).unwrap();
    let pos = FeatureMap::Positive { projection: p, epsilon: 0.0, softmax_scale: None };
    let mut data = Data::random(&mut r, len, d, dv, 1.0);
    let s = (d as f64).powf(0.25);
    for i in 0..len {
        data.q[i * d] = 250.0 * s;
        data.k[i * d + 1] = (250.0 - 0.004 * i as f64) * s;
    }
    cases.push(("positive", pos, data));
    for (name, map, data) in cases {
        for causal in [false, true] {
            for masked in [false, true] {
                let data = Data { mask: masked.then(|| some_mask(len)), ..data.clone() };
                // The path under test is really taken.
                let (qf, _) = query_features(&map, &data.head());
                let mf = map.feature_dim(d);
                let risky = (1..len)
                    .filter(|&i| {
                        let qi = &qf[i * mf..(i + 1) * mf];
                        let seen = |j: usize| data.keep(j) && (!causal || j <= i);
                        let kc = if map.is_stabilised() {
                            (0..len)
                                .filter(|&j| seen(j))
                                .map(|j| map.log_scale(data.head().k_row(j)))
                                .fold(f64::NEG_INFINITY, f64::max)
                        } else {
                            0.0
                        };
                        let r: f64 = (0..len)
                            .filter(|&j| seen(j))
                            .map(|j| dot(qi, &features_of(&map, data.head().k_row(j), kc)))
                            .sum();
                        at_risk(qi, r)
                    })
                    .count();
                assert!(risky >= 3, "{name}: only {risky} rows at risk");
                let g = gaussian(&mut testing::rng(9), len * dv, 1.0);
                let grads = backward(&map, 0.0, causal, &data.head(), &g);
                let loss = |d2: &Data| dot(&g, &forward(&map, 0.0, causal, &d2.head()));
                let what = |w: &str| format!("{name} (tiny denominators) causal={causal} mask={masked} d{w}");
                // Step 1e-4 with Richardson extrapolation: the exponents cancel terms of size
                // ~3·10⁴ (error ~1e-12), which a smaller step would amplify, and derivatives in
                // k̃ carry powers of ‖k̃‖ ≈ 250, which a plain central difference would not resolve.
                let n = testing::central_difference_richardson(&data.q, 1e-4, |x| {
                    loss(&Data { q: x.to_vec(), ..data.clone() })
                });
                assert_gradient(&what("q"), &grads.dq, &n, 1e-6);
                let n = testing::central_difference_richardson(&data.k, 1e-4, |x| {
                    loss(&Data { k: x.to_vec(), ..data.clone() })
                });
                assert_gradient(&what("k"), &grads.dk, &n, 1e-6);
                let n = testing::central_difference_richardson(&data.v, 1e-4, |x| {
                    loss(&Data { v: x.to_vec(), ..data.clone() })
                });
                assert_gradient(&what("v"), &grads.dv, &n, 1e-6);
                if map.has_params() {
                    let n = testing::param_gradient(&map, |m2| dot(&g, &forward(m2, 0.0, causal, &data.head())));
                    assert_gradient(&what("θ"), &testing::flat_param_grads(grads.params.as_ref().unwrap()), &n, 1e-5);
                }
            }
        }
    }
}

/// A sweep over magnitudes where features underflow part-way (|x| ~ 30 … 1e4), many seeds,
/// every map, ε = 0 and default, both directions: outputs and gradients stay finite and the
/// outputs of non-negative maps stay in the hull of v. (Before the `at_risk` path, about one
/// case in ten here produced an infinite or NaN gradient.)
#[test]
fn attention_is_finite_across_magnitudes_where_features_underflow() {
    let (len, d, dv, m) = (8, 4, 3, 6);
    let mut failures = Vec::new();
    for seed in 0..40u64 {
        let mut r = testing::rng(1000 + seed);
        for scale in [30.0, 100.0, 300.0, 1e3, 1e4] {
            let data = Data::random(&mut r, len, d, dv, scale);
            let g = gaussian(&mut r, len * dv, 1.0);
            let vmax = testing::max_abs(&data.v);
            for (name, map) in testing::feature_map_catalog(d, m, seed) {
                for eps in [0.0, 1e-6] {
                    let map = testing::with_epsilon(&map, eps);
                    let delta = map.default_denominator_guard() as f64;
                    for causal in [false, true] {
                        let out = forward(&map, delta, causal, &data.head());
                        let gr = backward(&map, delta, causal, &data.head(), &g);
                        let pg = gr.params.as_ref().map(testing::flat_param_grads).unwrap_or_default();
                        let finite =
                            out.iter().chain(&gr.dq).chain(&gr.dk).chain(&gr.dv).chain(&pg).all(|x| x.is_finite());
                        let bounded = name == "trigonometric" || testing::max_abs(&out) <= vmax * (1.0 + 1e-9);
                        if !(finite && bounded) {
                            failures.push(format!("seed {seed} |x|~{scale} {name} ε={eps} causal={causal}"));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
}

/// Kept key rows whose log-scale sets the key stabiliser: the arg-max (bidirectional) or every
/// row where the running maximum rises (causal).
fn stabiliser_rows(map: &FeatureMap, data: &Data, causal: bool) -> Vec<usize> {
    let s = |j: usize| map.log_scale(&data.k[j * data.d..(j + 1) * data.d]);
    let kept = (0..data.len).filter(|&j| data.keep(j));
    if causal {
        let mut c = f64::NEG_INFINITY;
        kept.filter(|&j| {
            let rises = s(j) > c;
            c = c.max(s(j));
            rises
        })
        .collect()
    } else {
        let best = kept.max_by(|&a, &b| s(a).total_cmp(&s(b))).expect("a kept key");
        vec![best]
    }
}

/// ‖numeric − analytic‖ / ‖numeric‖ of the gradient of ⟨G, out⟩ with respect to one row of q
/// (`of_keys` false) or k, the numeric one by Richardson-extrapolated central differences.
fn row_gradient_error(
    map: &FeatureMap,
    causal: bool,
    data: &Data,
    g: &[f64],
    grads: &HeadGrads,
    of_keys: bool,
    row: usize,
) -> f64 {
    let d = data.d;
    let span = row * d..(row + 1) * d;
    let x = if of_keys { &data.k[span.clone()] } else { &data.q[span.clone()] };
    let numeric = testing::central_difference_richardson(x, 1e-3, |xr| {
        let mut moved = data.clone();
        let t = if of_keys { &mut moved.k } else { &mut moved.q };
        t[span.clone()].copy_from_slice(xr);
        dot(g, &forward(map, 0.0, causal, &moved.head()))
    });
    let analytic = if of_keys { &grads.dk[span] } else { &grads.dq[span] };
    let diff: Vec<f64> = numeric.iter().zip(analytic).map(|(a, b)| a - b).collect();
    testing::frobenius(&diff) / testing::frobenius(&numeric)
}

/// The worst row error over the stabiliser-setting key rows and over a few other key and query
/// rows: (stabiliser rows, other rows).
fn stabiliser_row_errors(map: &FeatureMap, causal: bool, data: &Data) -> (f64, f64) {
    let g = gaussian(&mut testing::rng(7), data.len * data.dv, 1.0);
    let grads = backward(map, 0.0, causal, &data.head(), &g);
    let setting = stabiliser_rows(map, data, causal);
    let worst = |rows: &mut dyn Iterator<Item = (bool, usize)>| {
        rows.map(|(keys, r)| row_gradient_error(map, causal, data, &g, &grads, keys, r)).fold(0.0f64, f64::max)
    };
    let at_max = worst(&mut setting.iter().map(|&r| (true, r)));
    let others: Vec<(bool, usize)> = (1..data.len)
        .step_by(data.len / 5)
        .filter(|r| data.keep(*r) && !setting.contains(r))
        .map(|r| (true, r))
        // Early causal queries may see a single key, whose output then does not depend on q.
        .chain((data.len / 8..data.len).step_by(data.len / 4).map(|r| (false, r)))
        .collect();
    (at_max, worst(&mut others.into_iter()))
}

/// The gradient contract with ε > 0: the computed function does not depend on the shared key
/// stabiliser, and the backward differentiates the ε floor through each token's own log-scale,
/// so the gradient is exact on every row, including the key rows that set the stabiliser (the
/// arg-max key, or each key where the causal running maximum rises). Checked against central
/// differences of the forward at input std 0.5 and 1.0, both directions, with and without a
/// key mask. The stop-gradient backward (the deliberately broken variant) misses by more than
/// ten times the tolerance.
#[test]
fn gradients_are_exact_on_the_rows_that_set_the_stabiliser() {
    // Central differences of an f64 forward with O(1) inputs: Richardson with step 1e-3 leaves a
    // truncation error ~1e-12 and rounding ~1e-13/1e-3, far below the 1e-6 asked for.
    const TOL: f64 = 1e-6;
    let (len, d, dv, m) = (48, 16, 4, 32);
    let mut report = Vec::new();
    for (name, base) in testing::feature_map_catalog(d, m, 81).into_iter().take(2) {
        for eps in [crate::features::DEFAULT_EPSILON, 1e-3] {
            let map = testing::with_epsilon(&base, eps);
            for std in [0.5, 1.0] {
                for causal in [false, true] {
                    for masked in [false, true] {
                        let mut data = Data::random(&mut testing::rng(90 + masked as u64), len, d, dv, std);
                        data.mask = masked.then(|| some_mask(len));
                        let what = format!("{name} ε={eps} std={std} causal={causal} mask={masked}");
                        let (at_max, others) = stabiliser_row_errors(&map, causal, &data);
                        assert!(at_max <= TOL && others <= TOL, "{what}: row errors {at_max:.2e} / {others:.2e}");
                        crate::features::DROP_FLOOR_GRADIENT.set(true);
                        let (broken, _) = stabiliser_row_errors(&map, causal, &data);
                        crate::features::DROP_FLOOR_GRADIENT.set(false);
                        assert!(broken > 10.0 * TOL, "{what}: the stop-gradient variant passes ({broken:.2e})");
                        report.push(format!("{what}: {at_max:.1e} / {others:.1e} (stop-gradient {broken:.1e})"));
                    }
                }
            }
        }
    }
    println!("row gradient errors, stabiliser rows / others:\n{}", report.join("\n"));
}

/// The computed function does not depend on the shared stabilisers: attention with every key's
/// features taken against an arbitrary common constant (here 0, i.e. unstabilised, and c + 7),
/// and every query's against another, equals the stabilised result, ε included. Causal
/// attention is then bidirectional attention over each prefix.
#[test]
fn attention_does_not_depend_on_the_shared_stabilisers() {
    let (len, d, dv, m) = (10, 4, 3, 8);
    for (name, map) in testing::feature_map_catalog(d, m, 44).into_iter().take(3) {
        let map = testing::with_epsilon(&map, 1e-2);
        let mut data = Data::random(&mut testing::rng(12), len, d, dv, 0.8);
        data.mask = Some(some_mask(len));
        let h = data.head();
        let kept: Vec<usize> = (0..len).filter(|&j| data.keep(j)).collect();
        let ck = kept.iter().map(|&j| map.log_scale(h.k_row(j))).fold(f64::NEG_INFINITY, f64::max);
        let causal = causal_forward(&map, 0.0, &h);
        let bidirectional = bidirectional_forward(&map, 0.0, &h);
        for (ck_any, cq_shift) in [(0.0, 0.0), (ck + 7.0, -3.0)] {
            let attend = |i: usize, upto: usize| {
                let qf = features_of(&map, h.q_row(i), map.log_scale(h.q_row(i)) + cq_shift);
                let w: Vec<(usize, f64)> = kept
                    .iter()
                    .filter(|&&j| j <= upto)
                    .map(|&j| (j, dot(&qf, &features_of(&map, h.k_row(j), ck_any))))
                    .collect();
                normalise(&w, &data, 0.0)
            };
            for i in 0..len {
                let err = rel_frobenius(&attend(i, len), &bidirectional[i * dv..(i + 1) * dv]);
                assert!(err < 1e-12, "{name}: bidirectional row {i} depends on the stabilisers ({err:.1e})");
                if kept.iter().any(|&j| j <= i) {
                    let err = rel_frobenius(&attend(i, i), &causal[i * dv..(i + 1) * dv]);
                    assert!(err < 1e-12, "{name}: causal row {i} depends on the stabilisers ({err:.1e})");
                }
            }
        }
    }
}
