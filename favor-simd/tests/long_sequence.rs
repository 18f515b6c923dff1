//! Long sequences against the f64 reference: K'ᵀV, z and the causal state accumulate over whole
//! segments, so their rounding must not grow with L. d = 64, m = 256 (the paper's setting), one
//! head; the errors per L are printed (`--nocapture`).

mod common;
use common::*;
use favor_core::testing::rel_error;
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FeatureMap, Problem, Projection, ProjectionConfig,
};

#[test]
fn error_does_not_grow_with_sequence_length() {
    let backend = favor_simd::SimdBackend::new();
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(256, 64, 11)).unwrap());
    let lens: Vec<usize> = match std::env::var("FAVOR_LONG_LENS") {
        Ok(s) => s.split(',').map(|x| x.parse().unwrap()).collect(),
        Err(_) => vec![1024, 65536],
    };
    for direction in [Direction::Bidirectional, Direction::Causal] {
        for &len in &lens {
            let shape = AttentionShape::new(1, 1, len, 64);
            let p = Problem::new(shape, &map).with_options(AttentionOptions { direction, ..Default::default() });
            let case = Case::new(shape, DType::F32, false, 3);
            let what = format!("{direction:?} L={len}");
            let out = rel_error(&what, &case.forward(&backend, &p), &case.reference_forward(&p));
            let (dq, dk, dv, _) = case.backward(&backend, &p);
            let (rq, rk, rv, _) = case.reference_backward(&p);
            let (eq, ek, ev) = (rel_error(&what, &dq, &rq), rel_error(&what, &dk, &rk), rel_error(&what, &dv, &rv));
            println!("{} {direction:?} L={len}: out {out:.2e} dq {eq:.2e} dk {ek:.2e} dv {ev:.2e}", backend.name());
            for (name, e) in [("out", out), ("dq", eq), ("dk", ek), ("dv", ev)] {
                // f32 rounding of sums over L terms, blocked per tile and segment, stays within
                // the short-sequence tolerance at any L (measured ≤ 1.8e-6 at L = 65536).
                assert!(e <= TOL_F32, "{what}: {name} rel. error {e:.2e} > {TOL_F32:.0e}");
            }
        }
    }
}
