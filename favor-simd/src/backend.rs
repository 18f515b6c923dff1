//! [`SimdBackend`]: the favor-core backend trait on the CPU kernels, with rayon across
//! (batch, head) and across sequence segments.
//!
//! Work is cut into tasks that depend only on the shape (never on the thread count) and partial
//! sums are combined in task order, so results are bitwise identical for any number of threads.

use crate::isa::{Isa, IsaToken, best_isa, pad};
use crate::kernels::bidirectional::{
    KeyBackward, KeySegment, KeyState, KeyStats, QueryBackward, QueryForward, combine,
};
use crate::kernels::causal::{
    BackwardForwardSweep, BackwardReverseSweep, CausalForward, CausalSummary, HeadState, Stash, StashPlace, Suffix,
    SweepOut, combine_summary,
};
use crate::kernels::features::{ParamAcc, Plan, reduce_params};
use crate::kernels::gemm::transpose;
use crate::kernels::rows::SharedOut;
use crate::kernels::standalone::{FeatureBackwardTask, FeatureMapTask};
use crate::kernels::{HeadIn, HeadRows, OutRows, TILE};
use crate::scan::{Scanned, scan_inputs};
use favor_core::attention::{Head, bidirectional_backward, bidirectional_forward, causal_backward, causal_forward};
use favor_core::backend::{
    check_allocatable, check_backward, check_f64_attention_buffers, check_finite, check_output, check_tensor,
    try_with_capacity, validate_feature_call, validate_inputs,
};
use favor_core::layout::read_head_f64;
use favor_core::{
    AttentionShape, Direction, FavorBackend, FavorError, FeatureMap, FeatureRole, Grads, Host, HostMut, HostRef,
    Inputs, ParamGrads, Problem, Result, TensorArg, TensorHandle,
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

/// Decoding state: one [`HeadState`] per (batch, head), batch-major.
#[derive(Debug, Clone, PartialEq)]
pub struct SimdState {
    made_for: favor_core::StateSignature,
    heads: Vec<HeadState>,
}

/// Sequence segments of one head: fixed by the length alone (at most 8, at least 256 tokens,
/// whole tiles) so that a long single-head sequence still spreads over cores.
fn segments(len: usize) -> Vec<(usize, usize)> {
    const MAX_SEGMENTS: usize = 8;
    let seg = (len.div_ceil(MAX_SEGMENTS).div_ceil(TILE) * TILE).max(4 * TILE);
    (0..len.div_ceil(seg)).map(|s| (s * seg, ((s + 1) * seg).min(len))).collect()
}

/// Causal segments of one head: the causal forward pays an extra summary pass (about a third
/// of its work; the backward pays it and a suffix-sum product, about a sixth of its work) to
/// split a sequence, so it splits only when there are fewer than 8
/// (batch, head) problems, into at most 8 / problems segments of at least 1024 tokens.
/// Depends on the shape alone.
fn causal_segments(problems: usize, len: usize) -> Vec<(usize, usize)> {
    let n = if problems >= 8 { 1 } else { (8 / problems).min(len / 1024).max(1) };
    let seg = len.div_ceil(n).div_ceil(TILE) * TILE;
    (0..len.div_ceil(seg)).map(|s| (s * seg, ((s + 1) * seg).min(len))).collect()
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

/// Head `bh` of the inputs; `risk` holds one at-risk flag per head (empty: not tracked).
fn head_in<'a: 'r, 'r>(p: &Problem<'_>, inputs: &Inputs<'a, Host>, bh: usize, risk: &'r [AtomicBool]) -> HeadIn<'r> {
    let s = p.shape;
    let b = bh / s.heads;
    let at = |arg| HeadRows::of(p.strides(arg), s.heads, bh);
    HeadIn {
        risk: risk.get(bh),
        q: inputs.q,
        k: inputs.k,
        v: inputs.v,
        q_at: at(TensorArg::Q),
        k_at: at(TensorArg::K),
        v_at: at(TensorArg::V),
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

/// (head, r0, r1) for every segment of `rows` rows of every head, head-major: the query rows
/// (`s.len`) or the key rows (`s.keys()`, which differ in cross-attention).
fn segment_tasks(s: AttentionShape, rows: usize) -> Vec<(usize, usize, usize)> {
    let segs = segments(rows);
    (0..s.problems()).flat_map(|bh| segs.iter().map(move |&(a, b)| (bh, a, b))).collect()
}

impl SimdBackend {
    /// The causal segments of every head, (head, r0, r1) head-major, and the state entering
    /// each: a summary pass over every segment but the last (from an empty state, in parallel),
    /// then an ordered combination per head (cheap: O(M·d_v) per segment).
    fn causal_incoming(
        &self,
        plan: &Plan,
        p: &Problem<'_>,
        inputs: &Inputs<'_, Host>,
    ) -> (Vec<(usize, usize, usize)>, Vec<HeadState>) {
        let s = p.shape;
        let segs = causal_segments(s.problems(), s.len);
        let nseg = segs.len();
        let tasks: Vec<(usize, usize, usize)> =
            (0..s.problems()).flat_map(|bh| segs.iter().map(move |&(a, b)| (bh, a, b))).collect();
        if nseg == 1 {
            return (tasks, vec![HeadState::new(plan, s.dv); s.problems()]);
        }
        let summaries: Vec<HeadState> = tasks
            .par_iter()
            .filter(|&&(_, _, r1)| r1 < s.len)
            .map(|&(bh, r0, r1)| self.token.run(CausalSummary { plan, io: head_in(p, inputs, bh, &[]), r0, r1 }))
            .collect();
        let incoming = summaries
            .par_chunks(nseg - 1)
            .flat_map_iter(|sums| {
                let mut states = vec![HeadState::new(plan, s.dv)];
                for (k, sum) in sums.iter().enumerate() {
                    let next = combine_summary(&states[k], sum);
                    states.push(next);
                }
                states
            })
            .collect();
        (tasks, incoming)
    }

    /// Key states of every head (bidirectional).
    fn key_states(&self, plan: &Plan, p: &Problem<'_>, inputs: &Inputs<'_, Host>) -> Vec<KeyState> {
        let s = p.shape;
        let nseg = segments(s.keys()).len();
        let stats: Vec<KeyStats> = segment_tasks(s, s.keys())
            .into_par_iter()
            .map(|(bh, r0, r1)| self.token.run(KeySegment { plan, io: head_in(p, inputs, bh, &[]), r0, r1 }))
            .collect();
        stats.par_chunks(nseg).map(|parts| combine(plan, s.dv, parts)).collect()
    }
}

/// Checks the per-head sums of the kernels, mfp×dvp f32 each (several per head are live at
/// once), which they allocate without an error path: nothing the caller allocated bounds that
/// size (V is L×d_v, W is M×d), so a size no allocation can hold is an error before any kernel
/// runs rather than an abort inside one.
fn check_kernel_sums(plan: &Plan, dv: usize) -> Result<()> {
    check_allocatable::<f32>("state", &[plan.mfp, pad(dv)])
}

/// One at-risk flag per (batch, head).
fn risk_flags(s: AttentionShape) -> Vec<AtomicBool> {
    (0..s.problems()).map(|_| AtomicBool::new(false)).collect()
}

/// Q, K, V (and ∂ℒ/∂out) for [`scan_inputs`]; V and ∂ℒ/∂out are flagged for large values.
fn input_scans<'a>(inputs: [HostRef<'a>; 3], dout: Option<HostRef<'a>>) -> Vec<Scanned<'a>> {
    let [q, k, v] = inputs;
    let mut v = vec![
        Scanned { arg: TensorArg::Q, t: q, flag: false },
        Scanned { arg: TensorArg::K, t: k, flag: false },
        Scanned { arg: TensorArg::V, t: v, flag: true },
    ];
    v.extend(dout.map(|t| Scanned { arg: TensorArg::Dout, t, flag: true }));
    v
}

/// The heads with a row at risk, which are recomputed by favor-core's f64 attention.
fn flagged(risk: &[AtomicBool]) -> Vec<usize> {
    risk.iter().enumerate().filter(|(_, f)| f.load(Ordering::Relaxed)).map(|(bh, _)| bh).collect()
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

/// Head `bh` widened to f64 (the tensors were validated against the shape and layout).
fn f64_head<'a>(
    p: &Problem<'_>,
    inputs: &Inputs<'a, Host>,
    dout: Option<HostRef<'_>>,
    bh: usize,
) -> Result<F64Head<'a>> {
    let s = p.shape;
    let widen = |arg: TensorArg, t: &HostRef<'_>| read_head_f64(t, p.dims(arg), p.strides(arg), bh);
    let b = bh / s.heads;
    Ok(F64Head {
        q: widen(TensorArg::Q, &inputs.q)?,
        k: widen(TensorArg::K, &inputs.k)?,
        v: widen(TensorArg::V, &inputs.v)?,
        dout: dout.map(|g| widen(TensorArg::Dout, &g)).transpose()?,
        mask: inputs.key_mask.map(|m| &m[b * s.keys()..(b + 1) * s.keys()]),
    })
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
        let plan = Plan::new(map, shape.d);
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
        let plan = Plan::new(map, shape.d);
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
        let dtype = validate_inputs(p, &inputs)?;
        let s = p.shape;
        check_output(p, &out, dtype)?;
        let risk = risk_flags(s);
        scan_inputs(p, &input_scans([inputs.q, inputs.k, inputs.v], None), &risk)?;
        let mut out = shared_out(p, TensorArg::Out, out)?;
        let plan = Plan::new(p.map, s.d);
        check_kernel_sums(&plan, s.dv)?;
        let delta = p.denominator_guard();
        match p.options.direction {
            Direction::Bidirectional => {
                let keys = self.key_states(&plan, p, &inputs);
                let tasks = segment_tasks(s, s.len);
                let outs = out.split(&tasks);
                tasks.into_par_iter().zip(outs).for_each(|((bh, r0, r1), out)| {
                    let io = head_in(p, &inputs, bh, &risk);
                    self.token.run(QueryForward { plan: &plan, io, keys: &keys[bh], delta, r0, r1, out })
                });
            }
            Direction::Causal => {
                let (tasks, incoming) = self.causal_incoming(&plan, p, &inputs);
                // Replay every segment from its incoming state.
                let outs = out.split(&tasks);
                tasks.into_par_iter().zip(outs).zip(incoming).for_each(|(((bh, r0, r1), out), mut state)| {
                    let io = head_in(p, &inputs, bh, &risk);
                    self.token.run(CausalForward { plan: &plan, io, r0, r1, state: &mut state, delta, out })
                });
            }
        }
        let redo = flagged(&risk);
        if !redo.is_empty() {
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
        Ok(())
    }

    fn backward(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> Result<Option<ParamGrads>> {
        let dtype = validate_inputs(p, &inputs)?;
        let s = p.shape;
        check_backward(p, &dout, &grads, dtype)?;
        let risk = risk_flags(s);
        scan_inputs(p, &input_scans([inputs.q, inputs.k, inputs.v], Some(dout)), &risk)?;
        let Grads { dq, dk, dv } = grads;
        let mut dq = shared_out(p, TensorArg::Dq, dq)?;
        let mut dk = shared_out(p, TensorArg::Dk, dk)?;
        let mut dv = shared_out(p, TensorArg::Dv, dv)?;
        let plan = Plan::new(p.map, s.d);
        check_kernel_sums(&plan, s.dv)?;
        let delta = p.denominator_guard();
        let (mfp, dvp) = (plan.mfp, pad(s.dv));
        // Parameter-gradient partials, each with its head (those of recomputed heads are dropped).
        let params: Vec<(usize, ParamAcc)> = match p.options.direction {
            Direction::Bidirectional => {
                let keys = self.key_states(&plan, p, &inputs);
                let kvt: Vec<Vec<f32>> = keys
                    .par_iter()
                    .map(|k| {
                        let mut t = vec![0.0; dvp * mfp];
                        transpose::<wide::f32x8>(mfp, dvp, &k.kv, dvp, &mut t, mfp);
                        t
                    })
                    .collect();
                let tasks = segment_tasks(s, s.len);
                let nseg = segments(s.len).len();
                let dqs = dq.split(&tasks);
                let qgrads: Vec<_> = tasks
                    .par_iter()
                    .zip(dqs)
                    .map(|(&(bh, r0, r1), dq)| {
                        self.token.run(QueryBackward {
                            plan: &plan,
                            io: head_in(p, &inputs, bh, &risk),
                            dout,
                            keys: &keys[bh],
                            kvt: &kvt[bh],
                            delta,
                            r0,
                            r1,
                            dq,
                            params: ParamAcc::new(&plan, p.map),
                        })
                    })
                    .collect();
                // dKV, ds and their transposes per head, summed in segment order.
                let sums: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = qgrads
                    .par_chunks(nseg)
                    .map(|parts| {
                        let mut dkv = vec![0.0f32; mfp * dvp];
                        let mut ds = vec![0.0f32; mfp];
                        for part in parts {
                            dkv.iter_mut().zip(&part.dkv).for_each(|(a, b)| *a += b);
                            ds.iter_mut().zip(&part.ds).for_each(|(a, b)| *a += b);
                        }
                        let mut dkvt = vec![0.0; dvp * mfp];
                        transpose::<wide::f32x8>(mfp, dvp, &dkv, dvp, &mut dkvt, mfp);
                        (dkv, dkvt, ds)
                    })
                    .collect();
                let key_tasks = segment_tasks(s, s.keys());
                let dks = dk.split(&key_tasks);
                let dvs = dv.split(&key_tasks);
                let kparams: Vec<Option<ParamAcc>> = key_tasks
                    .par_iter()
                    .zip(dks.into_par_iter().zip(dvs))
                    .map(|(&(bh, r0, r1), (dk, dv))| {
                        let (dkv, dkvt, ds) = &sums[bh];
                        self.token.run(KeyBackward {
                            plan: &plan,
                            io: head_in(p, &inputs, bh, &risk),
                            c: keys[bh].c,
                            dkv,
                            dkvt,
                            ds,
                            r0,
                            r1,
                            dk,
                            dv,
                            params: ParamAcc::new(&plan, p.map),
                        })
                    })
                    .collect();
                let qparams = tasks.iter().map(|t| t.0).zip(qgrads).filter_map(|(bh, g)| g.params.map(|a| (bh, a)));
                let kparams = key_tasks.iter().map(|t| t.0).zip(kparams).filter_map(|(bh, a)| a.map(|a| (bh, a)));
                qparams.chain(kparams).collect()
            }
            Direction::Causal => {
                let (tasks, incoming) = self.causal_incoming(&plan, p, &inputs);
                let nseg = tasks.len() / s.problems();
                let place = StashPlace::choose(s.d, s.dv, dtype.size());
                // Sweep 1: dq, the stash, and each segment's share of the suffix sums.
                let mut sweeps: Vec<SweepOut> = {
                    let stash_rows: Vec<Option<OutRows<'_>>> = match place {
                        StashPlace::Dv => dv.split(&tasks).into_iter().map(Some).collect(),
                        StashPlace::Dk => dk.split(&tasks).into_iter().map(Some).collect(),
                        StashPlace::Side => tasks.iter().map(|_| None).collect(),
                    };
                    tasks
                        .par_iter()
                        .zip(incoming)
                        .zip(dq.split(&tasks).into_par_iter().zip(stash_rows))
                        .map(|((&(bh, r0, r1), state), (dq, rows))| {
                            let stash = Stash::new(rows, dtype.size(), r1 - r0);
                            self.token.run(BackwardForwardSweep {
                                plan: &plan,
                                io: head_in(p, &inputs, bh, &risk),
                                dout,
                                delta,
                                r0,
                                r1,
                                state,
                                suffix: r0 > 0,
                                dq,
                                stash,
                                params: ParamAcc::new(&plan, p.map),
                            })
                        })
                        .collect()
                };
                // The suffix sums entering each segment from its end, chained from the last segment
                // back: segment k − 1 gets segment k's share plus what entered segment k, moved
                // from segment k's final maximum (segment k + 1's incoming one) to segment k's own.
                let mut suffixes: Vec<Suffix> = Vec::with_capacity(tasks.len());
                for head in sweeps.chunks_mut(nseg) {
                    let mut chain = vec![Suffix::new(&plan, s.dv)];
                    for k in (1..nseg).rev() {
                        let share = head[k].suffix.take().unwrap_or_else(|| Suffix::new(&plan, s.dv));
                        let c_end = head.get(k + 1).map_or(head[k].c_in, |h| h.c_in);
                        let entering = chain.last().cloned().unwrap_or_else(|| Suffix::new(&plan, s.dv));
                        chain.push(Suffix::chain(entering, head[k].c_in, c_end, &share));
                    }
                    suffixes.extend(chain.into_iter().rev());
                }
                let mut params: Vec<(usize, ParamAcc)> = tasks
                    .iter()
                    .zip(sweeps.iter_mut())
                    .filter_map(|(t, w)| w.params.take().map(|a| (t.0, a)))
                    .collect();
                // Sweep 2: dk and dv, last chunk first in every segment.
                let kparams: Vec<Option<ParamAcc>> = tasks
                    .par_iter()
                    .zip(sweeps.into_par_iter().zip(suffixes))
                    .zip(dk.split(&tasks).into_par_iter().zip(dv.split(&tasks)))
                    .map(|((&(bh, r0, r1), (sweep, suffix)), (dk, dv))| {
                        self.token.run(BackwardReverseSweep {
                            plan: &plan,
                            io: head_in(p, &inputs, bh, &risk),
                            dout,
                            r0,
                            r1,
                            suffix,
                            place,
                            side: sweep.side,
                            dk,
                            dv,
                            params: ParamAcc::new(&plan, p.map),
                        })
                    })
                    .collect();
                params.extend(tasks.iter().zip(kparams).filter_map(|(t, a)| a.map(|a| (t.0, a))));
                params
            }
        };
        let redo = flagged(&risk);
        if !redo.is_empty() {
            check_f64_attention_buffers(p)?;
        }
        let mut params: Vec<ParamAcc> = params.into_iter().filter(|(bh, _)| !redo.contains(bh)).map(|x| x.1).collect();
        for &bh in &redo {
            let f = f64_head(p, &inputs, Some(dout), bh)?;
            let h = f.head(s);
            let g = f.dout.as_deref().unwrap_or_default();
            let r = match p.options.direction {
                Direction::Bidirectional => bidirectional_backward(p.map, delta as f64, &h, g),
                Direction::Causal => causal_backward(p.map, delta as f64, &h, g),
            };
            dq.head(bh).write_f64(&r.dq)?;
            dk.head(bh).write_f64(&r.dk)?;
            dv.head(bh).write_f64(&r.dv)?;
            params.extend(r.params.as_ref().map(|g| ParamAcc::from_f64(&plan, g)));
        }
        Ok(reduce_params(&plan, &params))
    }

    fn new_state(&self, p: &Problem<'_>) -> Result<SimdState> {
        let made_for = favor_core::StateSignature::new(p)?;
        let (plan, shape) = (Plan::new(p.map, p.shape.d), made_for.shape());
        let mut heads = try_with_capacity("state", shape.problems())?;
        for _ in 0..shape.problems() {
            heads.push(HeadState::try_new(&plan, shape.dv)?);
        }
        Ok(SimdState { made_for, heads })
    }

    fn decode(&self, p: &Problem<'_>, state: &mut SimdState, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        let dtype = validate_inputs(p, &inputs)?;
        // Decoding has no history to recompute from, so large values are not tracked.
        scan_inputs(p, &input_scans([inputs.q, inputs.k, inputs.v], None), &[])?;
        let s = p.shape;
        state.made_for.check(p)?;
        let plan = Plan::new(p.map, s.d);
        check_output(p, &out, dtype)?;
        let mut out = shared_out(p, TensorArg::Out, out)?;
        let delta = p.denominator_guard();
        let tasks: Vec<(usize, usize, usize)> = (0..s.problems()).map(|bh| (bh, 0, s.len)).collect();
        let outs = out.split(&tasks);
        state.heads.par_iter_mut().zip(outs).enumerate().for_each(|(bh, (state, out))| {
            // Decoding has no history to recompute from: rows at risk keep their f32 result
            // (divided in f64, finite).
            let io = head_in(p, &inputs, bh, &[]);
            self.token.run(CausalForward { plan: &plan, io, r0: 0, r1: s.len, state, delta, out })
        });
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
