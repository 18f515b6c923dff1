//! Thread-count independence, extreme magnitudes, typed errors, ISA selection.

mod common;
use common::*;
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FavorError, FeatureMap, Grads, HostTensor,
    Inputs, Problem, Projection, ProjectionConfig,
};
use favor_simd::{Isa, SimdBackend};

fn run_all(backend: &SimdBackend, case: &Case, p: &Problem<'_>) -> Vec<f32> {
    let mut out = HostTensor::zeros(DType::F32, case.shape.v_len());
    backend.forward(p, case.inputs(), out.view_mut()).unwrap();
    let (dq, dk, dv, pg) = case.backward(backend, p);
    let mut all = out.to_f32_vec();
    all.extend(dq.iter().chain(&dk).chain(&dv).map(|&x| x as f32));
    all.extend(params_vec(&pg).iter().map(|&x| x as f32));
    all
}

/// Results are bitwise identical in rayon pools of 1, 2 and 3 threads (long single-head
/// sequences, so the sequence is split into segments).
#[test]
fn results_do_not_depend_on_thread_count() {
    for backend in backends() {
        for (mi, direction) in [
            (0, Direction::Bidirectional),
            (0, Direction::Causal),
            (7, Direction::Bidirectional),
            (1, Direction::Causal),
        ] {
            let map = all_maps(16, 40, 1).swap_remove(mi);
            let shape = AttentionShape::new(1, 2, 2100, 16).with_dv(24);
            let case = Case::new(shape, DType::F32, true, 8);
            let p = Problem::new(shape, &map).with_options(AttentionOptions { direction, ..Default::default() });
            let results: Vec<Vec<f32>> = [1, 2, 3]
                .into_iter()
                .map(|n| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
                    pool.install(|| run_all(&backend, &case, &p))
                })
                .collect();
            for r in &results[1..] {
                assert!(
                    r.iter().zip(&results[0]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} {} {direction:?}: results differ between thread counts",
                    backend.name(),
                    map.name()
                );
            }
        }
    }
}

/// |x| up to 1e4 gives finite outputs and gradients for every map.
#[test]
fn extreme_magnitudes_give_finite_results() {
    for backend in backends() {
        for map in all_maps(8, 16, 5) {
            for direction in [Direction::Bidirectional, Direction::Causal] {
                for scale in [1e-4f32, 1e2, 1e4] {
                    let shape = AttentionShape::new(1, 1, 70, 8).with_dv(5);
                    let mut case = Case::new(shape, DType::F32, false, 2);
                    let big = |t: &HostTensor| {
                        HostTensor::from_f32(DType::F32, &t.to_f32_vec().iter().map(|x| x * scale).collect::<Vec<_>>())
                    };
                    case.q = big(&case.q);
                    case.k = big(&case.k);
                    case.v = big(&case.v);
                    let p =
                        Problem::new(shape, &map).with_options(AttentionOptions { direction, ..Default::default() });
                    let r = run_all(&backend, &case, &p);
                    assert!(
                        r.iter().all(|x| x.is_finite()),
                        "{} {} {direction:?} scale {scale}: non-finite result",
                        backend.name(),
                        map.name()
                    );
                }
            }
        }
    }
}

#[test]
fn bad_inputs_give_typed_errors() {
    let backend = SimdBackend::new();
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(8, 4, 1)).unwrap());
    let shape = AttentionShape::new(1, 1, 5, 4);
    let p = Problem::new(shape, &map);
    let q = vec![0.1f32; 20];
    let short = vec![0.1f32; 19];
    let mut out = [0.0f32; 20];
    fn mk<'a>(q: &'a [f32], k: &'a [f32]) -> Inputs<'a, favor_core::Host> {
        Inputs { q: q.into(), k: k.into(), v: q.into(), key_mask: None }
    }
    assert!(matches!(
        backend.forward(&p, mk(&q, &short), (&mut out[..]).into()),
        Err(FavorError::Shape { arg: "k", .. })
    ));
    let mut bad = q.clone();
    bad[3] = f32::NAN;
    assert!(matches!(
        backend.forward(&p, mk(&q, &bad), (&mut out[..]).into()),
        Err(FavorError::NonFinite { arg: "k", index: 3, .. })
    ));
    bad[3] = f32::INFINITY;
    assert!(matches!(backend.forward(&p, mk(&q, &bad), (&mut out[..]).into()), Err(FavorError::NonFinite { .. })));
    let mut short_out = [0.0f32; 3];
    assert!(matches!(
        backend.forward(&p, mk(&q, &q), (&mut short_out[..]).into()),
        Err(FavorError::Shape { arg: "out", .. })
    ));
    let half = [half::f16::ZERO; 20];
    assert!(matches!(
        backend.forward(
            &p,
            Inputs { q: (&q[..]).into(), k: (&half[..]).into(), v: (&q[..]).into(), key_mask: None },
            (&mut out[..]).into()
        ),
        Err(FavorError::DType { arg: "k", .. })
    ));
    let zero = Problem::new(AttentionShape::new(1, 0, 5, 4), &map);
    assert!(matches!(
        backend.forward(&zero, mk(&q, &q), (&mut out[..]).into()),
        Err(FavorError::ZeroSize { arg: "heads" })
    ));
    let wrong_d = Problem::new(AttentionShape::new(1, 1, 4, 5), &map);
    assert!(matches!(
        backend.forward(&wrong_d, mk(&q, &q), (&mut out[..]).into()),
        Err(FavorError::Shape { arg: "d", .. })
    ));
    let mask = vec![true; 4];
    let masked = Inputs { key_mask: Some(&mask), ..mk(&q, &q) };
    assert!(matches!(
        backend.forward(&p, masked, (&mut out[..]).into()),
        Err(FavorError::Shape { arg: "key_mask", .. })
    ));
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; 20], vec![0.0f32; 20], vec![0.0f32; 19]);
    let grads = Grads { dq: (&mut dq[..]).into(), dk: (&mut dk[..]).into(), dv: (&mut dv[..]).into() };
    assert!(matches!(
        backend.backward(&p, mk(&q, &q), (&q[..]).into(), grads),
        Err(FavorError::Shape { arg: "dv", .. })
    ));
    // A decoding state of another shape.
    let mut state = backend.new_state(&Problem::new(AttentionShape::new(2, 1, 1, 4), &map)).unwrap();
    assert!(matches!(
        backend.decode(&p, &mut state, mk(&q, &q), (&mut out[..]).into()),
        Err(FavorError::StateMismatch { field: "batch", .. })
    ));
}

#[test]
fn isa_selection() {
    let avail = Isa::available();
    assert_eq!(avail[0], Isa::Portable);
    assert!(avail.contains(&favor_simd::best_isa()));
    for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
        match SimdBackend::with_isa(isa) {
            Ok(b) => {
                assert!(avail.contains(&isa));
                assert_eq!(b.isa(), isa);
                assert_eq!(b.name(), format!("cpu-{}", isa.name()));
            }
            Err(e) => {
                assert!(!avail.contains(&isa));
                assert!(matches!(e, FavorError::NotAvailable { .. }));
            }
        }
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
    }
}
