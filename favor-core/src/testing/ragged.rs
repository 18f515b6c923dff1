//! Ragged batches checked the same way on every backend: the packed call must give, for every
//! sequence, the reference's attention and gradients over that sequence alone.

use super::slots::{heads_major, token_major};
use super::{flat_param_grads, flat_param_grads_f32, gaussian, index, learned_softplus, max_abs, max_abs_diff, rng};
use crate::ragged::Ragged;
use crate::{
    AttentionOptions, AttentionShape, Direction, FavorBackend, FavorError, FeatureMap, Grads, Host, Inputs, Layout,
    Problem, Projection, ProjectionConfig, ReferenceBackend,
};

/// One ragged scenario.
#[derive(Debug, Clone)]
pub struct RaggedCase {
    /// Name in messages.
    pub name: &'static str,
    /// Heads, kv_heads, d and d_v (batch and lengths are the sequences').
    pub shape: AttentionShape,
    /// Feature map.
    pub map: FeatureMap,
    /// Direction.
    pub direction: Direction,
    /// Query tokens of each sequence.
    pub lens: Vec<usize>,
    /// Key tokens of each sequence (cross-attention).
    pub kv_lens: Option<Vec<usize>>,
    /// Tensors `[1, L, H, ·]` instead of `[1, H, L, ·]`.
    pub blhd: bool,
    /// Random key padding.
    pub masked: bool,
}

/// Scenarios: both directions, grouped heads, cross-attention with its own key lengths, empty
/// and one-token sequences, lengths past the kernels' tiles and chunks, a learned map (its
/// parameter gradients sum over the sequences).
pub fn ragged_cases() -> Vec<RaggedCase> {
    let draw = |m: usize, d: usize, seed: u64| Projection::draw(ProjectionConfig::new(m, d, seed)).expect("valid");
    vec![
        RaggedCase {
            name: "bidirectional gqa [1, L, H, d] masked",
            shape: AttentionShape::new(1, 4, 1, 9).with_dv(7).with_kv_heads(2),
            map: FeatureMap::positive(draw(13, 9, 3)),
            direction: Direction::Bidirectional,
            lens: vec![5, 0, 130, 1, 67],
            kv_lens: None,
            blhd: true,
            masked: true,
        },
        RaggedCase {
            name: "causal [1, H, L, d]",
            shape: AttentionShape::new(1, 2, 1, 8),
            map: FeatureMap::positive(draw(16, 8, 5)),
            direction: Direction::Causal,
            lens: vec![70, 1, 0, 200, 9],
            kv_lens: None,
            blhd: false,
            masked: false,
        },
        RaggedCase {
            name: "cross-attention, own key lengths",
            shape: AttentionShape::new(1, 3, 1, 6).with_dv(5).with_kv_len(1),
            map: FeatureMap::positive(draw(10, 6, 7)),
            direction: Direction::Bidirectional,
            lens: vec![3, 0, 40, 1],
            kv_lens: Some(vec![90, 0, 7, 33]),
            blhd: true,
            masked: true,
        },
        RaggedCase {
            // The totals agree (no kv_len in the shape), the sequences' key counts do not.
            name: "cross-attention, as many keys as queries in all",
            shape: AttentionShape::new(1, 2, 1, 6).with_dv(5),
            map: FeatureMap::positive(draw(12, 6, 8)),
            direction: Direction::Bidirectional,
            lens: vec![3, 6, 1],
            kv_lens: Some(vec![5, 2, 3]),
            blhd: false,
            masked: false,
        },
        RaggedCase {
            name: "causal mqa, learned map",
            shape: AttentionShape::new(1, 3, 1, 5).with_dv(4).with_kv_heads(1),
            map: learned_softplus(11, 5, 9, true),
            direction: Direction::Causal,
            lens: vec![33, 2, 80],
            kv_lens: None,
            blhd: true,
            masked: false,
        },
    ]
}

fn offsets(lens: &[usize]) -> Vec<usize> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &n| {
            *acc += n;
            Some(*acc)
        }))
        .collect()
}

fn random(seed: u64, n: usize, std: f64) -> Vec<f32> {
    gaussian(&mut rng(seed), n, std).into_iter().map(|x| x as f32).collect()
}

/// Runs `case` on `backend`, forward and backward, and compares every sequence with the
/// reference over that sequence alone: errors relative to each tensor's largest element
/// ≤ `tol` (forward) and ≤ `grad_tol` (gradients, parameter gradients summed over sequences).
/// A case the backend does not support (a map without a kernel) is skipped with a message.
pub fn assert_ragged_matches<B: FavorBackend<Mem = Host>>(backend: &B, case: &RaggedCase, tol: f64, grad_tol: f64) {
    let what = format!("{}: {}", backend.name(), case.name);
    let s0 = case.shape;
    let (h, hk, d, dv) = (s0.heads, s0.key_heads(), s0.d, s0.dv);
    let kv_lens = case.kv_lens.clone().unwrap_or_else(|| case.lens.clone());
    let (qo, ko) = (offsets(&case.lens), offsets(&kv_lens));
    let (tq, tk) = (*qo.last().unwrap(), *ko.last().unwrap());
    let shape = AttentionShape { batch: 1, len: tq, kv_len: (tk != tq).then_some(tk), ..s0 };
    // Token-major tensors; rearranged for the [1, H, L, ·] layout.
    let q = random(1, tq * h * d, 0.5);
    let k = random(2, tk * hk * d, 0.5);
    let v = random(3, tk * hk * dv, 1.0);
    let dout = random(4, tq * h * dv, 1.0);
    let mut r = rng(5);
    let mask: Vec<bool> = (0..tk).map(|_| !case.masked || index(&mut r, 4) != 0).collect();
    let arrange = |x: &[f32], heads, width| if case.blhd { x.to_vec() } else { heads_major(x, heads, width) };
    let back = |x: &[f32], heads, width| if case.blhd { x.to_vec() } else { token_major(x, heads, width) };
    let (qa, ka, va, da) = (arrange(&q, h, d), arrange(&k, hk, d), arrange(&v, hk, dv), arrange(&dout, h, dv));
    let layout = if case.blhd { Layout::blhd(&shape) } else { Layout::default() };
    let p = Problem {
        shape,
        map: &case.map,
        options: AttentionOptions { direction: case.direction, ..Default::default() },
        layout,
    };
    let ragged = Ragged { offsets: &qo, kv_offsets: case.kv_lens.as_ref().map(|_| &ko[..]) };
    let inputs =
        Inputs { q: (&qa).into(), k: (&ka).into(), v: (&va).into(), key_mask: case.masked.then_some(&mask[..]) };
    let mut out = vec![0.0f32; tq * h * dv];
    match backend.forward_ragged(&p, ragged, inputs, (&mut out).into()) {
        Ok(()) => {}
        Err(FavorError::Unsupported(why)) => return eprintln!("{what}: skipped, unsupported: {why}"),
        Err(e) => panic!("{what}: forward: {e}"),
    }
    let (mut dq, mut dk, mut dvv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    let grads = Grads { dq: (&mut dq).into(), dk: (&mut dk).into(), dv: (&mut dvv).into() };
    let params = backend
        .backward_ragged(&p, ragged, inputs, (&da).into(), grads)
        .unwrap_or_else(|e| panic!("{what}: backward: {e}"));
    let (out, dq, dk, dvv) = (back(&out, h, dv), back(&dq, h, d), back(&dk, hk, d), back(&dvv, hk, dv));

    // Errors are relative to each tensor's largest element over every sequence: a one-token
    // causal sequence has dq = 0 exactly, and f32 roundoff is not relative to that.
    let mut diffs: Vec<(String, &str, f64, usize)> = Vec::new();
    let mut peak = [0.0f64; 4];
    let mut want_params: Option<Vec<f64>> = None;
    for (i, (w_q, w_k)) in qo.windows(2).zip(ko.windows(2)).enumerate() {
        let (nq, nk) = (w_q[1] - w_q[0], w_k[1] - w_k[0]);
        if nq == 0 {
            continue;
        }
        let sub_shape = AttentionShape { len: nq, kv_len: case.kv_lens.as_ref().map(|_| nk), ..shape };
        let sub = Problem { shape: sub_shape, layout: Layout::blhd(&sub_shape), ..p };
        let rows = |x: &[f32], w: &[usize], width: usize| x[w[0] * width..w[1] * width].to_vec();
        let (sq, sk, sv, sd) =
            (rows(&q, w_q, h * d), rows(&k, w_k, hk * d), rows(&v, w_k, hk * dv), rows(&dout, w_q, h * dv));
        let x = Inputs {
            q: (&sq).into(),
            k: (&sk).into(),
            v: (&sv).into(),
            key_mask: case.masked.then_some(&mask[w_k[0]..w_k[1]]),
        };
        let f = |y: Vec<f64>, heads, width| -> Vec<f64> {
            token_major(&y.iter().map(|&a| a as f32).collect::<Vec<_>>(), heads, width)
                .iter()
                .map(|&a| a as f64)
                .collect()
        };
        let want = f(ReferenceBackend.forward_f64(&sub, x).expect("reference"), h, dv);
        let g = ReferenceBackend.backward_f64(&sub, x, (&sd).into()).expect("reference");
        let widen = |x: Vec<f32>| x.into_iter().map(|a| a as f64).collect::<Vec<f64>>();
        for (j, (name, got, want)) in [
            ("out", widen(rows(&out, w_q, h * dv)), want),
            ("dq", widen(rows(&dq, w_q, h * d)), f(g.dq, h, d)),
            ("dk", widen(rows(&dk, w_k, hk * d)), f(g.dk, hk, d)),
            ("dv", widen(rows(&dvv, w_k, hk * dv)), f(g.dv, hk, dv)),
        ]
        .into_iter()
        .enumerate()
        {
            peak[j] = peak[j].max(max_abs(&want));
            diffs.push((format!("sequence {i} ({nq} queries, {nk} keys)"), name, max_abs_diff(&got, &want), j));
        }
        if let Some(pg) = g.params {
            let flat = flat_param_grads(&pg);
            match want_params.as_mut() {
                Some(acc) => acc.iter_mut().zip(&flat).for_each(|(a, b)| *a += b),
                None => want_params = Some(flat),
            }
        }
    }
    for (seq, name, diff, j) in diffs {
        let (err, t) = (diff / peak[j].max(1e-30), if j == 0 { tol } else { grad_tol });
        assert!(err <= t, "{what}: {seq}: {name} error {err:.2e} > {t:.0e} (relative to the largest {name})");
    }
    match (params, want_params) {
        (Some(got), Some(want)) => {
            let got = flat_param_grads_f32(&got);
            let err = max_abs_diff(&got, &want) / max_abs(&want).max(1e-30);
            assert!(err <= grad_tol, "{what}: parameter gradients error {err:.2e} > {grad_tol:.0e}");
        }
        (None, None) => {}
        (got, want) => panic!("{what}: parameter gradients {got:?} vs the reference's {want:?}"),
    }
}

/// Every way to misuse ragged offsets, on `backend`: each must be the typed error that names
/// the argument. Returns the errors, in order, so that backends can be compared.
pub fn assert_ragged_errors<B: FavorBackend<Mem = Host>>(backend: &B) -> Vec<FavorError> {
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(6, 4, 1)).expect("valid"));
    let what = backend.name();
    let run = |shape: AttentionShape, causal: bool, ragged: Ragged<'_>| {
        let options = if causal { AttentionOptions::causal() } else { AttentionOptions::bidirectional() };
        let p = Problem::new(shape, &map).with_options(options);
        let q = vec![0.25f32; shape.qk_len()];
        let k = vec![0.25f32; shape.k_len()];
        let v = vec![0.5f32; shape.v_len()];
        let mut out = vec![0.0f32; shape.out_len()];
        let inputs = Inputs { q: (&q).into(), k: (&k).into(), v: (&v).into(), key_mask: None };
        backend.forward_ragged(&p, ragged, inputs, (&mut out).into())
    };
    let s = AttentionShape::new(1, 2, 4, 4);
    let cross = s.with_kv_len(5);
    let cases: Vec<(&str, crate::Result<()>)> = vec![
        ("batch", run(AttentionShape { batch: 2, ..s }, false, Ragged::new(&[0, 4]))),
        ("offsets", run(s, false, Ragged::new(&[0]))),
        ("offsets", run(s, false, Ragged::new(&[1, 4]))),
        ("offsets", run(s, false, Ragged::new(&[0, 3, 2, 4]))),
        ("offsets", run(s, false, Ragged::new(&[0, 3]))),
        ("kv_offsets", run(cross, false, Ragged::new(&[0, 4]))),
        ("kv_offsets", run(cross, false, Ragged::new(&[0, 4]).with_kv_offsets(&[0, 2, 5]))),
        ("kv_offsets", run(cross, false, Ragged::new(&[0, 4]).with_kv_offsets(&[0, 4]))),
        ("kv_offsets", run(cross, false, Ragged::new(&[0, 0, 4]).with_kv_offsets(&[0, 1, 5]))),
        ("kv_offsets", run(s, true, Ragged::new(&[0, 1, 4]).with_kv_offsets(&[0, 2, 4]))),
    ];
    let mut errors = Vec::new();
    for (i, (name, r)) in cases.into_iter().enumerate() {
        let e = r.expect_err(&format!("{what}: case {i}: `{name}` misuse accepted"));
        let named = match &e {
            FavorError::InvalidParameter { name: n, .. } => *n,
            FavorError::Shape { arg, .. } => *arg,
            other => panic!("{what}: case {i}: unexpected error kind {other:?}"),
        };
        assert_eq!(named, name, "{what}: case {i}: {e}");
        errors.push(e);
    }
    assert_eq!(run(s, true, Ragged::new(&[0, 1, 1, 4])), Ok(()), "{what}: a valid call");
    errors
}
