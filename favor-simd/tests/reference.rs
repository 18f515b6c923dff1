//! Every ISA × feature map × direction, forward and backward, against the f64 reference on
//! shapes that cross the vector-width and tile boundaries.

mod common;
use common::*;
use favor_core::{AttentionShape, DType, Direction, FavorBackend};

/// Draws (L, d, d_v, m) from [`SIZES`] under a work budget so the f64 reference stays fast.
fn sample_shape(seed: u64, budget: f64) -> (usize, usize, usize, usize) {
    let mut r = rng(seed);
    loop {
        let (l, d, dv, m) =
            (SIZES[pick(&mut r, 13)], SIZES[pick(&mut r, 13)], SIZES[pick(&mut r, 13)], SIZES[pick(&mut r, 13)]);
        if (l * m * (d + dv)) as f64 <= budget && d <= 257 {
            return (l, d, dv, m);
        }
    }
}

fn sweep(direction: Direction) {
    let mut seed = if direction == Direction::Causal { 1000 } else { 0 };
    for backend in backends() {
        for mi in 0..all_maps(4, 4, 0).len() {
            for rep in 0..3 {
                seed += 1;
                let (l, d, dv, m) = sample_shape(seed, 4e6);
                let map = all_maps(d, m, seed).swap_remove(mi);
                let batch = 1 + (rep % 2);
                let shape = AttentionShape::new(batch, 1 + rep / 2, l, d).with_dv(dv);
                let masked = rep == 1;
                let e = check_against_reference(&backend, &map, shape, direction, DType::F32, masked, seed, true);
                eprintln!(
                    "{} {:>22} L={l:4} d={d:4} dv={dv:4} m={m:4} mask={masked}: {:.2e}",
                    backend.name(),
                    map.name(),
                    e.worst()
                );
            }
        }
    }
}

#[test]
fn bidirectional_matches_reference_on_every_isa_and_map() {
    sweep(Direction::Bidirectional);
}

#[test]
fn causal_matches_reference_on_every_isa_and_map() {
    sweep(Direction::Causal);
}

/// Every size of [`SIZES`] appears as L, d, d_v and m at least once (positive map, both directions).
#[test]
fn boundary_sizes_positive_map() {
    for backend in backends() {
        for (i, &n) in SIZES.iter().enumerate() {
            let other = SIZES[(i * 5 + 3) % 13].min(65);
            for (l, d, dv, m) in
                [(n, 16, other, 17), (65, n.min(257), 9, other), (33, 8, n, 15), (70, other.max(2), 7, n)]
            {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    let map = favor_core::FeatureMap::positive(
                        favor_core::Projection::draw(favor_core::ProjectionConfig::new(m, d, 0x5eed_0000 + i as u64))
                            .unwrap(),
                    );
                    let shape = AttentionShape::new(1, 2, l, d).with_dv(dv);
                    check_against_reference(
                        &backend,
                        &map,
                        shape,
                        direction,
                        DType::F32,
                        i % 3 == 0,
                        i as u64,
                        l * m <= 70_000,
                    );
                }
            }
        }
    }
}

#[test]
fn half_precision_storage() {
    for backend in backends() {
        for dtype in [DType::F16, DType::Bf16] {
            for (mi, direction) in [
                (0, Direction::Bidirectional),
                (1, Direction::Causal),
                (7, Direction::Causal),
                (5, Direction::Bidirectional),
            ] {
                let map = all_maps(17, 33, 3).swap_remove(mi);
                let shape = AttentionShape::new(2, 1, 130, 17).with_dv(9);
                check_against_reference(&backend, &map, shape, direction, dtype, mi == 1, 5, true);
            }
        }
    }
}

/// Long causal sequences with few heads are split into segments (summary pass, combination,
/// replay); the ε part of the features is carried exactly across segments. A large ε makes an
/// error there visible.
#[test]
fn causal_sequence_segments_match_reference() {
    use favor_core::{FeatureMap, Projection, ProjectionConfig};
    for backend in backends() {
        for (l, heads, masked) in [(3000, 1, true), (4500, 2, false), (2100, 1, false), (3100, 1, true)] {
            let (d, m) = (8, 16);
            let proj = || Projection::draw(ProjectionConfig::new(m, d, 0x5eed_1234)).unwrap();
            let maps = [
                FeatureMap::Positive { projection: proj(), epsilon: 0.1, softmax_scale: None },
                FeatureMap::Hyperbolic { projection: proj(), epsilon: 0.05, softmax_scale: None },
                FeatureMap::trigonometric(proj()),
                all_maps(d, m, 9).swap_remove(7),
            ];
            for map in &maps {
                let shape = AttentionShape::new(1, heads, l, d).with_dv(8);
                // 3100 tokens on one head: three segments, so the backward chains suffix sums twice.
                let backward = l != 4500;
                check_against_reference(&backend, map, shape, Direction::Causal, DType::F32, masked, 21, backward);
            }
        }
    }
}

/// The causal backward keeps R, ḡ and c of each token (16 bytes) in the caller's dv rows, or dk
/// rows when dv rows are narrower than 16 bytes, or a side buffer when both are: every
/// placement, split into segments and not, f32 and 16-bit storage.
#[test]
fn causal_backward_stash_placements_match_reference() {
    use favor_core::{FeatureMap, Projection, ProjectionConfig};
    for backend in backends() {
        // (d, d_v, dtype): dv rows, dk rows, side buffer in f32; dv rows, dk rows, side buffer
        // in 16-bit storage; one-element rows.
        for (d, dv, dtype) in [
            (8, 8, DType::F32),
            (8, 3, DType::F32),
            (3, 3, DType::F32),
            (8, 8, DType::F16),
            (8, 4, DType::F16),
            (4, 4, DType::Bf16),
            (1, 3, DType::F16),
        ] {
            for l in [2100, 130] {
                let proj = Projection::draw(ProjectionConfig::new(16, d, 0x5eed_0077)).unwrap();
                let map = FeatureMap::Positive { projection: proj, epsilon: 0.05, softmax_scale: None };
                let shape = AttentionShape::new(1, 1, l, d).with_dv(dv);
                check_against_reference(&backend, &map, shape, Direction::Causal, dtype, true, 33, true);
            }
        }
    }
}

/// The tolerances catch real errors on trigonometric features, on the same well-conditioned data
/// the sweeps use: a backend whose projection reads row 4 in place of row 5 (an off-by-one in
/// one of the m rows), and a subtle one, a projection rounded to f16 (a kernel keeping W in 16
/// bits), fail every check by more than 3× the tolerance.
#[test]
fn wrong_trigonometric_features_exceed_the_tolerance() {
    use favor_core::testing::rel_error;
    use favor_core::{AttentionOptions, FeatureMap, Problem, Projection, ProjectionConfig};
    let (d, m) = (16, 32);
    let proj = Projection::draw(ProjectionConfig::new(m, d, 0x5eed_0099)).unwrap();
    let mut shifted = proj.matrix().to_vec();
    shifted.copy_within(4 * d..5 * d, 5 * d);
    let half: Vec<f32> = proj.matrix().iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
    let good = FeatureMap::trigonometric(proj);
    let backend = favor_simd::SimdBackend::new();
    for (bug, w) in [("row 5 reads row 4", shifted), ("W rounded to f16", half)] {
        let bad = FeatureMap::trigonometric(Projection::from_matrix(m, d, w).unwrap());
        for direction in [Direction::Bidirectional, Direction::Causal] {
            let shape = AttentionShape::new(1, 2, 65, d).with_dv(9);
            let case = Case::new(shape, DType::F32, false, 4).conditioned_for(&good);
            let opts = AttentionOptions { direction, ..Default::default() };
            let p = Problem::new(shape, &good).with_options(opts);
            let wrong = Problem::new(shape, &bad).with_options(opts);
            let out = rel_error("out", &case.forward(&backend, &wrong), &case.reference_forward(&p));
            let (dq, dk, dv, _) = case.backward(&backend, &wrong);
            let (rq, rk, rv, _) = case.reference_backward(&p);
            let errors = [
                ("out", out),
                ("dq", rel_error("dq", &dq, &rq)),
                ("dk", rel_error("dk", &dk, &rk)),
                ("dv", rel_error("dv", &dv, &rv)),
            ];
            for (name, e) in errors {
                eprintln!("{bug}, {direction:?}: {name} error {e:.1e}");
                assert!(e > 3.0 * TOL_F32, "{bug}, {direction:?}, {name}: error only {e:.1e}");
            }
        }
    }
}
