//! The CUDA backend against the f64 reference, for every op, direction, pass, dtype and
//! supported feature map, on shapes with tails (L across the 32-row chunks and the 8-row feature
//! tiles, odd d, d_v and m). Without a usable GPU each test prints why and passes; with
//! `FAVOR_REQUIRE_GPU=1` a missing GPU fails instead (set on GPU machines).
//!
//! Error measure: relative Frobenius norm ‖cuda − ref‖ / ‖ref‖ with no floor, against the
//! reference's f64 result on the same stored inputs (favor_core::testing::rel_error); each
//! tolerance sits next to its measured figure. Gradients that vanish in exact arithmetic are
//! measured against the terms that cancel (rel_error_or_cancelled). Trigonometric data is kept
//! well-conditioned (its denominators' condition number is asserted), since its f32 error
//! grows with that number rather than with the data.
//!
//! With the `emulator` feature the same tests also run the kernel sources on the CPU
//! (`cuda/emu`), on the small shapes: `cargo test -p favor-cuda --features emulator`.

use favor_core::testing::{
    cancel_scales, denominator_condition, rel_error, rel_error_or_cancelled, storage_tolerance, unit_roundoff,
};
use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, Elementwise, FavorBackend, FavorError, FeatureMap, FeatureRole,
    Grads, HostTensor, Inputs, Linear, Problem, Projection, ProjectionConfig, ReferenceBackend,
};
use favor_cuda::{CudaBackend, CudaHost};
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

/// The backends under test: the GPU when there is one (otherwise the reason is printed, or the
/// test fails under `FAVOR_REQUIRE_GPU=1`), plus the CPU emulator of the same kernel sources
/// when the `emulator` feature is on. The flag marks the (slow) emulator, which gets the small
/// shapes only.
fn backends(test: &str) -> Vec<(CudaHost, bool)> {
    let found = gpu(test).into_iter().map(|b| (b, false));
    #[cfg(feature = "emulator")]
    let found = found.chain(std::iter::once((CudaHost::new(CudaBackend::emulated()), true)));
    found.collect()
}

/// Shapes for a backend: the emulator runs only the small ones.
fn shapes(emulated: bool) -> impl Iterator<Item = (usize, &'static (usize, usize, usize, usize, usize, usize))> {
    SHAPES.iter().enumerate().filter(move |(_, s)| !emulated || s.0 * s.1 * s.2 * (s.3 + s.5) <= 12_000)
}

fn gpu(test: &str) -> Option<CudaHost> {
    match CudaBackend::new(0) {
        Ok(b) => Some(CudaHost::new(b)),
        Err(FavorError::NotAvailable { reason, .. }) => {
            if std::env::var("FAVOR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: FAVOR_REQUIRE_GPU=1 but the CUDA backend is not available: {reason}");
            }
            eprintln!("{test}: SKIPPED, CUDA backend not available: {reason}");
            None
        }
        Err(e) => panic!("{test}: CudaBackend::new failed with an unexpected error: {e}"),
    }
}

fn randn(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let x: f64 = StandardNormal.sample(&mut rng);
            x as f32 * scale
        })
        .collect()
}

/// f32 compute error of the kernels' outputs against the f64 reference (fp32 tiled sums):
/// measured worst 6.9e-7 on the small shapes, 1.3e-6 at L = 2100, d = 64, m = 256.
const TOL_OUT: f64 = 1e-5;
/// The same for gradients, which go through two more passes (cotangents, then the transposed
/// products and the feature-map backward) and need no extra margin: measured worst 9.6e-7 on the
/// small shapes, 1.5e-6 at L = 2100.
const TOL_GRAD: f64 = 1e-5;
/// A gradient that vanishes in exact arithmetic (dq with one key) is f32 noise: bounded by
/// f32's resolution of the terms that cancel (measured worst 1.2e-7, any storage).
const TOL_CANCELLED: f64 = 1e-6;
/// Trigonometric data must stay this well-conditioned (see [`qk_std`]): the f32 error grows
/// with the denominators' condition number, and up to this bound the tolerances hold.
const TRIG_KAPPA_MAX: f64 = 10.0;

/// The tolerance of a result stored in `dtype` against the reference's f64 result: the f32
/// compute error plus, for 16-bit storage, half an ulp of the result.
fn tolerance(dtype: DType, gradient: bool) -> f64 {
    storage_tolerance(dtype, if gradient { TOL_GRAD } else { TOL_OUT })
}

/// Two results both rounded to the storage type (decoding and standalone feature maps, whose
/// reference has no f64 form): up to one ulp apart, plus the f32 compute error.
fn rounded_tolerance(dtype: DType, gradient: bool) -> f64 {
    (if gradient { TOL_GRAD } else { TOL_OUT }) + 2.0 * unit_roundoff(dtype)
}

/// Query/key standard deviation: trigonometric features are sign-indefinite and their
/// denominators cancel more as ‖q − k‖ grows (and with few keys: short causal prefixes, padding),
/// so for them d·σ² ≤ 1.
fn qk_std(map: &FeatureMap, d: usize) -> f32 {
    if matches!(map, FeatureMap::Trigonometric { .. }) { 0.8f32.min(1.0 / (d as f32).sqrt()) } else { 0.8 }
}

/// The worst error per kind, printed when a test ends (`--nocapture`).
#[derive(Default)]
struct Worst(std::collections::BTreeMap<String, f64>);

impl Worst {
    fn note(&mut self, kind: String, e: f64) {
        let w = self.0.entry(kind).or_insert(0.0);
        *w = w.max(e);
    }
    fn print(&self, test: &str) {
        for (kind, e) in &self.0 {
            println!("{test}: worst {kind}: {e:.1e}");
        }
    }
}

#[track_caller]
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    let e = rel_error(what, got, want);
    assert!(e <= tol, "{what}: relative Frobenius error {e:.2e} > {tol:.1e}");
    e
}

/// Checks dq, dk, dv against the reference's f64 gradients on the same inputs; dq and dk that
/// vanish in exact arithmetic are measured against the scale of the cancelled terms,
/// √d_v·RMS(dout)·RMS(v)·‖∇log R‖.
fn check_grads(
    what: &str,
    p: &Problem<'_>,
    inputs: Inputs<'_, favor_core::Host>,
    dout: &HostTensor,
    got: [&HostTensor; 3],
    worst: &mut Worst,
) {
    let dtype = dout.dtype();
    let want = ReferenceBackend.backward_f64(p, inputs, dout.view()).expect("reference backward");
    let scale = cancel_scales(p, inputs, dout.view()).0;
    for (name, g, w) in [("dq", got[0], &want.dq), ("dk", got[1], &want.dk)] {
        let e = rel_error_or_cancelled(what, &g.to_f64_vec(), w, scale);
        let tol = if e.cancelled { TOL_CANCELLED } else { tolerance(dtype, true) };
        assert!(e.value <= tol, "{what} {name}: error {e} > {tol:.1e}");
        worst.note(
            format!("{dtype} {}", if e.cancelled { "cancelled gradient (vs scale)" } else { "gradient" }),
            e.value,
        );
    }
    let e = assert_close(&format!("{what} dv"), &got[2].to_f64_vec(), &want.dv, tolerance(dtype, true));
    worst.note(format!("{dtype} gradient"), e);
}

/// (batch, heads, len, d, d_v, m): tails of every tile size, one shape spanning several
/// reduction segments and one at the benchmark's head size.
const SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 4, 3, 5),
    (2, 3, 7, 5, 6, 9),
    (1, 2, 33, 8, 5, 17),
    (2, 1, 65, 16, 13, 31),
    (1, 1, 130, 12, 1, 64),
    (1, 2, 97, 64, 64, 256),
    (1, 1, 1500, 16, 8, 32),
];

/// The positive map with its default ε (the per-token floor, which the tests compare too).
fn positive(projection: Projection) -> FeatureMap {
    FeatureMap::positive(projection)
}

/// The hyperbolic map with its default ε.
fn hyperbolic(projection: Projection) -> FeatureMap {
    FeatureMap::hyperbolic(projection)
}

fn maps(d: usize, m: usize, seed: u64) -> Vec<FeatureMap> {
    let proj = || Projection::draw(ProjectionConfig::new(m, d, seed)).expect("projection");
    vec![
        positive(proj()),
        hyperbolic(proj()),
        FeatureMap::trigonometric(proj()),
        FeatureMap::relu(Some(proj())),
        FeatureMap::relu(None),
        FeatureMap::elu_plus_one(),
        FeatureMap::generalized(Elementwise::Softplus, Some(proj()), true, 1e-3),
    ]
}

struct Case {
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    mask: Vec<bool>,
}

fn case(i: usize, &(b, h, l, d, dv, _m): &(usize, usize, usize, usize, usize, usize)) -> Case {
    let shape = AttentionShape::new(b, h, l, d).with_dv(dv);
    let seed = 1000 * i as u64;
    // Padding: every third key, but never all keys of a batch element.
    let mask = (0..b * l).map(|j| j % l == 0 || j % 3 != 1).collect();
    Case {
        shape,
        q: randn(shape.qk_len(), 0.8, seed + 1),
        k: randn(shape.qk_len(), 0.8, seed + 2),
        v: randn(shape.v_len(), 1.0, seed + 3),
        dout: randn(shape.v_len(), 1.0, seed + 4),
        mask,
    }
}

impl Case {
    /// Q and K with the standard deviation [`qk_std`] gives `map` (drawn at 0.8).
    fn qk_for(&self, map: &FeatureMap) -> (Vec<f32>, Vec<f32>) {
        let f = qk_std(map, self.shape.d) / 0.8;
        (self.q.iter().map(|x| x * f).collect(), self.k.iter().map(|x| x * f).collect())
    }
}

fn directions() -> [AttentionOptions; 2] {
    [AttentionOptions::bidirectional(), AttentionOptions::causal()]
}

#[test]
fn forward_matches_reference() {
    let mut worst = Worst::default();
    for (cuda, emulated) in backends("forward_matches_reference") {
        for (i, sh) in shapes(emulated) {
            let c = case(i, sh);
            for map in maps(sh.3, sh.5, i as u64) {
                let (cq, ck) = c.qk_for(&map);
                for opts in directions() {
                    for dtype in DType::ALL {
                        for masked in [false, true] {
                            let p = Problem::new(c.shape, &map).with_options(opts);
                            let (q, k, v) = (
                                HostTensor::from_f32(dtype, &cq),
                                HostTensor::from_f32(dtype, &ck),
                                HostTensor::from_f32(dtype, &c.v),
                            );
                            let key_mask = masked.then_some(c.mask.as_slice());
                            let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask };
                            let what =
                                format!("forward {:?} {} {:?} {dtype} mask={masked}", sh, map.name(), opts.direction);
                            let kappa = denominator_condition(&p, inputs);
                            assert!(kappa <= TRIG_KAPPA_MAX, "{what}: ill-conditioned denominators (κ = {kappa:.1e})");
                            let want = ReferenceBackend.forward_f64(&p, inputs).expect("reference");
                            let mut got = HostTensor::zeros(dtype, c.shape.v_len());
                            cuda.forward(&p, inputs, got.view_mut()).expect("cuda forward");
                            let e = assert_close(&what, &got.to_f64_vec(), &want, tolerance(dtype, false));
                            worst.note(format!("{dtype} output"), e);
                            worst.note("denominator condition number".into(), kappa);
                        }
                    }
                }
            }
        }
    }
    worst.print("forward_matches_reference");
}

#[test]
fn backward_matches_reference() {
    let mut worst = Worst::default();
    for (cuda, emulated) in backends("backward_matches_reference") {
        for (i, sh) in shapes(emulated) {
            let c = case(i, sh);
            for map in maps(sh.3, sh.5, i as u64) {
                let (cq, ck) = c.qk_for(&map);
                for opts in directions() {
                    for dtype in DType::ALL {
                        for masked in [false, true] {
                            let p = Problem::new(c.shape, &map).with_options(opts);
                            let (q, k, v, g) = (
                                HostTensor::from_f32(dtype, &cq),
                                HostTensor::from_f32(dtype, &ck),
                                HostTensor::from_f32(dtype, &c.v),
                                HostTensor::from_f32(dtype, &c.dout),
                            );
                            let key_mask = masked.then_some(c.mask.as_slice());
                            let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask };
                            let s = c.shape;
                            let zeros = |n| HostTensor::zeros(dtype, n);
                            let (mut cq, mut ck, mut cv) = (zeros(s.qk_len()), zeros(s.qk_len()), zeros(s.v_len()));
                            let params = cuda
                                .backward(
                                    &p,
                                    inputs,
                                    g.view(),
                                    Grads { dq: cq.view_mut(), dk: ck.view_mut(), dv: cv.view_mut() },
                                )
                                .expect("cuda backward");
                            assert!(params.is_none());
                            let what =
                                format!("backward {:?} {} {:?} {dtype} mask={masked}", sh, map.name(), opts.direction);
                            check_grads(&what, &p, inputs, &g, [&cq, &ck, &cv], &mut worst);
                        }
                    }
                }
            }
        }
    }
    worst.print("backward_matches_reference");
}

/// Rows `start..start + n` of every (batch, head) of a `[BH, L, width]` tensor.
fn take_rows(x: &[f32], problems: usize, len: usize, width: usize, start: usize, n: usize) -> Vec<f32> {
    (0..problems).flat_map(|bh| x[(bh * len + start) * width..(bh * len + start + n) * width].iter().copied()).collect()
}

#[test]
fn decode_matches_reference() {
    for (cuda, emulated) in backends("decode_matches_reference") {
        for (i, sh) in shapes(emulated).filter(|(_, s)| s.2 >= 7 && s.2 <= 200) {
            let c = case(i, sh);
            let s = c.shape;
            // A prefill chunk, three decoding steps, then another chunk.
            let first = s.len - 4 - s.len / 3;
            let chunks = [first, 1, 1, 1, s.len - first - 3];
            for map in maps(sh.3, sh.5, i as u64) {
                let (cq, ck) = c.qk_for(&map);
                for dtype in DType::ALL {
                    for masked in [false, true] {
                        let full = Problem::new(s, &map).with_options(AttentionOptions::causal());
                        let mut rs = ReferenceBackend.new_state(&full).expect("reference state");
                        let mut cs = cuda.new_state(&full).expect("cuda state");
                        let mut start = 0;
                        for n in chunks {
                            let cs_shape = AttentionShape { len: n, ..s };
                            let p = Problem::new(cs_shape, &map).with_options(AttentionOptions::causal());
                            let bh = s.problems();
                            let q = HostTensor::from_f32(dtype, &take_rows(&cq, bh, s.len, s.d, start, n));
                            let k = HostTensor::from_f32(dtype, &take_rows(&ck, bh, s.len, s.d, start, n));
                            let v = HostTensor::from_f32(dtype, &take_rows(&c.v, bh, s.len, s.dv, start, n));
                            let mask: Vec<bool> = (0..s.batch)
                                .flat_map(|b| c.mask[b * s.len + start..b * s.len + start + n].to_vec())
                                .collect();
                            let key_mask = masked.then_some(mask.as_slice());
                            let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask };
                            let mut want = HostTensor::zeros(dtype, cs_shape.v_len());
                            let mut got = HostTensor::zeros(dtype, cs_shape.v_len());
                            ReferenceBackend.decode(&p, &mut rs, inputs, want.view_mut()).expect("reference decode");
                            cuda.decode(&p, &mut cs, inputs, got.view_mut()).expect("cuda decode");
                            let what =
                                format!("decode {:?} {} {dtype} mask={masked} chunk at {start}+{n}", sh, map.name());
                            assert_close(&what, &got.to_f64_vec(), &want.to_f64_vec(), rounded_tolerance(dtype, false));
                            start += n;
                        }
                        assert!(cs.tokens().iter().all(|&t| t == s.len), "{:?}", cs.tokens());
                    }
                }
            }
        }
    }
}

#[test]
fn feature_maps_match_reference() {
    for (cuda, emulated) in backends("feature_maps_match_reference") {
        for (i, sh) in shapes(emulated).filter(|(_, s)| s.2 <= 200) {
            let c = case(i, sh);
            let s = c.shape;
            for map in maps(sh.3, sh.5, i as u64) {
                let mf = map.feature_dim(s.d);
                let dphi = randn(s.problems() * s.len * mf, 1.0, 77 + i as u64);
                for role in [FeatureRole::Query, FeatureRole::Key, FeatureRole::CausalKey] {
                    for dtype in DType::ALL {
                        let x = HostTensor::from_f32(dtype, &c.k);
                        let mut want = HostTensor::zeros(dtype, s.problems() * s.len * mf);
                        let mut got = HostTensor::zeros(dtype, s.problems() * s.len * mf);
                        ReferenceBackend.feature_map(&map, role, s, x.view(), want.view_mut()).expect("reference");
                        cuda.feature_map(&map, role, s, x.view(), got.view_mut()).expect("cuda feature map");
                        let what = format!("feature_map {:?} {} {role:?} {dtype}", sh, map.name());
                        assert_close(&what, &got.to_f64_vec(), &want.to_f64_vec(), rounded_tolerance(dtype, false));

                        let g = HostTensor::from_f32(dtype, &dphi);
                        let mut want = HostTensor::zeros(dtype, s.qk_len());
                        let mut got = HostTensor::zeros(dtype, s.qk_len());
                        ReferenceBackend
                            .feature_map_backward(&map, role, s, x.view(), g.view(), want.view_mut())
                            .expect("ref");
                        cuda.feature_map_backward(&map, role, s, x.view(), g.view(), got.view_mut()).expect("cuda");
                        let (got, want) = (got.to_f64_vec(), want.to_f64_vec());
                        assert_close(&format!("{what} backward"), &got, &want, rounded_tolerance(dtype, true));
                    }
                }
            }
        }
    }
}

#[test]
fn errors_are_typed() {
    for (cuda, _) in backends("errors_are_typed") {
        let shape = AttentionShape::new(1, 2, 9, 8);
        let map = positive(Projection::draw(ProjectionConfig::new(16, 8, 1)).expect("projection"));
        let p = Problem::new(shape, &map);
        let q = HostTensor::from_f32(DType::F32, &randn(shape.qk_len(), 1.0, 1));
        let mut bad = randn(shape.v_len(), 1.0, 2);
        let v = HostTensor::from_f32(DType::F32, &bad);
        let inputs = Inputs { q: q.view(), k: q.view(), v: v.view(), key_mask: None };
        let mut short = HostTensor::zeros(DType::F32, shape.v_len() - 1);
        assert!(matches!(cuda.forward(&p, inputs, short.view_mut()), Err(FavorError::Shape { arg: "out", .. })));
        bad[5] = f32::NAN;
        let vn = HostTensor::from_f32(DType::F32, &bad);
        let mut out = HostTensor::zeros(DType::F32, shape.v_len());
        let inputs = Inputs { q: q.view(), k: q.view(), v: vn.view(), key_mask: None };
        assert!(matches!(
            cuda.forward(&p, inputs, out.view_mut()),
            Err(FavorError::NonFinite { arg: "v", index: 5, .. })
        ));
        let learned = FeatureMap::Softplus(Linear::new(4, 8, vec![0.1; 32], None).expect("linear"));
        let p = Problem::new(shape, &learned);
        let inputs = Inputs { q: q.view(), k: q.view(), v: v.view(), key_mask: None };
        assert!(matches!(cuda.forward(&p, inputs, out.view_mut()), Err(FavorError::Unsupported(_))));
        // Every scratch buffer is released when a call returns.
        assert_eq!(cuda.device().memory_usage().current_bytes, 0);
        assert!(cuda.device().memory_usage().peak_bytes > 0);
    }
}

#[test]
fn device_buffers_and_large_values() {
    for (cuda, _) in backends("device_buffers_and_large_values") {
        let dev = cuda.device();
        let shape = AttentionShape::new(2, 2, 70, 16).with_dv(24);
        let map = positive(Projection::draw(ProjectionConfig::new(48, 16, 3)).expect("projection"));
        for direction in [Direction::Bidirectional, Direction::Causal] {
            let p = Problem::new(shape, &map).with_options(AttentionOptions { direction, ..Default::default() });
            // Large-magnitude tokens: the stabilisers must keep everything finite.
            let q = HostTensor::from_f32(DType::Bf16, &randn(shape.qk_len(), 30.0, 5));
            let k = HostTensor::from_f32(DType::Bf16, &randn(shape.qk_len(), 30.0, 6));
            let v = HostTensor::from_f32(DType::Bf16, &randn(shape.v_len(), 1.0, 7));
            let (qd, kd, vd) =
                (dev.upload(q.view()).unwrap(), dev.upload(k.view()).unwrap(), dev.upload(v.view()).unwrap());
            let mut od = dev.alloc(DType::Bf16, shape.v_len()).unwrap();
            let inputs = Inputs { q: qd.as_ref(), k: kd.as_ref(), v: vd.as_ref(), key_mask: None };
            dev.forward(&p, inputs, od.as_mut()).expect("device forward");
            let mut got = HostTensor::zeros(DType::Bf16, shape.v_len());
            dev.download(&od, got.view_mut()).unwrap();
            let host_inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: None };
            let want = ReferenceBackend.forward_f64(&p, host_inputs).unwrap();
            let what = format!("device forward {direction:?}");
            assert_close(&what, &got.to_f64_vec(), &want, tolerance(DType::Bf16, false));
        }
    }
}

#[test]
fn decode_state_matches_reference() {
    for (cuda, _) in backends("decode_state_matches_reference") {
        let s = AttentionShape::new(2, 1, 41, 6).with_dv(5);
        let c = case(3, &(2, 1, 41, 6, 5, 11));
        let map = positive(Projection::draw(ProjectionConfig::new(11, 6, 9)).expect("projection"));
        let full = Problem::new(s, &map).with_options(AttentionOptions::causal());
        let mut rs = ReferenceBackend.new_state(&full).expect("reference state");
        let mut cs = cuda.new_state(&full).expect("cuda state");
        let mut start = 0;
        for n in [33, 1, 7] {
            let shape = AttentionShape { len: n, ..s };
            let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
            let q = HostTensor::from_f32(DType::F32, &take_rows(&c.q, 2, s.len, s.d, start, n));
            let k = HostTensor::from_f32(DType::F32, &take_rows(&c.k, 2, s.len, s.d, start, n));
            let v = HostTensor::from_f32(DType::F32, &take_rows(&c.v, 2, s.len, s.dv, start, n));
            let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: None };
            let mut out = HostTensor::zeros(DType::F32, shape.v_len());
            ReferenceBackend.decode(&p, &mut rs, inputs, out.view_mut()).expect("reference decode");
            cuda.decode(&p, &mut cs, inputs, out.view_mut()).expect("cuda decode");
            start += n;
        }
        // Layout promised by CudaState::to_host: S is [B·H, M, d_v + 1] with z in the last column.
        let (st, ct) = cs.to_host(cuda.device()).expect("state to host");
        let (mf, dv1) = (11, s.dv + 1);
        for (bh, head) in rs.heads().iter().enumerate() {
            assert!((ct[bh] - head.c).abs() <= 1e-5 * head.c.abs().max(1.0), "c of head {bh}");
            let mut want = Vec::new();
            let mut got = Vec::new();
            for f in 0..mf {
                for e in 0..s.dv {
                    want.push(head.s[f * s.dv + e] as f32);
                    got.push(st[(bh * mf + f) * dv1 + e]);
                }
                want.push(head.z[f] as f32);
                got.push(st[(bh * mf + f) * dv1 + s.dv]);
            }
            let f = |x: Vec<f32>| x.into_iter().map(f64::from).collect::<Vec<f64>>();
            assert_close(&format!("state of head {bh}"), &f(got), &f(want), TOL_OUT);
        }
    }
}

/// Buffers whose home stream is not the backend's: tensors of the default-stream backend used
/// by a backend on its own stream and dropped right after the call, and a cudarc buffer written
/// on a third stream. The stream joins must order the copies, the kernels and the frees (on a
/// GPU; compute-sanitizer in cuda/gpu-validate.sh sees a use after free if they do not).
#[test]
fn buffers_of_other_streams_are_ordered() {
    let Some(host) = gpu("buffers_of_other_streams_are_ordered") else { return };
    let dev = host.device();
    let ctx = dev.context().expect("a GPU backend has a context").clone();
    let other = dev.with_stream(ctx.new_stream().expect("stream")).expect("with_stream");
    let shape = AttentionShape::new(1, 2, 300, 16).with_dv(8);
    let map = positive(Projection::draw(ProjectionConfig::new(32, 16, 4)).expect("projection"));
    let p = Problem::new(shape, &map);
    let (q, k, v) = (randn(shape.qk_len(), 0.8, 1), randn(shape.qk_len(), 0.8, 2), randn(shape.v_len(), 1.0, 3));
    let host_t = |x: &[f32]| HostTensor::from_f32(DType::F32, x);
    let (hq, hk, hv) = (host_t(&q), host_t(&k), host_t(&v));
    let mut want = HostTensor::zeros(DType::F32, shape.v_len());
    let inputs = Inputs { q: hq.view(), k: hk.view(), v: hv.view(), key_mask: None };
    ReferenceBackend.forward(&p, inputs, want.view_mut()).expect("reference");
    for round in 0..8 {
        let (qd, kd, vd) =
            (dev.upload(hq.view()).unwrap(), dev.upload(hk.view()).unwrap(), dev.upload(hv.view()).unwrap());
        let mut od = dev.alloc(DType::F32, shape.v_len()).unwrap();
        let inputs = Inputs { q: qd.as_ref(), k: kd.as_ref(), v: vd.as_ref(), key_mask: None };
        other.forward(&p, inputs, od.as_mut()).expect("forward on another stream");
        drop((qd, kd, vd));
        // Reuse the freed memory at once: garbage in it would show if the frees ran early.
        let junk: Vec<_> = (0..3).map(|_| dev.upload(host_t(&vec![1e30; shape.qk_len()]).view()).unwrap()).collect();
        let mut got = HostTensor::zeros(DType::F32, shape.v_len());
        dev.download(&od, got.view_mut()).unwrap();
        drop(junk);
        assert_close(&format!("round {round}"), &got.to_f64_vec(), &want.to_f64_vec(), TOL_OUT);
    }
    // A cudarc buffer of a third stream, under the unsafe constructor's contract.
    let third = ctx.new_stream().expect("stream");
    let (sq, sk, sv) = (third.clone_htod(&q).unwrap(), third.clone_htod(&k).unwrap(), third.clone_htod(&v).unwrap());
    let mut so = third.alloc_zeros::<f32>(shape.v_len()).unwrap();
    // SAFETY: the buffers live on `third`, their home stream, which the backend joins; nothing
    // else touches them until `third` is synchronised below.
    let inputs = unsafe {
        Inputs {
            q: favor_cuda::DeviceRef::from_slice(&sq),
            k: favor_cuda::DeviceRef::from_slice(&sk),
            v: favor_cuda::DeviceRef::from_slice(&sv),
            key_mask: None,
        }
    };
    // SAFETY: as above.
    other.forward(&p, inputs, unsafe { favor_cuda::DeviceMut::from_slice(&mut so) }).expect("forward");
    let got = third.clone_dtoh(&so).unwrap();
    third.synchronize().unwrap();
    let got: Vec<f64> = got.into_iter().map(f64::from).collect();
    assert_close("cudarc buffers", &got, &want.to_f64_vec(), TOL_OUT);
}

/// The sizes the small emulator shapes skip, on every backend including the emulator: L = 2100
/// spans three segments of the bidirectional reduction (1024 rows each, the last one short) and
/// 66 causal chunks, at the benchmark's head size d = d_v = 64 with m = 256 projections
/// (512 features for the hyperbolic map), forward and backward, with and without padding.
#[test]
fn long_sequences_at_the_benchmark_head_size() {
    let mut worst = Worst::default();
    for (cuda, _) in backends("long_sequences_at_the_benchmark_head_size") {
        let sh = (1, 1, 2100, 64, 64, 256);
        let c = case(9, &sh);
        let s = c.shape;
        let proj = || Projection::draw(ProjectionConfig::new(sh.5, sh.3, 9)).expect("projection");
        let (positive, hyperbolic) = (positive(proj()), hyperbolic(proj()));
        let (bidirectional, causal) = (AttentionOptions::bidirectional(), AttentionOptions::causal());
        // Three configurations only: each takes about a minute on the emulator with 2 cores.
        for (map, opts, masked) in
            [(&positive, bidirectional, true), (&hyperbolic, bidirectional, false), (&positive, causal, true)]
        {
            let p = Problem::new(s, map).with_options(opts);
            let f = |x: &[f32]| HostTensor::from_f32(DType::F32, x);
            let (q, k, v, g) = (f(&c.q), f(&c.k), f(&c.v), f(&c.dout));
            let key_mask = masked.then_some(c.mask.as_slice());
            let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask };
            let what = format!("L {} {} {:?} mask={masked}", s.len, map.name(), opts.direction);

            let zeros = |n| HostTensor::zeros(DType::F32, n);
            let mut got = zeros(s.v_len());
            let want = ReferenceBackend.forward_f64(&p, inputs).expect("reference");
            cuda.forward(&p, inputs, got.view_mut()).expect("cuda forward");
            let e = assert_close(&format!("forward {what}"), &got.to_f64_vec(), &want, TOL_OUT);
            worst.note("f32 output".into(), e);

            let (mut cq, mut ck, mut cv) = (zeros(s.qk_len()), zeros(s.qk_len()), zeros(s.v_len()));
            let grads = Grads { dq: cq.view_mut(), dk: ck.view_mut(), dv: cv.view_mut() };
            cuda.backward(&p, inputs, g.view(), grads).expect("cuda backward");
            check_grads(&format!("backward {what}"), &p, inputs, &g, [&cq, &ck, &cv], &mut worst);
        }
    }
    worst.print("long_sequences_at_the_benchmark_head_size");
}

/// Softmax scales other than 1/√d (above and below it) on two shapes with tails, forward and
/// backward, both directions, masked.
#[test]
fn softmax_scales_match_reference() {
    let mut worst = Worst::default();
    for (cuda, _) in backends("softmax_scales_match_reference") {
        for (i, sh) in SHAPES.iter().enumerate().take(4).skip(2) {
            let c = case(i, sh);
            let proj = || Projection::draw(ProjectionConfig::new(sh.5, sh.3, i as u64)).expect("projection");
            let maps = [
                positive(proj()).with_softmax_scale(1.3).expect("valid scale"),
                FeatureMap::generalized(Elementwise::Softplus, Some(proj()), true, 1e-3)
                    .with_softmax_scale(0.02)
                    .expect("valid scale"),
            ];
            for map in &maps {
                let (cq, ck) = c.qk_for(map);
                for opts in directions() {
                    let p = Problem::new(c.shape, map).with_options(opts);
                    let t = |x: &[f32]| HostTensor::from_f32(DType::F32, x);
                    let (q, k, v, g) = (t(&cq), t(&ck), t(&c.v), t(&c.dout));
                    let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: Some(&c.mask) };
                    let what = format!("softmax scale {:?} {} {:?}", sh, map.name(), opts.direction);
                    let mut out = HostTensor::zeros(DType::F32, c.shape.v_len());
                    cuda.forward(&p, inputs, out.view_mut()).expect("cuda forward");
                    let want = ReferenceBackend.forward_f64(&p, inputs).expect("reference");
                    let e = assert_close(&what, &out.to_f64_vec(), &want, tolerance(DType::F32, false));
                    worst.note("f32 output".into(), e);
                    let s = c.shape;
                    let zeros = |n| HostTensor::zeros(DType::F32, n);
                    let (mut dq, mut dk, mut dv) = (zeros(s.qk_len()), zeros(s.qk_len()), zeros(s.v_len()));
                    let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() };
                    cuda.backward(&p, inputs, g.view(), grads).expect("cuda backward");
                    check_grads(&what, &p, inputs, &g, [&dq, &dk, &dv], &mut worst);
                }
            }
        }
    }
    worst.print("softmax_scales_match_reference");
}

/// Cross-attention (bidirectional, kv_len ≠ len): fewer keys than queries and more, one of
/// either, lengths across the reduction segments on both sides, masked keys, grouped heads,
/// f32 and bf16 storage, forward and backward.
#[test]
fn cross_attention_matches_reference() {
    const LENGTHS: [(usize, usize); 6] = [(1, 5), (9, 1), (17, 130), (130, 17), (33, 70), (1100, 45)];
    let mut worst = Worst::default();
    for (cuda, emulated) in backends("cross_attention_matches_reference") {
        for (i, &(len, kv_len)) in LENGTHS.iter().enumerate() {
            if emulated && len > 500 {
                continue;
            }
            let (heads, kv_heads) = if i % 2 == 0 { (2, 1) } else { (3, 3) };
            let (d, dv, m) = (9, 7, 17);
            let shape = AttentionShape::new(2, heads, len, d).with_dv(dv).with_kv_len(kv_len).with_kv_heads(kv_heads);
            let proj = || Projection::draw(ProjectionConfig::new(m, d, 70 + i as u64)).expect("projection");
            let maps = [positive(proj()), FeatureMap::generalized(Elementwise::EluPlusOne, Some(proj()), true, 1e-3)];
            for (map, dtype) in maps.iter().flat_map(|m| [(m, DType::F32), (m, DType::Bf16)]) {
                let t = |n: usize, scale: f32, seed: u64| HostTensor::from_f32(dtype, &randn(n, scale, seed));
                let (q, k) = (t(shape.qk_len(), 0.6, 1 + i as u64), t(shape.k_len(), 0.6, 2 + i as u64));
                let (v, g) = (t(shape.v_len(), 1.0, 3 + i as u64), t(shape.out_len(), 1.0, 4 + i as u64));
                // Every second key of the second sequence dropped (one sequence keeps them all).
                let mask: Vec<bool> = (0..shape.mask_len()).map(|j| j < kv_len || j % 2 == 0).collect();
                let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: Some(&mask) };
                let p = Problem::new(shape, map);
                let what = format!("cross-attention {len} queries × {kv_len} keys, {} {dtype}", map.name());
                let zeros = |n| HostTensor::zeros(dtype, n);
                let mut out = zeros(shape.out_len());
                cuda.forward(&p, inputs, out.view_mut()).expect("cuda forward");
                let want = ReferenceBackend.forward_f64(&p, inputs).expect("reference");
                worst.note(
                    format!("{dtype} output"),
                    assert_close(&what, &out.to_f64_vec(), &want, tolerance(dtype, false)),
                );
                let (mut dq, mut dk, mut dv) = (zeros(shape.qk_len()), zeros(shape.k_len()), zeros(shape.v_len()));
                let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() };
                cuda.backward(&p, inputs, g.view(), grads).expect("cuda backward");
                check_grads(&what, &p, inputs, &g, [&dq, &dk, &dv], &mut worst);
            }
        }
        // Causal attention needs a key per query: the reference's typed error.
        let shape = AttentionShape::new(1, 1, 3, 4).with_kv_len(5);
        let map = positive(Projection::draw(ProjectionConfig::new(8, 4, 1)).expect("projection"));
        let t = |n: usize| HostTensor::from_f32(DType::F32, &randn(n, 0.5, n as u64));
        let (q, k, v) = (t(shape.qk_len()), t(shape.k_len()), t(shape.v_len()));
        let mut out = HostTensor::zeros(DType::F32, shape.out_len());
        let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: None };
        let causal = Problem::new(shape, &map).with_options(AttentionOptions::causal());
        let r = cuda.forward(&causal, inputs, out.view_mut());
        assert!(matches!(r, Err(FavorError::InvalidParameter { name: "kv_len", .. })), "{r:?}");
    }
    worst.print("cross_attention_matches_reference");
}

/// Forward and backward on device tensors; (out, dq, dk, dv) rows downloaded and gathered
/// contiguous.
fn device_run(
    dev: &CudaBackend,
    p: &Problem<'_>,
    inputs: Inputs<'_, favor_cuda::CudaMem>,
    dout: favor_cuda::DeviceRef<'_>,
) -> [Vec<f64>; 4] {
    use favor_core::TensorArg as A;
    let s = p.shape;
    // Exactly the tensor's size, or what its strides reach.
    let zeros = |arg: A, n: usize| {
        let n = p.layout.given(arg).map_or(n, |st| favor_core::layout::extent("t", p.dims(arg), st).expect("extent"));
        dev.alloc(DType::F32, n).expect("alloc")
    };
    let (mut o, mut dq) = (zeros(A::Out, s.out_len()), zeros(A::Dq, s.qk_len()));
    let (mut dk, mut dv) = (zeros(A::Dk, s.k_len()), zeros(A::Dv, s.v_len()));
    dev.forward(p, inputs, o.as_mut()).expect("device forward");
    let grads = Grads { dq: dq.as_mut(), dk: dk.as_mut(), dv: dv.as_mut() };
    dev.backward(p, inputs, dout, grads).expect("device backward");
    let down = |x: &favor_cuda::DeviceTensor, arg: A| {
        let mut h = HostTensor::zeros(DType::F32, x.len());
        dev.download(x, h.view_mut()).expect("download");
        favor_core::layout::gather(h.view(), p.dims(arg), p.strides(arg)).expect("rows").to_f64_vec()
    };
    [down(&o, A::Out), down(&dq, A::Dq), down(&dk, A::Dk), down(&dv, A::Dv)]
}

#[test]
fn strided_host_and_device_tensors_match_the_contiguous_layout() {
    let mut worst = Worst::default();
    for (cuda, emulated) in backends("strided_host_tensors_match_the_contiguous_layout") {
        let shapes: &[AttentionShape] = if emulated {
            &[AttentionShape::new(1, 2, 9, 5)]
        } else {
            &[AttentionShape::new(1, 2, 9, 5), AttentionShape::new(2, 3, 300, 16).with_dv(8)]
        };
        for (i, &shape) in shapes.iter().enumerate() {
            let proj = Projection::draw(ProjectionConfig::new(12, shape.d, 9 + i as u64)).expect("projection");
            for map in [positive(proj), FeatureMap::elu_plus_one()] {
                for opts in directions() {
                    let p = Problem::new(shape, &map).with_options(opts);
                    let what = format!("layouts {shape:?} {} {:?}", map.name(), opts.direction);
                    let run = favor_core::testing::assert_layouts_agree(&cuda, &p, DType::F32, true, 3, 1.0);
                    let want =
                        favor_core::testing::assert_layouts_agree(&ReferenceBackend, &p, DType::F32, true, 3, 1.0);
                    worst.note(
                        "f32 output".into(),
                        assert_close(&what, &run.out, &want.out, tolerance(DType::F32, false)),
                    );
                    worst.note("f32 dv".into(), assert_close(&what, &run.dv, &want.dv, tolerance(DType::F32, true)));
                }
            }
        }
        // Device tensors in the caller's layout: the kernels read and write them in place and
        // give what the contiguous layout gives, bit for bit.
        let shape = AttentionShape::new(2, 3, 7, 4);
        let map = FeatureMap::elu_plus_one();
        let dev = cuda.device();
        for opts in directions() {
            let base = Problem::new(shape, &map).with_options(opts);
            let t = |n: usize, seed: u64| HostTensor::from_f32(DType::F32, &randn(n, 0.5, seed));
            let (q, k, v, g) = (t(shape.qk_len(), 1), t(shape.k_len(), 2), t(shape.v_len(), 3), t(shape.out_len(), 4));
            let up = |x: &HostTensor| dev.upload(x.view()).expect("upload");
            let (qd, kd, vd, gd) = (up(&q), up(&k), up(&v), up(&g));
            let contiguous = {
                let inputs = Inputs { q: qd.as_ref(), k: kd.as_ref(), v: vd.as_ref(), key_mask: None };
                device_run(dev, &base, inputs, gd.as_ref())
            };
            for (name, layout) in favor_core::testing::test_layouts(&shape) {
                let p = base.with_layout(layout);
                let place = |x: &HostTensor, arg: favor_core::TensorArg, buf: &mut HostTensor, off: usize| {
                    let HostTensor::F32(b) = buf else { unreachable!() };
                    favor_core::layout::scatter(x.view(), (&mut b[off..]).into(), p.dims(arg), p.strides(arg))
                        .expect("fits");
                };
                use favor_core::TensorArg as A;
                let hd = shape.heads * shape.d;
                let span = |arg| favor_core::layout::extent("t", p.dims(arg), p.strides(arg)).expect("extent");
                let nan = |n: usize| HostTensor::from_f32(DType::F32, &vec![f32::NAN; n]);
                let what = format!("device layout {name} {:?}", opts.direction);
                let got = if name == "packed-qkv" {
                    let mut buf = nan(span(A::Q) + 2 * hd);
                    place(&q, A::Q, &mut buf, 0);
                    place(&k, A::K, &mut buf, hd);
                    place(&v, A::V, &mut buf, 2 * hd);
                    let mut gb = nan(span(A::Dout));
                    place(&g, A::Dout, &mut gb, 0);
                    let (b, gbd) = (up(&buf), up(&gb));
                    let qkv = b.as_ref();
                    let inputs =
                        Inputs { q: qkv, k: qkv.skip(hd).expect("k"), v: qkv.skip(2 * hd).expect("v"), key_mask: None };
                    device_run(dev, &p, inputs, gbd.as_ref())
                } else {
                    let one = |x: &HostTensor, arg| {
                        let mut buf = nan(span(arg));
                        place(x, arg, &mut buf, 0);
                        up(&buf)
                    };
                    let (qs, ks, vs, gs) = (one(&q, A::Q), one(&k, A::K), one(&v, A::V), one(&g, A::Dout));
                    let inputs = Inputs { q: qs.as_ref(), k: ks.as_ref(), v: vs.as_ref(), key_mask: None };
                    device_run(dev, &p, inputs, gs.as_ref())
                };
                for (i, (a, b)) in got.iter().zip(&contiguous).enumerate() {
                    assert!(a == b, "{what}: tensor {i} (out, dq, dk, dv) differs from the contiguous layout");
                }
            }
        }
    }
    worst.print("strided_host_tensors_match_the_contiguous_layout");
}

#[test]
fn grouped_heads_match_reference() {
    let mut worst = Worst::default();
    for (cuda, emulated) in backends("grouped_heads_match_reference") {
        // (batch, heads, kv_heads, len, d, d_v, m): groups of 2 and 3, multi-query.
        let mut shapes = vec![(2, 4, 2, 9, 5, 3, 9), (1, 3, 1, 33, 8, 5, 17)];
        if !emulated {
            shapes.push((2, 8, 2, 700, 64, 64, 256));
        }
        for (i, &(b, h, hk, l, d, dv, m)) in shapes.iter().enumerate() {
            let shape = AttentionShape::new(b, h, l, d).with_dv(dv).with_kv_heads(hk);
            let seed = 500 + 10 * i as u64;
            let mask: Vec<bool> = (0..b * l).map(|j| j % l == 0 || j % 3 != 1).collect();
            let proj = || Projection::draw(ProjectionConfig::new(m, d, seed)).expect("projection");
            for map in [positive(proj()), FeatureMap::trigonometric(proj()), FeatureMap::elu_plus_one()] {
                let std = qk_std(&map, d);
                for opts in directions() {
                    for dtype in [DType::F32, DType::Bf16] {
                        let t = |n: usize, s: f32, k: u64| HostTensor::from_f32(dtype, &randn(n, s, seed + k));
                        let (q, k, v) = (t(shape.qk_len(), std, 1), t(shape.k_len(), std, 2), t(shape.v_len(), 1.0, 3));
                        let g = t(shape.out_len(), 1.0, 4);
                        let p = Problem::new(shape, &map).with_options(opts);
                        let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: Some(&mask) };
                        let what = format!("grouped {shape:?} {} {:?} {dtype}", map.name(), opts.direction);
                        let kappa = denominator_condition(&p, inputs);
                        assert!(kappa <= TRIG_KAPPA_MAX, "{what}: ill-conditioned denominators (κ = {kappa:.1e})");
                        let want = ReferenceBackend.forward_f64(&p, inputs).expect("reference");
                        let mut out = HostTensor::zeros(dtype, shape.out_len());
                        cuda.forward(&p, inputs, out.view_mut()).expect("cuda forward");
                        worst.note(
                            format!("{dtype} output"),
                            assert_close(&what, &out.to_f64_vec(), &want, tolerance(dtype, false)),
                        );
                        let zeros = |n| HostTensor::zeros(dtype, n);
                        let (mut gq, mut gk, mut gv) =
                            (zeros(shape.qk_len()), zeros(shape.k_len()), zeros(shape.v_len()));
                        let grads = Grads { dq: gq.view_mut(), dk: gk.view_mut(), dv: gv.view_mut() };
                        cuda.backward(&p, inputs, g.view(), grads).expect("cuda backward");
                        check_grads(&what, &p, inputs, &g, [&gq, &gk, &gv], &mut worst);
                    }
                }
            }
            // Every layout (packed QKV with fewer key/value heads included) bit for bit, and
            // chunked decoding continues the grouped causal state.
            let map = positive(proj());
            for opts in directions() {
                let p = Problem::new(shape, &map).with_options(opts);
                favor_core::testing::assert_layouts_agree(&cuda, &p, DType::F32, true, seed, 1.0);
            }
            let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
            let (q, k, v) = (
                randn(shape.qk_len(), 0.5, seed),
                randn(shape.k_len(), 0.5, seed + 1),
                randn(shape.v_len(), 1.0, seed + 2),
            );
            let got = favor_core::testing::decode_in_chunks(&cuda, &p, [&q, &k, &v], &[l / 2, 1, l - l / 2 - 1])
                .expect("decode");
            let inputs = Inputs { q: q[..].into(), k: k[..].into(), v: v[..].into(), key_mask: None };
            let want = ReferenceBackend.forward_f64(&p, inputs).expect("reference");
            let got: Vec<f64> = got.iter().map(|&x| x as f64).collect();
            worst.note("f32 decode".into(), assert_close(&format!("grouped decode {shape:?}"), &got, &want, TOL_OUT));
            // V of the last key/value head beyond the f32 range: its group is recomputed in f64.
            let mut vb = v.clone();
            let n = l * dv;
            vb[(shape.kv_problems() - 1) * n..].iter_mut().for_each(|x| *x *= 1e10);
            let g = randn(shape.out_len(), 1.0, seed + 3);
            for opts in directions() {
                let p = Problem::new(shape, &map).with_options(opts);
                let inputs = Inputs { q: q[..].into(), k: k[..].into(), v: vb[..].into(), key_mask: None };
                let gt = HostTensor::from_f32(DType::F32, &g);
                let (mut gq, mut gk, mut gv) = (
                    HostTensor::zeros(DType::F32, shape.qk_len()),
                    HostTensor::zeros(DType::F32, shape.k_len()),
                    HostTensor::zeros(DType::F32, shape.v_len()),
                );
                let grads = Grads { dq: gq.view_mut(), dk: gk.view_mut(), dv: gv.view_mut() };
                cuda.backward(&p, inputs, gt.view(), grads).expect("cuda backward");
                let what = format!("grouped large V {shape:?} {:?}", opts.direction);
                let want = ReferenceBackend.backward_f64(&p, inputs, gt.view()).expect("reference");
                for (name, got, want) in [("dq", &gq, &want.dq), ("dk", &gk, &want.dk), ("dv", &gv, &want.dv)] {
                    assert_close(&format!("{what} {name}"), &got.to_f64_vec(), want, 1e-4);
                }
            }
        }
    }
    worst.print("grouped_heads_match_reference");
}

/// The slot decoder (prefill chunks and one-token steps for subsets of slots in one call, resets,
/// copies, byte round trips, also into the reference) against full causal attention per slot;
/// its misuse gives the reference's typed errors.
#[test]
fn slots_match_reference() {
    use favor_core::testing::slots::{assert_slot_decoding, assert_slot_errors, slot_cases};
    let want = assert_slot_errors(&ReferenceBackend);
    for (cuda, _) in backends("slots_match_reference") {
        for case in slot_cases() {
            assert_slot_decoding(&cuda, &case, 1e-4);
        }
        assert_eq!(assert_slot_errors(&cuda), want, "{}", cuda.name());
    }
}

/// Ragged batches (cu_seqlens offsets, empty and one-token sequences, grouped heads) against
/// the reference over each sequence alone, forward and backward; misuse gives the reference's
/// typed errors. Cross-attention and maps without a kernel are unsupported here and skipped.
#[test]
fn ragged_batches_match_reference() {
    use favor_core::testing::ragged::{assert_ragged_errors, assert_ragged_matches, ragged_cases};
    let want = assert_ragged_errors(&ReferenceBackend);
    for (cuda, _) in backends("ragged_batches_match_reference") {
        for case in ragged_cases() {
            assert_ragged_matches(&cuda, &case, 1e-4, 2e-4);
        }
        assert_eq!(assert_ragged_errors(&cuda), want, "{}", cuda.name());
    }
}
