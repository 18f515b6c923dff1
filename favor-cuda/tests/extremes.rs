//! The CUDA kernels at the edges of f32: denominators that underflow (the head must take the
//! f64 path, as on the CPU), and query/key entries scaled by 10^k for k = 0 … 37 (capped at the
//! storage type's range), every supported map, dtype and direction: outputs and gradients finite
//! at every scale, and within the unit-scale tolerance of the f64 reference up to 1e3. Runs on
//! the GPU when there is one and on the kernel emulator with the `emulator` feature; the error per
//! scale is printed (`--nocapture`).

use favor_core::testing::{cancel_scales, random_tensor, rel_error, storage_tolerance};
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, Elementwise, FavorBackend, FavorError, FeatureMap, Grads,
    HostTensor, Inputs, Problem, Projection, ProjectionConfig, ReferenceBackend,
};
use favor_cuda::{CudaBackend, CudaHost};

fn backends(test: &str) -> Vec<CudaHost> {
    let mut found = Vec::new();
    match CudaBackend::new(0) {
        Ok(b) => found.push(CudaHost::new(b)),
        Err(FavorError::NotAvailable { reason, .. }) => {
            if std::env::var("FAVOR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: FAVOR_REQUIRE_GPU=1 but the CUDA backend is not available: {reason}");
            }
            eprintln!("{test}: no GPU ({reason})");
        }
        Err(e) => panic!("{test}: CudaBackend::new failed with an unexpected error: {e}"),
    }
    #[cfg(feature = "emulator")]
    found.push(CudaHost::new(CudaBackend::emulated()));
    found
}

/// One problem's stored (rounded) inputs; the reference reads the same tensors.
struct Case {
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    dout: HostTensor,
    mask: Option<Vec<bool>>,
}

/// (out, dq, dk, dv) of `b`, widened to f64.
fn run(b: &impl FavorBackend<Mem = favor_core::Host>, p: &Problem<'_>, c: &Case) -> [Vec<f64>; 4] {
    let s = p.shape;
    let dt = c.q.dtype();
    let inputs = Inputs { q: c.q.view(), k: c.k.view(), v: c.v.view(), key_mask: c.mask.as_deref() };
    let mut out = HostTensor::zeros(dt, s.v_len());
    b.forward(p, inputs, out.view_mut()).unwrap_or_else(|e| panic!("{}: forward: {e}", b.name()));
    let (mut dq, mut dk, mut dv) =
        (HostTensor::zeros(dt, s.qk_len()), HostTensor::zeros(dt, s.qk_len()), HostTensor::zeros(dt, s.v_len()));
    b.backward(p, inputs, c.dout.view(), Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() })
        .unwrap_or_else(|e| panic!("{}: backward: {e}", b.name()));
    [out.to_f64_vec(), dq.to_f64_vec(), dk.to_f64_vec(), dv.to_f64_vec()]
}

const NAMES: [&str; 4] = ["out", "dq", "dk", "dv"];

/// The reference's f64 (out, dq, dk, dv) on the same stored inputs, under the storage policy
/// (saturation at the dtype's largest value; only values beyond it are changed).
fn reference(p: &Problem<'_>, c: &Case) -> [Vec<f64>; 4] {
    let inputs = Inputs { q: c.q.view(), k: c.k.view(), v: c.v.view(), key_mask: c.mask.as_deref() };
    let max = c.q.dtype().largest_finite();
    let stored = |x: Vec<f64>| x.into_iter().map(|y| y.clamp(-max, max)).collect::<Vec<f64>>();
    let out = ReferenceBackend.forward_f64(p, inputs).expect("reference forward");
    let g = ReferenceBackend.backward_f64(p, inputs, c.dout.view()).expect("reference backward");
    [stored(out), stored(g.dq), stored(g.dk), stored(g.dv)]
}

/// f32 compute error of outputs against the f64 reference (the suite's, see cross_backend.rs).
const TOL_OUT: f64 = 1e-5;
/// The same for gradients (the suite's, too).
const TOL_GRAD: f64 = 1e-5;
/// A gradient below f32's resolution of the terms it is a difference of (saturated attention:
/// one key takes all the weight) is checked against those terms instead (measured ≤ 3e-7).
const TOL_CANCELLED: f64 = 1e-6;

/// The f32 tolerance plus, for 16-bit storage, half an ulp of the result.
fn tol(dtype: DType, gradient: bool) -> f64 {
    storage_tolerance(dtype, if gradient { TOL_GRAD } else { TOL_OUT })
}

/// The scale of the terms that cancel in dq and dk (favor_core::testing::cancel_scales).
fn cancel_scale(p: &Problem<'_>, c: &Case) -> f64 {
    let inputs = Inputs { q: c.q.view(), k: c.k.view(), v: c.v.view(), key_mask: c.mask.as_deref() };
    cancel_scales(p, inputs, c.dout.view()).0
}

/// ‖a − b‖ / (scale·√n).
fn vs_scale(a: &[f64], b: &[f64], scale: f64) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    diff / (scale * (b.len().max(1) as f64).sqrt())
}

/// Head 0 ordinary; head 1 with every query entry `q1` and key entry `k1` plus a little noise.
fn tiny_case(shape: AttentionShape, dtype: DType, q1: f32, k1: f32) -> Case {
    let n = shape.len * shape.d;
    let fill = |seed: u64, x: f32| {
        let mut t = random_tensor(seed, shape.qk_len(), 0.5);
        for (e, z) in t[n..].iter_mut().zip(random_tensor(seed + 10, n, 0.01)) {
            *e = x + z;
        }
        HostTensor::from_f32(dtype, &t)
    };
    Case {
        q: fill(1, q1),
        k: fill(2, k1),
        v: HostTensor::from_f32(dtype, &random_tensor(3, shape.v_len(), 1.0)),
        dout: HostTensor::from_f32(dtype, &random_tensor(4, shape.v_len(), 1.0)),
        mask: None,
    }
}

fn check_tiny(map: &FeatureMap, d: usize, q1: f32, k1: f32) {
    let shape = AttentionShape::new(1, 2, 40, d).with_dv(3);
    for cuda in backends("tiny denominators") {
        for dtype in [DType::F32, DType::Bf16] {
            for direction in [Direction::Bidirectional, Direction::Causal] {
                let p = Problem::new(shape, map).with_options(AttentionOptions { direction, ..Default::default() });
                let c = tiny_case(shape, dtype, q1, k1);
                let what = format!("{} {} {dtype} {direction:?}", cuda.name(), map.name());
                let ours = run(&cuda, &p, &c);
                let reference = reference(&p, &c);
                // The constructed head's output is a proper average of v (not 0, not NaN).
                let half = shape.len * shape.dv;
                assert!(reference[0][half..].iter().any(|&x| x.abs() > 1e-3), "{what}: degenerate reference");
                for (i, name) in NAMES.iter().enumerate() {
                    let e = rel_error(&format!("{what} {name}"), &ours[i], &reference[i]);
                    let t = tol(dtype, i > 0);
                    assert!(e <= t, "{what}: {name} rel. error {e:.2e} > {t:.1e}");
                }
            }
        }
    }
}

#[test]
fn non_overlapping_positive_features_without_a_floor() {
    // d = 1, w = ±1, ε = 0: queries at +50 put their weight on feature 0, keys at −50 on
    // feature 1, so every q'·k' is about e^{-100}, below f32's smallest subnormal.
    let w = Projection::from_matrix(2, 1, vec![1.0, -1.0]).unwrap();
    check_tiny(&FeatureMap::Positive { projection: w, epsilon: 0.0, softmax_scale: None }, 1, 50.0, -50.0);
}

#[test]
fn elu_plus_one_queries_far_below_zero() {
    // elu(x) + 1 = e^x: queries near −95 have features near 5e-42 (subnormal in f32).
    check_tiny(&FeatureMap::elu_plus_one(), 4, -95.0, 0.3);
}

/// The largest power of ten whose scaled N(0, 0.5²) inputs stay inside the dtype's range.
fn max_exponent(dtype: DType) -> i32 {
    match dtype {
        DType::F16 => 4,
        _ => 37,
    }
}

/// Scales up to 1e3 must agree with the reference within the unit-scale tolerance.
const AGREE_UP_TO: i32 = 3;

/// The exponents tried: every one up to 1e8, where entries pass 2^24 and every head takes the
/// same f64 recomputation (see favor-cuda's ops), then samples up to the top of the range (the
/// emulator is slow: every exponent costs about 15 s).
fn exponents(dtype: DType) -> impl Iterator<Item = i32> {
    (0..=8).chain([12, 16, 20, 25, 30, 34, 37]).filter(move |&k| k <= max_exponent(dtype))
}

fn scaled(x: &[f32], dtype: DType, s: f64) -> HostTensor {
    HostTensor::from_f32(dtype, &x.iter().map(|&e| (e as f64 * s) as f32).collect::<Vec<f32>>())
}

#[test]
fn every_input_scale_gives_finite_results_that_agree_with_the_reference() {
    let (d, m) = (8, 16);
    let shape = AttentionShape::new(1, 2, 33, d).with_dv(5);
    let proj = || Projection::draw(ProjectionConfig::new(m, d, 5)).unwrap();
    let maps = [
        FeatureMap::positive(proj()),
        FeatureMap::hyperbolic(proj()),
        FeatureMap::trigonometric(proj()),
        FeatureMap::relu(Some(proj())),
        FeatureMap::elu_plus_one(),
        FeatureMap::generalized(Elementwise::Softplus, Some(proj()), true, 1e-3),
    ];
    let (q0, k0) = (random_tensor(11, shape.qk_len(), 0.5), random_tensor(12, shape.qk_len(), 0.5));
    let mask: Vec<bool> = (0..shape.mask_len()).map(|j| j == 0 || j % 4 != 2).collect();
    let mut report = Vec::new();
    for cuda in backends("every input scale") {
        for map in &maps {
            let trig = matches!(map, FeatureMap::Trigonometric { .. });
            for dtype in DType::ALL {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    let p = Problem::new(shape, map).with_options(AttentionOptions { direction, ..Default::default() });
                    let mut errors = Vec::new();
                    for k in exponents(dtype) {
                        let s = 10f64.powi(k);
                        let c = Case {
                            q: scaled(&q0, dtype, s),
                            k: scaled(&k0, dtype, s),
                            v: HostTensor::from_f32(dtype, &random_tensor(13, shape.v_len(), 1.0)),
                            dout: HostTensor::from_f32(dtype, &random_tensor(14, shape.v_len(), 1.0)),
                            mask: Some(mask.clone()),
                        };
                        let what = format!("{} {} {dtype} {direction:?} scale 1e{k}", cuda.name(), map.name());
                        let ours = run(&cuda, &p, &c);
                        for (g, name) in ours.iter().zip(NAMES) {
                            if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                                panic!("{what}: non-finite {name}[{i}] = {}", g[i]);
                            }
                        }
                        let reference = reference(&p, &c);
                        let checked = if trig { k == 0 } else { k <= AGREE_UP_TO };
                        let scale = if checked { cancel_scale(&p, &c) } else { f64::INFINITY };
                        let mut shown = Vec::new();
                        for i in 0..4 {
                            let rel = rel_error(&what, &ours[i], &reference[i]);
                            // dq and dk of a saturated attention (one key takes all the weight,
                            // from 1e2 up) are differences of equal terms: below f32's resolution
                            // of them the relative error is the gradient's conditioning, not the
                            // kernels', and the error against those terms is what is checked.
                            let cancelled = checked && (i == 1 || i == 2) && rel > tol(dtype, true);
                            let e = if cancelled { vs_scale(&ours[i], &reference[i], scale) } else { rel };
                            // Trigonometric features are sign-indefinite: beyond unit scale their
                            // denominators cancel and the error follows the condition number.
                            if checked {
                                let t = if cancelled { TOL_CANCELLED } else { tol(dtype, i > 0) };
                                assert!(e <= t, "{what}: {} error {e:.2e} > {t:.1e} (relative {rel:.1e})", NAMES[i]);
                            }
                            shown.push(if cancelled { format!("{rel:.0e}(c {e:.0e})") } else { format!("{rel:.0e}") });
                        }
                        errors.push(format!("1e{k}: {}", shown.join("/")));
                    }
                    report.push(format!("{} {} {dtype} {direction:?}: {}", cuda.name(), map.name(), errors.join(" ")));
                }
            }
        }
    }
    println!("relative errors out/dq/dk/dv per scale (c: dq/dk vs the cancelled terms):\n{}", report.join("\n"));
}

#[test]
fn sixteen_bit_results_beyond_the_range_saturate() {
    // Uniform causal attention (q = k = 0) with ∂ℒ/∂out = 6e4 everywhere: key 0 collects
    // Σ_i 6e4/(i + 1) ≈ 2.6e5 in dv, beyond f16's 65504; it must be stored as 65504, like the
    // reference does, never as ∞.
    let shape = AttentionShape::new(1, 1, 40, 4).with_dv(2);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(8, 4, 1)).unwrap());
    let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
    let c = Case {
        q: HostTensor::from_f32(DType::F16, &vec![0.0; shape.qk_len()]),
        k: HostTensor::from_f32(DType::F16, &vec![0.0; shape.qk_len()]),
        v: HostTensor::from_f32(DType::F16, &random_tensor(3, shape.v_len(), 1.0)),
        dout: HostTensor::from_f32(DType::F16, &vec![6e4; shape.v_len()]),
        mask: None,
    };
    for cuda in backends("16-bit saturation") {
        let [_, _, _, dv] = run(&cuda, &p, &c);
        let [_, _, _, want] = reference(&p, &c);
        assert_eq!(dv[0], 65504.0, "{}: dv[0] = {}", cuda.name(), dv[0]);
        let e = rel_error(&cuda.name(), &dv, &want);
        let t = tol(DType::F16, true);
        assert!(e <= t, "{}: dv rel. error {e:.2e} > {t:.1e}", cuda.name());
    }
}

#[test]
fn values_and_output_gradients_of_any_magnitude_give_finite_results() {
    // v and ∂ℒ/∂out of head 1 scaled up to the top of the range: K'ᵀV, the causal state and
    // ⟨∂ℒ/∂out, v⟩ would overflow f32, so heads with entries beyond 2^32 take the f64 path; head
    // 0 keeps unit values on the kernels. Compared with the reference's f64 result under the
    // storage policy (saturation at the dtype's largest value).
    let (d, m) = (8, 16);
    let shape = AttentionShape::new(1, 2, 33, d).with_dv(3);
    let proj = || Projection::draw(ProjectionConfig::new(m, d, 5)).unwrap();
    let maps = [FeatureMap::positive(proj()), FeatureMap::relu(Some(proj())), FeatureMap::elu_plus_one()];
    let half = shape.len * shape.dv;
    for cuda in backends("large values") {
        for map in &maps {
            for dtype in [DType::F32, DType::Bf16] {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    let p = Problem::new(shape, map).with_options(AttentionOptions { direction, ..Default::default() });
                    for s in [1e9f64, 1e20, 3e38] {
                        let big = |seed: u64| {
                            let mut x = random_tensor(seed, shape.v_len(), 1.0);
                            for e in &mut x[half..] {
                                *e = (*e as f64 * s).clamp(-3.3e38, 3.3e38) as f32;
                            }
                            HostTensor::from_f32(dtype, &x)
                        };
                        let c = Case {
                            q: HostTensor::from_f32(dtype, &random_tensor(1, shape.qk_len(), 0.5)),
                            k: HostTensor::from_f32(dtype, &random_tensor(2, shape.qk_len(), 0.5)),
                            v: big(3),
                            dout: big(4),
                            mask: None,
                        };
                        let what = format!("{} {} {dtype} {direction:?} v, dout × {s:e}", cuda.name(), map.name());
                        let ours = run(&cuda, &p, &c);
                        for (g, name) in ours.iter().zip(NAMES) {
                            assert!(g.iter().all(|x| x.is_finite()), "{what}: non-finite {name}");
                        }
                        let [out, _, _, dv] = reference(&p, &c);
                        // dv is linear in dout alone: no cancellation to speak of.
                        for (name, a, b) in [("out", &ours[0], &out), ("dv", &ours[3], &dv)] {
                            let e = rel_error(&what, a, b);
                            let t = tol(dtype, false);
                            assert!(e <= t, "{what}: {name} rel. error {e:.2e} > {t:.0e}");
                        }
                    }
                }
            }
        }
    }
}
