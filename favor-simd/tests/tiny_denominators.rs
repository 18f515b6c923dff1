//! Denominators that underflow f32: the kernels must not divide by them (1/R = ∞) but take the
//! reference's f64 path for the affected head, leaving the other heads on the f32 kernels.

mod common;
use common::*;
use favor_core::testing::{rel_error, rel_error_or_cancelled};
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FeatureMap, HostTensor, Problem, Projection,
};

/// Head 0 ordinary; head 1 with every query entry `q1` and key entry `k1` (plus a little noise).
fn case(shape: AttentionShape, dtype: DType, q1: f32, k1: f32) -> Case {
    let base = Case::new(shape, DType::F32, false, 9);
    let n = shape.len * shape.d;
    let noise = normal(2 * n, 0.01, 10);
    let fill = |t: &HostTensor, x: f32, off: usize| {
        let mut v = t.to_f32_vec();
        for (i, e) in v[n..].iter_mut().enumerate() {
            *e = x + noise[off + i];
        }
        HostTensor::from_f32(dtype, &v)
    };
    let q = fill(&base.q, q1, 0);
    let k = fill(&base.k, k1, n);
    let conv = |t: &HostTensor| HostTensor::from_f32(dtype, &t.to_f32_vec());
    Case { q, k, v: conv(&base.v), dout: conv(&base.dout), ..base }
}

fn check(map: &FeatureMap, d: usize, q1: f32, k1: f32) {
    let shape = AttentionShape::new(1, 2, 40, d).with_dv(3);
    for backend in backends() {
        for dtype in [DType::F32, DType::Bf16] {
            for direction in [Direction::Bidirectional, Direction::Causal] {
                let p = Problem::new(shape, map).with_options(AttentionOptions { direction, ..Default::default() });
                let c = case(shape, dtype, q1, k1);
                let what = format!("{} {} {dtype} {direction:?}", backend.name(), map.name());
                let ours = c.forward(&backend, &p);
                let reference = c.reference_forward(&p);
                // The constructed head's output is a proper average of v (not 0, not NaN).
                let half = shape.len * shape.dv;
                assert!(reference[half..].iter().any(|&x| x.abs() > 1e-3), "{what}: degenerate reference");
                let tol = tolerance(dtype);
                let e = rel_error(&what, &ours, &reference);
                assert!(e <= tol, "{what}: forward rel. error {e:.2e} > {tol:.1e}");
                let (dq, dk, dv, _) = c.backward(&backend, &p);
                let (rq, rk, rv, _) = c.reference_backward(&p);
                let (scale, _) = c.cancel_scales(&p);
                let eq = rel_error_or_cancelled(&format!("{what} dq"), &dq, &rq, scale);
                let ek = rel_error_or_cancelled(&format!("{what} dk"), &dk, &rk, scale);
                let ev = rel_error(&format!("{what} dv"), &dv, &rv);
                eprintln!("{what}: out {e:.1e} dq {eq} dk {ek} dv {ev:.1e}");
                for (name, e, tol) in [
                    ("dq", eq.value, grad_tolerance(eq, tol)),
                    ("dk", ek.value, grad_tolerance(ek, tol)),
                    ("dv", ev, tol),
                ] {
                    assert!(e <= tol, "{what}: {name} error {e:.2e} > {tol:.1e}");
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
    check(&FeatureMap::Positive { projection: w, epsilon: 0.0, softmax_scale: None }, 1, 50.0, -50.0);
}

#[test]
fn elu_plus_one_queries_far_below_zero() {
    // elu(x) + 1 = e^x: queries near −95 have features near 5e-42 (subnormal in f32).
    check(&FeatureMap::elu_plus_one(), 4, -95.0, 0.3);
}
