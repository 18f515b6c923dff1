//! [`SimdBackend`]: the favor-core backend trait on the CPU kernels, with rayon across
//! (batch, head) and across sequence segments.
//!
//! Work is cut into tasks that depend only on the shape (never on the thread count) and partial
//! sums are combined in task order, so results are bitwise identical for any number of threads.

use crate::isa::{Isa, IsaToken, best_isa, pad};
use crate::kernels::bidirectional::{
    KeyBackward, KeySegment, KeyState, QueryBackward, QueryForward, SegmentSums, combine,
};
use crate::kernels::causal::{
    BackwardForwardSweep, BackwardHeads, BackwardReverseSweep, CausalForward, CausalSummary, GroupHeads, HeadState,
    Stash, StashPlace, Suffix, SweepOut, combine_summary,
};
use crate::kernels::features::{ParamAcc, Plan, reduce_params};
use crate::kernels::gemm::transpose;
use crate::kernels::rows::SharedOut;
use crate::kernels::standalone::{FeatureBackwardTask, FeatureMapTask};
use crate::kernels::{HeadIn, HeadRows, TILE, zeroed};
use crate::scan::{Scanned, scan_inputs};
use favor_core::attention::{Head, bidirectional_backward, bidirectional_forward, causal_backward, causal_forward};
use favor_core::backend::{
    check_allocatable, check_backward, check_f64_attention_buffers, check_finite, check_output, check_slot_write,
    check_tensor, try_with_capacity, validate_feature_call, validate_inputs, validate_slot_call,
};
use favor_core::layout::read_head_f64;
use favor_core::{
    AttentionShape, Direction, FavorBackend, FavorError, FeatureMap, FeatureRole, Grads, Host, HostMut, HostRef,
    Inputs, ParamGrads, Problem, Result, SlotChunks, SlotHead, SlotState, TensorArg, TensorHandle, saturate_f32,
};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// The CPU SIMD backend. Cheap to create and to clone; uses the global rayon pool (or the pool
/// it is called from, e.g. inside `ThreadPool::install`).
#[derive(Debug, Clone, Copy)]
pub struct SimdBackend {
    token: IsaToken,
}

impl Default for SimdBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl SimdBackend {
    /// A backend on [`best_isa`] (the widest supported ISA, or `FAVOR_ISA`).
    pub fn new() -> SimdBackend {
        let token = IsaToken::new(best_isa()).or_else(|| IsaToken::new(Isa::Portable));
        // The portable ISA is always supported.
        SimdBackend { token: token.unwrap_or_else(|| unreachable!("portable is always available")) }
    }

    /// A backend on a given ISA; `Err(NotAvailable)` when this CPU lacks it.
    pub fn with_isa(isa: Isa) -> Result<SimdBackend> {
        IsaToken::new(isa).map(|token| SimdBackend { token }).ok_or_else(|| FavorError::NotAvailable {
            backend: "favor-simd",
            reason: format!("this CPU does not support {}", isa.name()),
        })
    }

    /// The ISA this backend runs.
    pub fn isa(&self) -> Isa {
        self.token.isa()
    }
}

/// Decoding state: one [`HeadState`] per (batch, key/value head), batch-major: the query heads
/// of a group share their key/value head's state.
#[derive(Debug, Clone, PartialEq)]
pub struct SimdState {
    made_for: favor_core::StateSignature,
    heads: Vec<HeadState>,
    /// Tokens each slot (batch element) has consumed.
    tokens: Vec<usize>,
    /// Scratch of `decode_slots`: the call's sequence continuing each slot, [`NO_SEQUENCE`]
    /// between calls.
    sequence_of: Vec<usize>,
}

/// A slot that no sequence of the call continues.
const NO_SEQUENCE: usize = usize::MAX;

impl SimdState {
    /// What the state was made for (its batch is its number of slots).
    pub fn signature(&self) -> &favor_core::StateSignature {
        &self.made_for
    }
}

/// The segments a sequence of one head is cut into: consecutive row ranges of `size` rows
/// (the last one shorter).
#[derive(Debug, Clone, Copy)]
struct Segments {
    len: usize,
    size: usize,
}

impl Segments {
    /// Sequence segments of one head: fixed by the length alone (at most 8, at least 256
    /// tokens, whole tiles) so that a long single-head sequence still spreads over cores.
    fn of(len: usize) -> Segments {
        const MAX_SEGMENTS: usize = 8;
        Segments { len, size: (len.div_ceil(MAX_SEGMENTS).div_ceil(TILE) * TILE).max(4 * TILE) }
    }

    /// Causal segments of one head: the causal forward pays an extra summary pass (about a
    /// third of its work; the backward pays it and a suffix-sum product, about a sixth of its
    /// work) to split a sequence, so it splits only when there are fewer than 8 (batch,
    /// key/value head) problems (the tasks: a group's query heads run inside its key/value
    /// head's task), into at most 8 / problems segments of at least 1024 tokens.
    /// Depends on the shape alone.
    fn causal(problems: usize, len: usize) -> Segments {
        let n = if problems >= 8 { 1 } else { (8 / problems).min(len / 1024).max(1) };
        Segments { len, size: (len.div_ceil(n).div_ceil(TILE) * TILE).max(TILE) }
    }

    fn count(&self) -> usize {
        self.len.div_ceil(self.size)
    }

    /// Rows r0..r1 of segment `i`.
    fn get(&self, i: usize) -> (usize, usize) {
        (i * self.size, ((i + 1) * self.size).min(self.len))
    }
}

/// The buffers a forward call needs beyond the caller's tensors, kept by the calling thread
/// between calls so that repeated calls of one shape allocate nothing after the first (the
/// kernels keep their tile scratch per worker thread likewise). Taken out for the call and
/// given back at its end: a nested or concurrent call on the same thread makes its own.
#[derive(Default)]
struct CallScratch {
    /// One at-risk flag per (batch, query head).
    risk: Vec<AtomicBool>,
    /// Bidirectional: the sums of every key segment (then, in the backward, of every query
    /// segment), and the key state of every key/value head.
    segment_sums: Vec<SegmentSums>,
    key_states: Vec<KeyState>,
    /// Causal: the state entering every segment of every key/value head, and the summaries of
    /// all segments but the last.
    incoming: Vec<HeadState>,
    summaries: Vec<HeadState>,
    /// Bidirectional backward: (K'ᵀV)ᵀ per key/value head, the key-gradient partials of every
    /// query segment and their sums per key/value head.
    kvt: Vec<Vec<f32>>,
    key_grads: Vec<KeyGrads>,
    /// Causal backward: what each forward sweep leaves, and the suffix sums entering each
    /// segment.
    sweeps: Vec<SweepOut>,
    suffixes: Vec<Suffix>,
    /// Parameter-gradient partials of the query-side and key-side tasks (learned maps only).
    task_params: Vec<Option<ParamAcc>>,
    key_params: Vec<Option<ParamAcc>>,
    /// The largest per-head sum (elements) [`check_kernel_sums`] found allocatable: smaller ones
    /// need no new trial allocation.
    sums_checked: usize,
}

thread_local! {
    static CALL_SCRATCH: std::cell::Cell<Option<Box<CallScratch>>> = const { std::cell::Cell::new(None) };
}

/// Drops the calling thread's [`CallScratch`].
pub(crate) fn release_call_scratch() {
    CALL_SCRATCH.with(|c| drop(c.take()));
}

impl CallScratch {
    fn take() -> Box<CallScratch> {
        CALL_SCRATCH.with(|c| c.take()).unwrap_or_default()
    }

    fn give_back(self: Box<Self>) {
        CALL_SCRATCH.with(|c| c.set(Some(self)));
    }

    /// [`check_kernel_sums`], once per size.
    fn check_sums(&mut self, plan: &Plan, dv: usize) -> Result<()> {
        let n = plan.mfp.saturating_mul(pad(dv));
        if n > self.sums_checked {
            check_kernel_sums(plan, dv)?;
            self.sums_checked = n;
        }
        Ok(())
    }
}

/// One cleared at-risk flag per (batch, query head) of `s`, in `buf` (no allocation once sized).
fn risk_flags(buf: &mut Vec<AtomicBool>, s: AttentionShape) -> &[AtomicBool] {
    buf.clear();
    buf.resize_with(s.problems(), || AtomicBool::new(false));
    buf
}

/// The first `n` entries of `v`, grown with default entries if it is shorter. Never shrunk: the
/// entries past `n` keep their buffers for a later, larger call (calls of several shapes in turn
/// — a forward and its backward — allocate nothing).
fn prefix<T: Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize_with(n, T::default);
    }
    &mut v[..n]
}

/// dKV, its transpose and ds of one key/value head (bidirectional backward).
#[derive(Default)]
struct KeyGrads {
    dkv: Vec<f32>,
    dkvt: Vec<f32>,
    ds: Vec<f32>,
}

impl KeyGrads {
    /// The sum of `parts` (in order), and the transpose.
    fn add(&mut self, mfp: usize, dvp: usize, parts: &[SegmentSums]) {
        zeroed(&mut self.dkv, mfp * dvp);
        zeroed(&mut self.dkvt, dvp * mfp);
        zeroed(&mut self.ds, mfp);
        for part in parts {
            self.dkv.iter_mut().zip(&part.s).for_each(|(a, b)| *a += b);
            self.ds.iter_mut().zip(&part.z).for_each(|(a, b)| *a += b);
        }
        transpose::<wide::f32x8>(mfp, dvp, &self.dkv, dvp, &mut self.dkvt, mfp);
    }
}

/// The first `n` states of `v` (see [`prefix`]), each reset to an empty state of the plan.
fn reset_states<'v>(v: &'v mut Vec<HeadState>, n: usize, plan: &Plan, dv: usize) -> &'v mut [HeadState] {
    let v = prefix(v, n);
    v.iter_mut().for_each(|h| h.reset(plan, dv));
    v
}

/// Splits a mutable tensor into consecutive pieces of the given lengths.
fn split_mut<'a>(t: HostMut<'a>, sizes: &[usize]) -> Vec<HostMut<'a>> {
    fn go<'a, T>(mut s: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
        let mut out = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let (a, b) = std::mem::take(&mut s).split_at_mut(n);
            out.push(a);
            s = b;
        }
        out
    }
    match t {
        HostMut::F32(s) => go(s, sizes).into_iter().map(HostMut::F32).collect(),
        HostMut::F16(s) => go(s, sizes).into_iter().map(HostMut::F16).collect(),
        HostMut::Bf16(s) => go(s, sizes).into_iter().map(HostMut::Bf16).collect(),
    }
}

/// Query head `bh` of the inputs with the key/value head it reads; `risk` holds one at-risk flag
/// per query head (empty: not tracked).
fn head_in<'a: 'r, 'r>(p: &Problem<'_>, inputs: &Inputs<'a, Host>, bh: usize, risk: &'r [AtomicBool]) -> HeadIn<'r> {
    let s = p.shape;
    let b = bh / s.heads;
    let at = |arg| HeadRows::of(p.strides(arg), s.heads, bh);
    let kv_at = |arg| HeadRows::of(p.strides(arg), s.key_heads(), s.kv_head_of(bh));
    HeadIn {
        risk: risk.get(bh),
        q: inputs.q,
        k: inputs.k,
        v: inputs.v,
        q_at: at(TensorArg::Q),
        k_at: kv_at(TensorArg::K),
        v_at: kv_at(TensorArg::V),
        dout_at: at(TensorArg::Dout),
        mask: inputs.key_mask.map(|m| &m[b * s.keys()..(b + 1) * s.keys()]),
        d: s.d,
        dv: s.dv,
    }
}

/// An output tensor of the call, shared by its tasks.
fn shared_out<'a>(p: &Problem<'_>, arg: TensorArg, t: HostMut<'a>) -> Result<SharedOut<'a>> {
    SharedOut::new(t, p.dims(arg), p.strides(arg), arg.name())
}

/// The first query head reading key/value head `kvh`: it stands for the group in tasks that
/// read only keys and values.
fn lead(s: AttentionShape, kvh: usize) -> usize {
    s.query_heads_of(kvh).start
}

impl SimdBackend {
    /// The causal segments of every key/value head and, in `incoming` (head-major, one per
    /// segment), the state entering each: a summary pass over every segment but the last (from
    /// an empty state, in parallel), then an ordered combination per head (cheap: O(M·d_v) per
    /// segment).
    fn causal_incoming(
        &self,
        plan: &Plan,
        p: &Problem<'_>,
        inputs: &Inputs<'_, Host>,
        incoming: &mut Vec<HeadState>,
        summaries: &mut Vec<HeadState>,
    ) -> Segments {
        let s = p.shape;
        let segs = Segments::causal(s.kv_problems(), s.len);
        let nseg = segs.count();
        let incoming = reset_states(incoming, s.kv_problems() * nseg, plan, s.dv);
        if nseg == 1 {
            return segs;
        }
        let summaries = reset_states(summaries, s.kv_problems() * (nseg - 1), plan, s.dv);
        summaries.par_iter_mut().enumerate().for_each(|(i, state)| {
            let (kvh, (r0, r1)) = (i / (nseg - 1), segs.get(i % (nseg - 1)));
            self.token.run(CausalSummary { plan, io: head_in(p, inputs, lead(s, kvh), &[]), r0, r1, state })
        });
        incoming.par_chunks_mut(nseg).zip(summaries.par_chunks(nseg - 1)).for_each(|(states, sums)| {
            for (k, sum) in sums.iter().enumerate() {
                let (before, after) = states.split_at_mut(k + 1);
                combine_summary(&before[k], sum, &mut after[0]);
            }
        });
        segs
    }

    /// Continues every (slot, key/value head) state in `heads` (slot-major) whose slot
    /// `rows_of` maps to (batch element of the tensors, r0, r1) by those rows, writing its query
    /// heads' rows of `out`; the others are left alone. Allocates nothing (the decoding step).
    fn continue_slots(
        &self,
        p: &Problem<'_>,
        inputs: &Inputs<'_, Host>,
        out: &SharedOut<'_>,
        heads: &mut [HeadState],
        rows_of: impl Fn(usize) -> Option<(usize, usize, usize)> + Sync,
    ) {
        let s = p.shape;
        let plan = Plan::prepared(p.map, s.d);
        let (kvn, g, delta) = (s.key_heads(), s.group(), p.denominator_guard());
        heads.par_iter_mut().enumerate().for_each(|(i, state)| {
            let (slot, j) = (i / kvn, i % kvn);
            let Some((b, r0, r1)) = rows_of(slot) else { return };
            if r1 == r0 {
                return;
            }
            let first = b * s.heads + j * g;
            let make = |gi: usize| {
                // SAFETY: this task alone takes query heads first..first + g (those of its key/value
                // head j of batch element b) and each once per chunk, after the previous one is
                // dropped; other tasks have other slots (distinct: rows of other batch elements
                // or other sequences) or other key/value heads (other query heads).
                let rows = unsafe { out.rows_unchecked(first + gi, r0, r1) };
                (head_in(p, inputs, first + gi, &[]), rows)
            };
            let heads = GroupHeads { count: g, make: &make };
            // Decoding has no history to recompute from: rows at risk keep their f32 result
            // (divided in f64, finite).
            self.token.run(CausalForward { plan: &plan, heads, r0, r1, state, delta })
        });
    }

    /// Key states of every key/value head (bidirectional), shared by its query heads, into
    /// `states` (through the segment summaries in `stats`).
    fn key_states(
        &self,
        plan: &Plan,
        p: &Problem<'_>,
        inputs: &Inputs<'_, Host>,
        stats: &mut Vec<SegmentSums>,
        states: &mut Vec<KeyState>,
    ) {
        let s = p.shape;
        let segs = Segments::of(s.keys());
        let nseg = segs.count();
        let stats = prefix(stats, s.kv_problems() * nseg);
        stats.par_iter_mut().enumerate().for_each(|(t, out)| {
            let (kvh, (r0, r1)) = (t / nseg, segs.get(t % nseg));
            self.token.run(KeySegment { plan, io: head_in(p, inputs, lead(s, kvh), &[]), r0, r1, out })
        });
        prefix(states, s.kv_problems())
            .par_iter_mut()
            .zip(stats.par_chunks(nseg))
            .for_each(|(out, parts)| combine(plan, s.dv, parts, out));
    }
}

/// Checks the per-head sums of the kernels, mfp×dvp f32 each (several per head are live at
/// once), which they allocate without an error path: nothing the caller allocated bounds that
/// size (V is L×d_v, W is M×d), so a size no allocation can hold is an error before any kernel
/// runs rather than an abort inside one.
fn check_kernel_sums(plan: &Plan, dv: usize) -> Result<()> {
    check_allocatable::<f32>("state", &[plan.mfp, pad(dv)])
}

/// Q, K and V for [`scan_inputs`]; with `flag_values`, V is flagged for large values
/// (decoding tracks none).
fn qkv_scans<'a>(inputs: &Inputs<'a, Host>, flag_values: bool) -> [Scanned<'a>; 3] {
    [
        Scanned { arg: TensorArg::Q, t: inputs.q, flag: false },
        Scanned { arg: TensorArg::K, t: inputs.k, flag: false },
        Scanned { arg: TensorArg::V, t: inputs.v, flag: flag_values },
    ]
}

/// The heads with a row at risk, which are recomputed by favor-core's f64 attention.
fn flagged(risk: &[AtomicBool]) -> impl Iterator<Item = usize> + '_ {
    risk.iter().enumerate().filter(|(_, f)| f.load(Ordering::Relaxed)).map(|(bh, _)| bh)
}

/// One (batch, head) of the inputs (and of ∂ℒ/∂out) widened to f64.
struct F64Head<'a> {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dout: Option<Vec<f64>>,
    mask: Option<&'a [bool]>,
}

impl F64Head<'_> {
    fn head(&self, s: AttentionShape) -> Head<'_> {
        Head { len: s.len, kv_len: s.keys(), d: s.d, dv: s.dv, q: &self.q, k: &self.k, v: &self.v, mask: self.mask }
    }
}

/// Query head `bh` and its key/value head widened to f64 (the tensors were validated against
/// the shape and layout).
fn f64_head<'a>(
    p: &Problem<'_>,
    inputs: &Inputs<'a, Host>,
    dout: Option<HostRef<'_>>,
    bh: usize,
) -> Result<F64Head<'a>> {
    let s = p.shape;
    let widen = |arg: TensorArg, t: &HostRef<'_>, h| read_head_f64(t, p.dims(arg), p.strides(arg), h);
    let (b, kvh) = (bh / s.heads, s.kv_head_of(bh));
    Ok(F64Head {
        q: widen(TensorArg::Q, &inputs.q, bh)?,
        k: widen(TensorArg::K, &inputs.k, kvh)?,
        v: widen(TensorArg::V, &inputs.v, kvh)?,
        dout: dout.map(|g| widen(TensorArg::Dout, &g, bh)).transpose()?,
        mask: inputs.key_mask.map(|m| &m[b * s.keys()..(b + 1) * s.keys()]),
    })
}

/// The causal backward's two sweeps over key/value-head tasks `(kv head, r0, r1)`
/// (head-major), each from its incoming state with the group's query heads inside, writing
/// their dq rows and the key/value head's dk/dv rows (the stash lives in those rows, elements of
/// `elem_size` bytes). Returns the parameter-gradient partials with their key/value heads.
struct CausalSweeps<'p, 'a, 'g> {
    plan: &'p Plan,
    p: &'p Problem<'p>,
    inputs: &'p Inputs<'a, Host>,
    dout: HostRef<'g>,
    delta: f32,
    risk: &'p [AtomicBool],
}

impl CausalSweeps<'_, '_, '_> {
    /// The sweeps over every segment of every key/value head (`segs` of each, head-major) from
    /// its incoming state (consumed), with the call's scratch for what the sweeps pass on.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        backend: &SimdBackend,
        segs: Segments,
        incoming: &mut [HeadState],
        sweeps: &mut Vec<SweepOut>,
        suffixes: &mut Vec<Suffix>,
        reverse_params: &mut Vec<Option<ParamAcc>>,
        (dq, dk, dv): (&mut SharedOut<'_>, &mut SharedOut<'_>, &mut SharedOut<'_>),
        elem_size: usize,
    ) -> Vec<(usize, ParamAcc)> {
        let (plan, p, inputs, dout, delta, risk) = (self.plan, self.p, self.inputs, self.dout, self.delta, self.risk);
        let s = p.shape;
        let (nseg, g) = (segs.count(), s.group());
        let ntasks = s.kv_problems() * nseg;
        let place = StashPlace::choose(s.d, s.dv, elem_size, g);
        let (dq, dk, dv) = (&*dq, &*dk, &*dv);
        let task = |t: usize| (t / nseg, segs.get(t % nseg));
        // Sweep 1: dq, the stash, and each segment's share of the suffix sums.
        let incoming = &mut incoming[..ntasks];
        let sweeps = prefix(sweeps, ntasks);
        sweeps.par_iter_mut().zip(incoming.par_iter_mut()).enumerate().for_each(|(t, (out, state))| {
            let (kvh, (r0, r1)) = task(t);
            let first = lead(s, kvh);
            let make = |gi: usize| {
                // SAFETY: this task alone takes rows r0..r1 of query heads first..first + g (those
                // of key/value head kvh; the other tasks have other segments or other key/value
                // heads), each once per chunk after the previous is dropped.
                let rows = unsafe { dq.rows_unchecked(first + gi, r0, r1) };
                (head_in(p, inputs, first + gi, risk), rows)
            };
            // SAFETY: this task alone takes rows r0..r1 of key/value head kvh of dv (or dk), for
            // the stash, until the sweep returns.
            let rows = unsafe {
                match place {
                    StashPlace::Dv => Some(dv.rows_unchecked(kvh, r0, r1)),
                    StashPlace::Dk => Some(dk.rows_unchecked(kvh, r0, r1)),
                    StashPlace::Side => None,
                }
            };
            let SweepOut { params, c_in, suffix, side } = out;
            let stash = Stash::new(rows, r1 - r0, g, side);
            *params = backend.token.run(BackwardForwardSweep {
                plan,
                heads: BackwardHeads { count: g, make: &make },
                dout,
                delta,
                r0,
                r1,
                state,
                suffix: r0 > 0,
                stash,
                params: ParamAcc::new(plan, p.map),
                suffix_out: suffix,
                c_in_out: c_in,
            })
        });
        // The suffix sums entering each segment from its end, chained from the last segment
        // back: segment k − 1 gets segment k's share plus what entered segment k, moved from
        // segment k's final maximum (segment k + 1's incoming one) to segment k's own.
        let suffixes = prefix(suffixes, ntasks);
        for (head, chain) in sweeps.chunks(nseg).zip(suffixes.chunks_mut(nseg)) {
            chain[nseg - 1].reset(plan, s.dv);
            for k in (1..nseg).rev() {
                let c_end = head.get(k + 1).map_or(head[k].c_in, |h| h.c_in);
                let (before, after) = chain.split_at_mut(k);
                before[k - 1].reset(plan, s.dv);
                before[k - 1].chain(&after[0], head[k].c_in, c_end, &head[k].suffix);
            }
        }
        // Sweep 2: dk and dv, last chunk first in every segment.
        let reverse_params = prefix(reverse_params, ntasks);
        let forward_sweeps = &*sweeps;
        reverse_params.par_iter_mut().zip(suffixes.par_iter_mut()).enumerate().for_each(|(t, (params, suffix))| {
            let (kvh, (r0, r1)) = task(t);
            let first = lead(s, kvh);
            let make = |gi: usize| head_in(p, inputs, first + gi, risk);
            // SAFETY: task t alone takes rows r0..r1 of key/value head kvh, in dk and in dv.
            let (dk, dv) = unsafe { (dk.rows_unchecked(kvh, r0, r1), dv.rows_unchecked(kvh, r0, r1)) };
            *params = backend.token.run(BackwardReverseSweep {
                plan,
                heads: BackwardHeads { count: g, make: &make },
                dout,
                r0,
                r1,
                suffix,
                place,
                side: &forward_sweeps[t].side,
                dk,
                dv,
                params: ParamAcc::new(plan, p.map),
            })
        });
        // Only learned maps have parameter partials: nothing is allocated for the others.
        let mut out = Vec::new();
        for (t, w) in sweeps.iter_mut().enumerate() {
            out.extend(w.params.take().map(|a| (t / nseg, a)));
        }
        for (t, a) in reverse_params.iter_mut().enumerate() {
            out.extend(a.take().map(|a| (t / nseg, a)));
        }
        out
    }
}

impl SimdBackend {
    /// The forward with this call's scratch.
    fn forward_with(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        out: HostMut<'_>,
        ws: &mut CallScratch,
    ) -> Result<()> {
        let dtype = validate_inputs(p, &inputs)?;
        let s = p.shape;
        check_output(p, &out, dtype)?;
        let mut risk_buf = std::mem::take(&mut ws.risk);
        let risk = risk_flags(&mut risk_buf, s);
        scan_inputs(p, &qkv_scans(&inputs, true), risk)?;
        let mut out = shared_out(p, TensorArg::Out, out)?;
        let plan = Plan::prepared(p.map, s.d);
        ws.check_sums(&plan, s.dv)?;
        let delta = p.denominator_guard();
        match p.options.direction {
            Direction::Bidirectional => {
                self.key_states(&plan, p, &inputs, &mut ws.segment_sums, &mut ws.key_states);
                let (keys, segs, shared) = (&ws.key_states, Segments::of(s.len), &out);
                let nseg = segs.count();
                (0..s.problems() * nseg).into_par_iter().for_each(|t| {
                    let (bh, (r0, r1)) = (t / nseg, segs.get(t % nseg));
                    // SAFETY: task t alone takes rows r0..r1 (segment t % nseg) of head t / nseg.
                    let out = unsafe { shared.rows_unchecked(bh, r0, r1) };
                    let io = head_in(p, &inputs, bh, risk);
                    let keys = &keys[s.kv_head_of(bh)];
                    self.token.run(QueryForward { plan: &plan, io, keys, delta, r0, r1, out })
                });
            }
            Direction::Causal => {
                let segs = self.causal_incoming(&plan, p, &inputs, &mut ws.incoming, &mut ws.summaries);
                // Replay every segment of every key/value head from its incoming state, with the
                // group's query heads inside.
                let (nseg, g, shared) = (segs.count(), s.group(), &out);
                ws.incoming[..s.kv_problems() * nseg].par_iter_mut().enumerate().for_each(|(t, state)| {
                    let (kvh, (r0, r1)) = (t / nseg, segs.get(t % nseg));
                    let first = lead(s, kvh);
                    let make = |gi: usize| {
                        // SAFETY: this task alone takes rows r0..r1 of query heads first..first + g
                        // (those of key/value head kvh; other tasks have other segments or other
                        // key/value heads), each once per chunk after the previous is dropped.
                        let rows = unsafe { shared.rows_unchecked(first + gi, r0, r1) };
                        (head_in(p, &inputs, first + gi, risk), rows)
                    };
                    let heads = GroupHeads { count: g, make: &make };
                    self.token.run(CausalForward { plan: &plan, heads, r0, r1, state, delta })
                });
            }
        }
        let mut redo = flagged(risk).peekable();
        if redo.peek().is_some() {
            check_f64_attention_buffers(p)?;
        }
        for bh in redo {
            let f = f64_head(p, &inputs, None, bh)?;
            let h = f.head(s);
            let o = match p.options.direction {
                Direction::Bidirectional => bidirectional_forward(p.map, delta as f64, &h),
                Direction::Causal => causal_forward(p.map, delta as f64, &h),
            };
            out.head(bh).write_f64(&o)?;
        }
        ws.risk = risk_buf;
        Ok(())
    }

    fn backward_with(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
        ws: &mut CallScratch,
    ) -> Result<Option<ParamGrads>> {
        let dtype = validate_inputs(p, &inputs)?;
        let s = p.shape;
        check_backward(p, &dout, &grads, dtype)?;
        // The flags leave the scratch for the call, so that its other buffers can be borrowed.
        let mut risk_buf = std::mem::take(&mut ws.risk);
        let risk = risk_flags(&mut risk_buf, s);
        let [q, k, v] = qkv_scans(&inputs, true);
        scan_inputs(p, &[q, k, v, Scanned { arg: TensorArg::Dout, t: dout, flag: true }], risk)?;
        let Grads { dq, dk, dv } = grads;
        let mut dq = shared_out(p, TensorArg::Dq, dq)?;
        let mut dk = shared_out(p, TensorArg::Dk, dk)?;
        let mut dv = shared_out(p, TensorArg::Dv, dv)?;
        let plan = Plan::prepared(p.map, s.d);
        ws.check_sums(&plan, s.dv)?;
        let ws = &mut *ws;
        let delta = p.denominator_guard();
        let (mfp, dvp) = (plan.mfp, pad(s.dv));
        // Parameter-gradient partials, each with its key/value head (those of recomputed groups
        // are dropped).
        let params: Vec<(usize, ParamAcc)> = match p.options.direction {
            Direction::Bidirectional => {
                self.key_states(&plan, p, &inputs, &mut ws.segment_sums, &mut ws.key_states);
                let keys = &ws.key_states;
                // (K'ᵀV)ᵀ of every key/value head.
                prefix(&mut ws.kvt, s.kv_problems()).par_iter_mut().zip(keys).for_each(|(t, k)| {
                    t.clear();
                    t.resize(dvp * mfp, 0.0);
                    transpose::<wide::f32x8>(mfp, dvp, &k.kv, dvp, t, mfp);
                });
                let kvt = &ws.kvt;
                let (segs, dq) = (Segments::of(s.len), &dq);
                let nseg = segs.count();
                // The key-segment sums were combined into the key states: their buffers take the
                // query segments' partials.
                let query_sums = prefix(&mut ws.segment_sums, s.problems() * nseg);
                let query_params = prefix(&mut ws.task_params, s.problems() * nseg);
                query_sums.par_iter_mut().zip(query_params.par_iter_mut()).enumerate().for_each(
                    |(t, (out, params))| {
                        let (bh, (r0, r1)) = (t / nseg, segs.get(t % nseg));
                        let kvh = s.kv_head_of(bh);
                        // SAFETY: task t alone takes rows r0..r1 (segment t % nseg) of head t / nseg.
                        let dq = unsafe { dq.rows_unchecked(bh, r0, r1) };
                        *params = self.token.run(QueryBackward {
                            plan: &plan,
                            io: head_in(p, &inputs, bh, risk),
                            dout,
                            keys: &keys[kvh],
                            kvt: &kvt[kvh],
                            delta,
                            r0,
                            r1,
                            dq,
                            out,
                            params: ParamAcc::new(&plan, p.map),
                        })
                    },
                );
                // dKV, ds and their transposes per key/value head, summed over its query heads
                // (consecutive) and their segments, in task order.
                prefix(&mut ws.key_grads, s.kv_problems())
                    .par_iter_mut()
                    .zip(query_sums.par_chunks(nseg * s.group()))
                    .for_each(|(sum, parts)| {
                        sum.add(mfp, dvp, parts);
                    });
                let (ksegs, dk, dv, sums) = (Segments::of(s.keys()), &dk, &dv, &ws.key_grads);
                let nkseg = ksegs.count();
                let key_params = prefix(&mut ws.key_params, s.kv_problems() * nkseg);
                key_params.par_iter_mut().enumerate().for_each(|(t, params)| {
                    let (kvh, (r0, r1)) = (t / nkseg, ksegs.get(t % nkseg));
                    // SAFETY: task t alone takes rows r0..r1 (segment t % nkseg) of key/value
                    // head t / nkseg, in dk and in dv.
                    let (dk, dv) = unsafe { (dk.rows_unchecked(kvh, r0, r1), dv.rows_unchecked(kvh, r0, r1)) };
                    let sum = &sums[kvh];
                    *params = self.token.run(KeyBackward {
                        plan: &plan,
                        io: head_in(p, &inputs, lead(s, kvh), risk),
                        c: keys[kvh].c,
                        dkv: &sum.dkv,
                        dkvt: &sum.dkvt,
                        ds: &sum.ds,
                        r0,
                        r1,
                        dk,
                        dv,
                        params: ParamAcc::new(&plan, p.map),
                    })
                });
                // Only learned maps have parameter partials: nothing is allocated for the others.
                let mut params = Vec::new();
                for (t, a) in query_params.iter_mut().enumerate() {
                    params.extend(a.take().map(|a| (s.kv_head_of(t / nseg), a)));
                }
                for (t, a) in key_params.iter_mut().enumerate() {
                    params.extend(a.take().map(|a| (t / nkseg, a)));
                }
                params
            }
            Direction::Causal => {
                let segs = self.causal_incoming(&plan, p, &inputs, &mut ws.incoming, &mut ws.summaries);
                let sweeps = CausalSweeps { plan: &plan, p, inputs: &inputs, dout, delta, risk };
                let outs = (&mut dq, &mut dk, &mut dv);
                sweeps.run(
                    self,
                    segs,
                    &mut ws.incoming,
                    &mut ws.sweeps,
                    &mut ws.suffixes,
                    &mut ws.task_params,
                    outs,
                    dtype.size(),
                )
            }
        };
        // Groups with a query head at risk are recomputed in f64 as a whole: their dk and dv
        // sum every query head's share.
        let mut redo: Vec<usize> = flagged(risk).map(|bh| s.kv_head_of(bh)).collect();
        redo.dedup();
        if !redo.is_empty() {
            check_f64_attention_buffers(p)?;
        }
        let mut params: Vec<ParamAcc> =
            params.into_iter().filter(|(kvh, _)| !redo.contains(kvh)).map(|x| x.1).collect();
        for &kvh in &redo {
            let (mut gk, mut gv) = (vec![0.0; s.keys() * s.d], vec![0.0; s.keys() * s.dv]);
            for bh in s.query_heads_of(kvh) {
                let f = f64_head(p, &inputs, Some(dout), bh)?;
                let h = f.head(s);
                let g = f.dout.as_deref().unwrap_or_default();
                let r = match p.options.direction {
                    Direction::Bidirectional => bidirectional_backward(p.map, delta as f64, &h, g),
                    Direction::Causal => causal_backward(p.map, delta as f64, &h, g),
                };
                dq.head(bh).write_f64(&r.dq)?;
                gk.iter_mut().zip(&r.dk).for_each(|(a, b)| *a += b);
                gv.iter_mut().zip(&r.dv).for_each(|(a, b)| *a += b);
                params.extend(r.params.as_ref().map(|g| ParamAcc::from_f64(&plan, g)));
            }
            dk.head(kvh).write_f64(&gk)?;
            dv.head(kvh).write_f64(&gv)?;
        }
        ws.risk = risk_buf;
        Ok(reduce_params(&plan, &params))
    }
}

impl FavorBackend for SimdBackend {
    type Mem = Host;
    type State = SimdState;

    fn name(&self) -> String {
        format!("cpu-{}", self.isa().name())
    }

    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        phi: HostMut<'_>,
    ) -> Result<()> {
        let mf = validate_feature_call(map, shape, &x, "phi", &phi)?;
        check_finite(&[("x", x)])?;
        let plan = Plan::prepared(map, shape.d);
        let pieces = split_mut(phi, &vec![shape.len * mf; shape.problems()]);
        pieces.into_par_iter().enumerate().for_each(|(bh, phi)| {
            self.token.run(FeatureMapTask { plan: &plan, role, x, off: bh * shape.len * shape.d, len: shape.len, phi })
        });
        Ok(())
    }

    fn feature_map_backward(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        dphi: HostRef<'_>,
        dx: HostMut<'_>,
    ) -> Result<Option<ParamGrads>> {
        let mf = validate_feature_call(map, shape, &x, "dphi", &dphi)?;
        check_tensor("dx", &dx, shape.qk_len(), x.dtype(), "[batch, heads, len, d]")?;
        check_finite(&[("x", x), ("dphi", dphi)])?;
        let plan = Plan::prepared(map, shape.d);
        let pieces = split_mut(dx, &vec![shape.len * shape.d; shape.problems()]);
        let parts: Vec<Option<ParamAcc>> = pieces
            .into_par_iter()
            .enumerate()
            .map(|(bh, dx)| {
                self.token.run(FeatureBackwardTask {
                    plan: &plan,
                    role,
                    x,
                    dphi,
                    off: bh * shape.len * shape.d,
                    phi_off: bh * shape.len * mf,
                    len: shape.len,
                    dx,
                    params: ParamAcc::new(&plan, map),
                })
            })
            .collect();
        let parts: Vec<ParamAcc> = parts.into_iter().flatten().collect();
        Ok(reduce_params(&plan, &parts))
    }

    fn forward(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        let mut scratch = CallScratch::take();
        let r = self.forward_with(p, inputs, out, &mut scratch);
        scratch.give_back();
        r
    }

    fn backward(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> Result<Option<ParamGrads>> {
        let mut scratch = CallScratch::take();
        let r = self.backward_with(p, inputs, dout, grads, &mut scratch);
        scratch.give_back();
        r
    }

    fn new_state(&self, p: &Problem<'_>) -> Result<SimdState> {
        let made_for = favor_core::StateSignature::new(p)?;
        let (plan, shape) = (Plan::prepared(p.map, p.shape.d), made_for.shape());
        let mut heads = try_with_capacity("state", shape.kv_problems())?;
        for _ in 0..shape.kv_problems() {
            heads.push(HeadState::try_new(&plan, shape.dv)?);
        }
        let mut tokens = try_with_capacity("state", shape.batch)?;
        tokens.resize(shape.batch, 0);
        let mut sequence_of = try_with_capacity("state", shape.batch)?;
        sequence_of.resize(shape.batch, NO_SEQUENCE);
        Ok(SimdState { made_for, heads, tokens, sequence_of })
    }

    fn decode(&self, p: &Problem<'_>, state: &mut SimdState, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        let dtype = validate_inputs(p, &inputs)?;
        // Decoding has no history to recompute from, so large values are not tracked.
        scan_inputs(p, &qkv_scans(&inputs, false), &[])?;
        let s = p.shape;
        state.made_for.check(p)?;
        check_output(p, &out, dtype)?;
        let out = shared_out(p, TensorArg::Out, out)?;
        // Slot b continues with rows 0..len of batch element b.
        self.continue_slots(p, &inputs, &out, &mut state.heads, |slot| Some((slot, 0, s.len)));
        state.tokens.iter_mut().for_each(|t| *t += s.len);
        Ok(())
    }

    fn state_signature<'s>(&self, state: &'s SimdState) -> &'s favor_core::StateSignature {
        &state.made_for
    }

    fn decode_slots(
        &self,
        p: &Problem<'_>,
        state: &mut SimdState,
        chunks: SlotChunks<'_>,
        inputs: Inputs<'_, Host>,
        out: HostMut<'_>,
    ) -> Result<()> {
        validate_slot_call(p, &state.made_for, &chunks, &inputs, &out)?;
        // Decoding has no history to recompute from, so large values are not tracked.
        scan_inputs(p, &qkv_scans(&inputs, false), &[])?;
        let out = shared_out(p, TensorArg::Out, out)?;
        // The sequence continuing each slot (validated: distinct slots, increasing offsets).
        for (i, (slot, _, _)) in chunks.sequences().enumerate() {
            state.sequence_of[slot] = i;
        }
        let sequence_of = &state.sequence_of;
        let rows_of = |slot: usize| {
            let i = *sequence_of.get(slot)?;
            (i != NO_SEQUENCE).then(|| (0, chunks.offsets[i], chunks.offsets[i + 1]))
        };
        self.continue_slots(p, &inputs, &out, &mut state.heads, rows_of);
        for (slot, r0, r1) in chunks.sequences() {
            state.tokens[slot] += r1 - r0;
            state.sequence_of[slot] = NO_SEQUENCE;
        }
        Ok(())
    }

    fn read_slot(&self, state: &SimdState, slot: usize) -> Result<SlotState> {
        state.made_for.check_slot("slot", slot)?;
        let s = state.made_for.shape();
        let (mf, dv, dvp) = (state.made_for.slot_signature().features, s.dv, pad(s.dv));
        let kvn = s.key_heads();
        let heads = state.heads[slot * kvn..(slot + 1) * kvn]
            .iter()
            .map(|h| SlotHead {
                c: h.c,
                z: h.z[..mf].iter().map(|&x| x as f64).collect(),
                s: (0..mf).flat_map(|f| h.s[f * dvp..f * dvp + dv].iter().map(|&x| x as f64)).collect(),
            })
            .collect();
        SlotState::new(state.made_for.slot_signature(), state.tokens[slot] as u64, heads)
    }

    fn write_slot(&self, state: &mut SimdState, slot: usize, value: &SlotState) -> Result<()> {
        check_slot_write(&state.made_for, slot, value)?;
        let s = state.made_for.shape();
        let (mf, dv, dvp) = (value.signature().features, s.dv, pad(s.dv));
        let kvn = s.key_heads();
        for (h, v) in state.heads[slot * kvn..(slot + 1) * kvn].iter_mut().zip(value.heads()) {
            // The padding stays zero, as in a state that consumed the same tokens.
            h.s.fill(0.0);
            h.z.fill(0.0);
            h.c = v.c;
            h.z[..mf].iter_mut().zip(&v.z).for_each(|(d, &x)| *d = saturate_f32(x));
            for (f, row) in v.s.chunks_exact(dv).enumerate() {
                h.s[f * dvp..f * dvp + dv].iter_mut().zip(row).for_each(|(d, &x)| *d = saturate_f32(x));
            }
        }
        state.tokens[slot] = value.tokens() as usize;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
