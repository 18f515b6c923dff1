//! The slot decoder's contract, checked the same way on every backend: a random serving
//! schedule (prefill chunks and one-token steps for random subsets of slots, in random order,
//! with resets, copies and an export/import through bytes) must give, for every slot, full
//! causal attention over the tokens that slot consumed.

use super::{TestRng, gaussian, index, max_abs, max_abs_diff, rng};
use crate::layout::{TensorDims, gather, scatter};
use crate::slots::{SlotChunks, SlotState};
use crate::{
    AttentionOptions, AttentionShape, FavorBackend, FavorError, FeatureMap, Host, Inputs, Layout, Problem, Projection,
    ProjectionConfig, ReferenceBackend, Strides,
};

/// One slot-decoding scenario.
#[derive(Debug, Clone)]
pub struct SlotCase {
    /// Name in messages.
    pub name: &'static str,
    /// The state's shape: `batch` slots (`len` is ignored).
    pub shape: AttentionShape,
    /// Feature map.
    pub map: FeatureMap,
    /// Tensors `[1, L, H, ·]` (what projections give) instead of `[1, H, L, ·]`.
    pub blhd: bool,
    /// Random key padding.
    pub masked: bool,
    /// Calls in the schedule.
    pub calls: usize,
    /// Longest prefill chunk.
    pub max_chunk: usize,
    /// Schedule seed.
    pub seed: u64,
}

/// Scenarios: grouped heads, odd sizes, every layout, masks, chunks longer than the SIMD and
/// CUDA chunk (64 tokens).
pub fn slot_cases() -> Vec<SlotCase> {
    let draw = |m: usize, d: usize, seed: u64| Projection::draw(ProjectionConfig::new(m, d, seed)).expect("valid");
    vec![
        SlotCase {
            name: "gqa, [1, L, H, d], masked",
            shape: AttentionShape::new(5, 4, 1, 9).with_dv(7).with_kv_heads(2),
            map: FeatureMap::positive(draw(13, 9, 3)),
            blhd: true,
            masked: true,
            calls: 14,
            max_chunk: 80,
            seed: 1,
        },
        SlotCase {
            name: "mha, [1, H, L, d]",
            shape: AttentionShape::new(3, 2, 1, 8),
            map: FeatureMap::positive(draw(16, 8, 5)),
            blhd: false,
            masked: false,
            calls: 10,
            max_chunk: 150,
            seed: 2,
        },
        SlotCase {
            name: "mqa, relu map",
            shape: AttentionShape::new(4, 3, 1, 5).with_dv(3).with_kv_heads(1),
            map: FeatureMap::relu(Some(draw(11, 5, 7))),
            blhd: true,
            masked: false,
            calls: 10,
            max_chunk: 40,
            seed: 3,
        },
    ]
}

/// The tokens a slot has consumed and the outputs it produced for them.
#[derive(Clone, Default)]
struct History {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    keep: Vec<bool>,
    out: Vec<f32>,
}

impl History {
    fn len(&self, s: &AttentionShape) -> usize {
        self.q.len() / (s.heads * s.d)
    }
}

/// The dims and `[1, L, heads, width]` strides of token-major rows.
fn token_rows(x: &[f32], heads: usize, width: usize) -> (TensorDims, Strides) {
    let rows = x.len() / (heads * width);
    (TensorDims { batch: 1, heads, rows, width }, Strides::blhd(heads, rows, width))
}

/// Token-major `[1, L, heads, width]` rows → `[1, heads, L, width]`.
pub(super) fn heads_major(x: &[f32], heads: usize, width: usize) -> Vec<f32> {
    let (dims, strides) = token_rows(x, heads, width);
    gather(x.into(), dims, strides).expect("whole rows").to_f32_vec()
}

/// Inverse of [`heads_major`].
pub(super) fn token_major(x: &[f32], heads: usize, width: usize) -> Vec<f32> {
    let (dims, strides) = token_rows(x, heads, width);
    let mut out = vec![0.0; x.len()];
    scatter(x.into(), out.as_mut_slice().into(), dims, strides).expect("whole rows");
    out
}

struct Runner<'b, B: FavorBackend<Mem = Host>> {
    backend: &'b B,
    case: SlotCase,
    rng: TestRng,
}

impl<B: FavorBackend<Mem = Host>> Runner<'_, B> {
    fn s(&self) -> AttentionShape {
        self.case.shape
    }

    /// Continues `slots` by the given numbers of fresh random tokens in one call, recording
    /// tokens and outputs in their histories.
    fn step(&mut self, state: &mut B::State, hist: &mut [History], plan: &[(usize, usize)]) {
        let s = self.s();
        let (hk, d, dv) = (s.key_heads(), s.d, s.dv);
        let total: usize = plan.iter().map(|&(_, n)| n).sum();
        let mut offsets = vec![0];
        let (mut q, mut k, mut v, mut keep) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(_, n) in plan {
            offsets.push(offsets.last().unwrap() + n);
            let g = |rng: &mut TestRng, len| gaussian(rng, len, 0.5).into_iter().map(|x| x as f32).collect::<Vec<_>>();
            q.extend(g(&mut self.rng, n * s.heads * d));
            k.extend(g(&mut self.rng, n * hk * d));
            v.extend(g(&mut self.rng, n * hk * dv).into_iter().map(|x| 2.0 * x));
            for _ in 0..n {
                keep.push(!self.case.masked || index(&mut self.rng, 4) != 0);
            }
        }
        let slots: Vec<usize> = plan.iter().map(|&(slot, _)| slot).collect();
        let shape = AttentionShape { batch: 1, len: total, ..s };
        let layout = if self.case.blhd { Layout::blhd(&shape) } else { Layout::default() };
        let arrange = |x: &[f32], heads, width| if self.case.blhd { x.to_vec() } else { heads_major(x, heads, width) };
        let (qa, ka, va) = (arrange(&q, s.heads, d), arrange(&k, hk, d), arrange(&v, hk, dv));
        let mut out = vec![0.0f32; total * s.heads * dv];
        let p = Problem { shape, map: &self.case.map, options: AttentionOptions::causal(), layout };
        let inputs = Inputs {
            q: (&qa).into(),
            k: (&ka).into(),
            v: (&va).into(),
            key_mask: self.case.masked.then_some(&keep[..]),
        };
        self.backend
            .decode_slots(&p, state, SlotChunks::new(&slots, &offsets), inputs, (&mut out).into())
            .unwrap_or_else(|e| panic!("{}: {}: decode_slots {plan:?}: {e}", self.backend.name(), self.case.name));
        let out = if self.case.blhd { out } else { token_major(&out, s.heads, dv) };
        for (i, &(slot, _)) in plan.iter().enumerate() {
            let (a, b) = (offsets[i], offsets[i + 1]);
            let h = &mut hist[slot];
            h.q.extend_from_slice(&q[a * s.heads * d..b * s.heads * d]);
            h.k.extend_from_slice(&k[a * hk * d..b * hk * d]);
            h.v.extend_from_slice(&v[a * hk * dv..b * hk * dv]);
            h.keep.extend_from_slice(&keep[a..b]);
            h.out.extend_from_slice(&out[a * s.heads * dv..b * s.heads * dv]);
        }
    }

    /// Asserts that a slot's outputs are full causal attention (f64 reference) over its
    /// history and that it counts its tokens.
    fn check(&self, state: &B::State, hist: &History, slot: usize, tol: f64) {
        let s = self.s();
        let what = format!("{}: {}: slot {slot}", self.backend.name(), self.case.name);
        let l = hist.len(&s);
        let read = self.backend.read_slot(state, slot).unwrap_or_else(|e| panic!("{what}: read_slot: {e}"));
        assert_eq!(read.tokens(), l as u64, "{what}: tokens consumed");
        if l == 0 {
            return;
        }
        let shape = AttentionShape { batch: 1, len: l, ..s };
        let p = Problem::new(shape, &self.case.map)
            .with_options(AttentionOptions::causal())
            .with_layout(Layout::blhd(&shape));
        let inputs = Inputs {
            q: (&hist.q).into(),
            k: (&hist.k).into(),
            v: (&hist.v).into(),
            key_mask: self.case.masked.then_some(&hist.keep[..]),
        };
        let want = token_major(
            &ReferenceBackend.forward_f64(&p, inputs).expect("reference").iter().map(|&x| x as f32).collect::<Vec<_>>(),
            s.heads,
            s.dv,
        );
        let got: Vec<f64> = hist.out.iter().map(|&x| x as f64).collect();
        let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        let err = max_abs_diff(&got, &want) / max_abs(&want).max(1e-30);
        assert!(err <= tol, "{what}: {l} tokens: error {err:.2e} > {tol:.0e} against causal attention over the slot");
    }
}

/// Runs `case` on `backend` and checks every slot after every call against full causal
/// attention over its tokens (max error relative to the largest output ≤ `tol`). The schedule
/// mixes prefill chunks up to `max_chunk` and one-token steps for random subsets of slots in
/// random order; it resets a slot, copies one slot over another (which then continues with its
/// own tokens), exports a slot as bytes into a fresh state, and imports this backend's slot into
/// the reference backend, which must continue it alike.
pub fn assert_slot_decoding<B: FavorBackend<Mem = Host>>(backend: &B, case: &SlotCase, tol: f64) {
    let s = case.shape;
    let n = s.batch;
    let mut run = Runner { backend, case: case.clone(), rng: rng(case.seed) };
    let state_problem = Problem::new(s, &case.map).with_options(AttentionOptions::causal());
    let mut state = backend.new_state(&state_problem).expect("new_state");
    let mut hist = vec![History::default(); n];
    for call in 0..case.calls {
        // A random subset of the slots (at least one), in random order.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, index(&mut run.rng, i + 1));
        }
        let take = 1 + index(&mut run.rng, n);
        let mut plan: Vec<(usize, usize)> = order[..take]
            .iter()
            .map(|&slot| {
                let len = match index(&mut run.rng, 3) {
                    0 => 1 + index(&mut run.rng, case.max_chunk),
                    1 => 0,
                    _ => 1,
                };
                (slot, len)
            })
            .collect();
        // A call has at least one token (len = 0 is rejected like everywhere).
        if plan.iter().all(|&(_, len)| len == 0) {
            plan[0].1 = 1;
        }
        run.step(&mut state, &mut hist, &plan);
        match call % 5 {
            // Prefix sharing: slot b becomes a copy of slot a, then goes its own way.
            2 => {
                let (a, b) = (order[0], order[n - 1]);
                backend.copy_slot(&mut state, a, b).expect("copy_slot");
                hist[b] = hist[a].clone();
            }
            4 => {
                let c = order[0];
                backend.reset_slot(&mut state, c).expect("reset_slot");
                hist[c] = History::default();
            }
            _ => {}
        }
        for (slot, h) in hist.iter().enumerate() {
            run.check(&state, h, slot, tol);
        }
    }
    // Export a slot through bytes into another slot of a fresh state: both continue alike.
    let bytes = backend.read_slot(&state, 0).expect("read_slot").to_bytes();
    let value = SlotState::from_bytes(&bytes).expect("from_bytes");
    let mut fresh = backend.new_state(&state_problem).expect("new_state");
    let last = n - 1;
    backend.write_slot(&mut fresh, last, &value).expect("write_slot");
    let mut fresh_hist = vec![History::default(); n];
    fresh_hist[last] = hist[0].clone();
    run.rng = rng(case.seed ^ 0xfeed);
    run.step(&mut fresh, &mut fresh_hist, &[(last, 3)]);
    run.check(&fresh, &fresh_hist[last], last, tol);
    // The reference continues this backend's slot like full causal attention too: the slot's
    // values mean the same on every backend.
    let mut on_reference = ReferenceBackend.new_state(&state_problem).expect("new_state");
    ReferenceBackend.write_slot(&mut on_reference, 0, &value).expect("write_slot into the reference");
    let mut ref_hist = vec![History::default(); n];
    ref_hist[0] = hist[0].clone();
    let mut on_ref = Runner { backend: &ReferenceBackend, case: case.clone(), rng: rng(case.seed ^ 0xbeef) };
    on_ref.step(&mut on_reference, &mut ref_hist, &[(0, 5)]);
    on_ref.check(&on_reference, &ref_hist[0], 0, tol);
}

/// Every way to misuse the slot decoder, run on `backend`: each must be the typed error that
/// names the argument. Returns the errors, in order, so that backends can be compared.
pub fn assert_slot_errors<B: FavorBackend<Mem = Host>>(backend: &B) -> Vec<FavorError> {
    let s = AttentionShape::new(3, 2, 1, 4).with_dv(3);
    let draw = |seed| FeatureMap::positive(Projection::draw(ProjectionConfig::new(6, 4, seed)).expect("valid"));
    let map = draw(1);
    let causal = AttentionOptions::causal();
    let mut state = backend.new_state(&Problem::new(s, &map).with_options(causal)).expect("new_state");
    let call = |state: &mut B::State, batch: usize, len: usize, slots: &[usize], offsets: &[usize]| {
        let shape = AttentionShape { batch, len, ..s };
        let q = vec![0.25f32; shape.qk_len()];
        let v = vec![0.5f32; shape.v_len()];
        let mut out = vec![0.0f32; shape.out_len()];
        let inputs = Inputs { q: (&q).into(), k: (&q).into(), v: (&v).into(), key_mask: None };
        let p = Problem::new(shape, &map).with_options(causal);
        backend.decode_slots(&p, state, SlotChunks::new(slots, offsets), inputs, (&mut out).into())
    };
    let what = backend.name();
    let mut errors = Vec::new();
    let mut expect = |r: crate::Result<()>, name: &str| {
        let e = r.expect_err(&format!("{what}: `{name}` misuse accepted"));
        let named = match &e {
            FavorError::InvalidParameter { name: n, .. } => *n,
            FavorError::Shape { arg, .. } => *arg,
            FavorError::StateMismatch { field, .. } => *field,
            other => panic!("{what}: `{name}`: unexpected error kind {other:?}"),
        };
        assert_eq!(named, name, "{what}: {e}");
        errors.push(e);
    };
    expect(call(&mut state, 2, 2, &[0], &[0, 2]), "batch");
    expect(call(&mut state, 1, 2, &[0], &[0, 1, 2]), "offsets");
    expect(call(&mut state, 1, 2, &[0, 1], &[1, 1, 2]), "offsets");
    expect(call(&mut state, 1, 3, &[0, 1], &[0, 2, 1]), "offsets");
    expect(call(&mut state, 1, 3, &[0, 1], &[0, 1, 2]), "offsets");
    expect(call(&mut state, 1, 2, &[0, 3], &[0, 1, 2]), "slots");
    expect(call(&mut state, 1, 2, &[1, 1], &[0, 1, 2]), "slots");
    // Misuse changed nothing: every slot is still empty.
    for slot in 0..3 {
        assert_eq!(backend.read_slot(&state, slot).expect("read_slot").tokens(), 0, "{what}: slot {slot}");
    }
    assert_eq!(call(&mut state, 1, 3, &[2, 0], &[0, 2, 3]), Ok(()), "{what}: a valid call");
    expect(backend.read_slot(&state, 3).map(|_| ()), "slot");
    expect(backend.reset_slot(&mut state, 3), "slot");
    expect(backend.copy_slot(&mut state, 3, 0), "from");
    expect(backend.copy_slot(&mut state, 0, 3), "to");
    // A slot of a state made for another map, or other sizes, does not fit.
    let other_map = draw(2);
    let other = backend.new_state(&Problem::new(s, &other_map).with_options(causal)).expect("new_state");
    let foreign = backend.read_slot(&other, 0).expect("read_slot");
    expect(backend.write_slot(&mut state, 0, &foreign), "feature map (fingerprint)");
    let wider = backend.new_state(&Problem::new(s.with_dv(4), &map).with_options(causal)).expect("new_state");
    expect(backend.write_slot(&mut state, 0, &backend.read_slot(&wider, 0).expect("read_slot")), "d_v");
    // Bytes of another version, truncated or altered.
    let bytes = backend.read_slot(&state, 2).expect("read_slot").to_bytes();
    assert_eq!(SlotState::from_bytes(&bytes).map(|v| v.tokens()), Ok(2), "{what}: round trip");
    let mut versioned = bytes.clone();
    versioned[8] += 1;
    let mut altered = bytes.clone();
    let at = bytes.len() / 2;
    altered[at] ^= 1;
    for bad in [&versioned[..], &bytes[..bytes.len() - 1], &altered[..], b"FAVORSLT"] {
        expect(SlotState::from_bytes(bad).map(|_| ()), "slot bytes");
    }
    // Values that are not finite never reach a state.
    let good = SlotState::from_bytes(&bytes).expect("round trip");
    let mut heads = good.heads().to_vec();
    heads[0].s[1] = f64::NAN;
    expect(SlotState::new(*good.signature(), 2, heads).map(|_| ()), "heads");
    errors
}
