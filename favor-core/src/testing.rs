//! Shared test utilities: seeded random tensors, error norms, central finite differences and a
//! catalogue of every feature map. Compiled for favor-core's own tests and, with the `testing`
//! cargo feature, for other crates' tests (`favor-core = { ..., features = ["testing"] }` as a
//! dev-dependency).
//!
//! Everything is deterministic: the RNG is `Xoshiro256++` seeded by the caller.

use crate::features::ParamGradsF64;
use crate::layout::TensorDims;
use crate::{
    AttentionShape, DType, Elementwise, FavorBackend, FavorError, FeatureMap, GatedSoftplusParams, Grads, Host,
    HostMut, HostRef, HostTensor, Inputs, Layout, Linear, Problem, Projection, ProjectionConfig, Strides, TensorArg,
    TensorHandle,
};
use rand_distr::{Distribution, StandardNormal, StandardUniform};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

pub mod ragged;
pub mod slots;

/// The value-stable RNG of the test suite.
pub type TestRng = Xoshiro256PlusPlus;

/// A seeded RNG.
pub fn rng(seed: u64) -> TestRng {
    TestRng::seed_from_u64(seed)
}

/// `n` draws of N(0, std²) in f64.
pub fn gaussian(rng: &mut TestRng, n: usize, std: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            std * z
        })
        .collect()
}

/// A seeded N(0, std²) tensor of `n` elements in f32 (for the host API).
pub fn random_tensor(seed: u64, n: usize, std: f32) -> Vec<f32> {
    gaussian(&mut rng(seed), n, std as f64).into_iter().map(|x| x as f32).collect()
}

/// `n` draws uniform in [lo, hi).
pub fn uniform(rng: &mut TestRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let u: f64 = StandardUniform.sample(rng);
            lo + (hi - lo) * u
        })
        .collect()
}

/// A uniform index in `0..n` (`n > 0`).
pub fn index(rng: &mut TestRng, n: usize) -> usize {
    let u: f64 = StandardUniform.sample(rng);
    ((u * n as f64) as usize).min(n - 1)
}

/// A key mask of `n` entries keeping each with probability `keep`.
pub fn random_mask(rng: &mut TestRng, n: usize, keep: f64) -> Vec<bool> {
    uniform(rng, n, 0.0, 1.0).into_iter().map(|u| u < keep).collect()
}

/// ⟨a, b⟩.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// ‖a‖_F.
pub fn frobenius(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Relative Frobenius error ‖a − b‖_F / ‖b‖_F (0 when both are zero, ∞ when only b is).
pub fn rel_frobenius(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_frobenius: length mismatch");
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (num, den) = (frobenius(&diff), frobenius(b));
    if num == 0.0 { 0.0 } else { num / den }
}

/// The error of a backend's result `a` against the reference `b`: ‖a − b‖_F / ‖b‖_F, with no
/// floor (a floor on ‖b‖ turns the check into an absolute one for small results and hides their
/// errors). 0 when a = b, ∞ when only b is zero. Panics on a length mismatch or a non-finite
/// value, naming the tensor and the index.
///
/// For a reference that is zero in exact arithmetic use [`rel_error_or_cancelled`].
#[track_caller]
pub fn rel_error(what: &str, a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: length mismatch");
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        panic!("{what}: non-finite result [{i}] = {}", a[i]);
    }
    if let Some(i) = b.iter().position(|x| !x.is_finite()) {
        panic!("{what}: non-finite reference [{i}] = {}", b[i]);
    }
    rel_frobenius(a, b)
}

/// The largest relative error of rounding one value to a storage type, half an ulp: 2^-24 in
/// f32, 2^-11 in f16, 2^-8 in bf16 (normal range).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-24),
        DType::F16 => 2f64.powi(-11),
        DType::Bf16 => 2f64.powi(-8),
    }
}

/// The tolerance of a result stored in `dtype` against the reference's f64 result on the same
/// stored inputs: `compute`, the f32 compute error, plus for 16-bit storage the rounding of the
/// result to it. Rounding every element by at most [`unit_roundoff`] relative moves the result
/// by at most that much in Frobenius norm; the inputs are the same rounded values for both.
pub fn storage_tolerance(dtype: DType, compute: f64) -> f64 {
    match dtype {
        DType::F32 => compute,
        DType::F16 | DType::Bf16 => compute + unit_roundoff(dtype),
    }
}

/// A reference whose RMS is below this fraction of the scale of the terms it is formed from is
/// f64 rounding noise (sums of O(L) such terms round to ~1e-16·√L of their scale); it is treated
/// as an exact zero. Ordinary results, however small, are far above it (f32 alone resolves only
/// 6e-8 of the scale, so a reference between the two fails the relative check, visibly).
pub const CANCELLED_BELOW: f64 = 1e-13;

/// An error measured by [`rel_error_or_cancelled`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelError {
    /// ‖a − b‖ / ‖b‖, or ‖a − b‖ / (scale·√n) for a cancelled reference.
    pub value: f64,
    /// Whether the reference was a cancellation (exactly zero in exact arithmetic).
    pub cancelled: bool,
}

impl std::fmt::Display for RelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1e}{}", self.value, if self.cancelled { " (cancelled; vs scale)" } else { "" })
    }
}

/// [`rel_error`] for results that can be zero in exact arithmetic: ∂out/∂q with one key, d = 1 or
/// a single feature is a difference of two O(`scale`) terms that cancel exactly, so f64 leaves
/// ~1e-17·scale and f32 ~1e-7·scale of noise, and a relative error is undefined. Only there, when
/// RMS(b) ≤ [`CANCELLED_BELOW`]·`scale`, the error is measured against the cancelled terms,
/// ‖a − b‖ / (scale·√n), so that the same tolerance bounds the f32 noise relative to what
/// cancelled. `scale` is the magnitude of those terms (for attention gradients: that of the
/// output cotangent times the values, and the key or query norm for dq and dk). Every other
/// reference, however small, gets the plain relative error.
#[track_caller]
pub fn rel_error_or_cancelled(what: &str, a: &[f64], b: &[f64], scale: f64) -> RelError {
    assert!(scale.is_finite() && scale > 0.0, "{what}: the scale of the cancelled terms must be positive, got {scale}");
    let value = rel_error(what, a, b);
    let n = b.len().max(1) as f64;
    if frobenius(b) <= CANCELLED_BELOW * scale * n.sqrt() {
        let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        RelError { value: frobenius(&diff) / (scale * n.sqrt()), cancelled: true }
    } else {
        RelError { value, cancelled: false }
    }
}

/// The slopes of the log-denominators of attention with `p` on `inputs`, the scale of the terms
/// that cancel in a gradient that vanishes in exact arithmetic (with one key, ∂out/∂q_i is
/// ∇log R_i·⟨g_i, v − out_i⟩, a difference of two terms of size ‖g_i‖·‖v‖·‖∇log R_i‖): the
/// largest ‖∇_{q_i} log R_i‖ with R_i = φ(q_i)·Σ_j φ(k_j), the largest ‖∇_{k_j} log(φ(k_j)·Σ_i
/// φ(q_i))‖, and the largest norm of the same gradients with respect to a learned map's
/// parameters (0 without). Large where features are small (ReLU's floor κ: 1/κ). Computed in f64
/// from the stored inputs, with every key (causal prefixes differ only by a bounded factor).
pub fn log_denominator_slopes(p: &Problem<'_>, inputs: Inputs<'_, Host>) -> (f64, f64) {
    let s = p.shape;
    let (l, lk, d) = (s.len, s.keys(), s.d);
    let mf = p.map.feature_dim(d);
    let (q, k) = (inputs.q.to_f64_vec(), inputs.k.to_f64_vec());
    let (mut slope, mut param_slope) = (0.0f64, 0.0f64);
    for bh in 0..s.problems() {
        let keep = |j: usize| inputs.key_mask.is_none_or(|m| m[(bh / s.heads) * lk + j]);
        let kvh = s.kv_head_of(bh);
        let (qh, kh) = (q[bh * l * d..(bh + 1) * l * d].to_vec(), k[kvh * lk * d..(kvh + 1) * lk * d].to_vec());
        // Features of each row at its own log-scale, and their sums (the scale of each row drops
        // out of its log-slope).
        let feats = |x: &[f64], kept: &dyn Fn(usize) -> bool| {
            let rows = x.len() / d;
            let mut f = vec![0.0; rows * mf];
            for j in (0..rows).filter(|&j| kept(j)) {
                let xj = &x[j * d..(j + 1) * d];
                p.map.features(xj, p.map.log_scale(xj), &mut f[j * mf..(j + 1) * mf]);
            }
            let mut sum = vec![0.0; mf];
            f.chunks_exact(mf).for_each(|r| sum.iter_mut().zip(r).for_each(|(a, b)| *a += b));
            (f, sum)
        };
        let (qf, qsum) = feats(&qh, &|_| true);
        let (kf, ksum) = feats(&kh, &keep);
        for (x, f, other, kept) in [(&qh, &qf, &ksum, &(|_| true) as &dyn Fn(usize) -> bool), (&kh, &kf, &qsum, &keep)]
        {
            for j in (0..x.len() / d).filter(|&j| kept(j)) {
                let r = dot(&f[j * mf..(j + 1) * mf], other);
                if r == 0.0 {
                    continue;
                }
                let dphi: Vec<f64> = other.iter().map(|o| o / r).collect();
                let xj = &x[j * d..(j + 1) * d];
                let mut dx = vec![0.0; d];
                let mut grads = p.map.param_grads_f64();
                p.map.features_backward(xj, p.map.log_scale(xj), &dphi, &mut dx, grads.as_mut());
                slope = slope.max(frobenius(&dx));
                if let Some(g) = &grads {
                    param_slope = param_slope.max(frobenius(&flat_param_grads(g)));
                }
            }
        }
    }
    (slope, param_slope)
}

/// The scale of the terms that cancel in a gradient that vanishes in exact arithmetic, for
/// dq/dk and for a learned map's parameter gradients: √d_v·RMS(dout)·RMS(v) (the size of
/// ⟨g_i, v_j⟩) times the slopes of [`log_denominator_slopes`]; never below the smallest
/// positive f64, so it can divide. The measure of [`rel_error_or_cancelled`].
pub fn cancel_scales(p: &Problem<'_>, inputs: Inputs<'_, Host>, dout: HostRef<'_>) -> (f64, f64) {
    let rms = |t: HostRef<'_>| {
        let x = t.to_f64_vec();
        (x.iter().map(|y| y * y).sum::<f64>() / x.len().max(1) as f64).sqrt()
    };
    let (x, params) = log_denominator_slopes(p, inputs);
    let gv = (p.shape.dv as f64).sqrt() * rms(dout) * rms(inputs.v);
    ((gv * x).max(f64::MIN_POSITIVE), (gv * params).max(f64::MIN_POSITIVE))
}

/// How much the denominators of attention with `p` on `inputs` cancel: the largest, over the
/// query rows of every head that see a key, of Σ_j |φ(q_i)·φ(k_j)| / |Σ_j φ(q_i)·φ(k_j)| (keys
/// j ≤ i for causal attention, unmasked only). 1 for non-negative features; for sign-indefinite
/// (trigonometric) features the f32 rounding of the sums is amplified by this factor, so tests
/// bound it for their data. Computed in f64 from the stored inputs; O(L²·m) per head.
pub fn denominator_condition(p: &Problem<'_>, inputs: Inputs<'_, Host>) -> f64 {
    let s = p.shape;
    let (l, lk, d) = (s.len, s.keys(), s.d);
    let mf = p.map.feature_dim(d);
    let (q, k) = (inputs.q.to_f64_vec(), inputs.k.to_f64_vec());
    let causal = p.options.direction == crate::Direction::Causal;
    let mut worst = 1.0f64;
    for bh in 0..s.problems() {
        let keep = |j: usize| inputs.key_mask.is_none_or(|m| m[(bh / s.heads) * lk + j]);
        let kvh = s.kv_head_of(bh);
        let (qh, kh) = (&q[bh * l * d..(bh + 1) * l * d], &k[kvh * lk * d..(kvh + 1) * lk * d]);
        // Any common key stabiliser gives the same ratio: the largest log-scale of a kept key.
        let c = (0..lk).filter(|&j| keep(j)).map(|j| p.map.log_scale(&kh[j * d..(j + 1) * d])).fold(f64::MIN, f64::max);
        let mut kf = vec![0.0; lk * mf];
        for j in (0..lk).filter(|&j| keep(j)) {
            p.map.features(&kh[j * d..(j + 1) * d], c, &mut kf[j * mf..(j + 1) * mf]);
        }
        let mut qf = vec![0.0; mf];
        for i in 0..l {
            let qi = &qh[i * d..(i + 1) * d];
            p.map.features(qi, p.map.log_scale(qi), &mut qf);
            let (mut abs, mut sum) = (0.0f64, 0.0f64);
            for j in (0..if causal { i + 1 } else { lk }).filter(|&j| keep(j)) {
                let x = dot(&qf, &kf[j * mf..(j + 1) * mf]);
                abs += x.abs();
                sum += x;
            }
            if abs > 0.0 {
                worst = worst.max(abs / sum.abs());
            }
        }
    }
    worst
}

/// max_i |a_i − b_i|.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// max_i |a_i|.
pub fn max_abs(a: &[f64]) -> f64 {
    a.iter().map(|x| x.abs()).fold(0.0, f64::max)
}

/// The gradient of `f` at `x` by central differences with step `h` (2·len evaluations).
/// Truncation error O(h²·f'''), rounding error O(ulp(f)/h): h ≈ 1e-5 suits O(1) inputs in f64.
pub fn central_difference(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let up = f(&xp);
            xp[i] = x[i] - h;
            let down = f(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// [`central_difference`] with Richardson extrapolation over steps h and h/2: truncation error
/// O(h⁴), for functions with large higher derivatives.
pub fn central_difference_richardson(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let coarse = central_difference(x, h, &mut f);
    let fine = central_difference(x, h / 2.0, &mut f);
    coarse.iter().zip(&fine).map(|(c, f)| (4.0 * f - c) / 3.0).collect()
}

/// The largest entrywise difference between an analytic and a finite-difference gradient,
/// relative to the largest finite-difference entry.
pub fn gradient_error(analytic: &[f64], numeric: &[f64]) -> f64 {
    max_abs_diff(analytic, numeric) / max_abs(numeric).max(f64::MIN_POSITIVE)
}

/// Asserts that `analytic` matches `numeric` within `rtol` (see [`gradient_error`]) and that the
/// gradient is not trivially zero (a check of two zero vectors could never fail).
#[track_caller]
pub fn assert_gradient(what: &str, analytic: &[f64], numeric: &[f64], rtol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: length mismatch");
    assert!(
        analytic.iter().chain(numeric).all(|x| x.is_finite()),
        "{what}: non-finite gradient\nanalytic {analytic:?}\nnumeric  {numeric:?}"
    );
    assert!(max_abs(numeric) > 1e-10, "{what}: the gradient is (numerically) zero; the check would be vacuous");
    let err = gradient_error(analytic, numeric);
    assert!(err <= rtol, "{what}: gradient error {err:.3e} > {rtol:.1e}\nanalytic {analytic:?}\nnumeric  {numeric:?}");
}

/// Rounds to a multiple of 2^-16, so that steps of 2^-12 on values below 2^8 in magnitude are
/// exact in f32: finite differences on f32 parameters then see exactly the step they assume.
pub fn quantize(x: f64) -> f32 {
    ((x * 65536.0).round() / 65536.0) as f32
}

/// A learned softplus map m×d, weights N(0, 1/d) (quantised, see [`quantize`]), optional bias.
pub fn learned_softplus(m: usize, d: usize, seed: u64, bias: bool) -> FeatureMap {
    let mut r = rng(seed);
    let std = (d as f64).sqrt().recip();
    let w = gaussian(&mut r, m * d, std).into_iter().map(quantize).collect();
    let b = bias.then(|| gaussian(&mut r, m, 0.5).into_iter().map(quantize).collect());
    FeatureMap::Softplus(Linear::new(m, d, w, b).expect("valid learned softplus"))
}

/// A learned gated softplus map m×d with quantised N(0, 1/d) weights.
pub fn gated_softplus(m: usize, d: usize, seed: u64) -> FeatureMap {
    let mut r = rng(seed);
    let std = (d as f64).sqrt().recip();
    let lin = |r: &mut TestRng| {
        Linear::new(m, d, gaussian(r, m * d, std).into_iter().map(quantize).collect(), None).expect("valid linear")
    };
    let filter = lin(&mut r);
    let gate = lin(&mut r);
    FeatureMap::GatedSoftplus(GatedSoftplusParams { filter, gate })
}

/// Every feature map favor offers, named: positive, hyperbolic, trigonometric (orthogonal
/// projections with χ norms, m draws), ReLU with and without projection, ELU+1, generalized
/// softplus (projected, normalised data), learned softplus with bias, gated softplus. Maps
/// without a projection have d features.
pub fn feature_map_catalog(d: usize, m: usize, seed: u64) -> Vec<(&'static str, FeatureMap)> {
    let proj = |s: u64| {
        Projection::draw(ProjectionConfig::new(m, d, seed.wrapping_mul(1000).wrapping_add(s)))
            .expect("valid projection")
    };
    vec![
        ("positive", FeatureMap::positive(proj(1))),
        ("hyperbolic", FeatureMap::hyperbolic(proj(2))),
        ("trigonometric", FeatureMap::trigonometric(proj(3))),
        ("relu-projected", FeatureMap::relu(Some(proj(4)))),
        ("relu", FeatureMap::relu(None)),
        ("elu+1", FeatureMap::elu_plus_one()),
        ("generalized-softplus", FeatureMap::generalized(Elementwise::Softplus, Some(proj(5)), true, 1e-3)),
        ("learned-softplus", learned_softplus(m, d, seed.wrapping_add(6), true)),
        ("gated-softplus", gated_softplus(m, d, seed.wrapping_add(7))),
        // A softmax scale above every default 1/√d (d ≥ 1), so the temperature path differs
        // from the default one at every d.
        ("positive-scaled", FeatureMap::positive(proj(8)).with_softmax_scale(1.3).expect("valid scale")),
    ]
}

/// The same map with ε set (positive and hyperbolic maps; others are returned unchanged).
pub fn with_epsilon(map: &FeatureMap, eps: f32) -> FeatureMap {
    match map {
        FeatureMap::Positive { projection, softmax_scale, .. } => {
            FeatureMap::Positive { projection: projection.clone(), epsilon: eps, softmax_scale: *softmax_scale }
        }
        FeatureMap::Hyperbolic { projection, softmax_scale, .. } => {
            FeatureMap::Hyperbolic { projection: projection.clone(), epsilon: eps, softmax_scale: *softmax_scale }
        }
        other => other.clone(),
    }
}

/// The trainable parameters of a learned map, flattened as (W or W_f, bias, W_g); empty for
/// maps without parameters.
pub fn params(map: &FeatureMap) -> Vec<f32> {
    match map {
        FeatureMap::Softplus(l) => l.w.iter().chain(l.bias.iter().flatten()).copied().collect(),
        FeatureMap::GatedSoftplus(g) => g.filter.w.iter().chain(&g.gate.w).copied().collect(),
        _ => Vec::new(),
    }
}

/// A copy of a learned map with its flattened parameters (layout of [`params`]) replaced.
pub fn with_params(map: &FeatureMap, p: &[f32]) -> FeatureMap {
    let mut out = map.clone();
    match &mut out {
        FeatureMap::Softplus(l) => {
            let n = l.w.len();
            l.w.copy_from_slice(&p[..n]);
            if let Some(b) = &mut l.bias {
                b.copy_from_slice(&p[n..]);
            }
        }
        FeatureMap::GatedSoftplus(g) => {
            let n = g.filter.w.len();
            g.filter.w.copy_from_slice(&p[..n]);
            g.gate.w.copy_from_slice(&p[n..]);
        }
        _ => assert!(p.is_empty(), "map without parameters"),
    }
    out
}

/// Parameter gradients flattened like [`params`].
pub fn flat_param_grads(g: &ParamGradsF64) -> Vec<f64> {
    g.w.iter().chain(g.bias.iter().flatten()).chain(g.w_gate.iter().flatten()).copied().collect()
}

/// [`flat_param_grads`] of a backend's f32 parameter gradients, widened.
pub fn flat_param_grads_f32(g: &crate::ParamGrads) -> Vec<f64> {
    g.w.iter().chain(g.bias.iter().flatten()).chain(g.w_gate.iter().flatten()).map(|&x| x as f64).collect()
}

/// Finite-difference gradient w.r.t. a learned map's parameters: `loss(map)` is evaluated at
/// parameters ± 2^-12 (exact in f32 for quantised parameters) and Richardson-extrapolated with
/// the ± 2^-13 step, so the truncation error is O(h⁴).
pub fn param_gradient(map: &FeatureMap, mut loss: impl FnMut(&FeatureMap) -> f64) -> Vec<f64> {
    let p0 = params(map);
    let mut p = p0.clone();
    let mut diff = |i: usize, h: f32, p: &mut Vec<f32>| {
        p[i] = p0[i] + h;
        let up = loss(&with_params(map, p));
        p[i] = p0[i] - h;
        let down = loss(&with_params(map, p));
        p[i] = p0[i];
        (up - down) / (2.0 * h as f64)
    };
    (0..p0.len())
        .map(|i| {
            let coarse = diff(i, 2f32.powi(-12), &mut p);
            let fine = diff(i, 2f32.powi(-13), &mut p);
            (4.0 * fine - coarse) / 3.0
        })
        .collect()
}

/// The smallest |pre-activation| of a ReLU or ELU+1 map over the rows of `x` (L×d): central
/// differences across a kink are wrong, so gradient checks pick inputs away from it. `∞` for
/// other maps.
pub fn min_abs_preactivation(map: &FeatureMap, x: &[f64], d: usize) -> f64 {
    let FeatureMap::Generalized { f: Elementwise::Relu | Elementwise::EluPlusOne, projection, scale, .. } = map else {
        return f64::INFINITY;
    };
    let n = map.data_normalizer(d) * *scale as f64;
    let mut min = f64::INFINITY;
    for row in x.chunks_exact(d) {
        match projection {
            Some(p) => {
                for w in p.rows() {
                    let y: f64 = w.iter().zip(row).map(|(&w, &v)| w as f64 * v).sum();
                    min = min.min((n * y).abs());
                }
            }
            None => row.iter().for_each(|v| min = min.min((n * v).abs())),
        }
    }
    min
}

/// One decoding-state case: a state made for (`state_shape`, `state_map`) continued with
/// (`call_shape`, `call_map`). `field` is what the check must name, `None` when it must accept.
pub struct StateCase {
    /// The field [`crate::FavorError::StateMismatch`] must name, or `None` for a match.
    pub field: Option<&'static str>,
    /// Shape the state is made for.
    pub state_shape: AttentionShape,
    /// Map the state is made for.
    pub state_map: FeatureMap,
    /// Shape of the decode call.
    pub call_shape: AttentionShape,
    /// Map of the decode call.
    pub call_map: FeatureMap,
}

/// States made for another problem (other batch, heads, d, d_v, feature count, seed, map kind
/// with the same feature count, W, ε, learned weights) and states that match (the same map,
/// one redrawn from the same config, another chunk length).
pub fn state_cases() -> Vec<StateCase> {
    let (d, dv) = (8, 5);
    let shape = AttentionShape::new(2, 3, 2, d).with_dv(dv);
    let draw = |m: usize, d: usize, seed: u64| Projection::draw(ProjectionConfig::new(m, d, seed)).expect("valid");
    let base = FeatureMap::positive(draw(12, d, 1));
    let fixed = |bump: f32| {
        let mut w = draw(12, d, 9).matrix().to_vec();
        w[5] += bump;
        FeatureMap::positive(Projection::from_matrix(12, d, w).expect("valid"))
    };
    let iid = FeatureMap::positive(Projection::draw(ProjectionConfig::new(12, d, 1).iid()).expect("valid"));
    let case = |field, state_shape, state_map: &FeatureMap, call_shape, call_map: &FeatureMap| StateCase {
        field,
        state_shape,
        state_map: state_map.clone(),
        call_shape,
        call_map: call_map.clone(),
    };
    let b = &base;
    vec![
        case(None, shape, b, shape, b),
        case(None, shape, b, AttentionShape { len: 1, ..shape }, &FeatureMap::positive(draw(12, d, 1))),
        case(None, shape, &fixed(0.0), shape, &fixed(0.0)),
        case(None, shape, &learned_softplus(12, d, 3, true), shape, &learned_softplus(12, d, 3, true)),
        case(Some("batch"), AttentionShape { batch: 1, ..shape }, b, shape, b),
        case(Some("heads"), AttentionShape { heads: 1, ..shape }, b, shape, b),
        case(Some("d"), AttentionShape { d: 4, ..shape }, &FeatureMap::positive(draw(12, 4, 1)), shape, b),
        case(Some("d_v"), shape.with_dv(3), b, shape, b),
        case(Some("features"), shape, &FeatureMap::positive(draw(16, d, 1)), shape, b),
        case(Some("projection seed"), shape, &FeatureMap::positive(draw(12, d, 2)), shape, b),
        // Other map kinds with the same feature count (12, and 16 both ways).
        case(Some("feature map"), shape, &FeatureMap::hyperbolic(draw(6, d, 1)), shape, b),
        case(Some("feature map"), shape, &FeatureMap::trigonometric(draw(6, d, 1)), shape, b),
        case(
            Some("feature map"),
            shape,
            &FeatureMap::positive(draw(16, d, 1)),
            shape,
            &FeatureMap::hyperbolic(draw(8, d, 1)),
        ),
        case(
            Some("feature map"),
            shape,
            &FeatureMap::hyperbolic(draw(8, d, 1)),
            shape,
            &FeatureMap::positive(draw(16, d, 1)),
        ),
        case(Some("projection W (fingerprint)"), shape, &iid, shape, b),
        case(Some("projection W (fingerprint)"), shape, &fixed(0.5), shape, &fixed(0.0)),
        case(Some("map parameters (fingerprint)"), shape, &with_epsilon(b, 1e-3), shape, b),
        case(
            Some("map parameters (fingerprint)"),
            shape,
            &learned_softplus(12, d, 3, true),
            shape,
            &learned_softplus(12, d, 4, true),
        ),
    ]
}

/// Runs every [`state_cases`] case on `backend`: mismatches must be
/// [`crate::FavorError::StateMismatch`] naming the case's field, with distinct expected and
/// actual values both in the message, and must leave the state usable for its own problem;
/// matches must decode. Cases whose map the backend does not support are skipped. Returns the
/// errors, in case order, so that backends can be compared.
pub fn assert_states_checked<B: FavorBackend<Mem = Host>>(backend: &B) -> Vec<(usize, FavorError)> {
    let decode = |state: &mut B::State, s: AttentionShape, map: &FeatureMap| {
        let p = Problem::new(s, map);
        let q = random_tensor(1, s.qk_len(), 0.5);
        let v = random_tensor(2, s.v_len(), 1.0);
        let mut out = vec![0.0f32; s.v_len()];
        let inputs = Inputs { q: (&q).into(), k: (&q).into(), v: (&v).into(), key_mask: None };
        backend.decode(&p, state, inputs, (&mut out).into())
    };
    let mut errors = Vec::new();
    for (i, c) in state_cases().into_iter().enumerate() {
        let what = format!("{} case {i} ({:?})", backend.name(), c.field);
        let mut state = match backend.new_state(&Problem::new(c.state_shape, &c.state_map)) {
            Err(FavorError::Unsupported(_)) => continue,
            r => r.unwrap_or_else(|e| panic!("{what}: new_state: {e}")),
        };
        let r = decode(&mut state, c.call_shape, &c.call_map);
        match (c.field, r) {
            (None, r) => assert_eq!(r, Ok(()), "{what}"),
            (Some(want), Err(e @ FavorError::StateMismatch { .. })) => {
                let FavorError::StateMismatch { field, expected, actual } = &e else { unreachable!() };
                assert_eq!(*field, want, "{what}: {e}");
                assert_ne!(expected, actual, "{what}: {e}");
                let msg = e.to_string();
                assert!(msg.contains(expected.as_str()) && msg.contains(actual.as_str()), "{what}: {msg}");
                assert_eq!(decode(&mut state, c.state_shape, &c.state_map), Ok(()), "{what}: state still usable");
                errors.push((i, e));
            }
            (Some(want), r) => panic!("{what}: expected a state mismatch on `{want}`, got {r:?}"),
        }
    }
    errors
}

/// Problems whose decoding state passes validation but cannot be allocated: M·d_v of 2^42
/// values per head (d_v = 2^40), M = 2^40 features (a map without projection on d = 2^40) and
/// 2^40 heads. No token is needed to ask for such a state, so nothing the caller allocated
/// bounds its size.
pub fn huge_state_problems() -> Vec<(AttentionShape, FeatureMap)> {
    let small = || FeatureMap::positive(Projection::draw(ProjectionConfig::new(4, 4, 1)).expect("valid"));
    vec![
        (AttentionShape::new(1, 1, 1, 4).with_dv(1 << 40), small()),
        (AttentionShape::new(1, 1, 1, 1 << 40).with_dv(1), FeatureMap::relu(None)),
        (AttentionShape::new(1 << 40, 1, 1, 4).with_dv(1), small()),
    ]
}

/// Asks `backend` for a state of every [`huge_state_problems`] problem: each must be
/// [`FavorError::OutOfMemory`] for the state, never an abort, and a small state must still be
/// made afterwards. Run it under [`with_capped_address_space`], where such requests fail on any
/// machine.
pub fn assert_huge_states_are_errors<B: FavorBackend<Mem = Host>>(backend: &B) {
    for (shape, map) in huge_state_problems() {
        let what = format!("{}: state for {shape:?} ({})", backend.name(), map.name());
        match backend.new_state(&Problem::new(shape, &map)) {
            Err(FavorError::OutOfMemory { arg: "state", elements, bytes }) => {
                assert!(elements >= 1 << 40 && bytes >= elements, "{what}: {elements} elements, {bytes} bytes");
            }
            Err(e) => panic!("{what}: expected OutOfMemory, got {e}"),
            Ok(_) => panic!("{what}: expected OutOfMemory, got a state"),
        }
    }
    let (shape, map) = &huge_state_problems()[0];
    assert!(backend.new_state(&Problem::new(shape.with_dv(4), map)).is_ok(), "{}: small state", backend.name());
}

/// Runs forward and backward, both directions, on one token with d = d_v = 2^20 and a map
/// without projection (M = 2^20): 4 MiB per tensor, but 2^40 values in each head's M×d_v sums.
/// Each call must be [`FavorError::OutOfMemory`] for the state, never an abort. Run it under
/// [`with_capped_address_space`].
pub fn assert_huge_sums_are_errors<B: FavorBackend<Mem = Host>>(backend: &B) {
    let n = 1 << 20;
    let shape = AttentionShape::new(1, 1, 1, n);
    let map = FeatureMap::relu(None);
    let x = vec![0.5f32; n];
    let inputs = Inputs { q: (&x).into(), k: (&x).into(), v: (&x).into(), key_mask: None };
    let (mut a, mut b, mut c) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    for options in [crate::AttentionOptions::bidirectional(), crate::AttentionOptions::causal()] {
        let p = Problem::new(shape, &map).with_options(options);
        let what = format!("{} {:?}", backend.name(), options.direction);
        let is_oom = |r: crate::Result<()>, call: &str| match r {
            Err(FavorError::OutOfMemory { arg: "state", elements, .. }) => {
                assert!(elements >= 1 << 40, "{what} {call}: {elements} elements")
            }
            other => panic!("{what} {call}: expected OutOfMemory, got {other:?}"),
        };
        is_oom(backend.forward(&p, inputs, (&mut a).into()), "forward");
        let grads = crate::Grads { dq: (&mut a).into(), dk: (&mut b).into(), dv: (&mut c).into() };
        is_oom(backend.backward(&p, inputs, (&x).into(), grads).map(drop), "backward");
    }
}

/// Environment variable that marks the capped child of [`with_capped_address_space`].
#[cfg(target_os = "linux")]
const CAPPED_CHILD: &str = "FAVOR_TEST_ADDRESS_SPACE_LIMITED";

/// Runs `body` with the address space capped at 4 GiB (`ulimit -v`), where a request of 16 GiB
/// or more fails at once on any machine whatever its memory and overcommit policy, and nothing
/// is ever touched: in this process when it is the capped child, otherwise by re-running test
/// `test` (its full name in this test binary) in a capped child and requiring that it passed.
/// A cross-compiled test binary (aarch64 under qemu) is re-run through the cargo runner
/// configured for its target, so the cap applies to the emulator and its guest.
#[cfg(target_os = "linux")]
pub fn with_capped_address_space(test: &str, body: impl FnOnce()) {
    if std::env::var_os(CAPPED_CHILD).is_some() {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -v 4194304 && exec $2 "$0" --exact "$1" --test-threads=1"#)
        .arg(exe)
        .arg(test)
        .arg(runner_for_this_target())
        .env(CAPPED_CHILD, "1")
        .output()
        .expect("spawn sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in a capped child: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `CARGO_TARGET_<triple>_RUNNER` command for this binary's architecture when one is set
/// (an emulator for a cross-compiled test), else empty: the binary then runs directly.
#[cfg(target_os = "linux")]
fn runner_for_this_target() -> String {
    let prefix = format!("CARGO_TARGET_{}_", std::env::consts::ARCH.to_uppercase());
    std::env::vars()
        .find(|(key, _)| key.starts_with(&prefix) && key.ends_with("_RUNNER"))
        .map(|(_, runner)| runner)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_error_has_no_floor() {
        // A result of RMS 1e-6 that is 10 % off reads 10 %, not 1e-7 as against a floor of 1.
        let b = vec![1e-6; 50];
        let a: Vec<f64> = b.iter().map(|x| x * 1.1).collect();
        assert!((rel_error("small", &a, &b) - 0.1).abs() < 1e-12);
        assert_eq!(rel_error("equal", &b, &b), 0.0);
        assert_eq!(rel_error("zeros", &[0.0; 3], &[0.0; 3]), 0.0);
        assert_eq!(rel_error("zero reference", &[1e-30, 0.0], &[0.0; 2]), f64::INFINITY);
    }

    #[test]
    fn one_element_off_by_three_tolerances_fails() {
        let b = gaussian(&mut rng(1), 1000, 1.0);
        for tol in [1e-5, 2f64.powi(-11), 2f64.powi(-8)] {
            let mut a = b.clone();
            a[17] += 3.0 * tol * frobenius(&b);
            let e = rel_error("perturbed", &a, &b);
            assert!(e > tol && (e - 3.0 * tol).abs() < 1e-9 * tol, "{e} vs {tol}");
        }
    }

    #[test]
    #[should_panic(expected = "non-finite result [1] = NaN")]
    fn rel_error_rejects_a_non_finite_result() {
        rel_error("nan", &[1.0, f64::NAN], &[1.0, 1.0]);
    }

    #[test]
    fn only_a_reference_at_f64_noise_counts_as_cancelled() {
        // f64 noise of O(1) terms: measured against the scale; f32 noise there passes 1e-5.
        let noise = gaussian(&mut rng(2), 40, 1e-17);
        let f32_noise = gaussian(&mut rng(3), 40, 1e-7);
        let e = rel_error_or_cancelled("cancelled", &f32_noise, &noise, 1.0);
        assert!(e.cancelled && e.value < 2e-7, "{e}");
        // A genuinely small gradient (1e-9 of the scale) is not cancelled: 10 % off reads 10 %.
        let small = gaussian(&mut rng(4), 40, 1e-9);
        let off: Vec<f64> = small.iter().map(|x| x * 1.1).collect();
        let e = rel_error_or_cancelled("small", &off, &small, 1.0);
        assert!(!e.cancelled && (e.value - 0.1).abs() < 1e-9, "{e}");
        // Large noise on a cancelled reference fails the check.
        let big: Vec<f64> = f32_noise.iter().map(|x| x * 1e3).collect();
        assert!(rel_error_or_cancelled("noisy", &big, &noise, 1.0).value > 1e-5);
    }

    #[test]
    fn the_log_denominator_slope_of_relu_is_one_over_its_feature() {
        // One token, d = 1: R = φ(q)·φ(k) with φ(x) = relu(x) + κ, so ∂log R/∂q = 1/(q + κ).
        let map = FeatureMap::relu(None);
        let FeatureMap::Generalized { kappa, .. } = map else { unreachable!() };
        let (q, k) = ([0.01f32], [0.5f32]);
        let inputs = Inputs { q: (&q[..]).into(), k: (&k[..]).into(), v: (&k[..]).into(), key_mask: None };
        let (slope, params) = log_denominator_slopes(&Problem::new(AttentionShape::new(1, 1, 1, 1), &map), inputs);
        let want = 1.0 / (0.01f32 as f64 + kappa as f64);
        assert!((slope / want - 1.0).abs() < 1e-12 && params == 0.0, "{slope} vs {want}");
    }

    #[test]
    fn storage_tolerances_add_half_an_ulp() {
        assert_eq!(storage_tolerance(DType::F32, 1e-5), 1e-5);
        assert_eq!(storage_tolerance(DType::F16, 0.0), 2f64.powi(-11));
        let x = 1.0 + 2f64.powi(-9) + 2f64.powi(-20);
        let rounded = half::bf16::from_f64(x).to_f64();
        assert!(((rounded - x) / x).abs() <= unit_roundoff(DType::Bf16));
    }

    #[test]
    fn positive_features_do_not_cancel_and_trigonometric_ones_do() {
        let s = AttentionShape::new(1, 1, 40, 16);
        let q = random_tensor(5, s.qk_len(), 1.0);
        let k = random_tensor(6, s.qk_len(), 1.0);
        let inputs = Inputs { q: (&q).into(), k: (&k).into(), v: (&q).into(), key_mask: None };
        let proj = Projection::draw(ProjectionConfig::new(16, 16, 7)).unwrap();
        let positive = denominator_condition(&Problem::new(s, &FeatureMap::positive(proj.clone())), inputs);
        assert!((positive - 1.0).abs() < 1e-12, "{positive}");
        let trig = denominator_condition(&Problem::new(s, &FeatureMap::trigonometric(proj)), inputs);
        assert!(trig > 1.5, "{trig}");
    }
}

/// The contiguous results of one problem (forward, backward and, when causal, a decode in two
/// chunks), as f64 `[B, H, ·, ·]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutRun {
    /// Forward output.
    pub out: Vec<f64>,
    /// ∂ℒ/∂Q.
    pub dq: Vec<f64>,
    /// ∂ℒ/∂K.
    pub dk: Vec<f64>,
    /// ∂ℒ/∂V.
    pub dv: Vec<f64>,
    /// Decode output (causal problems; empty otherwise).
    pub decoded: Vec<f64>,
}

/// What fills the elements of a strided output that no row covers: must survive every call.
const UNTOUCHED: f32 = 7.0;

/// The test layouts of a shape: `[B, L, H, ·]`, sequence-first `[L, B, H, ·]`, `[B, H, L, ·]`
/// with gaps after every row, head and batch element, and (for self-attention with d_v = d)
/// packed QKV.
pub fn test_layouts(s: &AttentionShape) -> Vec<(&'static str, Layout)> {
    let seq_first = Layout::from_fn(|arg| {
        let t = arg.dims(s);
        Some(Strides { batch: t.heads * t.width, head: t.width, token: t.batch * t.heads * t.width })
    });
    let gapped = Layout::from_fn(|arg| {
        let t = arg.dims(s);
        let token = t.width + 3;
        let head = t.rows * token + 5;
        Some(Strides { batch: t.heads * head + 7, head, token })
    });
    let mut v = vec![("blhd", Layout::blhd(s)), ("lbhd", seq_first), ("gapped", gapped)];
    if s.dv == s.d && !s.is_cross() {
        v.push(("packed-qkv", Layout::packed_qkv(s)));
    }
    v
}

/// Elements `off..` of a tensor.
fn view_from(t: &HostTensor, off: usize) -> HostRef<'_> {
    match t {
        HostTensor::F32(v) => HostRef::F32(&v[off..]),
        HostTensor::F16(v) => HostRef::F16(&v[off..]),
        HostTensor::Bf16(v) => HostRef::Bf16(&v[off..]),
    }
}

/// Elements `off..` of a tensor, writable.
fn view_mut_from(t: &mut HostTensor, off: usize) -> HostMut<'_> {
    match t {
        HostTensor::F32(v) => HostMut::F32(&mut v[off..]),
        HostTensor::F16(v) => HostMut::F16(&mut v[off..]),
        HostTensor::Bf16(v) => HostMut::Bf16(&mut v[off..]),
    }
}

/// Which elements of a buffer the rows of `dims`/`strides` (from `off`) cover.
fn covered(len: usize, off: usize, dims: TensorDims, strides: Strides) -> Vec<bool> {
    let mut c = vec![false; len];
    for bh in 0..dims.batch * dims.heads {
        for r in 0..dims.rows {
            let start = off + strides.head_base(dims.heads, bh) + r * strides.token;
            c[start..start + dims.width].iter_mut().for_each(|x| *x = true);
        }
    }
    c
}

/// A buffer of `dtype` holding `fill` everywhere.
fn filled(dtype: DType, len: usize, fill: f32) -> HostTensor {
    HostTensor::from_f32(dtype, &vec![fill; len])
}

/// Places contiguous tensors into one buffer: `(tensor, dims, strides, offset)` each; elements
/// no row covers hold NaN, which the finiteness check must not see.
fn place(dtype: DType, len: usize, parts: &[(&HostTensor, TensorDims, Strides, usize)]) -> HostTensor {
    let mut buf = filled(dtype, len, f32::NAN);
    for &(t, dims, strides, off) in parts {
        crate::layout::scatter(t.view(), view_mut_from(&mut buf, off), dims, strides).expect("test layout fits");
    }
    buf
}

/// Strided outputs: buffers of `UNTOUCHED` with room for the layout's rows.
struct StridedOut {
    buf: HostTensor,
    dims: TensorDims,
    strides: Strides,
}

impl StridedOut {
    fn new(dtype: DType, dims: TensorDims, strides: Strides) -> Self {
        let len = crate::layout::extent("test", dims, strides).expect("test layout fits") + 5;
        StridedOut { buf: filled(dtype, len, UNTOUCHED), dims, strides }
    }

    /// The rows, contiguous; asserts that nothing outside them was written.
    fn rows(&self, what: &str) -> Vec<f64> {
        let cover = covered(self.buf.view().len(), 0, self.dims, self.strides);
        let all = self.buf.to_f64_vec();
        for (i, (&x, c)) in all.iter().zip(cover).enumerate() {
            assert!(c || x == UNTOUCHED as f64, "{what}: element {i}, outside every row, was overwritten with {x}");
        }
        crate::layout::gather(self.buf.view(), self.dims, self.strides).expect("validated").to_f64_vec()
    }
}

/// Runs `p` (whose layout is ignored) with every tensor contiguous and again in each of
/// [`test_layouts`], from the same random inputs: forward, backward and, for causal problems, a
/// decode in two chunks read in place from the strided buffers. Asserts that every strided run
/// equals the contiguous one bit for bit (the kernels' arithmetic does not depend on where rows
/// live) and writes nothing outside its rows; returns the contiguous run. V and ∂ℒ/∂out have
/// standard deviation `value_std` (large values send heads to backends' f64 recomputation).
pub fn assert_layouts_agree<B: FavorBackend<Mem = Host>>(
    backend: &B,
    p: &Problem<'_>,
    dtype: DType,
    masked: bool,
    seed: u64,
    value_std: f32,
) -> LayoutRun {
    let s = p.shape;
    let base = Problem { layout: Layout::default(), ..*p };
    let t = |arg: TensorArg, k: u64| {
        let d = arg.dims(&s);
        let std = if matches!(arg, TensorArg::V | TensorArg::Dout) { value_std } else { 0.5 };
        HostTensor::from_f32(dtype, &random_tensor(seed * 8 + k, d.total_rows() * d.width, std))
    };
    let (q, k, v, g) = (t(TensorArg::Q, 0), t(TensorArg::K, 1), t(TensorArg::V, 2), t(TensorArg::Dout, 3));
    let mask = masked.then(|| random_mask(&mut rng(seed), s.batch * s.keys(), 0.7));
    let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: mask.as_deref() };
    let what = format!("{} {} {:?} {:?} {dtype} mask={masked}", backend.name(), p.map.name(), p.options.direction, s);

    // Contiguous.
    let zeros = |arg: TensorArg| {
        let d = arg.dims(&s);
        HostTensor::zeros(dtype, d.total_rows() * d.width)
    };
    let mut out = zeros(TensorArg::Out);
    backend.forward(&base, inputs, out.view_mut()).unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    let (mut dq, mut dk, mut dv) = (zeros(TensorArg::Dq), zeros(TensorArg::Dk), zeros(TensorArg::Dv));
    let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() };
    backend.backward(&base, inputs, g.view(), grads).unwrap_or_else(|e| panic!("{what}: backward: {e}"));
    let causal = p.options.direction == crate::Direction::Causal;
    let split = s.len / 2;
    let chunks: Vec<(usize, usize)> = [(0, split), (split, s.len)].into_iter().filter(|c| c.1 > c.0).collect();
    let mut decoded = Vec::new();
    if causal {
        // The same chunks, each gathered into contiguous tensors.
        let mut state = backend.new_state(&base).expect("state");
        let mut outs: Vec<Vec<f64>> = Vec::new();
        for &(t0, t1) in &chunks {
            let cs = AttentionShape { len: t1 - t0, ..s };
            let chunk = |x: &HostTensor, arg: TensorArg| {
                let d = TensorDims { rows: t1 - t0, ..arg.dims(&s) };
                let st = Strides::bhld(d.heads, s.len, d.width);
                crate::layout::gather(view_from(x, t0 * d.width), d, st).expect("chunk")
            };
            let (cq, ck, cv) = (chunk(&q, TensorArg::Q), chunk(&k, TensorArg::K), chunk(&v, TensorArg::V));
            let ci = Inputs { q: cq.view(), k: ck.view(), v: cv.view(), key_mask: None };
            let mut co = HostTensor::zeros(dtype, cs.out_len());
            backend.decode(&Problem { shape: cs, ..base }, &mut state, ci, co.view_mut()).expect("decode");
            outs.push(co.to_f64_vec());
        }
        // Interleave the chunks back into [B, H, L, d_v].
        for bh in 0..s.problems() {
            for (c, &(t0, t1)) in chunks.iter().enumerate() {
                let n = (t1 - t0) * s.dv;
                decoded.extend_from_slice(&outs[c][bh * n..(bh + 1) * n]);
            }
        }
    }
    let want =
        LayoutRun { out: out.to_f64_vec(), dq: dq.to_f64_vec(), dk: dk.to_f64_vec(), dv: dv.to_f64_vec(), decoded };

    for (name, layout) in test_layouts(&s) {
        let lp = Problem { layout, ..base };
        let what = format!("{what} layout {name}");
        let st = |arg| lp.strides(arg);
        let dims = |arg: TensorArg| arg.dims(&s);
        let span = |arg| crate::layout::extent("test", dims(arg), st(arg)).expect("test layout fits");
        // Q, K, V: one packed buffer, or one buffer each; NaN between rows.
        let packed = name == "packed-qkv";
        let (qb, kb, vb, offs) = if packed {
            let offs = Layout::packed_qkv_offsets(&s);
            let len = span(TensorArg::Q) + offs[2];
            let parts = [
                (&q, dims(TensorArg::Q), st(TensorArg::Q), offs[0]),
                (&k, dims(TensorArg::K), st(TensorArg::K), offs[1]),
                (&v, dims(TensorArg::V), st(TensorArg::V), offs[2]),
            ];
            let b = place(dtype, len, &parts);
            (b.clone(), b.clone(), b, offs)
        } else {
            let one = |x: &HostTensor, arg| place(dtype, span(arg) + 3, &[(x, dims(arg), st(arg), 0)]);
            (one(&q, TensorArg::Q), one(&k, TensorArg::K), one(&v, TensorArg::V), [0, 0, 0])
        };
        let gb = place(dtype, span(TensorArg::Dout) + 3, &[(&g, dims(TensorArg::Dout), st(TensorArg::Dout), 0)]);
        let li = Inputs {
            q: view_from(&qb, offs[0]),
            k: view_from(&kb, offs[1]),
            v: view_from(&vb, offs[2]),
            key_mask: mask.as_deref(),
        };
        let mut o = StridedOut::new(dtype, dims(TensorArg::Out), st(TensorArg::Out));
        backend.forward(&lp, li, o.buf.view_mut()).unwrap_or_else(|e| panic!("{what}: forward: {e}"));
        assert!(o.rows(&what) == want.out, "{what}: forward differs from the contiguous layout");
        let mut gq = StridedOut::new(dtype, dims(TensorArg::Dq), st(TensorArg::Dq));
        let mut gk = StridedOut::new(dtype, dims(TensorArg::Dk), st(TensorArg::Dk));
        let mut gv = StridedOut::new(dtype, dims(TensorArg::Dv), st(TensorArg::Dv));
        let grads = Grads { dq: gq.buf.view_mut(), dk: gk.buf.view_mut(), dv: gv.buf.view_mut() };
        backend.backward(&lp, li, gb.view(), grads).unwrap_or_else(|e| panic!("{what}: backward: {e}"));
        assert!(gq.rows(&what) == want.dq, "{what}: dq differs from the contiguous layout");
        assert!(gk.rows(&what) == want.dk, "{what}: dk differs from the contiguous layout");
        assert!(gv.rows(&what) == want.dv, "{what}: dv differs from the contiguous layout");
        if causal {
            // Decode the chunks in place: each chunk's tensors start at its first token.
            let mut state = backend.new_state(&lp).expect("state");
            let mut o = StridedOut::new(dtype, dims(TensorArg::Out), st(TensorArg::Out));
            for &(t0, t1) in &chunks {
                let cp = Problem { shape: AttentionShape { len: t1 - t0, ..s }, ..lp };
                let at = |arg: TensorArg| t0 * st(arg).token;
                let ci = Inputs {
                    q: view_from(&qb, offs[0] + at(TensorArg::Q)),
                    k: view_from(&kb, offs[1] + at(TensorArg::K)),
                    v: view_from(&vb, offs[2] + at(TensorArg::V)),
                    key_mask: None,
                };
                let off = at(TensorArg::Out);
                backend
                    .decode(&cp, &mut state, ci, view_mut_from(&mut o.buf, off))
                    .unwrap_or_else(|e| panic!("{what}: decode: {e}"));
            }
            assert!(o.rows(&what) == want.decoded, "{what}: decode differs from the contiguous layout");
        }
    }
    want
}

/// Decodes causal problem `p` (contiguous `[B, H, L, ·]` f32 tensors, no mask) in chunks of the
/// given lengths (summing to L) into a contiguous output. Each chunk is read and written in place
/// in the full tensors through strides (a chunk starting at token t is the buffer sliced at
/// t × the token stride), as an engine decoding from its own buffers does.
pub fn decode_in_chunks<B: FavorBackend<Mem = Host>>(
    backend: &B,
    p: &Problem<'_>,
    [q, k, v]: [&[f32]; 3],
    chunks: &[usize],
) -> crate::Result<Vec<f32>> {
    let s = p.shape;
    let full = Layout::from_fn(|arg| {
        let t = arg.dims(&s);
        Some(Strides::bhld(t.heads, t.rows, t.width))
    });
    let mut state = backend.new_state(p)?;
    let mut out = vec![0f32; s.out_len()];
    let mut start = 0;
    for &t in chunks {
        let chunk = Problem { shape: AttentionShape { len: t, ..s }, layout: full, ..*p };
        let inputs = Inputs {
            q: q[start * s.d..].into(),
            k: k[start * s.d..].into(),
            v: v[start * s.dv..].into(),
            key_mask: None,
        };
        backend.decode(&chunk, &mut state, inputs, (&mut out[start * s.dv..]).into())?;
        start += t;
    }
    assert_eq!(start, s.len, "the chunks cover the sequence");
    Ok(out)
}
