//! The reference backend through its public host API: causal full == chunked prefill ==
//! step-by-step decoding, agreement with the f64 per-head functions on every dtype and on sizes
//! that straddle vector and tile widths, finite results at extreme magnitudes, and typed errors
//! for bad input.

use favor_core::attention::{self, Head};
use favor_core::testing::{self, TestRng};
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FavorBackend, FavorError, FeatureMap, FeatureRole, Grads, Host,
    HostTensor, Inputs, Linear, Problem, Projection, ProjectionConfig, ReferenceBackend, reference,
};

/// Host tensors of one call, stored in `dtype`.
struct Tensors {
    shape: AttentionShape,
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    mask: Option<Vec<bool>>,
}

impl Tensors {
    fn random(r: &mut TestRng, shape: AttentionShape, dtype: DType, std: f64) -> Self {
        let t = |r: &mut TestRng, n: usize, s: f64| {
            let v: Vec<f32> = testing::gaussian(r, n, s).into_iter().map(|x| x as f32).collect();
            HostTensor::from_f32(dtype, &v)
        };
        Self {
            shape,
            q: t(r, shape.qk_len(), std),
            k: t(r, shape.k_len(), std),
            v: t(r, shape.v_len(), 1.0),
            mask: None,
        }
    }

    fn inputs(&self) -> Inputs<'_, Host> {
        Inputs { q: self.q.view(), k: self.k.view(), v: self.v.view(), key_mask: self.mask.as_deref() }
    }

    fn dtype(&self) -> DType {
        self.q.dtype()
    }
}

/// The (dtype-rounded) inputs widened to f64, split per (batch, head).
struct Wide {
    shape: AttentionShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Option<Vec<bool>>,
}

impl Wide {
    fn new(t: &Tensors) -> Self {
        Self { shape: t.shape, q: t.q.to_f64_vec(), k: t.k.to_f64_vec(), v: t.v.to_f64_vec(), mask: t.mask.clone() }
    }

    fn head(&self, bh: usize) -> Head<'_> {
        let s = self.shape;
        let (l, d, dv) = (s.len, s.d, s.dv);
        let b = bh / s.heads;
        Head {
            len: l,
            kv_len: l,
            d,
            dv,
            q: &self.q[bh * l * d..(bh + 1) * l * d],
            k: &self.k[bh * l * d..(bh + 1) * l * d],
            v: &self.v[bh * l * dv..(bh + 1) * l * dv],
            mask: self.mask.as_ref().map(|m| &m[b * l..(b + 1) * l]),
        }
    }
}

/// Rounding `want` (f64) into `dtype` through f32 costs at most u_dtype + u_f32 relative, plus
/// half the dtype's smallest subnormal in absolute terms (f16 underflows early).
#[track_caller]
fn assert_rounded(what: &str, dtype: DType, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let u = dtype.unit_roundoff() + DType::F32.unit_roundoff();
    let floor = match dtype {
        DType::F16 => 3.0e-8,
        DType::Bf16 | DType::F32 => 1e-40,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= u * w.abs() + floor, "{what} ({dtype}): element {i}: got {g}, want {w}");
    }
}

fn problem(shape: AttentionShape, map: &FeatureMap, causal: bool) -> Problem<'_> {
    let options = if causal { AttentionOptions::causal() } else { AttentionOptions::bidirectional() };
    Problem::new(shape, map).with_options(options)
}

fn forward_host(p: &Problem<'_>, t: &Tensors) -> Vec<f64> {
    let mut out = HostTensor::zeros(t.dtype(), p.shape.v_len());
    ReferenceBackend.forward(p, t.inputs(), out.view_mut()).expect("forward");
    out.to_f64_vec()
}

/// Causal decoding over `chunks` (lengths summing to L) with one state, outputs concatenated in
/// [B, H, L, d_v] order.
fn decode_chunks(p: &Problem<'_>, t: &Tensors, chunks: &[usize]) -> Vec<f64> {
    let s = t.shape;
    let backend = ReferenceBackend;
    let mut state = backend.new_state(p).expect("new_state");
    let (q, k, v) = (t.q.to_f32_vec(), t.k.to_f32_vec(), t.v.to_f32_vec());
    let mut out = vec![0.0; s.v_len()];
    let mut start = 0;
    for &n in chunks {
        let cs = AttentionShape { len: n, ..s };
        // Slice the chunk out of every (batch, head) and the mask out of every batch element.
        let cut = |x: &[f32], w: usize| -> HostTensor {
            let rows: Vec<f32> = (0..s.problems())
                .flat_map(|bh| x[(bh * s.len + start) * w..(bh * s.len + start + n) * w].to_vec())
                .collect();
            HostTensor::from_f32(t.dtype(), &rows)
        };
        let (cq, ck, cv) = (cut(&q, s.d), cut(&k, s.d), cut(&v, s.dv));
        let cmask: Option<Vec<bool>> = t
            .mask
            .as_ref()
            .map(|m| (0..s.batch).flat_map(|b| m[b * s.len + start..b * s.len + start + n].to_vec()).collect());
        let mut co = HostTensor::zeros(t.dtype(), cs.v_len());
        let inputs = Inputs { q: cq.view(), k: ck.view(), v: cv.view(), key_mask: cmask.as_deref() };
        backend.decode(&Problem { shape: cs, ..*p }, &mut state, inputs, co.view_mut()).expect("decode");
        let co = co.to_f64_vec();
        for bh in 0..s.problems() {
            out[(bh * s.len + start) * s.dv..(bh * s.len + start + n) * s.dv]
                .copy_from_slice(&co[bh * n * s.dv..(bh + 1) * n * s.dv]);
        }
        start += n;
    }
    assert_eq!(start, s.len);
    out
}

/// Random split of `len` into chunks of 1..=5 tokens.
fn random_chunks(r: &mut TestRng, len: usize) -> Vec<usize> {
    let mut chunks = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = (1 + testing::index(r, 5)).min(left);
        chunks.push(n);
        left -= n;
    }
    chunks
}

#[test]
fn causal_full_chunked_prefill_and_step_decoding_agree() {
    let shape = AttentionShape::new(2, 2, 13, 4).with_dv(3);
    for (name, map) in testing::feature_map_catalog(4, 6, 3) {
        for masked in [false, true] {
            let mut r = testing::rng(17);
            let mut t = Tensors::random(&mut r, shape, DType::F32, 0.6);
            if masked {
                // Batch 0 starts with padded keys (queries that see nothing), batch 1 is random.
                let mut m = testing::random_mask(&mut r, 2 * 13, 0.7);
                m[0] = false;
                m[1] = false;
                t.mask = Some(m);
            }
            let p = problem(shape, &map, true);
            let full = forward_host(&p, &t);
            let chunks = random_chunks(&mut r, shape.len);
            let chunked = decode_chunks(&p, &t, &chunks);
            let steps = decode_chunks(&p, &t, &[1; 13]);
            let prefill_then_steps = decode_chunks(&p, &t, &[8, 1, 1, 1, 1, 1]);
            let what = format!("{name} mask={masked}");
            assert_rounded(&format!("{what} chunked {chunks:?}"), DType::F32, &chunked, &full);
            assert_rounded(&format!("{what} step-by-step"), DType::F32, &steps, &full);
            assert_rounded(&format!("{what} prefill+steps"), DType::F32, &prefill_then_steps, &full);
            // And all of them equal the f64 causal function per head.
            let w = Wide::new(&t);
            let delta = p.denominator_guard() as f64;
            let want: Vec<f64> =
                (0..shape.problems()).flat_map(|bh| attention::causal_forward(&map, delta, &w.head(bh))).collect();
            assert_rounded(&what, DType::F32, &full, &want);
            assert!(testing::max_abs(&full) > 0.0);
        }
    }
}

/// The state after a prefill equals the state after step-by-step decoding (S, z, c, tokens).
#[test]
fn prefill_and_step_states_agree() {
    let shape = AttentionShape::new(1, 2, 9, 5).with_dv(2);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(7, 5, 4)).unwrap());
    let t = Tensors::random(&mut testing::rng(4), shape, DType::F32, 0.8);
    let p = problem(shape, &map, true);
    let backend = ReferenceBackend;
    let mut prefill = backend.new_state(&p).unwrap();
    let mut out = HostTensor::zeros(DType::F32, shape.v_len());
    backend.decode(&p, &mut prefill, t.inputs(), out.view_mut()).unwrap();
    let mut stepped = backend.new_state(&p).unwrap();
    // Step by step on `stepped`, to inspect its state.
    let (q, k, v) = (t.q.to_f32_vec(), t.k.to_f32_vec(), t.v.to_f32_vec());
    for i in 0..shape.len {
        let cs = AttentionShape { len: 1, ..shape };
        let cut = |x: &[f32], w: usize| {
            (0..2).flat_map(|bh| x[(bh * 9 + i) * w..(bh * 9 + i + 1) * w].to_vec()).collect::<Vec<f32>>()
        };
        let (cq, ck, cv) = (cut(&q, 5), cut(&k, 5), cut(&v, 2));
        let mut co = vec![0f32; cs.v_len()];
        let inputs = Inputs { q: (&cq).into(), k: (&ck).into(), v: (&cv).into(), key_mask: None };
        backend.decode(&Problem { shape: cs, ..p }, &mut stepped, inputs, (&mut co).into()).unwrap();
    }
    for (a, b) in prefill.heads().iter().zip(stepped.heads()) {
        assert_eq!(a.tokens, 9);
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.c, b.c);
        assert!(testing::rel_frobenius(&a.s, &b.s) < 1e-14 && testing::rel_frobenius(&a.z, &b.z) < 1e-14);
    }
}

const TAIL_SIZES: [usize; 12] = [1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127];

/// Every host method on every dtype against the f64 per-head functions on the dtype-rounded
/// inputs, over sizes sampled from the tail set (L, d, d_v, m) and every feature map.
#[test]
fn host_api_matches_the_f64_functions_across_tail_sizes_and_dtypes() {
    let mut r = testing::rng(2025);
    let backend = ReferenceBackend;
    let mut covered = std::collections::BTreeSet::new();
    for case in 0..18 {
        let pick = |r: &mut TestRng| TAIL_SIZES[testing::index(r, TAIL_SIZES.len())];
        let (mut len, d, dv, mut m) = (pick(&mut r), pick(&mut r), pick(&mut r), pick(&mut r));
        // Keep the O(L·M·(d + d_v)) reference affordable: shrink the largest of L and m when both are big.
        if len * m * (d + dv) > 400_000 {
            if len > m {
                len = TAIL_SIZES[testing::index(&mut r, 8)]
            } else {
                m = TAIL_SIZES[testing::index(&mut r, 8)]
            }
        }
        let (batch, heads) = (1 + testing::index(&mut r, 2), 1 + testing::index(&mut r, 2));
        let shape = AttentionShape::new(batch, heads, len, d).with_dv(dv);
        let catalog = testing::feature_map_catalog(d, m, case);
        let (name, map) = &catalog[case as usize % catalog.len()];
        covered.extend([len, d, dv, m]);
        let dtype = DType::ALL[case as usize % 3];
        let mut t = Tensors::random(&mut r, shape, dtype, 0.5);
        if case % 2 == 1 {
            let mut mask = testing::random_mask(&mut r, shape.mask_len(), 0.8);
            mask[0] = true;
            t.mask = Some(mask);
        }
        let w = Wide::new(&t);
        let what =
            format!("case {case}: {name} B={batch} H={heads} L={len} d={d} dv={dv} m={m} mask={}", t.mask.is_some());
        let gout = HostTensor::from_f32(dtype, &testing::random_tensor(case + 500, shape.v_len(), 1.0));
        let gw = gout.to_f64_vec();
        for causal in [false, true] {
            let p = problem(shape, map, causal);
            let delta = p.denominator_guard() as f64;
            // Forward.
            let want: Vec<f64> = (0..shape.problems())
                .flat_map(|bh| {
                    if causal {
                        attention::causal_forward(map, delta, &w.head(bh))
                    } else {
                        attention::bidirectional_forward(map, delta, &w.head(bh))
                    }
                })
                .collect();
            assert_rounded(&format!("{what} causal={causal} forward"), dtype, &forward_host(&p, &t), &want);
            // Backward.
            let mut dq = HostTensor::zeros(dtype, shape.qk_len());
            let mut dk = HostTensor::zeros(dtype, shape.qk_len());
            let mut dvt = HostTensor::zeros(dtype, shape.v_len());
            let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dvt.view_mut() };
            let pg = backend.backward(&p, t.inputs(), gout.view(), grads).expect("backward");
            let (mut wq, mut wk, mut wv, mut wp) = (Vec::new(), Vec::new(), Vec::new(), None::<Vec<f64>>);
            for bh in 0..shape.problems() {
                let gh = &gw[bh * len * dv..(bh + 1) * len * dv];
                let hg = if causal {
                    attention::causal_backward(map, delta, &w.head(bh), gh)
                } else {
                    attention::bidirectional_backward(map, delta, &w.head(bh), gh)
                };
                wq.extend(hg.dq);
                wk.extend(hg.dk);
                wv.extend(hg.dv);
                if let Some(part) = hg.params {
                    let part = testing::flat_param_grads(&part);
                    match &mut wp {
                        Some(acc) => acc.iter_mut().zip(&part).for_each(|(a, b)| *a += b),
                        None => wp = Some(part),
                    }
                }
            }
            let tag = format!("{what} causal={causal}");
            assert_rounded(&format!("{tag} dq"), dtype, &dq.to_f64_vec(), &wq);
            assert_rounded(&format!("{tag} dk"), dtype, &dk.to_f64_vec(), &wk);
            assert_rounded(&format!("{tag} dv"), dtype, &dvt.to_f64_vec(), &wv);
            match (pg, wp) {
                (Some(got), Some(want)) => {
                    let got = testing::flat_param_grads_f32(&got);
                    // Parameter gradients are always returned in f32.
                    assert_rounded(&format!("{tag} dθ"), DType::F32, &got, &want);
                }
                (None, None) => {}
                _ => panic!("{tag}: parameter gradients present in only one of host/f64"),
            }
        }
        // Feature maps in every role, forward and backward.
        let mf = map.feature_dim(d);
        let fshape = AttentionShape { dv: d, ..shape };
        let gphi = HostTensor::from_f32(dtype, &testing::random_tensor(case + 900, shape.problems() * len * mf, 1.0));
        let gphi_w = gphi.to_f64_vec();
        for role in [FeatureRole::Query, FeatureRole::Key, FeatureRole::CausalKey] {
            let mut phi = HostTensor::zeros(dtype, shape.problems() * len * mf);
            backend.feature_map(map, role, fshape, t.q.view(), phi.view_mut()).expect("feature_map");
            let mut dx = HostTensor::zeros(dtype, shape.qk_len());
            let pg = backend
                .feature_map_backward(map, role, fshape, t.q.view(), gphi.view(), dx.view_mut())
                .expect("feature_map_backward");
            let (mut want_phi, mut want_dx, mut want_pg) =
                (vec![0.0; phi.to_f64_vec().len()], vec![0.0; shape.qk_len()], map.param_grads_f64());
            for bh in 0..shape.problems() {
                let rows = &w.q[bh * len * d..(bh + 1) * len * d];
                let s: Vec<f64> = rows.chunks(d).map(|x| map.log_scale(x)).collect();
                let mut running = f64::NEG_INFINITY;
                for i in 0..len {
                    running = running.max(s[i]);
                    let c = match role {
                        FeatureRole::Query => s[i],
                        FeatureRole::Key => s.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                        FeatureRole::CausalKey => running,
                    };
                    let o = (bh * len + i) * mf;
                    map.features(&rows[i * d..(i + 1) * d], c, &mut want_phi[o..o + mf]);
                    let xo = (bh * len + i) * d;
                    map.features_backward(
                        &rows[i * d..(i + 1) * d],
                        c,
                        &gphi_w[o..o + mf],
                        &mut want_dx[xo..xo + d],
                        want_pg.as_mut(),
                    );
                }
            }
            let tag = format!("{what} {role:?}");
            assert_rounded(&format!("{tag} φ"), dtype, &phi.to_f64_vec(), &want_phi);
            assert_rounded(&format!("{tag} dx"), dtype, &dx.to_f64_vec(), &want_dx);
            assert_eq!(pg.is_some(), want_pg.is_some(), "{tag}: parameter gradients");
            if let (Some(got), Some(want)) = (pg, want_pg) {
                let got: Vec<f64> = got
                    .w
                    .iter()
                    .chain(got.bias.iter().flatten())
                    .chain(got.w_gate.iter().flatten())
                    .map(|&x| x as f64)
                    .collect();
                assert_rounded(&format!("{tag} dθ"), DType::F32, &got, &testing::flat_param_grads(&want));
            }
        }
        // Decoding in two chunks equals the causal forward.
        let p = problem(shape, map, true);
        let split = len / 2;
        let chunks: Vec<usize> = [split, len - split].into_iter().filter(|&n| n > 0).collect();
        assert_rounded(
            &format!("{what} decode {chunks:?}"),
            dtype,
            &decode_chunks(&p, &t, &chunks),
            &forward_host(&p, &t),
        );
    }
    // The sample must reach the interesting tails.
    for n in [1, 7, 9, 17, 63, 65, 127] {
        assert!(covered.contains(&n), "size {n} never drawn: {covered:?}");
    }
}

/// Finite f32 inputs of any magnitude through every host method give finite results.
#[test]
fn host_api_is_finite_at_extreme_magnitudes() {
    let shape = AttentionShape::new(2, 1, 9, 4).with_dv(3);
    let mut r = testing::rng(71);
    let scales: [(&str, [f64; 3]); 4] =
        [("1e4", [1e4; 3]), ("1e-30", [1e-30; 3]), ("mixed", [1e4, 1e-30, 1.0]), ("q 1e4 k 1e-30", [1e4, 1e-30, 1e4])];
    let backend = ReferenceBackend;
    for (name, map) in testing::feature_map_catalog(4, 6, 72) {
        for (case, sc) in &scales {
            let draw = |r: &mut TestRng, n: usize, which: usize| -> HostTensor {
                let v: Vec<f32> = testing::gaussian(r, n, 1.0)
                    .into_iter()
                    .enumerate()
                    .map(|(i, x)| (x * if *case == "mixed" { sc[i % 3] } else { sc[which] }) as f32)
                    .collect();
                HostTensor::from_f32(DType::F32, &v)
            };
            let mut t = Tensors::random(&mut r, shape, DType::F32, 1.0);
            t.q = draw(&mut r, shape.qk_len(), 0);
            t.k = draw(&mut r, shape.qk_len(), 1);
            t.v = draw(&mut r, shape.v_len(), 2);
            for masked in [false, true] {
                t.mask = masked.then(|| (0..shape.mask_len()).map(|j| j % 4 != 1).collect());
                for causal in [false, true] {
                    let what = format!("{name} [{case}] causal={causal} mask={masked}");
                    let p = problem(shape, &map, causal);
                    let out = forward_host(&p, &t);
                    assert!(out.iter().all(|x| x.is_finite()), "{what}: non-finite output");
                    let gout = HostTensor::from_f32(DType::F32, &testing::random_tensor(3, shape.v_len(), 1.0));
                    let mut dq = HostTensor::zeros(DType::F32, shape.qk_len());
                    let mut dk = HostTensor::zeros(DType::F32, shape.qk_len());
                    let mut dv = HostTensor::zeros(DType::F32, shape.v_len());
                    let pg = backend
                        .backward(
                            &p,
                            t.inputs(),
                            gout.view(),
                            Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() },
                        )
                        .expect("backward");
                    let pg: Vec<f32> = pg
                        .map(|g| {
                            g.w.into_iter()
                                .chain(g.bias.into_iter().flatten())
                                .chain(g.w_gate.into_iter().flatten())
                                .collect()
                        })
                        .unwrap_or_default();
                    for (g, n) in [(dq.to_f64_vec(), "dq"), (dk.to_f64_vec(), "dk"), (dv.to_f64_vec(), "dv")] {
                        assert!(g.iter().all(|x| x.is_finite()), "{what}: non-finite {n}");
                    }
                    assert!(pg.iter().all(|x| x.is_finite()), "{what}: non-finite parameter gradient");
                    if causal {
                        let dec = decode_chunks(&p, &t, &[4, 1, 4]);
                        assert!(dec.iter().all(|x| x.is_finite()), "{what}: non-finite decode output");
                    }
                }
            }
            let mf = map.feature_dim(4);
            for role in [FeatureRole::Query, FeatureRole::Key, FeatureRole::CausalKey] {
                let fshape = AttentionShape { dv: 4, ..shape };
                let mut phi = HostTensor::zeros(DType::F32, shape.problems() * shape.len * mf);
                backend.feature_map(&map, role, fshape, t.k.view(), phi.view_mut()).expect("feature_map");
                let ones = HostTensor::from_f32(DType::F32, &vec![1.0; shape.problems() * shape.len * mf]);
                let mut dx = HostTensor::zeros(DType::F32, shape.qk_len());
                backend
                    .feature_map_backward(&map, role, fshape, t.k.view(), ones.view(), dx.view_mut())
                    .expect("backward");
                assert!(
                    phi.to_f64_vec().iter().chain(&dx.to_f64_vec()).all(|x| x.is_finite()),
                    "{name} [{case}] {role:?}: non-finite features or gradient"
                );
            }
        }
    }
}

#[test]
fn bad_input_gives_typed_errors_never_a_panic() {
    let backend = ReferenceBackend;
    let shape = AttentionShape::new(2, 1, 3, 4).with_dv(2);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(5, 4, 1)).unwrap());
    let p = Problem::new(shape, &map);
    let f32s = |n: usize| vec![0.5f32; n];
    let (q, k, v) = (f32s(shape.qk_len()), f32s(shape.qk_len()), f32s(shape.v_len()));
    let mut out = f32s(shape.v_len());
    let good = Inputs::<Host> { q: (&q).into(), k: (&k).into(), v: (&v).into(), key_mask: None };
    assert!(backend.forward(&p, good, (&mut out).into()).is_ok());

    let shape_arg = |e: FavorError| match e {
        FavorError::Shape { arg, .. } => arg,
        other => panic!("expected a shape error, got {other:?}"),
    };
    // Wrong lengths, named.
    let short = f32s(shape.qk_len() - 1);
    let short_v = f32s(shape.v_len() + 1);
    for (inputs, want) in [
        (Inputs { q: (&short).into(), ..good }, "q"),
        (Inputs { k: (&short).into(), ..good }, "k"),
        (Inputs { v: (&short_v).into(), ..good }, "v"),
        (Inputs { key_mask: Some(&[true; 5]), ..good }, "key_mask"),
    ] {
        for causal in [false, true] {
            let pc = problem(shape, &map, causal);
            assert_eq!(shape_arg(backend.forward(&pc, inputs, (&mut out).into()).unwrap_err()), want);
            let mut g = (f32s(shape.qk_len()), f32s(shape.qk_len()), f32s(shape.v_len()));
            let grads = Grads { dq: (&mut g.0).into(), dk: (&mut g.1).into(), dv: (&mut g.2).into() };
            assert_eq!(shape_arg(backend.backward(&pc, inputs, (&v).into(), grads).unwrap_err()), want);
        }
        let mut st = backend.new_state(&p).unwrap();
        assert_eq!(shape_arg(backend.decode(&p, &mut st, inputs, (&mut out).into()).unwrap_err()), want);
        let mut g = (f32s(shape.qk_len()), f32s(shape.qk_len()), f32s(shape.v_len()));
        let grads = Grads { dq: (&mut g.0).into(), dk: (&mut g.1).into(), dv: (&mut g.2).into() };
        assert_eq!(
            shape_arg(reference::softmax_attention(shape, Default::default(), inputs, (&mut out).into()).unwrap_err()),
            want
        );
        assert_eq!(
            shape_arg(
                reference::softmax_attention_backward(shape, Default::default(), inputs, (&v).into(), grads)
                    .unwrap_err()
            ),
            want
        );
    }
    let mut wrong_out = f32s(shape.v_len() + 2);
    assert_eq!(shape_arg(backend.forward(&p, good, (&mut wrong_out).into()).unwrap_err()), "out");
    assert_eq!(
        shape_arg(reference::softmax_attention(shape, Default::default(), good, (&mut wrong_out).into()).unwrap_err()),
        "out"
    );
    // Backward output and cotangent lengths.
    let (mut gq, mut gk, mut gv) = (f32s(shape.qk_len()), f32s(shape.qk_len()), f32s(shape.v_len()));
    let mut bad_q = f32s(1);
    let mut bad_v = f32s(1);
    let bw = |dout: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]| {
        backend.backward(&p, good, dout.into(), Grads { dq: dq.into(), dk: dk.into(), dv: dv.into() })
    };
    assert_eq!(shape_arg(bw(&f32s(1), &mut gq, &mut gk, &mut gv).unwrap_err()), "dout");
    assert_eq!(shape_arg(bw(&v, &mut bad_q, &mut gk, &mut gv).unwrap_err()), "dq");
    assert_eq!(shape_arg(bw(&v, &mut gq, &mut bad_q, &mut gv).unwrap_err()), "dk");
    assert_eq!(shape_arg(bw(&v, &mut gq, &mut gk, &mut bad_v).unwrap_err()), "dv");
    assert!(bw(&v, &mut gq, &mut gk, &mut gv).is_ok());

    // Dtype mismatches, named, with expected and actual dtype.
    let k16: Vec<half::f16> = k.iter().map(|&x| half::f16::from_f32(x)).collect();
    let err = backend.forward(&p, Inputs { k: (&k16).into(), ..good }, (&mut out).into()).unwrap_err();
    assert_eq!(err, FavorError::DType { arg: "k", expected: DType::F32, actual: DType::F16 });
    let mut out16 = vec![half::bf16::ZERO; shape.v_len()];
    let err = backend.forward(&p, good, (&mut out16).into()).unwrap_err();
    assert_eq!(err, FavorError::DType { arg: "out", expected: DType::F32, actual: DType::Bf16 });
    let mut dq16 = vec![half::f16::ZERO; shape.qk_len()];
    let err = backend
        .backward(&p, good, (&v).into(), Grads { dq: (&mut dq16).into(), dk: (&mut gk).into(), dv: (&mut gv).into() })
        .unwrap_err();
    assert_eq!(err, FavorError::DType { arg: "dq", expected: DType::F32, actual: DType::F16 });

    // Zero sizes.
    for (zero, arg) in [
        (AttentionShape { batch: 0, ..shape }, "batch"),
        (AttentionShape { heads: 0, ..shape }, "heads"),
        (AttentionShape { len: 0, ..shape }, "len"),
        (AttentionShape { dv: 0, ..shape }, "dv"),
    ] {
        let pz = Problem::new(zero, &map);
        let empty: Vec<f32> = Vec::new();
        let e = Inputs::<Host> { q: (&empty).into(), k: (&empty).into(), v: (&empty).into(), key_mask: None };
        let mut o: Vec<f32> = Vec::new();
        assert_eq!(backend.forward(&pz, e, (&mut o).into()).unwrap_err(), FavorError::ZeroSize { arg });
        if arg != "len" {
            assert_eq!(backend.new_state(&pz).unwrap_err(), FavorError::ZeroSize { arg });
        }
        if arg != "dv" {
            let mut phi: Vec<f32> = Vec::new();
            assert_eq!(
                backend.feature_map(&map, FeatureRole::Query, zero, (&empty).into(), (&mut phi).into()).unwrap_err(),
                FavorError::ZeroSize { arg }
            );
        }
    }
    // m = 0: a learned map (projections cannot even be drawn with m = 0).
    let zero_m = FeatureMap::Softplus(Linear { m: 0, d: 4, w: vec![], bias: None });
    assert_eq!(
        backend.forward(&Problem::new(shape, &zero_m), good, (&mut out).into()).unwrap_err(),
        FavorError::ZeroSize { arg: "m" }
    );
    assert_eq!(backend.new_state(&Problem::new(shape, &zero_m)).unwrap_err(), FavorError::ZeroSize { arg: "m" });
    assert_eq!(Linear::new(0, 4, vec![], None).unwrap_err(), FavorError::ZeroSize { arg: "m" });
    assert_eq!(Projection::draw(ProjectionConfig::new(0, 4, 1)).unwrap_err(), FavorError::ZeroSize { arg: "m" });
    // d differs from the map's input dimension.
    let p3 = Problem::new(AttentionShape::new(2, 1, 3, 3).with_dv(2), &map);
    assert_eq!(shape_arg(backend.forward(&p3, good, (&mut out).into()).unwrap_err()), "d");
    // Element counts that overflow.
    let huge = AttentionShape::new(usize::MAX / 2, 4, 4, 4);
    assert!(matches!(
        backend.forward(&Problem::new(huge, &map), good, (&mut out).into()),
        Err(FavorError::SizeOverflow { arg: "q", .. })
    ));

    // Invalid parameters.
    let param_name = |e: FavorError| match e {
        FavorError::InvalidParameter { name, .. } => name,
        other => panic!("expected an invalid-parameter error, got {other:?}"),
    };
    let neg_eps = testing::with_epsilon(&map, -1e-6);
    assert_eq!(
        param_name(backend.forward(&Problem::new(shape, &neg_eps), good, (&mut out).into()).unwrap_err()),
        "epsilon"
    );
    assert_eq!(param_name(backend.new_state(&Problem::new(shape, &neg_eps)).unwrap_err()), "epsilon");
    let mut phi = f32s(shape.problems() * shape.len * 5);
    assert_eq!(
        param_name(backend.feature_map(&neg_eps, FeatureRole::Key, shape, (&q).into(), (&mut phi).into()).unwrap_err()),
        "epsilon"
    );
    let nan_eps = testing::with_epsilon(
        &FeatureMap::hyperbolic(Projection::draw(ProjectionConfig::new(5, 4, 1)).unwrap()),
        f32::NAN,
    );
    assert_eq!(
        param_name(backend.forward(&Problem::new(shape, &nan_eps), good, (&mut out).into()).unwrap_err()),
        "epsilon"
    );
    let neg_kappa = FeatureMap::generalized(favor_core::Elementwise::Relu, None, false, -1.0);
    assert_eq!(
        param_name(backend.forward(&Problem::new(shape, &neg_kappa), good, (&mut out).into()).unwrap_err()),
        "kappa"
    );
    for guard in [-1.0, f32::NAN, f32::INFINITY] {
        let pg = p.with_options(AttentionOptions { denominator_guard: Some(guard), ..Default::default() });
        assert_eq!(param_name(backend.forward(&pg, good, (&mut out).into()).unwrap_err()), "denominator_guard");
    }
    let biased_gate = match testing::gated_softplus(5, 4, 1) {
        FeatureMap::GatedSoftplus(mut g) => {
            g.gate.bias = Some(vec![0.0; 5]);
            FeatureMap::GatedSoftplus(g)
        }
        _ => unreachable!(),
    };
    assert!(matches!(
        backend.forward(&Problem::new(shape, &biased_gate), good, (&mut out).into()),
        Err(FavorError::Unsupported(_))
    ));

    // Non-finite values, with argument and flat index.
    let non_finite = |e: FavorError| match e {
        FavorError::NonFinite { arg, index, .. } => (arg, index),
        other => panic!("expected a non-finite error, got {other:?}"),
    };
    let mut bad = v.clone();
    bad[5] = f32::NAN;
    assert_eq!(
        non_finite(backend.forward(&p, Inputs { v: (&bad).into(), ..good }, (&mut out).into()).unwrap_err()),
        ("v", 5)
    );
    let mut bad_q = q.clone();
    bad_q[17] = f32::NEG_INFINITY;
    let bq = Inputs { q: (&bad_q).into(), ..good };
    assert_eq!(non_finite(backend.forward(&p, bq, (&mut out).into()).unwrap_err()), ("q", 17));
    let mut st = backend.new_state(&p).unwrap();
    assert_eq!(non_finite(backend.decode(&p, &mut st, bq, (&mut out).into()).unwrap_err()), ("q", 17));
    assert_eq!(
        non_finite(reference::softmax_attention(shape, Default::default(), bq, (&mut out).into()).unwrap_err()),
        ("q", 17)
    );
    assert_eq!(non_finite(bw(&bad, &mut gq, &mut gk, &mut gv).unwrap_err()), ("dout", 5));
    assert_eq!(
        non_finite(
            backend.feature_map(&map, FeatureRole::Query, shape, (&bad_q).into(), (&mut phi).into()).unwrap_err()
        ),
        ("x", 17)
    );
    let mut bad_phi = f32s(phi.len());
    bad_phi[2] = f32::INFINITY;
    let mut dx = f32s(shape.qk_len());
    assert_eq!(
        non_finite(
            backend
                .feature_map_backward(&map, FeatureRole::Query, shape, (&q).into(), (&bad_phi).into(), (&mut dx).into())
                .unwrap_err()
        ),
        ("dphi", 2)
    );
    let mut w = vec![0.5f32; 20];
    w[3] = f32::NAN;
    assert_eq!(non_finite(Linear::new(5, 4, w.clone(), None).unwrap_err()), ("w", 3));
    assert_eq!(non_finite(Projection::from_matrix(5, 4, w).unwrap_err()), ("w", 3));

    // Feature-map calls: every tensor named.
    let fb = |x: &[f32], g: &[f32], dx: &mut [f32]| {
        backend.feature_map_backward(&map, FeatureRole::Key, shape, x.into(), g.into(), dx.into())
    };
    assert_eq!(
        shape_arg(backend.feature_map(&map, FeatureRole::Key, shape, (&short).into(), (&mut phi).into()).unwrap_err()),
        "x"
    );
    let mut short_phi = f32s(phi.len() - 1);
    assert_eq!(
        shape_arg(
            backend.feature_map(&map, FeatureRole::Key, shape, (&q).into(), (&mut short_phi).into()).unwrap_err()
        ),
        "phi"
    );
    assert_eq!(shape_arg(fb(&short, &phi, &mut dx).unwrap_err()), "x");
    assert_eq!(shape_arg(fb(&q, &short_phi, &mut dx).unwrap_err()), "dphi");
    assert_eq!(shape_arg(fb(&q, &phi, &mut f32s(3)).unwrap_err()), "dx");
    assert!(fb(&q, &phi, &mut dx).is_ok());
    let mut phi16 = vec![half::f16::ZERO; phi.len()];
    assert_eq!(
        backend.feature_map(&map, FeatureRole::Key, shape, (&q).into(), (&mut phi16).into()).unwrap_err(),
        FavorError::DType { arg: "phi", expected: DType::F32, actual: DType::F16 }
    );

    // Decoding with a state made for another problem.
    let other = AttentionShape::new(1, 1, 3, 4).with_dv(2);
    let mut st = backend.new_state(&Problem::new(other, &map)).unwrap();
    assert!(matches!(
        backend.decode(&p, &mut st, good, (&mut out).into()),
        Err(FavorError::StateMismatch { field: "batch", .. })
    ));
    let mut st = backend.new_state(&p).unwrap();
    assert_eq!(shape_arg(backend.decode(&p, &mut st, good, (&mut wrong_out).into()).unwrap_err()), "out");
    assert!(backend.decode(&p, &mut st, good, (&mut out).into()).is_ok());
    // Errors print the argument and the expected vs actual value.
    let msg = backend.forward(&p, Inputs { q: (&short).into(), ..good }, (&mut out).into()).unwrap_err().to_string();
    assert!(
        msg.contains("`q`")
            && msg.contains(&shape.qk_len().to_string())
            && msg.contains(&(shape.qk_len() - 1).to_string()),
        "{msg}"
    );
}

/// Cross-attention (L queries, L_kv keys) is self-attention over L + L_kv positions whose first
/// L keys are padded and whose last L_kv queries are ignored: queries [Q; X], keys [Y; K],
/// values [Z; V], mask [false…; mask]. The reference gives the same output rows, the same dq on
/// the query rows and dk, dv on the key rows (with ∂ℒ/∂out zero on the ignored rows), and the
/// same parameter gradients, for every map; exact softmax attention likewise.
#[test]
fn cross_attention_is_self_attention_over_padded_positions() {
    let (b, h, l, lk, d, dv) = (2, 2, 5, 8, 3, 2);
    let cross = AttentionShape::new(b, h, l, d).with_dv(dv).with_kv_len(lk);
    let joint = AttentionShape::new(b, h, l + lk, d).with_dv(dv);
    let t = |seed: u64, n: usize| testing::random_tensor(seed, n, 0.6);
    let (q, k, v, g) = (t(1, cross.qk_len()), t(2, cross.k_len()), t(3, cross.v_len()), t(4, cross.out_len()));
    let (x, y, z) = (t(5, b * h * lk * d), t(6, b * h * l * d), t(7, b * h * l * dv));
    let mask: Vec<bool> = (0..b * lk).map(|i| i % 3 != 1).collect();
    // Per (batch, head): `first` rows of width w from a, then `second` rows from c.
    let stack = |a: &[f32], first: usize, c: &[f32], second: usize, w: usize| -> Vec<f32> {
        (0..b * h)
            .flat_map(|bh| {
                let mut rows = a[bh * first * w..(bh + 1) * first * w].to_vec();
                rows.extend_from_slice(&c[bh * second * w..(bh + 1) * second * w]);
                rows
            })
            .collect()
    };
    let (jq, jk, jv) = (stack(&q, l, &x, lk, d), stack(&y, l, &k, lk, d), stack(&z, l, &v, lk, dv));
    let jg = stack(&g, l, &vec![0.0; b * h * lk * dv], lk, dv);
    let jmask: Vec<bool> =
        (0..b).flat_map(|bi| (0..l).map(|_| false).chain(mask[bi * lk..(bi + 1) * lk].to_vec())).collect();
    // Rows [from, from + n) of every (batch, head) of a joint tensor of width w.
    let rows = |a: &[f64], from: usize, n: usize, w: usize| -> Vec<f64> {
        (0..b * h).flat_map(|bh| a[(bh * (l + lk) + from) * w..(bh * (l + lk) + from + n) * w].to_vec()).collect()
    };
    let close = |what: &str, a: &[f64], want: &[f64]| {
        let e = testing::rel_error(what, a, want);
        assert!(e <= 1e-12, "{what}: {e:.2e}");
    };
    let ci = Inputs { q: q.as_slice().into(), k: k.as_slice().into(), v: v.as_slice().into(), key_mask: Some(&mask) };
    let ji =
        Inputs { q: jq.as_slice().into(), k: jk.as_slice().into(), v: jv.as_slice().into(), key_mask: Some(&jmask) };
    for (name, map) in testing::feature_map_catalog(d, 6, 17) {
        let (pc, pj) = (Problem::new(cross, &map), Problem::new(joint, &map));
        let got = ReferenceBackend.forward_f64(&pc, ci).unwrap();
        close(&format!("{name} out"), &got, &rows(&ReferenceBackend.forward_f64(&pj, ji).unwrap(), 0, l, dv));
        let gc = ReferenceBackend.backward_f64(&pc, ci, g.as_slice().into()).unwrap();
        let gj = ReferenceBackend.backward_f64(&pj, ji, jg.as_slice().into()).unwrap();
        close(&format!("{name} dq"), &gc.dq, &rows(&gj.dq, 0, l, d));
        close(&format!("{name} dk"), &gc.dk, &rows(&gj.dk, l, lk, d));
        close(&format!("{name} dv"), &gc.dv, &rows(&gj.dv, l, lk, dv));
        if let (Some(a), Some(bb)) = (&gc.params, &gj.params) {
            close(&format!("{name} params"), &testing::flat_param_grads(a), &testing::flat_param_grads(bb));
        }
    }
    // Exact softmax attention.
    let mut out = vec![0f32; cross.out_len()];
    favor_core::reference::softmax_attention(cross, Direction::Bidirectional, ci, out.as_mut_slice().into()).unwrap();
    let mut jout = vec![0f32; joint.out_len()];
    favor_core::reference::softmax_attention(joint, Direction::Bidirectional, ji, jout.as_mut_slice().into()).unwrap();
    let f = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    close("softmax out", &f(&out), &rows(&f(&jout), 0, l, dv));
}

/// Cross-attention shapes that do not fit are typed errors on the reference backend.
#[test]
fn cross_attention_errors_are_typed() {
    let map = testing::feature_map_catalog(4, 6, 1).remove(0).1;
    let shape = AttentionShape::new(1, 1, 3, 4).with_kv_len(5);
    let t = |n: usize| testing::random_tensor(n as u64, n, 0.5);
    let (q, k, v) = (t(shape.qk_len()), t(shape.k_len()), t(shape.v_len()));
    let inputs = Inputs { q: q.as_slice().into(), k: k.as_slice().into(), v: v.as_slice().into(), key_mask: None };
    let mut out = vec![0f32; shape.out_len()];
    let causal = Problem::new(shape, &map).with_options(AttentionOptions::causal());
    let r = ReferenceBackend.forward(&causal, inputs, out.as_mut_slice().into());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_len", .. })), "{r:?}");
    let r = favor_core::reference::softmax_attention(shape, Direction::Causal, inputs, out.as_mut_slice().into());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_len", .. })), "{r:?}");
    let p = Problem::new(shape, &map);
    let r = ReferenceBackend.forward(&p, Inputs { k: q.as_slice().into(), ..inputs }, out.as_mut_slice().into());
    assert!(matches!(r, Err(FavorError::Shape { arg: "k", .. })), "{r:?}");
    let mut state = ReferenceBackend.new_state(&p).unwrap();
    let r = ReferenceBackend.decode(&p, &mut state, inputs, out.as_mut_slice().into());
    assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_len", .. })), "{r:?}");
}

#[test]
fn strided_layouts_give_the_contiguous_results_bit_for_bit() {
    let maps = testing::feature_map_catalog(5, 7, 3);
    // Odd sizes; a cross shape (no packed QKV there) and d_v ≠ d.
    let shapes = [
        AttentionShape::new(2, 3, 11, 5),
        AttentionShape::new(1, 2, 6, 5).with_dv(3),
        AttentionShape::new(2, 1, 4, 5).with_kv_len(9),
        AttentionShape::new(1, 1, 1, 5),
    ];
    for (i, shape) in shapes.into_iter().enumerate() {
        for (name, map) in maps.iter().filter(|(n, _)| ["positive", "trigonometric", "relu"].contains(n)) {
            for (causal, dtype, masked) in
                [(false, DType::F32, true), (true, DType::F32, false), (true, DType::Bf16, true)]
            {
                if causal && shape.is_cross() {
                    continue;
                }
                let p = problem(shape, map, causal);
                let run = testing::assert_layouts_agree(&ReferenceBackend, &p, dtype, masked, 10 + i as u64, 1.0);
                assert!(run.out.iter().all(|x| x.is_finite()), "{name} {shape:?}");
            }
        }
    }
}

#[test]
fn strides_that_overlap_or_run_past_the_buffer_are_typed_errors() {
    use favor_core::{Layout, Strides};
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(6, 4, 1)).expect("W"));
    let shape = AttentionShape::new(2, 3, 5, 4);
    let mut r = testing::rng(1);
    let t = Tensors::random(&mut r, shape, DType::F32, 0.5);
    let mut out = HostTensor::zeros(DType::F32, shape.out_len());
    let blhd = Layout::blhd(&shape);
    let p = Problem::new(shape, &map).with_layout(blhd);
    ReferenceBackend.forward(&p, t.inputs(), out.view_mut()).expect("[B, L, H, d] of the same size");
    // Rows of one head interleaved with another's.
    let bad = Strides { batch: 60, head: 4, token: 8 };
    let r = ReferenceBackend.forward(&p.with_layout(Layout { k: Some(bad), ..blhd }), t.inputs(), out.view_mut());
    assert!(matches!(r, Err(FavorError::Strides { arg: "k", .. })), "{r:?}");
    // A token stride shorter than a row, on an output.
    let bad = Strides { batch: 60, head: 20, token: 3 };
    let r = ReferenceBackend.forward(&p.with_layout(Layout { out: Some(bad), ..blhd }), t.inputs(), out.view_mut());
    assert!(matches!(r, Err(FavorError::Strides { arg: "out", .. })), "{r:?}");
    // A slice that ends before the last row.
    let r = ReferenceBackend.forward(
        &p,
        Inputs { v: HostTensor::zeros(DType::F32, 119).view(), ..t.inputs() },
        out.view_mut(),
    );
    assert!(matches!(r, Err(FavorError::Shape { arg: "v", .. })), "{r:?}");
    // Strides whose extent wraps.
    let huge = Strides { batch: usize::MAX / 2, head: 4, token: 12 };
    let r = ReferenceBackend.forward(&p.with_layout(Layout { q: Some(huge), ..blhd }), t.inputs(), out.view_mut());
    assert!(matches!(r, Err(FavorError::SizeOverflow { arg: "q", .. })), "{r:?}");
    // Gradients are checked too.
    let g = HostTensor::zeros(DType::F32, shape.out_len());
    let (mut dq, mut dk, mut dv) = (out.clone(), out.clone(), out.clone());
    let bad = Layout { dk: Some(Strides { batch: 60, head: 20, token: 2 }), ..blhd };
    let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() };
    let r = ReferenceBackend.backward(&p.with_layout(bad), t.inputs(), g.view(), grads);
    assert!(matches!(r, Err(FavorError::Strides { arg: "dk", .. })), "{r:?}");
    // A NaN inside a row is reported with its index in the slice; NaN between rows is ignored.
    let gapped = Strides { batch: 80, head: 25, token: 5 };
    let mut q = vec![f32::NAN; 160];
    for bh in 0..6 {
        for row in 0..5 {
            let at = gapped.head_base(3, bh) + row * 5;
            q[at..at + 4].copy_from_slice(&[0.1, 0.2, 0.3, 0.4]);
        }
    }
    let lp = p.with_layout(Layout { q: Some(gapped), ..blhd });
    let qi = Inputs { q: favor_core::HostRef::F32(&q), ..t.inputs() };
    ReferenceBackend.forward(&lp, qi, out.view_mut()).expect("NaN only between rows");
    q[gapped.offset(1, 2, 3) + 1] = f32::INFINITY;
    let qi = Inputs { q: favor_core::HostRef::F32(&q), ..t.inputs() };
    let r = ReferenceBackend.forward(&lp, qi, out.view_mut());
    assert!(matches!(r, Err(FavorError::NonFinite { arg: "q", index, .. }) if index == 80 + 50 + 15 + 1), "{r:?}");
}
