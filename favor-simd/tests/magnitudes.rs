//! Inputs of every magnitude: query and key entries scaled by 10^k, k = 0 … 38 (capped at the
//! storage type's range), every feature map, ISA, dtype and direction.

mod common;
use common::*;
use favor_core::{AttentionOptions, AttentionShape, DType, Direction, FavorBackend, HostTensor, Problem, ReferenceBackend};

fn scaled(t: &HostTensor, s: f64) -> HostTensor {
    let dt = t.dtype();
    HostTensor::from_f32(dt, &t.to_f32_vec().iter().map(|&x| (x as f64 * s) as f32).collect::<Vec<_>>())
}

/// The largest power of ten whose scaled N(0, 0.5²) inputs stay inside the dtype's range.
fn max_exponent(dtype: DType) -> i32 {
    match dtype {
        DType::F16 => 4,
        _ => 37,
    }
}

#[test]
fn every_input_scale_gives_finite_results() {
    let shape = AttentionShape::new(1, 2, 70, 8).with_dv(5);
    let mut report = Vec::new();
    for backend in backends() {
        for map in all_maps(8, 16, 5) {
            for dtype in DType::ALL {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    let p = Problem::new(shape, &map).with_options(AttentionOptions { direction, ..Default::default() });
                    let base = Case::new(shape, dtype, true, 2);
                    let mut worst = Vec::new();
                    for k in 0..=max_exponent(dtype) {
                        let s = 10f64.powi(k);
                        let case = Case { q: scaled(&base.q, s), k: scaled(&base.k, s), ..Case::new(shape, dtype, true, 2) };
                        let what = format!("{} {} {dtype} {direction:?} 1e{k}", backend.name(), map.name());
                        let ours = case.forward(&backend, &p);
                        assert!(ours.iter().all(|x| x.is_finite()), "{what}: non-finite output");
                        let (dq, dk, dv, pg) = case.backward(&backend, &p);
                        let pv = params_vec(&pg);
                        for (n, g) in [("dq", &dq), ("dk", &dk), ("dv", &dv), ("params", &pv)] {
                            assert!(g.iter().all(|x| x.is_finite()), "{what}: non-finite {n}");
                        }
                        let reference = case.forward(&ReferenceBackend, &p);
                        let (rq, rk, rv, rpg) = case.backward(&ReferenceBackend, &p);
                        let e = [
                            rel_fro(&ours, &reference),
                            rel_fro(&dq, &rq),
                            rel_fro(&dk, &rk),
                            rel_fro(&dv, &rv),
                            rel_fro(&pv, &params_vec(&rpg)),
                        ];
                        worst.push(format!("1e{k}: {}", e.iter().map(|x| format!("{x:.0e}")).collect::<Vec<_>>().join("/")));
                    }
                    report.push(format!("{} {} {dtype} {direction:?}: {}", backend.name(), map.name(), worst.join(" ")));
                }
            }
        }
    }
    println!("{}", report.join("\n"));
}
