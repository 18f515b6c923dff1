//! Cross-backend integration tests through the `favor` entry point: every backend that
//! `Backend::available()` lists (one CPU backend per ISA this machine runs) against the f64
//! reference, for every feature map, both directions, forward, backward and decoding, on shapes
//! that cross vector-width and tile boundaries, with f32/f16/bf16 storage.

use favor::{
    AttentionOptions, AttentionShape, Backend, DType, Direction, FavorBackend, FavorError, Grads, HostTensor, Inputs,
    Problem, ReferenceBackend,
};
use favor_core::testing::{feature_map_catalog, random_mask, random_tensor, rel_frobenius, rng};

/// Backends under test: everything but the reference itself.
fn fast_backends() -> Vec<Backend> {
    Backend::available().into_iter().filter(|b| !matches!(b, Backend::Reference(_))).collect()
}

/// Relative Frobenius tolerance of a backend vs the reference for a storage dtype.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 | DType::Bf16 => 1e-2,
    }
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
            shape: AttentionShape { batch, heads, len, d, dv },
            m,
            dtype,
            masked: i % 2 == 1,
            seed: i as u64,
        });
    }
    out
}

/// ‖a − b‖_F / max(‖b‖_F, √n): relative error with an RMS floor of 1, the scale of the test
/// data (unit-variance V and output gradient). Some gradients are exactly zero in exact
/// arithmetic (dq with a single key: two O(1) terms cancel), where f32 rounding noise would
/// otherwise read as an infinite relative error.
fn rel_error(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    diff / norm.max((b.len() as f64).sqrt())
}

fn tensor(dtype: DType, seed: u64, n: usize, std: f32) -> HostTensor {
    HostTensor::from_f32(dtype, &random_tensor(seed, n, std))
}

#[test]
fn the_entry_point_offers_a_fast_backend() {
    let best = Backend::best();
    assert!(!matches!(best, Backend::Reference(_)), "best() fell back to the reference backend");
    assert!(!fast_backends().is_empty());
    assert!(best.name().starts_with("cpu-"), "{}", best.name());
}

#[test]
fn every_backend_matches_the_reference_forward_and_backward() {
    for backend in fast_backends() {
        for case in cases() {
            let s = case.shape;
            for (name, map) in feature_map_catalog(s.d, case.m, case.seed) {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    let options = AttentionOptions { direction, ..Default::default() };
                    let p = Problem::new(s, &map).with_options(options);
                    let q = tensor(case.dtype, case.seed * 7 + 1, s.qk_len(), 0.8);
                    let k = tensor(case.dtype, case.seed * 7 + 2, s.qk_len(), 0.8);
                    let v = tensor(case.dtype, case.seed * 7 + 3, s.v_len(), 1.0);
                    let g = tensor(case.dtype, case.seed * 7 + 4, s.v_len(), 1.0);
                    let mask = case.masked.then(|| {
                        let mut m = random_mask(&mut rng(case.seed), s.mask_len(), 0.7);
                        m[0] = true;
                        m
                    });
                    let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: mask.as_deref() };
                    // Trigonometric denominators are sign-indefinite and can nearly cancel (causal
                    // rows with few keys), which amplifies f32 rounding by 1/R: allow 10x there.
                    let trig = if name == "trigonometric" { 10.0 } else { 1.0 };
                    let what = format!("{} {name} {direction:?} {:?} m={} {}", backend.name(), s, case.m, case.dtype);

                    let mut want = HostTensor::zeros(case.dtype, s.v_len());
                    let mut got = HostTensor::zeros(case.dtype, s.v_len());
                    ReferenceBackend.forward(&p, inputs, want.view_mut()).unwrap();
                    backend.forward(&p, inputs, got.view_mut()).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let err = rel_frobenius(&got.to_f64_vec(), &want.to_f64_vec());
                    assert!(err <= trig * tolerance(case.dtype), "{what}: forward rel. error {err:e}");

                    let grads = |b: &dyn Fn(Grads<'_, favor::Host>) -> favor::Result<Option<favor::ParamGrads>>| {
                        let mut dq = HostTensor::zeros(case.dtype, s.qk_len());
                        let mut dk = HostTensor::zeros(case.dtype, s.qk_len());
                        let mut dv = HostTensor::zeros(case.dtype, s.v_len());
                        let params = b(Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() }).unwrap();
                        (dq.to_f64_vec(), dk.to_f64_vec(), dv.to_f64_vec(), params)
                    };
                    let want = grads(&|gr| ReferenceBackend.backward(&p, inputs, g.view(), gr));
                    let got = grads(&|gr| backend.backward(&p, inputs, g.view(), gr));
                    for (arg, a, b) in [("dq", &got.0, &want.0), ("dk", &got.1, &want.1), ("dv", &got.2, &want.2)] {
                        let err = rel_error(a, b);
                        // Gradients go through one more reduction than outputs: allow 10x.
                        assert!(err <= 10.0 * trig * tolerance(case.dtype), "{what}: {arg} rel. error {err:e}");
                    }
                    assert_eq!(got.3.is_some(), want.3.is_some(), "{what}: parameter gradients present");
                    if let (Some(a), Some(b)) = (&got.3, &want.3) {
                        let f = |v: &Vec<f32>| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
                        let err = rel_error(&f(&a.w), &f(&b.w));
                        assert!(err <= 10.0 * tolerance(case.dtype), "{what}: dW rel. error {err:e}");
                    }
                }
            }
        }
    }
}

#[test]
fn decoding_through_the_entry_point_equals_full_causal_attention() {
    let s = AttentionShape { batch: 2, heads: 2, len: 23, d: 9, dv: 5 };
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
            backend.forward(&p, inputs, full.as_mut_slice().into()).unwrap();

            // Chunks of 10, 1, 5, 7 tokens, gathered per (batch, head) into [B, H, T, ·].
            let mut state = backend.new_state(&p).unwrap();
            let mut decoded = vec![0f32; s.v_len()];
            let mut start = 0;
            for t in [10, 1, 5, 7] {
                let gather = |x: &[f32], w: usize| -> Vec<f32> {
                    (0..s.problems())
                        .flat_map(|bh| x[(bh * s.len + start) * w..(bh * s.len + start + t) * w].to_vec())
                        .collect()
                };
                let (qc, kc, vc) = (gather(&q, s.d), gather(&k, s.d), gather(&v, s.dv));
                let mut oc = vec![0f32; s.problems() * t * s.dv];
                let chunk = Problem::new(AttentionShape { len: t, ..s }, &map);
                let inputs = Inputs {
                    q: qc.as_slice().into(),
                    k: kc.as_slice().into(),
                    v: vc.as_slice().into(),
                    key_mask: None,
                };
                backend.decode(&chunk, &mut state, inputs, oc.as_mut_slice().into()).unwrap();
                for bh in 0..s.problems() {
                    let dst = (bh * s.len + start) * s.dv;
                    decoded[dst..dst + t * s.dv].copy_from_slice(&oc[bh * t * s.dv..(bh + 1) * t * s.dv]);
                }
                start += t;
            }
            let f = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
            let err = rel_frobenius(&f(&decoded), &f(&full));
            assert!(err <= 1e-5, "{} {name}: decode vs full rel. error {err:e}", backend.name());
        }
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
}
