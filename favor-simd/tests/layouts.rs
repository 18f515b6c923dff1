//! Strided tensors on every ISA: `[B, L, H, d]`, sequence-first, gapped and packed-QKV layouts
//! give the contiguous results bit for bit — forward, backward and in-place chunked decoding,
//! across tile and segment boundaries, with masks, in f32 and bf16, and on heads recomputed in
//! f64 — and the contiguous results agree with the f64 reference.

mod common;
use common::*;
use favor_core::testing::{assert_layouts_agree, rel_error};
use favor_core::{AttentionOptions, AttentionShape, DType, Direction, FavorBackend, Problem, ReferenceBackend};

#[test]
fn strided_layouts_match_the_contiguous_layout_on_every_isa() {
    // Odd sizes; bidirectional segments (> 256 rows) and causal segments (≥ 2048 rows with
    // fewer than 8 heads) are crossed; a cross shape and d_v ≠ d.
    let shapes = [
        (AttentionShape::new(2, 3, 13, 9), true),
        (AttentionShape::new(1, 2, 300, 9).with_dv(7), true),
        (AttentionShape::new(2, 1, 70, 9).with_kv_len(290), false),
        (AttentionShape::new(1, 1, 2100, 9), true),
    ];
    for backend in backends() {
        for (i, &(shape, causal)) in shapes.iter().enumerate() {
            let maps = all_maps(shape.d, 17, 60 + i as u64);
            // A positive map, ELU+1 and a learned map everywhere; every map on the small shape.
            let picks: Vec<usize> = if i == 0 { (0..maps.len()).collect() } else { vec![0, 5, 7] };
            for mi in picks {
                let map = &maps[mi];
                let dirs = if causal {
                    &[Direction::Bidirectional, Direction::Causal][..]
                } else {
                    &[Direction::Bidirectional]
                };
                for &direction in dirs {
                    let p = Problem::new(shape, map).with_options(AttentionOptions { direction, ..Default::default() });
                    for (dtype, masked) in [(DType::F32, true), (DType::Bf16, false)] {
                        let run = assert_layouts_agree(&backend, &p, dtype, masked, 70 + i as u64, 1.0);
                        if dtype == DType::F32 && mi == 0 {
                            let what = format!("{} {:?} {shape:?}", backend.name(), direction);
                            let reference =
                                assert_layouts_agree(&ReferenceBackend, &p, dtype, masked, 70 + i as u64, 1.0);
                            assert!(rel_error(&what, &run.out, &reference.out) < 1e-4, "{what}: out");
                            assert!(rel_error(&what, &run.dv, &reference.dv) < 1e-4, "{what}: dv");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn heads_recomputed_in_f64_are_written_in_the_callers_layout() {
    // Values beyond the kernels' f32 range send their heads to the f64 recomputation.
    for backend in backends() {
        let map = &all_maps(6, 11, 3)[0];
        let shape = AttentionShape::new(2, 2, 37, 6);
        for direction in [Direction::Bidirectional, Direction::Causal] {
            let p = Problem::new(shape, map).with_options(AttentionOptions { direction, ..Default::default() });
            let run = assert_layouts_agree(&backend, &p, DType::F32, true, 5, 1e10);
            let reference = assert_layouts_agree(&ReferenceBackend, &p, DType::F32, true, 5, 1e10);
            let what = format!("{} {direction:?}", backend.name());
            assert!(rel_error(&what, &run.out, &reference.out) < 1e-6, "{what}: recomputed out");
            assert!(rel_error(&what, &run.dq, &reference.dq) < 1e-5, "{what}: recomputed dq");
            assert!(run.out.iter().all(|x| x.is_finite()));
        }
    }
}
