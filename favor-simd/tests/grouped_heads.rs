//! Grouped-query and multi-query attention on every ISA and feature map against the f64
//! reference: groups of 2 and 3, one key/value head, cross-attention, lengths across the tile,
//! bidirectional-segment and causal-segment boundaries, masks, f32 and bf16; every layout bit
//! for bit (packed QKV with fewer key/value heads included), chunked decoding, and a group sent
//! to the f64 recomputation while the others stay on the kernels.

mod common;
use common::*;
use favor_core::testing::{assert_layouts_agree, decode_in_chunks, rel_error};
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FavorError, HostTensor, Inputs, Problem,
    ReferenceBackend,
};

#[test]
fn grouped_heads_match_the_reference_on_every_isa_and_map() {
    // (shape, causal too): groups of 2, 3 and 4 (multi-query), d_v ≠ d, a cross shape, more than
    // one bidirectional segment (> 256 rows) and two causal segments (≥ 2048 rows, 4 heads). The
    // causal backward stashes a group's entries (16 bytes per query head and token) in dv rows,
    // dk rows (d_v = 3 below) or a side buffer (rows too narrow for the group).
    let shapes = [
        (AttentionShape::new(2, 4, 13, 9).with_kv_heads(2), true),
        (AttentionShape::new(1, 4, 45, 16).with_dv(3).with_kv_heads(2), true),
        (AttentionShape::new(2, 3, 37, 9).with_dv(7).with_kv_heads(1), true),
        (AttentionShape::new(1, 6, 300, 9).with_kv_heads(2), true),
        (AttentionShape::new(1, 4, 70, 9).with_kv_heads(2).with_kv_len(290), false),
        (AttentionShape::new(1, 4, 2100, 9).with_kv_heads(1), true),
    ];
    for backend in backends() {
        for (i, &(shape, causal)) in shapes.iter().enumerate() {
            let maps = all_maps(shape.d, 17, 80 + i as u64);
            let picks: Vec<usize> = if i == 0 { (0..maps.len()).collect() } else { vec![0, 5, 7] };
            let dirs =
                if causal { &[Direction::Bidirectional, Direction::Causal][..] } else { &[Direction::Bidirectional] };
            for mi in picks {
                for &direction in dirs {
                    for (dtype, masked) in [(DType::F32, true), (DType::Bf16, true), (DType::F32, false)] {
                        if shape.len > 1000 && dtype != DType::F32 {
                            continue;
                        }
                        let e = check_against_reference(
                            &backend,
                            &maps[mi],
                            shape,
                            direction,
                            dtype,
                            masked,
                            90 + i as u64,
                            true,
                        );
                        assert!(e.worst().is_finite());
                    }
                }
            }
        }
    }
}

#[test]
fn grouped_layouts_match_the_contiguous_layout_and_decoding_continues_them() {
    let shapes = [
        AttentionShape::new(2, 4, 13, 9).with_kv_heads(2),
        AttentionShape::new(1, 6, 40, 8).with_kv_heads(1),
        AttentionShape::new(1, 3, 300, 9).with_dv(5).with_kv_heads(3),
    ];
    for backend in backends() {
        for (i, &shape) in shapes.iter().enumerate() {
            let maps = all_maps(shape.d, 17, 10 + i as u64);
            for mi in [0, 7] {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    let p = Problem::new(shape, &maps[mi])
                        .with_options(AttentionOptions { direction, ..Default::default() });
                    assert_layouts_agree(
                        &backend,
                        &p,
                        DType::F32,
                        direction == Direction::Bidirectional,
                        20 + i as u64,
                        1.0,
                    );
                }
            }
            // Decoding in uneven chunks continues the grouped causal state.
            let p = Problem::new(shape, &maps[0]).with_options(AttentionOptions::causal());
            let case = Case::new(shape, DType::F32, false, 30 + i as u64);
            let (q, k, v) = (case.q.to_f32_vec(), case.k.to_f32_vec(), case.v.to_f32_vec());
            let chunks = [shape.len / 3, 1, shape.len - shape.len / 3 - 1];
            let got = decode_in_chunks(&backend, &p, [&q, &k, &v], &chunks).unwrap();
            let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
            let what = format!("{} decode {shape:?}", backend.name());
            assert!(rel_error(&what, &got, &case.reference_forward(&p)) <= TOL_F32, "{what}");
        }
    }
}

#[test]
fn one_group_recomputed_in_f64_leaves_the_others_on_the_kernels() {
    // V of key/value head 1 beyond the kernels' f32 range: its two query heads are recomputed in
    // f64 (dk and dv summed over both), head group 0 stays on the kernels.
    let shape = AttentionShape::new(1, 4, 37, 6).with_kv_heads(2);
    for backend in backends() {
        for (mi, map) in all_maps(6, 11, 3).iter().enumerate().filter(|(i, _)| [0, 7].contains(i)) {
            for direction in [Direction::Bidirectional, Direction::Causal] {
                let mut case = Case::new(shape, DType::F32, true, 40 + mi as u64);
                let mut v = case.v.to_f32_vec();
                let n = shape.keys() * shape.dv;
                v[n..].iter_mut().for_each(|x| *x *= 1e10);
                case.v = HostTensor::from_f32(DType::F32, &v);
                let p = Problem::new(shape, map).with_options(AttentionOptions { direction, ..Default::default() });
                let what = format!("{} {} {direction:?} large V in group 1", backend.name(), map.name());
                let out = case.forward(&backend, &p);
                assert!(rel_error(&what, &out, &case.reference_forward(&p)) <= TOL_F32, "{what}: out");
                let (dq, dk, dv, _) = case.backward(&backend, &p);
                let (rq, rk, rv, _) = case.reference_backward(&p);
                for (name, got, want) in [("dq", &dq, &rq), ("dk", &dk, &rk), ("dv", &dv, &rv)] {
                    let e = rel_error(&format!("{what} {name}"), got, want);
                    assert!(e <= 1e-4, "{what}: {name} rel. error {e:.2e}");
                }
            }
        }
    }
}

#[test]
fn grouping_that_does_not_divide_is_a_typed_error() {
    let backend = favor_simd::SimdBackend::new();
    let map = all_maps(4, 8, 1).swap_remove(0);
    let shape = AttentionShape::new(1, 6, 3, 4).with_kv_heads(4);
    let t = HostTensor::zeros(DType::F32, 1000);
    let mut out = HostTensor::zeros(DType::F32, shape.out_len());
    let inputs = Inputs { q: t.view(), k: t.view(), v: t.view(), key_mask: None };
    let r = backend.forward(&Problem::new(shape, &map), inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_heads", .. })), "{r:?}");
    let r = backend.new_state(&Problem::new(shape, &map));
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_heads", .. })), "{r:?}");
    // The reference agrees on what is an error.
    let r = ReferenceBackend.forward(&Problem::new(shape, &map), inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_heads", .. })), "{r:?}");
}
