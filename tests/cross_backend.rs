//! Cross-backend integration tests through the `favor` entry point: every backend that
//! `Backend::available()` lists (one CPU backend per ISA this machine runs) against the f64
//! reference, for every feature map, both directions, forward, backward and decoding, on shapes
//! that cross vector-width and tile boundaries, with f32/f16/bf16 storage.

use favor::{
    AttentionOptions, AttentionShape, Backend, DType, Direction, FavorBackend, FavorError, Grads, HostTensor, Inputs,
    Problem, ReferenceBackend, TensorHandle,
};
use favor_core::testing::{
    RelError, cancel_scales, decode_in_chunks, denominator_condition, feature_map_catalog, flat_param_grads,
    random_mask, random_tensor, rel_error, rel_error_or_cancelled, rng, storage_tolerance,
};
use std::collections::BTreeMap;

/// Backends under test: everything but the reference itself.
fn fast_backends() -> Vec<Backend> {
    Backend::available().into_iter().filter(|b| !matches!(b, Backend::Reference(_))).collect()
}

/// The f32 compute error allowed against the f64 reference, outputs and gradients alike (f32
/// rounding of the tiled sums): measured worst 3.1e-7 (outputs) and 6.0e-7 (gradients); the
/// gradients' extra reduction needs no extra factor.
const TOL_F32: f64 = 1e-5;

/// The tolerance for a storage dtype: TOL_F32 plus half an ulp of the 16-bit result, which both
/// backends compute from the same rounded inputs. A bound rather than an estimate (each element
/// moves by at most u relative), so the margin is small: measured 2.8e-4 in f16 vs 4.9e-4, 2.0e-3
/// in bf16 vs 3.9e-3.
fn tolerance(dtype: DType) -> f64 {
    storage_tolerance(dtype, TOL_F32)
}

/// A gradient that vanishes in exact arithmetic is f32 noise whatever the storage: its error
/// against the scale of the terms that cancel is bounded by f32's resolution of them (measured
/// worst 3.3e-7).
const TOL_CANCELLED: f64 = 1e-6;

/// Trigonometric data must stay this well-conditioned (see [`qk_std`]): measured κ ≤ 2.6;
/// the f32 error grows ∝ κ, so up to this bound TOL_F32 still holds.
const TRIG_KAPPA_MAX: f64 = 10.0;

/// Query/key standard deviation. Trigonometric features are sign-indefinite and their
/// denominators cancel more as ‖q − k‖ grows (the phases w·(q − k) spread over more than a
/// period), amplifying the f32 rounding by the condition number: for them d·σ² ≤ 4.
fn qk_std(name: &str, d: usize) -> f32 {
    if name == "trigonometric" { 0.8f32.min(2.0 / (d as f32).sqrt()) } else { 0.8 }
}

struct Case {
    shape: AttentionShape,
    m: usize,
    dtype: DType,
    masked: bool,
    seed: u64,
}

/// Shapes crossing the 8/16-lane and tile boundaries; every dtype appears.
fn cases() -> Vec<Case> {
    let dims = [(1, 1, 1, 1, 1), (1, 2, 9, 7, 17), (2, 1, 17, 16, 8), (1, 1, 65, 15, 9), (1, 3, 130, 8, 65)];
    let mut out = Vec::new();
    for (i, &(batch, heads, len, d, dv)) in dims.iter().enumerate() {
        let m = [7, 16, 17, 33, 64][i];
        let dtype = DType::ALL[i % 3];
        out.push(Case {
            shape: AttentionShape::new(batch, heads, len, d).with_dv(dv),
            m,
            dtype,
            masked: i % 2 == 1,
            seed: i as u64,
        });
    }
    out
}

fn tensor(dtype: DType, seed: u64, n: usize, std: f32) -> HostTensor {
    HostTensor::from_f32(dtype, &random_tensor(seed, n, std))
}

#[test]
fn the_entry_point_offers_a_fast_backend() {
    let best = Backend::best();
    assert!(!matches!(best, Backend::Reference(_)), "best() fell back to the reference backend");
    assert!(!fast_backends().is_empty());
    assert!(best.is_gpu() || best.name().starts_with("cpu-"), "{}", best.name());
}

/// Learned maps have no CUDA kernels: on a GPU backend they must be a typed error, and are
/// then skipped (favor-cuda's own tests cover what the kernels support).
fn unsupported_here(backend: &Backend, name: &str, p: &Problem<'_>, inputs: Inputs<'_, favor::Host>) -> bool {
    if !backend.is_gpu() || !name.contains("softplus") || name == "generalized-softplus" {
        return false;
    }
    let mut out = HostTensor::zeros(inputs.v.dtype(), p.shape.v_len());
    let r = backend.forward(p, inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::Unsupported(_))), "{}: {name} on the GPU: {r:?}", backend.name());
    true
}

#[test]
fn every_backend_matches_the_reference_forward_and_backward() {
    // Worst error per (dtype, map class, what), printed at the end (`--nocapture`).
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut note = |key: String, e: f64| {
        let w = worst.entry(key).or_insert(0.0);
        *w = w.max(e);
    };
    for backend in fast_backends() {
        for case in cases() {
            let s = case.shape;
            for (name, map) in feature_map_catalog(s.d, case.m, case.seed) {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    let options = AttentionOptions { direction, ..Default::default() };
                    let p = Problem::new(s, &map).with_options(options);
                    let std = qk_std(name, s.d);
                    let q = tensor(case.dtype, case.seed * 7 + 1, s.qk_len(), std);
                    let k = tensor(case.dtype, case.seed * 7 + 2, s.qk_len(), std);
                    let v = tensor(case.dtype, case.seed * 7 + 3, s.v_len(), 1.0);
                    let g = tensor(case.dtype, case.seed * 7 + 4, s.v_len(), 1.0);
                    let mask = case.masked.then(|| {
                        let mut m = random_mask(&mut rng(case.seed), s.mask_len(), 0.7);
                        m[0] = true;
                        m
                    });
                    let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: mask.as_deref() };
                    if unsupported_here(&backend, name, &p, inputs) {
                        continue;
                    }
                    let what = format!("{} {name} {direction:?} {:?} m={} {}", backend.name(), s, case.m, case.dtype);
                    let kappa = denominator_condition(&p, inputs);
                    assert!(kappa <= TRIG_KAPPA_MAX, "{what}: ill-conditioned denominators (κ = {kappa:.1e})");
                    let class = if name == "trigonometric" { "trigonometric" } else { "non-negative" };
                    note(format!("denominator condition number, {class}"), kappa);
                    let tol = tolerance(case.dtype);

                    // The reference's f64 result on the same stored (rounded) inputs.
                    let mut got = HostTensor::zeros(case.dtype, s.v_len());
                    backend.forward(&p, inputs, got.view_mut()).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let want = ReferenceBackend.forward_f64(&p, inputs).unwrap();
                    let err = rel_error(&what, &got.to_f64_vec(), &want);
                    assert!(err <= tol, "{what}: forward rel. error {err:.2e} > {tol:.1e}");
                    note(format!("{} {class} forward", case.dtype), err);

                    let mut dq = HostTensor::zeros(case.dtype, s.qk_len());
                    let mut dk = HostTensor::zeros(case.dtype, s.qk_len());
                    let mut dv = HostTensor::zeros(case.dtype, s.v_len());
                    let params = backend
                        .backward(
                            &p,
                            inputs,
                            g.view(),
                            Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() },
                        )
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let want = ReferenceBackend.backward_f64(&p, inputs, g.view()).unwrap();
                    // dq and dk vanish in exact arithmetic with one key, d = 1 or one feature
                    // (two terms of size √d_v·RMS(g)·RMS(v)·‖∇log R‖ cancel): measured against that.
                    let (scale, pscale) = cancel_scales(&p, inputs, g.view());
                    let errors = [
                        ("dq", rel_error_or_cancelled(&what, &dq.to_f64_vec(), &want.dq, scale)),
                        ("dk", rel_error_or_cancelled(&what, &dk.to_f64_vec(), &want.dk, scale)),
                        ("dv", RelError { value: rel_error(&what, &dv.to_f64_vec(), &want.dv), cancelled: false }),
                    ];
                    for (arg, err) in errors {
                        let tol = if err.cancelled { TOL_CANCELLED } else { tol };
                        assert!(err.value <= tol, "{what}: {arg} error {err} > {tol:.1e}");
                        let kind = if err.cancelled { "cancelled gradients (vs scale)" } else { "backward" };
                        note(format!("{} {class} {kind}", case.dtype), err.value);
                    }
                    assert_eq!(params.is_some(), want.params.is_some(), "{what}: parameter gradients present");
                    if let (Some(a), Some(b)) = (&params, &want.params) {
                        let a: Vec<f64> =
                            a.w.iter()
                                .chain(a.bias.iter().flatten())
                                .chain(a.w_gate.iter().flatten())
                                .map(|&x| x as f64)
                                .collect();
                        let err = rel_error_or_cancelled(&what, &a, &flat_param_grads(b), pscale);
                        // Parameter gradients are returned in f32 whatever the storage.
                        let tol = if err.cancelled { TOL_CANCELLED } else { TOL_F32 };
                        assert!(err.value <= tol, "{what}: dW error {err} > {tol:.0e}");
                        note(
                            format!(
                                "any dtype {class} dW{}",
                                if err.cancelled { " (cancelled, vs scale)" } else { "" }
                            ),
                            err.value,
                        );
                    }
                }
            }
        }
    }
    for (what, e) in worst {
        eprintln!("worst {what}: {e:.1e}");
    }
}

#[test]
fn decoding_through_the_entry_point_equals_full_causal_attention() {
    let s = AttentionShape::new(2, 2, 23, 9).with_dv(5);
    for backend in Backend::available() {
        for (name, map) in feature_map_catalog(s.d, 17, 3) {
            let p = Problem::new(s, &map).with_options(AttentionOptions::causal());
            let (q, k, v) = (
                random_tensor(1, s.qk_len(), 0.7),
                random_tensor(2, s.qk_len(), 0.7),
                random_tensor(3, s.v_len(), 1.0),
            );
            let mut full = vec![0f32; s.v_len()];
            let inputs =
                Inputs { q: q.as_slice().into(), k: k.as_slice().into(), v: v.as_slice().into(), key_mask: None };
            if unsupported_here(&backend, name, &p, inputs) {
                continue;
            }
            backend.forward(&p, inputs, full.as_mut_slice().into()).unwrap();

            // Chunks of 10, 1, 5, 7 tokens, read in place from the full tensors.
            let decoded = decode_in_chunks(&backend, &p, [&q, &k, &v], &[10, 1, 5, 7]).unwrap();
            let f = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
            let what = format!("{} {name}: decode vs full", backend.name());
            // The same backend's f32 sums, per chunk and over the whole sequence: measured worst
            // 9.3e-8; 2e-6 as in favor-simd's decode test (measured 1.7e-7 there).
            let err = rel_error(&what, &f(&decoded), &f(&full));
            eprintln!("{what}: {err:.1e}");
            assert!(err <= 2e-6, "{what}: rel. error {err:.2e}");
        }
    }
}

#[test]
fn slot_decoding_through_the_entry_point_equals_full_causal_attention() {
    use favor_core::testing::slots::{assert_slot_decoding, assert_slot_errors, slot_cases};
    let want = assert_slot_errors(&favor_core::ReferenceBackend);
    for backend in Backend::available() {
        for case in slot_cases() {
            assert_slot_decoding(&backend, &case, 1e-4);
        }
        assert_eq!(assert_slot_errors(&backend), want, "{}", backend.name());
    }
}

#[test]
fn ragged_batches_through_the_entry_point_match_separate_calls() {
    use favor_core::testing::ragged::{assert_ragged_errors, assert_ragged_matches, ragged_cases};
    let want = assert_ragged_errors(&favor_core::ReferenceBackend);
    for backend in Backend::available() {
        for case in ragged_cases() {
            assert_ragged_matches(&backend, &case, 1e-4, 2e-4);
        }
        assert_eq!(assert_ragged_errors(&backend), want, "{}", backend.name());
    }
}

#[test]
fn a_state_from_another_backend_is_a_typed_error() {
    let backends = Backend::available();
    let (Some(a), Some(b)) = (backends.first(), backends.last()) else { panic!("no backend") };
    let map = feature_map_catalog(4, 8, 1).remove(0).1;
    let s = AttentionShape::new(1, 1, 1, 4);
    let p = Problem::new(s, &map);
    let mut state = b.new_state(&p).unwrap();
    let x = vec![0.5f32; 4];
    let mut out = vec![0f32; 4];
    let inputs = Inputs { q: x.as_slice().into(), k: x.as_slice().into(), v: x.as_slice().into(), key_mask: None };
    let r = a.decode(&p, &mut state, inputs, out.as_mut_slice().into());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "state", .. })), "{r:?}");
    let r = a.decode_slots(&p, &mut state, favor::SlotChunks::new(&[0], &[0, 1]), inputs, out.as_mut_slice().into());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "state", .. })), "{r:?}");
    for r in [a.reset_slot(&mut state, 0), a.copy_slot(&mut state, 0, 0), a.read_slot(&state, 0).map(|_| ())] {
        assert!(matches!(r, Err(FavorError::InvalidParameter { name: "state", .. })), "{r:?}");
    }
}
