//! Cross-attention (queries and keys of different lengths, bidirectional) on every ISA and
//! feature map, forward and backward, against the f64 reference: lengths on both sides that
//! cross the tile and segment boundaries, masks over the keys, f32 and bf16 storage; and the
//! typed errors of shapes that do not fit.

mod common;
use common::*;
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FavorError, HostTensor, Inputs, Problem,
};

/// (queries, keys) per sequence: fewer keys than queries and more, one of either, and lengths
/// spanning several segments on each side.
const LENGTHS: [(usize, usize); 7] = [(1, 5), (9, 1), (17, 130), (130, 17), (70, 700), (600, 23), (33, 33)];

#[test]
fn cross_attention_matches_the_reference_on_every_isa_and_map() {
    for backend in backends() {
        for (i, &(len, kv_len)) in LENGTHS.iter().enumerate() {
            let (d, dv, m) = (9, 7, 17);
            let shape = AttentionShape::new(2, 1 + i % 2, len, d).with_dv(dv).with_kv_len(kv_len);
            let maps = all_maps(d, m, 40 + i as u64);
            // Long shapes: a positive, an ELU+1 and a learned map; short ones: every map.
            let picks: Vec<usize> = if len + kv_len > 300 { vec![0, 5, 7] } else { (0..maps.len()).collect() };
            for mi in picks {
                for (masked, dtype) in [(false, DType::F32), (true, DType::F32), (true, DType::Bf16)] {
                    let e = check_against_reference(
                        &backend,
                        &maps[mi],
                        shape,
                        Direction::Bidirectional,
                        dtype,
                        masked,
                        100 + i as u64,
                        true,
                    );
                    assert!(e.worst().is_finite());
                }
            }
        }
    }
}

#[test]
fn cross_attention_shapes_that_do_not_fit_are_typed_errors() {
    let backend = favor_simd::SimdBackend::new();
    let map = all_maps(4, 8, 1).swap_remove(0);
    let shape = AttentionShape::new(1, 2, 3, 4).with_kv_len(5);
    let t = |n: usize| HostTensor::from_f32(DType::F32, &normal(n, 0.5, n as u64));
    let (q, k, v) = (t(shape.qk_len()), t(shape.k_len()), t(shape.v_len()));
    let mut out = HostTensor::zeros(DType::F32, shape.out_len());
    let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: None };
    let p = Problem::new(shape, &map);
    backend.forward(&p, inputs, out.view_mut()).expect("a fitting cross-attention call");

    // Causal attention needs a key per query.
    let causal = p.with_options(AttentionOptions::causal());
    let r = backend.forward(&causal, inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_len", .. })), "{r:?}");
    // K sized for the queries, a mask over the queries, an output over the keys.
    let short_k = t(shape.qk_len());
    let r = backend.forward(&p, Inputs { k: short_k.view(), ..inputs }, out.view_mut());
    assert!(matches!(r, Err(FavorError::Shape { arg: "k", .. })), "{r:?}");
    let query_mask = vec![true; shape.batch * shape.len];
    let r = backend.forward(&p, Inputs { key_mask: Some(&query_mask), ..inputs }, out.view_mut());
    assert!(matches!(r, Err(FavorError::Shape { arg: "key_mask", .. })), "{r:?}");
    let mut wrong_out = HostTensor::zeros(DType::F32, shape.v_len());
    let r = backend.forward(&p, inputs, wrong_out.view_mut());
    assert!(matches!(r, Err(FavorError::Shape { arg: "out", .. })), "{r:?}");
    // No keys at all.
    let none = Problem::new(shape.with_kv_len(0), &map);
    let r = backend.forward(&none, inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::ZeroSize { arg: "kv_len" })), "{r:?}");
    // Decoding continues causal attention: a cross shape is refused there too.
    let mut state = backend.new_state(&p).expect("a state ignores kv_len");
    let r = backend.decode(&p, &mut state, inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_len", .. })), "{r:?}");
}
