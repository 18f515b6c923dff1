//! Long sequences against the f64 reference: K'ᵀV, z and the causal state accumulate over whole
//! segments, so their rounding must not grow with L. d = 64, m = 256 (the paper's setting), one
//! head; the errors per L are printed (`--nocapture`).

mod common;
use common::*;
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FeatureMap, Problem, Projection,
    ProjectionConfig, ReferenceBackend,
};

/// Relative Frobenius error without a floor.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

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
            let out = rel(&case.forward(&backend, &p), &case.forward(&ReferenceBackend, &p));
            let (dq, dk, dv, _) = case.backward(&backend, &p);
            let (rq, rk, rv, _) = case.backward(&ReferenceBackend, &p);
            let (eq, ek, ev) = (rel(&dq, &rq), rel(&dk, &rk), rel(&dv, &rv));
            println!("{} {direction:?} L={len}: out {out:.2e} dq {eq:.2e} dk {ek:.2e} dv {ev:.2e}", backend.name());
            for (name, e) in [("out", out), ("dq", eq), ("dk", ek), ("dv", ev)] {
                // f32 rounding of sums over L terms, blocked per tile and segment: ≤ 1e-5 at any L.
                assert!(e <= 1e-5, "{direction:?} L={len}: {name} rel. error {e:.2e} > 1e-5");
            }
        }
    }
}
