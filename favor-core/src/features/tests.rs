//! Feature-map tests: unbiasedness and closed-form variance of the softmax estimators
//! (the paper's Lemma 2), orthogonal vs iid projections, the documented formulas,
//! finite-difference gradients in f64, and finite results at extreme magnitudes.

use super::*;
use crate::testing::{self, assert_gradient, central_difference, dot, gaussian};
use crate::{ProjectionConfig, ProjectionKind};

/// Per-draw estimates of the softmax kernel exp(x̃ᵀỹ) by the raw (c = 0, ε = 0) feature map
/// `make(seed)` over `draws` independent projections.
fn kernel_estimates(draws: u64, base_seed: u64, x: &[f64], y: &[f64], make: impl Fn(u64) -> FeatureMap) -> Vec<f64> {
    (0..draws)
        .map(|n| {
            let map = make(base_seed + n);
            let mf = map.feature_dim(x.len());
            let (mut fx, mut fy) = (vec![0.0; mf], vec![0.0; mf]);
            map.features(x, 0.0, &mut fx);
            map.features(y, 0.0, &mut fy);
            dot(&fx, &fy)
        })
        .collect()
}

/// Sample mean, variance, the standard error of the mean and of the variance (from the fourth
/// central moment: Var(s²) ≈ (μ₄ − σ⁴)/N).
struct Moments {
    mean: f64,
    var: f64,
    se_mean: f64,
    se_var: f64,
}

fn moments(e: &[f64]) -> Moments {
    let n = e.len() as f64;
    let mean = e.iter().sum::<f64>() / n;
    let var = e.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let m4 = e.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n;
    Moments { mean, var, se_mean: (var / n).sqrt(), se_var: ((m4 - var * var) / n).sqrt() }
}

/// Mean squared error of estimates against the truth, with its standard error.
fn mse(e: &[f64], truth: f64) -> (f64, f64) {
    let sq: Vec<f64> = e.iter().map(|x| (x - truth).powi(2)).collect();
    let m = moments(&sq);
    (m.mean, m.se_mean)
}

/// x = d^{1/4}·x̃, so that the map's normaliser gives back x̃.
fn denormalize(xt: &[f64]) -> Vec<f64> {
    let s = (xt.len() as f64).powf(0.25);
    xt.iter().map(|v| v * s).collect()
}

fn sq_norm(v: &[f64]) -> f64 {
    dot(v, v)
}

/// Closed-form MSEs of the paper's Lemma 2 for m iid draws, in terms of x̃, ỹ.
fn lemma2_mse(kind: &str, xt: &[f64], yt: &[f64], m: usize) -> f64 {
    let z: Vec<f64> = xt.iter().zip(yt).map(|(a, b)| a + b).collect();
    let delta: Vec<f64> = xt.iter().zip(yt).map(|(a, b)| a - b).collect();
    let sm = dot(xt, yt).exp();
    let (z2, d2, m) = (sq_norm(&z), sq_norm(&delta), m as f64);
    let positive = z2.exp() * sm * sm * (1.0 - (-z2).exp()) / m;
    match kind {
        "positive" => positive,
        "hyperbolic" => 0.5 * (1.0 - (-z2).exp()) * positive,
        "trigonometric" => z2.exp() / (sm * sm) * (1.0 - (-d2).exp()).powi(2) / (2.0 * m),
        _ => unreachable!(),
    }
}

fn raw_map(kind: &str, projection: Projection) -> FeatureMap {
    match kind {
        "positive" => FeatureMap::Positive { projection, epsilon: 0.0, softmax_scale: None },
        "hyperbolic" => FeatureMap::Hyperbolic { projection, epsilon: 0.0, softmax_scale: None },
        "trigonometric" => FeatureMap::Trigonometric { projection, softmax_scale: None },
        _ => unreachable!(),
    }
}

const KERNEL_KINDS: [&str; 3] = ["positive", "hyperbolic", "trigonometric"];

/// Lemma 1 and Lemma 2: the raw estimators are unbiased and their variance over projection
/// draws is the closed form. The variance check's tolerance is the sampling error of a variance
/// estimate (from the fourth moment), so a missing factor (e.g. ½ of the hyperbolic map, a
/// wrong ratio m^{-1/2}, cos/sin swapped with the wrong norm factor) is many standard errors off.
#[test]
fn softmax_estimators_are_unbiased_with_the_closed_form_variance() {
    // d = 4; x̃, ỹ chosen with ‖x̃ + ỹ‖² = 0.55 and ‖x̃ − ỹ‖² = 0.51: moderate variances, so the
    // sampling error of the variance estimate is small (kurtosis of e^{ωᵀz} grows like e^{6‖z‖²}).
    let xt = [0.3, -0.2, 0.4, 0.1];
    let yt = [0.2, 0.3, 0.1, -0.3];
    let (x, y) = (denormalize(&xt), denormalize(&yt));
    let truth = dot(&xt, &yt).exp();
    let (m, d, draws) = (8, 4, 20_000);
    for kind in KERNEL_KINDS {
        let est = kernel_estimates(draws, 1_000_000, &x, &y, |s| {
            raw_map(kind, Projection::draw(ProjectionConfig::new(m, d, s).iid()).unwrap())
        });
        let mo = moments(&est);
        let z_mean = (mo.mean - truth) / mo.se_mean;
        let theory = lemma2_mse(kind, &xt, &yt, m);
        let z_var = (mo.var - theory) / mo.se_var;
        println!(
            "unbiasedness [{kind:>13}, iid, m={m}, d={d}, {draws} draws]: mean {:.6} vs exp(x̃ᵀỹ) {truth:.6} \
             (z = {z_mean:+.2}); variance {:.5e} vs Lemma 2 {theory:.5e} (ratio {:.4}, z = {z_var:+.2})",
            mo.mean,
            mo.var,
            mo.var / theory
        );
        assert!(z_mean.abs() < 4.0, "{kind}: biased, z = {z_mean}");
        assert!(z_var.abs() < 4.0, "{kind}: variance off the closed form, z = {z_var}");
        // The standard errors are small enough to tell a 5% bias and a 15% variance error.
        assert!(mo.se_mean < 0.01 * truth && mo.se_var < 0.05 * theory);
    }
}

/// Orthogonal rows with χ(d) norms are marginally N(0, I): the estimators stay unbiased.
#[test]
fn orthogonal_projections_keep_the_estimators_unbiased() {
    let xt = [0.3, -0.2, 0.4, 0.1];
    let yt = [0.2, 0.3, 0.1, -0.3];
    let (x, y) = (denormalize(&xt), denormalize(&yt));
    let truth = dot(&xt, &yt).exp();
    // m = 6 > d = 4: one full orthogonal block and a 2-row remainder block.
    let (m, d, draws) = (6, 4, 20_000);
    for kind in KERNEL_KINDS {
        let est = kernel_estimates(draws, 2_000_000, &x, &y, |s| {
            raw_map(kind, Projection::draw(ProjectionConfig::new(m, d, s)).unwrap())
        });
        let mo = moments(&est);
        let z_mean = (mo.mean - truth) / mo.se_mean;
        println!(
            "unbiasedness [{kind:>13}, orthogonal, m={m}, d={d}, {draws} draws]: mean {:.6} vs {truth:.6} (z = {z_mean:+.2})",
            mo.mean
        );
        assert!(z_mean.abs() < 4.0, "{kind}: orthogonal features biased, z = {z_mean}");
        assert!(mo.se_mean < 0.01 * truth);
    }
}

/// Orthogonal random features have a lower MSE than iid ones at equal m (one full d×d block),
/// by a margin of many standard errors.
#[test]
fn orthogonal_features_have_lower_mse_than_iid() {
    let (m, d, draws) = (16, 16, 20_000);
    let mut r = testing::rng(11);
    let unit = |r: &mut testing::TestRng| {
        let v = gaussian(r, d, 1.0);
        let n = sq_norm(&v).sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f64>>()
    };
    // ‖x̃‖ = ‖ỹ‖ = 0.7: ‖x̃ + ỹ‖² ≈ 1, where the orthogonal gain relative to the MSE is largest.
    let xt: Vec<f64> = unit(&mut r).into_iter().map(|v| 0.7 * v).collect();
    let yt: Vec<f64> = unit(&mut r).into_iter().map(|v| 0.7 * v).collect();
    let (x, y) = (denormalize(&xt), denormalize(&yt));
    let truth = dot(&xt, &yt).exp();
    let lambda = (-(sq_norm(&xt) + sq_norm(&yt)) / 2.0).exp();
    for kind in ["positive", "hyperbolic"] {
        let est = |k: ProjectionKind, seed| {
            kernel_estimates(draws, seed, &x, &y, |s| {
                raw_map(kind, Projection::draw(ProjectionConfig { kind: k, ..ProjectionConfig::new(m, d, s) }).unwrap())
            })
        };
        let (iid, iid_se) = mse(&est(ProjectionKind::Iid, 3_000_000), truth);
        let (ort, ort_se) = mse(&est(ProjectionKind::Orthogonal, 4_000_000), truth);
        let se = (iid_se * iid_se + ort_se * ort_se).sqrt();
        let z = (iid - ort) / se;
        let theory_iid = lemma2_mse(kind, &xt, &yt, m);
        // The paper's Theorem 2 (positive features): MSE_ort ≤ MSE_iid − 2(m−1)/(m(d+2))·(SM − Λ)².
        let bound = theory_iid - 2.0 * (m - 1) as f64 / (m * (d + 2)) as f64 * (truth - lambda).powi(2);
        println!(
            "iid vs orthogonal [{kind:>10}, m={m}, d={d}, {draws} draws each]: MSE iid {iid:.4e} ± {iid_se:.1e} \
             (Lemma 2: {theory_iid:.4e}), orthogonal {ort:.4e} ± {ort_se:.1e} (ratio {:.3}, difference z = {z:.1}){}",
            ort / iid,
            if kind == "positive" { format!("; Theorem 2 bound {bound:.4e}") } else { String::new() }
        );
        assert!(z > 5.0, "{kind}: orthogonal MSE {ort} not clearly below iid {iid} (z = {z})");
        if kind == "positive" {
            assert!(ort < bound + 4.0 * ort_se, "positive: orthogonal MSE {ort} above the Theorem 2 bound {bound}");
        }
    }
}

/// Independent evaluations of the documented formulas (module table), ε and κ included.
#[test]
fn features_match_the_documented_formulas() {
    let (d, m) = (5, 7);
    let mut r = testing::rng(5);
    let x = gaussian(&mut r, d, 0.8);
    let c = 0.37;
    for (name, map) in testing::feature_map_catalog(d, m, 9) {
        let map = testing::with_epsilon(&map, 0.25);
        // x̃ = √τ·x, τ = 1/√d unless the map sets a softmax scale.
        let tau = match &map {
            FeatureMap::Positive { softmax_scale, .. }
            | FeatureMap::Hyperbolic { softmax_scale, .. }
            | FeatureMap::Trigonometric { softmax_scale, .. }
            | FeatureMap::Generalized { softmax_scale, .. } => softmax_scale.map_or(1.0 / (d as f64).sqrt(), f64::from),
            _ => 1.0 / (d as f64).sqrt(),
        };
        let xt: Vec<f64> = x.iter().map(|v| v * tau.sqrt()).collect();
        let h = sq_norm(&xt) / 2.0;
        let mf = map.feature_dim(d);
        let mut got = vec![0.0; mf];
        map.features(&x, c, &mut got);
        let row = |p: &Projection, j: usize, v: &[f64]| {
            p.row(j).unwrap().iter().zip(v).map(|(&w, &t)| w as f64 * t).sum::<f64>()
        };
        let want: Vec<f64> = match &map {
            // The ε floor scales with the token's own log-scale s = max_j a_j − h (|a_j| for
            // hyperbolic): ε·e^{s − c}.
            FeatureMap::Positive { projection: p, epsilon, .. } => {
                let s = (0..m).map(|j| row(p, j, &xt)).fold(f64::NEG_INFINITY, f64::max) - h;
                let floor = *epsilon as f64 * (s - c).exp();
                (0..m).map(|j| ((row(p, j, &xt) - h - c).exp() + floor) / (m as f64).sqrt()).collect()
            }
            FeatureMap::Hyperbolic { projection: p, epsilon, .. } => {
                let s = (0..m).map(|j| row(p, j, &xt).abs()).fold(f64::NEG_INFINITY, f64::max) - h;
                let floor = *epsilon as f64 * (s - c).exp();
                let r = (2.0 * m as f64).sqrt();
                let plus = (0..m).map(|j| ((row(p, j, &xt) - h - c).exp() + floor) / r);
                let minus = (0..m).map(|j| ((-row(p, j, &xt) - h - c).exp() + floor) / r);
                plus.chain(minus).collect()
            }
            FeatureMap::Trigonometric { projection: p, .. } => {
                let s = (h - c).exp() / (m as f64).sqrt();
                let cos = (0..m).map(|j| s * row(p, j, &xt).cos());
                let sin = (0..m).map(|j| s * row(p, j, &xt).sin());
                cos.chain(sin).collect()
            }
            FeatureMap::Generalized { f, projection, normalize_data, scale, kappa, .. } => {
                let xh = if *normalize_data { &xt } else { &x };
                let y: Vec<f64> = match projection {
                    Some(p) => (0..m).map(|j| *scale as f64 * row(p, j, xh)).collect(),
                    None => xh.iter().map(|v| *scale as f64 * v).collect(),
                };
                let f = |v: f64| match f {
                    Elementwise::Relu => v.max(0.0),
                    Elementwise::EluPlusOne => {
                        if v > 0.0 {
                            v + 1.0
                        } else {
                            v.exp()
                        }
                    }
                    Elementwise::Softplus => (1.0 + v.exp()).ln(),
                };
                y.into_iter().map(|v| f(v) + *kappa as f64).collect()
            }
            FeatureMap::Softplus(l) => (0..m)
                .map(|j| {
                    let yv = l.bias.as_ref().unwrap()[j] as f64
                        + dot(&l.w[j * d..(j + 1) * d].iter().map(|&w| w as f64).collect::<Vec<_>>(), &x);
                    (1.0 + yv.exp()).ln()
                })
                .collect(),
            FeatureMap::GatedSoftplus(g) => (0..m)
                .map(|j| {
                    let w = |l: &Linear| l.w[j * d..(j + 1) * d].iter().map(|&w| w as f64).collect::<Vec<_>>();
                    let (yf, yg) = (dot(&w(&g.filter), &x), dot(&w(&g.gate), &x));
                    (1.0 + yf.exp()).ln() / (1.0 + (-yg).exp())
                })
                .collect(),
        };
        let err = testing::rel_frobenius(&got, &want);
        assert!(err < 1e-14, "{name}: features differ from the documented formula by {err:e}");
        // Sanity of the defaults: ReLU with a projection scales by m^{-1/2}, κ = 1e-3.
        if name == "relu-projected" {
            assert!(
                matches!(map, FeatureMap::Generalized { scale, kappa: 1e-3, .. } if (scale - 1.0 / (m as f32).sqrt()).abs() < 1e-7)
            );
        }
    }
}

/// The query stabiliser includes −‖x̃‖²/2: the largest positive feature of a query is exactly
/// m^{-1/2}(1 + ε) whatever its norm (no underflow to the ε floor); hyperbolic and trigonometric
/// likewise peak at (2m)^{-1/2}(1 + ε) and m^{-1/2}.
#[test]
fn query_stabiliser_keeps_the_largest_feature_at_one() {
    let (d, m) = (6, 9);
    for scale in [1e-30, 1e-3, 1.0, 30.0, 1e4] {
        let x: Vec<f64> = gaussian(&mut testing::rng(3), d, scale);
        for (name, map) in testing::feature_map_catalog(d, m, 2).into_iter().take(3) {
            let mf = map.feature_dim(d);
            let mut phi = vec![0.0; mf];
            map.features(&x, map.log_scale(&x), &mut phi);
            let max = phi.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
            let want = match name {
                "positive" => (1.0 + DEFAULT_EPSILON as f64) / (m as f64).sqrt(),
                "hyperbolic" => (1.0 + DEFAULT_EPSILON as f64) / (2.0 * m as f64).sqrt(),
                // [cos, sin]·m^{-1/2}: the largest of |cos a_j|, |sin a_j| is at most 1.
                _ => {
                    assert!(max <= 1.0 / (m as f64).sqrt() * (1.0 + 1e-12) && max > 0.5 / (m as f64).sqrt());
                    continue;
                }
            };
            assert!((max - want).abs() < 1e-12 * want, "{name} at |x| ~ {scale}: max feature {max}, want {want}");
        }
    }
}

/// ∂/∂x of ⟨g, φ(x; c)⟩ with c held fixed, for every map, against central differences; and
/// the documented accumulate-into-`dx` contract.
#[test]
fn feature_map_input_gradients_match_finite_differences() {
    let (d, m) = (5, 6);
    for (name, map) in testing::feature_map_catalog(d, m, 21) {
        let mf = map.feature_dim(d);
        for trial in 0..3u64 {
            let mut r = testing::rng(100 + trial);
            let mut x = gaussian(&mut r, d, 0.7);
            while testing::min_abs_preactivation(&map, &x, d) < 1e-3 {
                x = gaussian(&mut r, d, 0.7);
            }
            let g = gaussian(&mut r, mf, 1.0);
            // A stabiliser near (not at) the log-scale, held fixed.
            let c = map.log_scale(&x) + 0.3;
            let loss = |x: &[f64]| {
                let mut phi = vec![0.0; mf];
                map.features(x, c, &mut phi);
                dot(&g, &phi)
            };
            let numeric = central_difference(&x, 1e-5, loss);
            let offset = vec![0.5; d];
            let mut dx = offset.clone();
            map.features_backward(&x, c, &g, &mut dx, None);
            let analytic: Vec<f64> = dx.iter().zip(&offset).map(|(a, b)| a - b).collect();
            assert_gradient(&format!("{name} dφ/dx (trial {trial})"), &analytic, &numeric, 1e-7);
        }
    }
}

/// Parameter gradients of the learned maps (W, bias, W_g), summed over tokens, against central
/// differences on the f32 parameters.
#[test]
fn learned_map_parameter_gradients_match_finite_differences() {
    let (d, m, tokens) = (4, 5, 3);
    for map in [
        testing::learned_softplus(m, d, 1, true),
        testing::learned_softplus(m, d, 2, false),
        testing::gated_softplus(m, d, 3),
    ] {
        let mut r = testing::rng(31);
        let xs = gaussian(&mut r, tokens * d, 1.0);
        let g = gaussian(&mut r, tokens * m, 1.0);
        let loss = |map: &FeatureMap| {
            let mut phi = vec![0.0; m];
            (0..tokens)
                .map(|t| {
                    map.features(&xs[t * d..(t + 1) * d], 0.0, &mut phi);
                    dot(&g[t * m..(t + 1) * m], &phi)
                })
                .sum::<f64>()
        };
        let numeric = testing::param_gradient(&map, loss);
        let mut grads = map.param_grads_f64().expect("learned map has parameters");
        let mut dx = vec![0.0; d];
        for t in 0..tokens {
            map.features_backward(&xs[t * d..(t + 1) * d], 0.0, &g[t * m..(t + 1) * m], &mut dx, Some(&mut grads));
        }
        let analytic = testing::flat_param_grads(&grads);
        assert_eq!(analytic.len(), testing::params(&map).len());
        assert_gradient(&format!("{} dφ/dθ", map.name()), &analytic, &numeric, 1e-7);
    }
}

/// Finite inputs of any magnitude give finite features and gradients (f64), with the
/// stabilisers a query, a bidirectional key set and a causal key prefix would use.
#[test]
fn features_are_finite_at_extreme_magnitudes() {
    let (d, m) = (6, 8);
    let mut r = testing::rng(77);
    let mixed: Vec<f64> = (0..4 * d)
        .map(|i| {
            let s = [1e4, 1.0, 1e-30, -1e4][i % 4];
            s * (1.0 + testing::uniform(&mut r, 1, 0.0, 1.0)[0])
        })
        .collect();
    let cases: Vec<(&str, Vec<f64>)> = vec![
        ("1e4", gaussian(&mut r, 4 * d, 1e4)),
        ("1e-30", gaussian(&mut r, 4 * d, 1e-30)),
        ("mixed", mixed),
        ("zero", vec![0.0; 4 * d]),
    ];
    for (name, map) in testing::feature_map_catalog(d, m, 8) {
        let mf = map.feature_dim(d);
        for (case, xs) in &cases {
            let s: Vec<f64> = xs.chunks(d).map(|x| map.log_scale(x)).collect();
            let key_max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            for (t, x) in xs.chunks(d).enumerate() {
                for c in [s[t], key_max] {
                    let mut phi = vec![0.0; mf];
                    map.features(x, c, &mut phi);
                    let mut dx = vec![0.0; d];
                    let mut pg = map.param_grads_f64();
                    map.features_backward(x, c, &vec![1.0; mf], &mut dx, pg.as_mut());
                    let pg = pg.map(|p| testing::flat_param_grads(&p)).unwrap_or_default();
                    assert!(
                        phi.iter().chain(&dx).chain(&pg).all(|v| v.is_finite()),
                        "{name} [{case}] token {t}: non-finite φ {phi:?} / dx {dx:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn parameters_beyond_the_limit_are_rejected_with_their_name() {
    let proj = || Projection::draw(ProjectionConfig::new(4, 3, 1)).unwrap();
    let relu = |scale: f32, kappa: f32| FeatureMap::Generalized {
        f: Elementwise::Relu,
        projection: Some(proj()),
        normalize_data: true,
        scale,
        kappa,
        softmax_scale: None,
    };
    let elu = |scale: f32| FeatureMap::Generalized {
        f: Elementwise::EluPlusOne,
        projection: None,
        normalize_data: false,
        scale,
        kappa: 0.0,
        softmax_scale: None,
    };
    // Built field by field: `Linear::new` already refuses such weights.
    let learned = |w: f32, b: f32| FeatureMap::Softplus(Linear { m: 2, d: 3, w: vec![w; 6], bias: Some(vec![b; 2]) });
    let huge = Projection::from_matrix(2, 3, vec![0.5, 1e30, 0.0, 1.0, 1.0, 1.0]);
    let bad = [
        (FeatureMap::Positive { projection: proj(), epsilon: 1e38, softmax_scale: None }, "epsilon"),
        (FeatureMap::Hyperbolic { projection: proj(), epsilon: 3e38, softmax_scale: None }, "epsilon"),
        (relu(1.0, 1e38), "kappa"),
        (relu(1e38, 0.0), "scale"),
        (elu(-1e38), "scale"),
        (learned(1e30, 0.0), "w"),
        (learned(0.1, -1e30), "bias"),
    ];
    // Projections are checked where they are made (or by the map that uses them).
    let projection_rejected = match huge {
        Err(FavorError::InvalidParameter { name: "projection", .. }) => true,
        Ok(p) => {
            matches!(FeatureMap::positive(p).validate(3), Err(FavorError::InvalidParameter { name: "projection", .. }))
        }
        Err(_) => false,
    };
    assert!(projection_rejected);
    for (map, want) in bad {
        match map.validate(3) {
            Err(FavorError::InvalidParameter { name, reason }) => {
                assert_eq!(name, want, "{reason}");
                assert!(reason.contains("1e6"), "the message states the range: {reason}");
            }
            other => panic!("{} with an out-of-range {want}: {other:?}", map.name()),
        }
    }
    let at_limit = [
        FeatureMap::Positive { projection: proj(), epsilon: PARAM_LIMIT, softmax_scale: None },
        relu(-PARAM_LIMIT, PARAM_LIMIT),
        elu(PARAM_LIMIT),
        learned(PARAM_LIMIT, -PARAM_LIMIT),
    ];
    for map in at_limit {
        map.validate(3).unwrap();
    }
}

/// With softmax scale τ the raw estimators are unbiased for exp(τ·xᵀy) (not exp(xᵀy/√d)), and
/// their variance is Lemma 2's at x̃ = √τ·x.
#[test]
fn a_softmax_scale_sets_the_kernel_temperature() {
    let (m, d, draws) = (8, 4, 20_000);
    for (i, tau) in [0.3f32, 1.3].into_iter().enumerate() {
        // τ‖x + y‖² = 0.6 for both τ: moderate variances, as in the unbiasedness test above.
        let s = (0.19 / tau as f64).sqrt();
        let x: Vec<f64> = [0.5, -0.3, 0.6, 0.2].iter().map(|v| v * s).collect();
        let y: Vec<f64> = [0.6, -0.4, 0.5, 0.3].iter().map(|v| v * s).collect();
        let truth = (tau as f64 * dot(&x, &y)).exp();
        let default_truth = (dot(&x, &y) / (d as f64).sqrt()).exp();
        let (xt, yt): (Vec<f64>, Vec<f64>) =
            (x.iter().map(|v| v * (tau as f64).sqrt()).collect(), y.iter().map(|v| v * (tau as f64).sqrt()).collect());
        for kind in KERNEL_KINDS {
            let est = kernel_estimates(draws, 5_000_000 + 100_000 * i as u64, &x, &y, |s| {
                let p = Projection::draw(ProjectionConfig::new(m, d, s).iid()).unwrap();
                raw_map(kind, p).with_softmax_scale(tau).unwrap()
            });
            let mo = moments(&est);
            let z_mean = (mo.mean - truth) / mo.se_mean;
            let theory = lemma2_mse(kind, &xt, &yt, m);
            let z_var = (mo.var - theory) / mo.se_var;
            println!(
                "τ = {tau} [{kind:>13}]: mean {:.6} vs exp(τ·xᵀy) {truth:.6} (z = {z_mean:+.2}), vs the default \
                 kernel {default_truth:.6}; variance ratio to Lemma 2 {:.4} (z = {z_var:+.2})",
                mo.mean,
                mo.var / theory
            );
            assert!(z_mean.abs() < 4.0, "{kind} τ = {tau}: biased, z = {z_mean}");
            assert!(z_var.abs() < 4.0, "{kind} τ = {tau}: variance off Lemma 2, z = {z_var}");
            // The test can tell the scaled kernel from the default one.
            assert!((default_truth - truth).abs() > 10.0 * mo.se_mean, "{kind} τ = {tau}: kernels too close to tell");
        }
    }
}

/// A softmax scale τ is the default map on the rescaled input c·x, c = (τ√d)^{1/2}: the same
/// log-scale and features, and ∂ℒ/∂x = c·(the default map's gradient at c·x), for every map
/// that has a softmax scale, on a stabiliser shared by both.
#[test]
fn a_softmax_scale_equals_the_default_map_on_rescaled_input() {
    let (d, m) = (6, 9);
    let mut r = testing::rng(31);
    let x = gaussian(&mut r, d, 0.8);
    for (name, base) in testing::feature_map_catalog(d, m, 12) {
        if base.softmax_scale(d).is_none() || name.ends_with("-scaled") {
            continue;
        }
        let base = testing::with_epsilon(&base, 0.1);
        for tau in [0.05f32, 1.3, 7.0] {
            let scaled = base.clone().with_softmax_scale(tau).unwrap();
            assert_eq!(scaled.softmax_scale(d), Some(tau as f64));
            let c = (tau as f64 * (d as f64).sqrt()).sqrt();
            let xs: Vec<f64> = x.iter().map(|v| v * c).collect();
            let what = format!("{name} τ = {tau}");
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1e-300);
            assert!(close(scaled.log_scale(&x), base.log_scale(&xs)), "{what}: log-scale");
            let stab = base.log_scale(&xs) + 0.3;
            let mf = base.feature_dim(d);
            let (mut fs, mut fb) = (vec![0.0; mf], vec![0.0; mf]);
            scaled.features(&x, stab, &mut fs);
            base.features(&xs, stab, &mut fb);
            assert!(fs.iter().zip(&fb).all(|(&a, &b)| close(a, b)), "{what}: features {fs:?} vs {fb:?}");
            let g = gaussian(&mut r, mf, 1.0);
            let (mut ds, mut db) = (vec![0.0; d], vec![0.0; d]);
            scaled.features_backward(&x, stab, &g, &mut ds, None);
            base.features_backward(&xs, stab, &g, &mut db, None);
            assert!(ds.iter().zip(&db).all(|(&a, &b)| close(a, c * b)), "{what}: gradients {ds:?} vs c·{db:?}");
        }
    }
}

/// Softmax scales outside (0, PARAM_LIMIT], and scales on maps that do not normalise their
/// input, are typed errors naming `softmax_scale`.
#[test]
fn softmax_scales_are_validated() {
    let proj = || Projection::draw(ProjectionConfig::new(4, 3, 1)).unwrap();
    let is_scale_error = |r: Result<()>| matches!(r, Err(FavorError::InvalidParameter { name: "softmax_scale", .. }));
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY, 2.0 * PARAM_LIMIT, -0.0] {
        assert!(is_scale_error(FeatureMap::positive(proj()).with_softmax_scale(bad).map(drop)), "τ = {bad}");
        let literal = FeatureMap::Trigonometric { projection: proj(), softmax_scale: Some(bad) };
        assert!(is_scale_error(literal.validate(3)), "literal τ = {bad}");
    }
    for map in [
        FeatureMap::relu(Some(proj())),
        FeatureMap::relu(None),
        FeatureMap::elu_plus_one(),
        testing::learned_softplus(4, 3, 5, true),
        testing::gated_softplus(4, 3, 6),
    ] {
        assert_eq!(map.softmax_scale(3), None, "{}", map.name());
        assert_eq!(map.data_normalizer(3), 1.0, "{}", map.name());
        assert!(is_scale_error(map.clone().with_softmax_scale(0.5).map(drop)), "{}", map.name());
    }
    let unnormalised = FeatureMap::Generalized {
        f: Elementwise::Softplus,
        projection: Some(proj()),
        normalize_data: false,
        softmax_scale: Some(0.5),
        scale: 1.0,
        kappa: 0.0,
    };
    assert!(is_scale_error(unnormalised.validate(3)));
    // Defaults: τ = 1/√d, normaliser d^{-1/4}; a set scale is taken as given.
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(4, 16, 1)).unwrap());
    assert_eq!((map.softmax_scale(16), map.data_normalizer(16)), (Some(0.25), 0.5));
    let map = map.with_softmax_scale(PARAM_LIMIT).unwrap();
    assert_eq!(map.softmax_scale(16), Some(PARAM_LIMIT as f64));
    assert!(map.validate(16).is_ok());
}
