//! Grouped-query and multi-query attention on the reference backend: a grouped call equals the
//! ungrouped call on key/value heads repeated for each query head (dk and dv summed over the
//! group), its key gradient passes a finite-difference check in f64, every layout agrees bit
//! for bit, decoding continues it, and a kv_heads that does not divide heads is a typed error.

use favor_core::attention::{Head, bidirectional_forward, causal_forward};
use favor_core::testing::{self, TestRng};
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FavorError, FeatureMap, HostTensor, Inputs,
    Problem, Projection, ProjectionConfig, ReferenceBackend,
};

fn tensor(r: &mut TestRng, n: usize, std: f64) -> Vec<f32> {
    testing::gaussian(r, n, std).into_iter().map(|x| x as f32).collect()
}

/// Repeats each key/value head of `x` (`[B, H_kv, rows, width]`) for its query heads.
fn expand<T: Copy>(s: &AttentionShape, x: &[T], rows: usize, width: usize) -> Vec<T> {
    let n = rows * width;
    (0..s.problems()).flat_map(|bh| x[s.kv_head_of(bh) * n..(s.kv_head_of(bh) + 1) * n].iter().copied()).collect()
}

/// Sums `[B, H, rows, width]` over the query heads of each key/value head, in head order.
fn sum_groups(s: &AttentionShape, x: &[f64], rows: usize, width: usize) -> Vec<f64> {
    let n = rows * width;
    let mut out = vec![0.0; s.kv_problems() * n];
    for bh in 0..s.problems() {
        let kvh = s.kv_head_of(bh);
        out[kvh * n..(kvh + 1) * n].iter_mut().zip(&x[bh * n..(bh + 1) * n]).for_each(|(a, b)| *a += b);
    }
    out
}

fn map(d: usize, m: usize, seed: u64) -> FeatureMap {
    FeatureMap::positive(Projection::draw(ProjectionConfig::new(m, d, seed)).unwrap())
}

#[test]
fn grouped_heads_equal_repeated_key_value_heads() {
    let mut r = testing::rng(11);
    // (batch, heads, kv_heads, len, kv_len): groups of 2 and 3, multi-query, ungrouped, cross.
    let cases = [(2, 4, 2, 9, 9), (1, 6, 2, 17, 17), (2, 3, 1, 5, 5), (1, 2, 2, 4, 4), (2, 4, 1, 6, 11)];
    for (i, &(b, h, hk, l, lk)) in cases.iter().enumerate() {
        let (d, dv) = (5, 3);
        let shape = AttentionShape::new(b, h, l, d).with_dv(dv).with_kv_heads(hk).with_kv_len(lk);
        let flat = AttentionShape { kv_heads: None, ..shape };
        let fm = map(d, 8, i as u64);
        for direction in [Direction::Bidirectional, Direction::Causal] {
            if direction == Direction::Causal && lk != l {
                continue;
            }
            let opts = AttentionOptions { direction, ..Default::default() };
            let (q, k, v) = (
                tensor(&mut r, shape.qk_len(), 0.5),
                tensor(&mut r, shape.k_len(), 0.5),
                tensor(&mut r, shape.v_len(), 1.0),
            );
            let dout = tensor(&mut r, shape.out_len(), 1.0);
            let mask: Vec<bool> = (0..shape.mask_len()).map(|j| j % 4 != 1).collect();
            let (ke, ve) = (expand(&shape, &k, lk, d), expand(&shape, &v, lk, dv));
            let grouped = Inputs { q: q[..].into(), k: k[..].into(), v: v[..].into(), key_mask: Some(&mask) };
            let repeated = Inputs { q: q[..].into(), k: ke[..].into(), v: ve[..].into(), key_mask: Some(&mask) };
            let (pg, pf) = (Problem::new(shape, &fm).with_options(opts), Problem::new(flat, &fm).with_options(opts));
            let what = format!("{shape:?} {direction:?}");
            let out = ReferenceBackend.forward_f64(&pg, grouped).unwrap();
            assert!(out == ReferenceBackend.forward_f64(&pf, repeated).unwrap(), "{what}: forward");
            let g = ReferenceBackend.backward_f64(&pg, grouped, dout[..].into()).unwrap();
            let e = ReferenceBackend.backward_f64(&pf, repeated, dout[..].into()).unwrap();
            assert!(g.dq == e.dq, "{what}: dq");
            assert!(g.dk == sum_groups(&shape, &e.dk, lk, d), "{what}: dk is the group's sum");
            assert!(g.dv == sum_groups(&shape, &e.dv, lk, dv), "{what}: dv is the group's sum");
            // The host API stores the same values.
            let mut o = vec![0f32; shape.out_len()];
            ReferenceBackend.forward(&pg, grouped, (&mut o[..]).into()).unwrap();
            assert!(o.iter().zip(&out).all(|(&a, &b)| a == b as f32), "{what}: stored forward");
        }
    }
}

#[test]
fn grouped_key_gradient_matches_finite_differences() {
    let mut r = testing::rng(5);
    let shape = AttentionShape::new(1, 3, 6, 4).with_dv(2).with_kv_heads(1);
    let fm = map(4, 16, 3);
    for direction in [Direction::Bidirectional, Direction::Causal] {
        let p = Problem::new(shape, &fm).with_options(AttentionOptions { direction, ..Default::default() });
        let (q, k, v) = (
            tensor(&mut r, shape.qk_len(), 0.5),
            tensor(&mut r, shape.k_len(), 0.5),
            tensor(&mut r, shape.v_len(), 1.0),
        );
        let dout = tensor(&mut r, shape.out_len(), 1.0);
        let inputs = Inputs { q: q[..].into(), k: k[..].into(), v: v[..].into(), key_mask: None };
        let g = ReferenceBackend.backward_f64(&p, inputs, dout[..].into()).unwrap();
        let wide = |x: &[f32]| x.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let (qf, kf, vf, gf) = (wide(&q), wide(&k), wide(&v), wide(&dout));
        // ℒ(K, V) = Σ over the three query heads of ⟨dout_h, attention(q_h, K, V)⟩, in f64.
        let loss = |k: &[f64], v: &[f64]| -> f64 {
            (0..shape.heads)
                .map(|h| {
                    let (l, d, dv) = (shape.len, shape.d, shape.dv);
                    let head = Head { len: l, kv_len: l, d, dv, q: &qf[h * l * d..(h + 1) * l * d], k, v, mask: None };
                    let o = match direction {
                        Direction::Bidirectional => bidirectional_forward(&fm, 0.0, &head),
                        Direction::Causal => causal_forward(&fm, 0.0, &head),
                    };
                    testing::dot(&o, &gf[h * l * dv..(h + 1) * l * dv])
                })
                .sum()
        };
        let nk = testing::central_difference_richardson(&kf, 1e-3, |k| loss(k, &vf));
        testing::assert_gradient(&format!("{direction:?} dk"), &g.dk, &nk, 1e-7);
        let nv = testing::central_difference_richardson(&vf, 1e-3, |v| loss(&kf, v));
        testing::assert_gradient(&format!("{direction:?} dv"), &g.dv, &nv, 1e-7);
    }
}

#[test]
fn grouped_layouts_and_decoding_agree() {
    for (direction, seed) in [(Direction::Bidirectional, 1), (Direction::Causal, 2)] {
        let shape = AttentionShape::new(2, 4, 7, 4).with_kv_heads(2);
        let fm = map(4, 8, seed);
        let p = Problem::new(shape, &fm).with_options(AttentionOptions { direction, ..Default::default() });
        testing::assert_layouts_agree(
            &ReferenceBackend,
            &p,
            DType::F32,
            direction == Direction::Bidirectional,
            seed,
            1.0,
        );
    }
    // Decoding a grouped causal problem in chunks equals the full causal forward.
    let shape = AttentionShape::new(1, 6, 13, 4).with_dv(3).with_kv_heads(3);
    let fm = map(4, 8, 9);
    let p = Problem::new(shape, &fm).with_options(AttentionOptions::causal());
    let mut r = testing::rng(3);
    let (q, k, v) =
        (tensor(&mut r, shape.qk_len(), 0.5), tensor(&mut r, shape.k_len(), 0.5), tensor(&mut r, shape.v_len(), 1.0));
    let mut full = vec![0f32; shape.out_len()];
    let inputs = Inputs { q: q[..].into(), k: k[..].into(), v: v[..].into(), key_mask: None };
    ReferenceBackend.forward(&p, inputs, (&mut full[..]).into()).unwrap();
    let decoded = testing::decode_in_chunks(&ReferenceBackend, &p, [&q, &k, &v], &[5, 1, 7]).unwrap();
    assert_eq!(decoded, full);
}

#[test]
fn grouping_errors_are_typed() {
    let fm = map(4, 8, 1);
    let shape = AttentionShape::new(1, 6, 3, 4).with_kv_heads(4);
    let t = HostTensor::zeros(DType::F32, 1000);
    let mut out = HostTensor::zeros(DType::F32, shape.out_len());
    let inputs = Inputs { q: t.view(), k: t.view(), v: t.view(), key_mask: None };
    let r = ReferenceBackend.forward(&Problem::new(shape, &fm), inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_heads", .. })), "{r:?}");
    let r = ReferenceBackend.forward(&Problem::new(shape.with_kv_heads(0), &fm), inputs, out.view_mut());
    assert!(matches!(r, Err(FavorError::ZeroSize { arg: "kv_heads" })), "{r:?}");
    // K sized for the query heads is the wrong size for two key/value heads.
    let g = AttentionShape::new(1, 4, 3, 4).with_kv_heads(2);
    let (q, k) = (HostTensor::zeros(DType::F32, g.qk_len()), HostTensor::zeros(DType::F32, g.qk_len()));
    let v = HostTensor::zeros(DType::F32, g.v_len());
    let mut out = HostTensor::zeros(DType::F32, g.out_len());
    let r = ReferenceBackend.forward(
        &Problem::new(g, &fm),
        Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: None },
        out.view_mut(),
    );
    assert!(matches!(r, Err(FavorError::Shape { arg: "k", .. })), "{r:?}");
    // A state remembers its grouping.
    let state = ReferenceBackend.new_state(&Problem::new(g, &fm)).unwrap();
    let mut state = state;
    let ungrouped = AttentionShape { kv_heads: None, ..g };
    let (k4, v4) = (HostTensor::zeros(DType::F32, ungrouped.k_len()), HostTensor::zeros(DType::F32, ungrouped.v_len()));
    let r = ReferenceBackend.decode(
        &Problem::new(ungrouped, &fm).with_options(AttentionOptions::causal()),
        &mut state,
        Inputs { q: q.view(), k: k4.view(), v: v4.view(), key_mask: None },
        out.view_mut(),
    );
    assert!(matches!(r, Err(FavorError::StateMismatch { field: "kv_heads", .. })), "{r:?}");
}
