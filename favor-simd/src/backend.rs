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
    CausalBackward, CausalForward, CausalSummary, HeadState, SegmentSummary, combine_summary,
};
use crate::kernels::features::{ParamAcc, Plan, reduce_params};
use crate::kernels::gemm::transpose;
use crate::kernels::standalone::{FeatureBackwardTask, FeatureMapTask};
use crate::kernels::{HeadIn, TILE};
use favor_core::backend::{
    check_backward, check_finite, check_output, check_tensor, validate_feature_call, validate_host_inputs,
};
use favor_core::{
    AttentionShape, Direction, FavorBackend, FavorError, FeatureMap, FeatureRole, Grads, Host, HostMut, HostRef,
    Inputs, ParamGrads, Problem, Result, TensorHandle,
};
use rayon::prelude::*;

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
    shape: AttentionShape,
    mfp: usize,
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
/// of its work) to split a sequence, so it splits only when there are fewer than 8
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

fn head_in<'a>(s: AttentionShape, inputs: &Inputs<'a, Host>, bh: usize) -> HeadIn<'a> {
    let b = bh / s.heads;
    HeadIn {
        q: inputs.q,
        k: inputs.k,
        v: inputs.v,
        qk_off: bh * s.len * s.d,
        v_off: bh * s.len * s.dv,
        mask: inputs.key_mask.map(|m| &m[b * s.len..(b + 1) * s.len]),
        len: s.len,
        d: s.d,
        dv: s.dv,
    }
}

/// (head, r0, r1) for every segment of every head, head-major.
fn tasks(s: AttentionShape) -> Vec<(usize, usize, usize)> {
    let segs = segments(s.len);
    (0..s.problems()).flat_map(|bh| segs.iter().map(move |&(a, b)| (bh, a, b))).collect()
}

impl SimdBackend {
    /// Key states of every head (bidirectional).
    fn key_states(&self, plan: &Plan, s: AttentionShape, inputs: &Inputs<'_, Host>) -> Vec<KeyState> {
        let nseg = segments(s.len).len();
        let stats: Vec<KeyStats> = tasks(s)
            .into_par_iter()
            .map(|(bh, r0, r1)| self.token.run(KeySegment { plan, io: head_in(s, inputs, bh), r0, r1 }))
            .collect();
        stats.par_chunks(nseg).map(|parts| combine(plan, s.dv, parts)).collect()
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
        let dtype = validate_host_inputs(p, &inputs)?;
        let s = p.shape;
        check_output(p, &out, dtype)?;
        let plan = Plan::new(p.map, s.d);
        let delta = p.denominator_guard();
        match p.options.direction {
            Direction::Bidirectional => {
                let keys = self.key_states(&plan, s, &inputs);
                let tasks = tasks(s);
                let sizes: Vec<usize> = tasks.iter().map(|&(_, a, b)| (b - a) * s.dv).collect();
                let outs = split_mut(out, &sizes);
                tasks.into_par_iter().zip(outs).for_each(|((bh, r0, r1), out)| {
                    let io = head_in(s, &inputs, bh);
                    self.token.run(QueryForward { plan: &plan, io, keys: &keys[bh], delta, r0, r1, out })
                });
            }
            Direction::Causal => {
                let segs = causal_segments(s.problems(), s.len);
                let nseg = segs.len();
                let tasks: Vec<(usize, usize, usize)> =
                    (0..s.problems()).flat_map(|bh| segs.iter().map(move |&(a, b)| (bh, a, b))).collect();
                // Pass 1: what each segment but the last adds to the state, from an empty state.
                let summaries: Vec<SegmentSummary> = tasks
                    .par_iter()
                    .filter(|&&(_, _, r1)| r1 < s.len)
                    .map(|&(bh, r0, r1)| {
                        self.token.run(CausalSummary { plan: &plan, io: head_in(s, &inputs, bh), r0, r1 })
                    })
                    .collect();
                // The incoming state of every segment, combined in order (cheap: O(M·d_v) each).
                let incoming: Vec<HeadState> = (0..s.problems())
                    .into_par_iter()
                    .flat_map_iter(|bh| {
                        let io = head_in(s, &inputs, bh);
                        let mut states = vec![HeadState::new(&plan, s.dv)];
                        for (k, sum) in summaries[bh * (nseg - 1)..(bh + 1) * (nseg - 1)].iter().enumerate() {
                            let next = combine_summary(&plan, &io, segs[k].0, &states[k], sum);
                            states.push(next);
                        }
                        states
                    })
                    .collect();
                // Pass 2: replay every segment from its incoming state.
                let outs = split_mut(out, &tasks.iter().map(|&(_, a, b)| (b - a) * s.dv).collect::<Vec<_>>());
                tasks.into_par_iter().zip(outs).zip(incoming).for_each(|(((bh, r0, r1), out), mut state)| {
                    let io = head_in(s, &inputs, bh);
                    self.token.run(CausalForward { plan: &plan, io, r0, r1, state: &mut state, delta, out })
                });
            }
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
        let dtype = validate_host_inputs(p, &inputs)?;
        let s = p.shape;
        check_backward(p, &dout, &grads, dtype)?;
        let Grads { dq, dk, dv } = grads;
        check_finite(&[("dout", dout)])?;
        let plan = Plan::new(p.map, s.d);
        let delta = p.denominator_guard();
        let (mfp, dvp) = (plan.mfp, pad(s.dv));
        let params: Vec<ParamAcc> = match p.options.direction {
            Direction::Bidirectional => {
                let keys = self.key_states(&plan, s, &inputs);
                let kvt: Vec<Vec<f32>> = keys
                    .par_iter()
                    .map(|k| {
                        let mut t = vec![0.0; dvp * mfp];
                        transpose(mfp, dvp, &k.kv, dvp, &mut t, mfp);
                        t
                    })
                    .collect();
                let tasks = tasks(s);
                let nseg = segments(s.len).len();
                let dqs = split_mut(dq, &tasks.iter().map(|&(_, a, b)| (b - a) * s.d).collect::<Vec<_>>());
                let qgrads: Vec<_> = tasks
                    .par_iter()
                    .zip(dqs)
                    .map(|(&(bh, r0, r1), dq)| {
                        self.token.run(QueryBackward {
                            plan: &plan,
                            io: head_in(s, &inputs, bh),
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
                        transpose(mfp, dvp, &dkv, dvp, &mut dkvt, mfp);
                        (dkv, dkvt, ds)
                    })
                    .collect();
                let sizes_k: Vec<usize> = tasks.iter().map(|&(_, a, b)| (b - a) * s.d).collect();
                let sizes_v: Vec<usize> = tasks.iter().map(|&(_, a, b)| (b - a) * s.dv).collect();
                let dks = split_mut(dk, &sizes_k);
                let dvs = split_mut(dv, &sizes_v);
                let kparams: Vec<Option<ParamAcc>> = tasks
                    .par_iter()
                    .zip(dks.into_par_iter().zip(dvs))
                    .map(|(&(bh, r0, r1), (dk, dv))| {
                        let (dkv, dkvt, ds) = &sums[bh];
                        self.token.run(KeyBackward {
                            plan: &plan,
                            io: head_in(s, &inputs, bh),
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
                qgrads.into_iter().filter_map(|g| g.params).chain(kparams.into_iter().flatten()).collect()
            }
            Direction::Causal => {
                let n = s.problems();
                let dqs = split_mut(dq, &vec![s.len * s.d; n]);
                let dks = split_mut(dk, &vec![s.len * s.d; n]);
                let dvs = split_mut(dv, &vec![s.len * s.dv; n]);
                let parts: Vec<Option<ParamAcc>> = dqs
                    .into_par_iter()
                    .zip(dks.into_par_iter().zip(dvs))
                    .enumerate()
                    .map(|(bh, (dq, (dk, dv)))| {
                        self.token.run(CausalBackward {
                            plan: &plan,
                            io: head_in(s, &inputs, bh),
                            dout,
                            delta,
                            dq,
                            dk,
                            dv,
                            params: ParamAcc::new(&plan, p.map),
                        })
                    })
                    .collect();
                parts.into_iter().flatten().collect()
            }
        };
        Ok(reduce_params(&plan, &params))
    }

    fn new_state(&self, p: &Problem<'_>) -> Result<SimdState> {
        let shape = AttentionShape { len: 1, ..p.shape };
        Problem { shape, ..*p }.validate()?;
        let plan = Plan::new(p.map, shape.d);
        Ok(SimdState { shape, mfp: plan.mfp, heads: vec![HeadState::new(&plan, shape.dv); shape.problems()] })
    }

    fn decode(&self, p: &Problem<'_>, state: &mut SimdState, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        let dtype = validate_host_inputs(p, &inputs)?;
        let s = p.shape;
        let st = state.shape;
        let plan = Plan::new(p.map, s.d);
        if (st.batch, st.heads, st.d, st.dv) != (s.batch, s.heads, s.d, s.dv) || state.mfp != plan.mfp {
            return Err(FavorError::Shape {
                arg: "state",
                expected: format!("a state for batch {}, heads {}, d {}, d_v {}", s.batch, s.heads, s.d, s.dv),
                actual: format!("one for batch {}, heads {}, d {}, d_v {}", st.batch, st.heads, st.d, st.dv),
            });
        }
        check_output(p, &out, dtype)?;
        let delta = p.denominator_guard();
        let outs = split_mut(out, &vec![s.len * s.dv; s.problems()]);
        state.heads.par_iter_mut().zip(outs).enumerate().for_each(|(bh, (state, out))| {
            let io = head_in(s, &inputs, bh);
            self.token.run(CausalForward { plan: &plan, io, r0: 0, r1: s.len, state, delta, out })
        });
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
