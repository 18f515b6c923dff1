//! The sequence of kernel launches behind each trait method (all on device memory).
//!
//! Every call packs its inputs into fp32 rows (V with a ones column, so the denominator is the
//! last output column), computes φ(Q) against each query's own log-scale and φ(K) against the
//! key stabiliser (shared maximum, or running maximum for causal), runs the attention kernels,
//! and rounds once into the caller's dtype. With A·B·V written for "out_t = Σ (A_t·B_s)·V_s":
//!
//! | quantity | bidirectional (reduce + apply) | causal scan |
//! |---|---|---|
//! | O1 = [N R] | A = φ(Q), B = φ(K), V = [V 1] | same, forward |
//! | dφ(Q) | A = G1, B = [V 1], V = φ(K) | same, forward |
//! | dφ(K) | A = [V 1], B = G1, V = φ(Q) | same, reversed |
//! | dV | A = φ(K), B = φ(Q), V = G1[:, ..d_v] | same, reversed |
//!
//! with G1 = [dO/R, −<dO, out>/R]. Then dQ, dK go through the feature map's backward with the
//! stabilisers held constant (exact: attention does not depend on them) and the ε floor
//! differentiated through each token's own log-scale. Nothing is stored between calls: the
//! backward recomputes φ.

use crate::backend::{CudaBackend, CudaState, StateRows, check};
use crate::kernels::{FeatureKind, MapArgs, MaskArgs, RiskArgs, RowMap, SMEM_LIMIT, StabMode, scan_value_tile};
use crate::memory::{CudaMem, DevPtr, DeviceMut, DeviceRef, Scratch};
use favor_core::attention::{Head, bidirectional_backward, bidirectional_forward, causal_backward, causal_forward};
use favor_core::backend::{
    check_backward, check_output, check_slot_write, sequence_inputs, sequence_mut, sequence_problem, validate_inputs,
    validate_slot_call,
};
use favor_core::limits::{FEATURE_HI, FEATURE_LO, VALUE_LIMIT, WIDE_INPUT};
use favor_core::ragged::Sequence;
use favor_core::{
    AttentionShape, DType, Direction, Elementwise, FavorError, FeatureMap, FeatureRole, Grads, Inputs, ParamGrads,
    Problem, Result, SlotChunks, SlotHead, SlotState, TensorArg, TensorHandle, saturate_f32,
};

/// Largest grid.y (one block row per (batch, head)).
const MAX_PROBLEMS: usize = 65_535;
/// Target rows per segment of the bidirectional reduction.
const REDUCE_SEGMENT: usize = 1024;

/// The map's parameters for the kernels, plus the uploaded projection.
struct Map {
    args: MapArgs,
    _w: Option<Scratch<f32>>,
}

/// fp32 copies of one call's inputs.
struct Packed {
    q: Scratch<f32>,
    k: Scratch<f32>,
    v1: Scratch<f32>,
    mask: Option<Scratch<u8>>,
    map: Map,
    /// Query rows (batch · heads · len).
    rows: usize,
    /// Key and value rows (batch · heads · kv_len: grouped heads packed per query head).
    key_rows: usize,
}

/// Features and stabilisers of one call, and O1 = [N R].
struct Attention {
    qf: Scratch<f32>,
    qc: Scratch<f64>,
    kf: Scratch<f32>,
    kc: Scratch<f64>,
    o1: Scratch<f32>,
}

impl Packed {
    fn mask(&self, heads: usize) -> Option<MaskArgs> {
        self.mask.as_ref().map(|m| MaskArgs { keep: m.ptr(), heads })
    }
}

/// Rows the f32 kernels cannot carry, tracked per call: a denominator below 2^-40 (see
/// `at_risk` in cuda/common.cuh), a query or key entry beyond [`WIDE_INPUT`], a value or output
/// gradient beyond [`VALUE_LIMIT`], or — for the maps without
/// a built-in stabiliser — a largest feature outside [`FEATURE_LO`]..[`FEATURE_HI`]. Their heads
/// are recomputed on the host by favor-core's f64 attention, as the CPU backend does. Costs one
/// read-back of a flag per (batch, head) per call; only extreme inputs (ε = 0 with features that
/// do not overlap, ELU+1 queries far below zero, entries beyond 2^24) are ever flagged.
struct Risk {
    first_seen: Scratch<i32>,
    flags: Scratch<i32>,
    len: usize,
}

impl Risk {
    fn args(&self) -> RiskArgs {
        RiskArgs { first_seen: self.first_seen.ptr(), flags: self.flags.ptr(), len: self.len }
    }

    /// The same flags for key rows, `kv_len` to a head.
    fn key_args(&self, kv_len: usize) -> RiskArgs {
        RiskArgs { len: kv_len, ..self.args() }
    }
}

/// One (batch, head) of a call on the host in f64, widened from the packed fp32 rows (exact
/// copies of the inputs).
struct HostHead<'a> {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Option<&'a [bool]>,
}

impl HostHead<'_> {
    fn head(&self, s: AttentionShape) -> Head<'_> {
        Head { len: s.len, kv_len: s.keys(), d: s.d, dv: s.dv, q: &self.q, k: &self.k, v: &self.v, mask: self.mask }
    }
}

/// The packed inputs of one call on the host (only read when a head needs the f64 path).
struct HostPacked<'a> {
    q: Vec<f32>,
    k: Vec<f32>,
    v1: Vec<f32>,
    mask: Option<&'a [bool]>,
}

impl<'a> HostPacked<'a> {
    fn head(&self, s: AttentionShape, bh: usize) -> HostHead<'a> {
        let (qn, kn, nk) = (s.len * s.d, s.keys() * s.d, s.keys());
        let widen = |x: &[f32]| x.iter().map(|&e| e as f64).collect::<Vec<f64>>();
        let b = bh / s.heads;
        HostHead {
            q: widen(&self.q[bh * qn..(bh + 1) * qn]),
            k: widen(&self.k[bh * kn..(bh + 1) * kn]),
            v: (bh * nk..(bh + 1) * nk)
                .flat_map(|r| self.v1[r * (s.dv + 1)..r * (s.dv + 1) + s.dv].iter().map(|&e| e as f64))
                .collect(),
            mask: self.mask.map(|m| &m[b * nk..(b + 1) * nk]),
        }
    }
}

impl CudaBackend {
    fn map_args(&self, map: &FeatureMap, d: usize) -> Result<Map> {
        // x̃ = nrm·x with nrm = √τ (d^{-1/4} by default).
        let nrm = map.data_normalizer(d) as f32;
        let (kind, proj, in_scale, eps) = match map {
            FeatureMap::Positive { projection, epsilon, .. } => {
                (FeatureKind::Positive, Some(projection), nrm, *epsilon)
            }
            FeatureMap::Hyperbolic { projection, epsilon, .. } => {
                (FeatureKind::Hyperbolic, Some(projection), nrm, *epsilon)
            }
            FeatureMap::Trigonometric { projection, .. } => (FeatureKind::Trigonometric, Some(projection), nrm, 0.0),
            FeatureMap::Generalized { f, projection, scale, kappa, .. } => {
                let kind = match f {
                    Elementwise::Relu => FeatureKind::Relu,
                    Elementwise::EluPlusOne => FeatureKind::EluPlusOne,
                    Elementwise::Softplus => FeatureKind::Softplus,
                };
                (kind, projection.as_ref(), scale * nrm, *kappa)
            }
            FeatureMap::Softplus(_) | FeatureMap::GatedSoftplus(_) => {
                return Err(FavorError::Unsupported(format!(
                    "the {} feature map has no CUDA kernel yet (use the CPU backends)",
                    map.name()
                )));
            }
        };
        let (w, m) = match proj {
            Some(p) => (Some(self.scratch_from(p.matrix())?), p.m()),
            None => (None, d),
        };
        // h = ‖√τ·x‖²/2 = (τ/2)·x·x, from the exact f32 inputs in f64.
        let hcoef = if kind.is_exp() { map.softmax_scale(d).unwrap_or(0.0) / 2.0 } else { 0.0 };
        let args = MapArgs { kind, w: w.as_ref().map(Scratch::ptr), m, d, in_scale, hcoef, eps };
        if args.backward_smem() > SMEM_LIMIT {
            return Err(FavorError::Unsupported(format!(
                "d = {d} with m = {m} projections exceeds the CUDA feature kernels' shared memory"
            )));
        }
        Ok(Map { args, _w: w })
    }

    fn check_sizes(&self, shape: AttentionShape, map: &MapArgs) -> Result<()> {
        if shape.problems() > MAX_PROBLEMS {
            return Err(FavorError::Unsupported(format!("batch × heads = {} > {MAX_PROBLEMS}", shape.problems())));
        }
        for (what, len) in [("len", shape.len), ("kv_len", shape.keys())] {
            if len > i32::MAX as usize || len * shape.problems() > i64::MAX as usize / 4096 {
                return Err(FavorError::Unsupported(format!("{what} = {len} is too long for the CUDA kernels")));
            }
        }
        scan_value_tile(map.features(), shape.dv + 1)?;
        scan_value_tile(shape.dv + 1, map.features())?;
        Ok(())
    }

    fn pack_inputs(&self, p: &Problem<'_>, inputs: &Inputs<'_, CudaMem>, dtype: DType) -> Result<Packed> {
        let s = p.shape;
        let map = self.map_args(p.map, s.d)?;
        self.check_sizes(s, &map.args)?;
        let (rows, key_rows) = (s.problems() * s.len, s.problems() * s.keys());
        let q = self.pack(dtype, inputs.q.raw(), RowMap::of(p, TensorArg::Q)?, rows, s.d, s.d, false)?;
        // Grouped key/value heads are packed once per query head: the current kernels work per
        // (batch, query head).
        let (km, vm) = (RowMap::per_query_head(p, TensorArg::K)?, RowMap::per_query_head(p, TensorArg::V)?);
        let k = self.pack(dtype, inputs.k.raw(), km, key_rows, s.d, s.d, false)?;
        let v1 = self.pack(dtype, inputs.v.raw(), vm, key_rows, s.dv, s.dv + 1, true)?;
        let mask = inputs.key_mask.map(|m| self.scratch_mask(m)).transpose()?;
        Ok(Packed { q, k, v1, mask, map, rows, key_rows })
    }

    /// The rows of a caller's tensor (where `map` puts them) widened into fp32 scratch, `ld` per
    /// row (plus a ones column at n when `ones`).
    #[allow(clippy::too_many_arguments)]
    fn pack(
        &self,
        dtype: DType,
        src: DevPtr,
        map: RowMap,
        rows: usize,
        n: usize,
        ld: usize,
        ones: bool,
    ) -> Result<Scratch<f32>> {
        let dst = self.scratch(rows * ld)?;
        self.exec.launch_pack(dtype, src, map, rows, n, dst.ptr(), ld, ones)?;
        Ok(dst)
    }

    /// φ of query rows against their own log-scales; returns (φ, c).
    fn query_features(
        &self,
        x: DevPtr,
        rows: usize,
        len: usize,
        map: &MapArgs,
    ) -> Result<(Scratch<f32>, Scratch<f64>)> {
        let mf = map.features();
        let phi = self.scratch(rows * mf)?;
        let c = self.scratch_f64(rows)?;
        self.exec.launch_features(
            x,
            rows,
            map,
            StabMode::Own,
            None,
            Some(c.ptr()),
            None,
            len,
            Some((phi.ptr(), mf)),
        )?;
        Ok((phi, c))
    }

    /// Key stabilisers: the shared (bidirectional) or running (causal) maximum of the unpadded
    /// log-scales per (batch, head), continuing from `c_init` (decoding). Zero for maps without
    /// a stabiliser.
    #[allow(clippy::too_many_arguments)]
    fn key_stabilisers(
        &self,
        x: DevPtr,
        shape: AttentionShape,
        map: &MapArgs,
        mask: Option<MaskArgs>,
        causal: bool,
        c_init: Option<DevPtr>,
    ) -> Result<Scratch<f64>> {
        let (len, rows) = (shape.keys(), shape.problems() * shape.keys());
        let c = self.scratch_f64(rows)?;
        if map.kind.is_exp() {
            let s = self.scratch_f64(rows)?;
            self.exec.launch_features(x, rows, map, StabMode::LogScaleOnly, None, Some(s.ptr()), None, len, None)?;
            self.exec.launch_stabiliser(s.ptr(), mask, shape.problems(), len, c_init, causal, c.ptr())?;
        }
        Ok(c)
    }

    fn key_features(
        &self,
        x: DevPtr,
        shape: AttentionShape,
        map: &MapArgs,
        c: &Scratch<f64>,
        mask: Option<MaskArgs>,
    ) -> Result<Scratch<f32>> {
        let (len, rows) = (shape.keys(), shape.problems() * shape.keys());
        let mf = map.features();
        let phi = self.scratch(rows * mf)?;
        self.exec.launch_features(
            x,
            rows,
            map,
            StabMode::Given,
            Some(c.ptr()),
            None,
            mask,
            len,
            Some((phi.ptr(), mf)),
        )?;
        Ok(phi)
    }

    /// out_t = A_tᵀ Σ_s B_s V_sᵀ (bidirectional) into `out` (rows × ldo, columns 0..nv), for
    /// `problems` heads of `lens.0` rows of B and V (summed) and `lens.1` rows of A and out.
    #[allow(clippy::too_many_arguments)]
    fn bidirectional(
        &self,
        (problems, lens): (usize, (usize, usize)),
        a: (DevPtr, usize),
        b: (DevPtr, usize),
        na: usize,
        v: (DevPtr, usize),
        nv: usize,
        out: (DevPtr, usize),
    ) -> Result<()> {
        let (summed, applied) = lens;
        let segments = summed.div_ceil(REDUCE_SEGMENT).clamp(1, 64);
        let partial = self.scratch(problems * segments * na * nv)?;
        let kv = self.scratch(problems * na * nv)?;
        self.exec.launch_kv_reduce(
            (b.0, b.1, na),
            (v.0, v.1, nv),
            problems,
            summed,
            segments,
            partial.ptr(),
            kv.ptr(),
        )?;
        self.exec.launch_kv_apply((a.0, a.1, na), kv.ptr(), nv, problems, applied, out)
    }

    /// φ(Q), φ(K), stabilisers and O1 = [N R] of a forward pass (optionally continuing a state).
    /// With `risk`, the heads with rows the f32 kernels cannot carry are flagged (see [`Risk`]).
    fn attention(
        &self,
        p: &Problem<'_>,
        x: &Packed,
        state: Option<StateRows>,
        risk: Option<&Risk>,
    ) -> Result<Attention> {
        let s = p.shape;
        let map = &x.map.args;
        let mf = map.features();
        let causal = p.options.direction == Direction::Causal || state.is_some();
        let mask = x.mask(s.heads);
        if let Some(r) = risk {
            self.exec.launch_flag_wide(x.q.ptr(), x.rows, s.d, (0.0, WIDE_INPUT), r.args())?;
            let keys = r.key_args(s.keys());
            self.exec.launch_flag_wide(x.k.ptr(), x.key_rows, s.d, (0.0, WIDE_INPUT), keys)?;
            // V with its ones column: the extra 1 is inside the range.
            self.exec.launch_flag_wide(x.v1.ptr(), x.key_rows, s.dv + 1, (0.0, VALUE_LIMIT), keys)?;
        }
        let (qf, qc) = self.query_features(x.q.ptr(), x.rows, s.len, map)?;
        let c_init = state.map(|st| st.c);
        let kc = self.key_stabilisers(x.k.ptr(), s, map, mask, causal, c_init)?;
        let kf = self.key_features(x.k.ptr(), s, map, &kc, mask)?;
        if let Some(r) = risk.filter(|_| !map.kind.is_exp()) {
            self.exec.launch_flag_wide(qf.ptr(), x.rows, mf, (FEATURE_LO, FEATURE_HI), r.args())?;
            self.exec.launch_flag_wide(kf.ptr(), x.key_rows, mf, (FEATURE_LO, FEATURE_HI), r.key_args(s.keys()))?;
        }
        let o1 = self.scratch(x.rows * (s.dv + 1))?;
        let (q, k, v1, o) = ((qf.ptr(), mf), (kf.ptr(), mf), (x.v1.ptr(), s.dv + 1), (o1.ptr(), s.dv + 1));
        if causal {
            let st = state.map(|st| (st.s, st.c));
            self.exec.launch_causal_scan(q, k, mf, v1, s.dv + 1, kc.ptr(), s.problems(), s.len, false, o, st)?;
            if let Some(st) = state {
                self.exec.launch_state_c_update(kc.ptr(), s.len, s.problems(), st.c)?;
            }
        } else {
            self.bidirectional((s.problems(), (s.keys(), s.len)), q, k, mf, v1, s.dv + 1, o)?;
        }
        Ok(Attention { qf, qc, kf, kc, o1 })
    }

    pub(crate) fn forward_device(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, CudaMem>,
        out: DeviceMut<'_>,
    ) -> Result<()> {
        let dtype = validate_inputs(p, &inputs)?;
        let s = p.shape;
        check_output(p, &out, dtype)?;
        let x = self.pack_inputs(p, &inputs, dtype)?;
        let risk = self.risk_tracking(p, inputs.key_mask)?;
        let att = self.attention(p, &x, None, Some(&risk))?;
        let delta = p.denominator_guard();
        let out_map = RowMap::of(p, TensorArg::Out)?;
        self.exec.launch_normalize(
            dtype,
            att.o1.ptr(),
            x.rows,
            s.dv,
            delta,
            out.raw(),
            out_map,
            None,
            Some(risk.args()),
        )?;
        drop(att);
        let flagged = self.flagged_heads(&risk)?;
        if flagged.is_empty() {
            return Ok(());
        }
        let host = self.packed_to_host(&x, inputs.key_mask)?;
        for bh in flagged {
            let f = host.head(s, bh);
            let o = match p.options.direction {
                Direction::Bidirectional => bidirectional_forward(p.map, delta as f64, &f.head(s)),
                Direction::Causal => causal_forward(p.map, delta as f64, &f.head(s)),
            };
            self.write_head(dtype, &o, out.raw(), RowMap::of(p, TensorArg::Out)?, s.dv, bh)?;
        }
        Ok(())
    }

    pub(crate) fn backward_device(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, CudaMem>,
        dout: DeviceRef<'_>,
        grads: Grads<'_, CudaMem>,
    ) -> Result<Option<ParamGrads>> {
        let dtype = validate_inputs(p, &inputs)?;
        let s = p.shape;
        check_backward(p, &dout, &grads, dtype)?;
        let x = self.pack_inputs(p, &inputs, dtype)?;
        let risk = self.risk_tracking(p, inputs.key_mask)?;
        let att = self.attention(p, &x, None, Some(&risk))?;
        let map = &x.map.args;
        let (rows, mf, dv1) = (x.rows, map.features(), s.dv + 1);

        let g = self.pack(dtype, dout.raw(), RowMap::of(p, TensorArg::Dout)?, rows, s.dv, s.dv, false)?;
        let g1 = self.scratch(rows * dv1)?;
        let invariant = self.scratch_bytes(rows)?;
        let delta = p.denominator_guard();
        self.exec.launch_flag_wide(g.ptr(), rows, s.dv, (0.0, VALUE_LIMIT), risk.args())?;
        let (o1, inv) = (att.o1.ptr(), Some(invariant.ptr()));
        self.exec.launch_cotangent(g.ptr(), o1, rows, s.dv, delta, g1.ptr(), inv, Some(risk.args()))?;
        // Heads at risk get zero cotangents here and are recomputed in f64 at the end.
        let flagged = self.flagged_heads(&risk)?;
        let fallback = if flagged.is_empty() {
            None
        } else {
            Some((self.packed_to_host(&x, inputs.key_mask)?, self.scratch_to_host(&g)?))
        };
        drop(g);

        let key_rows = x.key_rows;
        let dqf = self.scratch(rows * mf)?;
        let dkf = self.scratch(key_rows * mf)?;
        let dv32 = self.scratch(key_rows * s.dv)?;
        let (qf, kf, v1, g1p) = ((att.qf.ptr(), mf), (att.kf.ptr(), mf), (x.v1.ptr(), dv1), (g1.ptr(), dv1));
        match p.options.direction {
            Direction::Bidirectional => {
                let (n, over_keys, over_queries) = (s.problems(), (s.keys(), s.len), (s.len, s.keys()));
                self.bidirectional((n, over_keys), g1p, v1, dv1, kf, mf, (dqf.ptr(), mf))?;
                self.bidirectional((n, over_queries), v1, g1p, dv1, qf, mf, (dkf.ptr(), mf))?;
                self.bidirectional((n, over_queries), kf, qf, mf, g1p, s.dv, (dv32.ptr(), s.dv))?;
            }
            Direction::Causal => {
                let (c, n, l) = (att.kc.ptr(), s.problems(), s.len);
                let k = &self.exec;
                k.launch_causal_scan(g1p, v1, dv1, kf, mf, c, n, l, false, (dqf.ptr(), mf), None)?;
                k.launch_causal_scan(v1, g1p, dv1, qf, mf, c, n, l, true, (dkf.ptr(), mf), None)?;
                k.launch_causal_scan(kf, qf, mf, g1p, s.dv, c, n, l, true, (dv32.ptr(), s.dv), None)?;
            }
        }

        let dq32 = self.scratch(rows * s.d)?;
        let dk32 = self.scratch(key_rows * s.d)?;
        let kern = &self.exec;
        let (qc, inv) = (Some(att.qc.ptr()), Some(invariant.ptr()));
        kern.launch_features_bwd(x.q.ptr(), rows, map, qc, inv, dqf.ptr(), mf, None, s.len, dq32.ptr())?;
        kern.launch_features_bwd(
            x.k.ptr(),
            key_rows,
            map,
            Some(att.kc.ptr()),
            None,
            dkf.ptr(),
            mf,
            x.mask(s.heads),
            s.keys(),
            dk32.ptr(),
        )?;
        let Grads { dq, dk, dv } = grads;
        // dk and dv of a key/value head: the sum of its query heads' rows.
        let (kv_rows, g) = (s.kv_problems() * s.keys(), s.group());
        kern.launch_unpack(dtype, dq32.ptr(), s.d, rows, s.d, dq.raw(), RowMap::of(p, TensorArg::Dq)?, 1)?;
        kern.launch_unpack(dtype, dk32.ptr(), s.d, kv_rows, s.d, dk.raw(), RowMap::of(p, TensorArg::Dk)?, g)?;
        kern.launch_unpack(dtype, dv32.ptr(), s.dv, kv_rows, s.dv, dv.raw(), RowMap::of(p, TensorArg::Dv)?, g)?;
        if let Some((host, gout)) = fallback {
            // A group with a flagged query head is recomputed whole: its dk and dv sum every
            // query head's share.
            let mut groups: Vec<usize> = flagged.iter().map(|&bh| s.kv_head_of(bh)).collect();
            groups.dedup();
            for kvh in groups {
                let (mut gk, mut gv) = (vec![0.0; s.keys() * s.d], vec![0.0; s.keys() * s.dv]);
                for bh in s.query_heads_of(kvh) {
                    let f = host.head(s, bh);
                    let rows = bh * s.len * s.dv..(bh + 1) * s.len * s.dv;
                    let gh: Vec<f64> = gout[rows].iter().map(|&e| e as f64).collect();
                    let hg = match p.options.direction {
                        Direction::Bidirectional => bidirectional_backward(p.map, delta as f64, &f.head(s), &gh),
                        Direction::Causal => causal_backward(p.map, delta as f64, &f.head(s), &gh),
                    };
                    self.write_head(dtype, &hg.dq, dq.raw(), RowMap::of(p, TensorArg::Dq)?, s.d, bh)?;
                    gk.iter_mut().zip(&hg.dk).for_each(|(a, b)| *a += b);
                    gv.iter_mut().zip(&hg.dv).for_each(|(a, b)| *a += b);
                }
                self.write_head(dtype, &gk, dk.raw(), RowMap::of(p, TensorArg::Dk)?, s.d, kvh)?;
                self.write_head(dtype, &gv, dv.raw(), RowMap::of(p, TensorArg::Dv)?, s.dv, kvh)?;
            }
        }
        Ok(None)
    }

    /// Per (batch, head): the first row that sees a kept key (causal: the first kept key;
    /// bidirectional: row 0 when the head has one), and zeroed flags.
    fn risk_tracking(&self, p: &Problem<'_>, mask: Option<&[bool]>) -> Result<Risk> {
        let s = p.shape;
        let causal = p.options.direction == Direction::Causal;
        // len ≤ i32::MAX (check_sizes).
        // Causal calls have kv_len = len; a bidirectional head without a kept key has zero rows
        // (none at risk), every other sees a key from row 0.
        let nk = s.keys();
        let first_seen: Vec<i32> = (0..s.problems())
            .map(|bh| {
                let b = bh / s.heads;
                let first = mask.map_or(Some(0), |m| m[b * nk..(b + 1) * nk].iter().position(|&keep| keep));
                match first {
                    Some(f) if causal => f,
                    Some(_) => 0,
                    None => s.len,
                }
                .min(s.len) as i32
            })
            .collect();
        Ok(Risk {
            first_seen: self.scratch_i32_from(&first_seen)?,
            flags: self.scratch_i32_from(&vec![0; s.problems()])?,
            len: s.len,
        })
    }

    /// The heads the kernels flagged (reads the flags back: waits for the stream).
    fn flagged_heads(&self, risk: &Risk) -> Result<Vec<usize>> {
        let flags = self.scratch_to_host(&risk.flags)?;
        Ok(flags.iter().enumerate().filter(|(_, f)| **f != 0).map(|(bh, _)| bh).collect())
    }

    fn packed_to_host<'m>(&self, x: &Packed, mask: Option<&'m [bool]>) -> Result<HostPacked<'m>> {
        Ok(HostPacked {
            q: self.scratch_to_host(&x.q)?,
            k: self.scratch_to_host(&x.k)?,
            v1: self.scratch_to_host(&x.v1)?,
            mask,
        })
    }

    /// Writes one head's rows (`values`: len × n in f64, saturated to f32 then rounded to the
    /// storage type) into head `bh` of `dst` ([B, H, len, n]).
    /// Writes head `bh` of a caller's tensor (where `map` puts its rows of `width` elements)
    /// from contiguous f64 rows.
    fn write_head(
        &self,
        dtype: DType,
        values: &[f64],
        dst: DevPtr,
        map: RowMap,
        width: usize,
        bh: usize,
    ) -> Result<()> {
        let narrowed: Vec<f32> = values.iter().map(|&v| saturate_f32(v)).collect();
        let src = self.scratch_from(&narrowed)?;
        let (base, head) = map.head(bh, width);
        let dst = dst
            .slice(base, head.extent, dtype.size())
            .ok_or_else(|| FavorError::Backend { backend: "cuda", reason: format!("head {bh} outside its tensor") })?;
        self.exec.launch_unpack(dtype, src.ptr(), width, map.len, width, dst, head, 1)
    }

    pub(crate) fn new_state_device(&self, p: &Problem<'_>) -> Result<CudaState> {
        let made_for = favor_core::StateSignature::new(p)?;
        let shape = made_for.shape();
        let map = self.map_args(p.map, shape.d)?;
        self.check_sizes(shape, &map.args)?;
        let mf = map.args.features();
        let s = self.scratch(shape.problems() * mf * (shape.dv + 1))?;
        let c = self.scratch_f64_from(&vec![f64::NEG_INFINITY; shape.problems()])?;
        Ok(CudaState { made_for, s, c, tokens: vec![0; shape.batch] })
    }

    pub(crate) fn decode_device(
        &self,
        p: &Problem<'_>,
        state: &mut CudaState,
        inputs: Inputs<'_, CudaMem>,
        out: DeviceMut<'_>,
    ) -> Result<()> {
        let dtype = validate_inputs(p, &inputs)?;
        state.made_for.check(p)?;
        check_output(p, &out, dtype)?;
        self.continue_rows(p, state.rows(), &inputs, out.raw(), dtype)?;
        state.tokens.iter_mut().for_each(|t| *t += p.shape.len);
        Ok(())
    }

    /// Continues `rows` (a whole state or one slot of it) by the call's tokens.
    fn continue_rows(
        &self,
        p: &Problem<'_>,
        rows: StateRows,
        inputs: &Inputs<'_, CudaMem>,
        out: DevPtr,
        dtype: DType,
    ) -> Result<()> {
        let x = self.pack_inputs(p, inputs, dtype)?;
        let att = self.attention(p, &x, Some(rows), None)?;
        // Decoding has no history to recompute from: rows with tiny denominators keep their
        // quotient (formed in double, finite), and rows beyond the f32 kernels' range (see
        // `Risk`) are not recomputed.
        let out_map = RowMap::of(p, TensorArg::Out)?;
        self.exec.launch_normalize(
            dtype,
            att.o1.ptr(),
            x.rows,
            p.shape.dv,
            p.denominator_guard(),
            out,
            out_map,
            None,
            None,
        )
    }

    /// Slot decoding: each sequence continues its slot's rows of the state in turn (the
    /// current kernels take one state row range per launch).
    pub(crate) fn decode_slots_device(
        &self,
        p: &Problem<'_>,
        state: &mut CudaState,
        chunks: SlotChunks<'_>,
        inputs: Inputs<'_, CudaMem>,
        mut out: DeviceMut<'_>,
    ) -> Result<()> {
        let dtype = validate_slot_call(p, &state.made_for, &chunks, &inputs, &out)?;
        for (slot, r0, r1) in chunks.sequences() {
            if r0 == r1 {
                continue;
            }
            let seq = Sequence { q0: r0, q1: r1, k0: r0, k1: r1 };
            let sub = sequence_problem(p, &seq);
            let sub_inputs = sequence_inputs(p, &seq, &inputs)?;
            let sub_out = sequence_mut::<CudaMem>(p, TensorArg::Out, &seq, &mut out)?;
            self.continue_rows(&sub, state.slot_rows(slot), &sub_inputs, sub_out.raw(), dtype)?;
            state.tokens[slot] += r1 - r0;
        }
        Ok(())
    }

    /// One slot of a state as [`SlotState`] (waits for the stream).
    pub(crate) fn read_slot_device(&self, state: &CudaState, slot: usize) -> Result<SlotState> {
        state.made_for.check_slot("slot", slot)?;
        let sig = state.made_for.slot_signature();
        let (heads, mf, dv) = (sig.heads, sig.features, sig.dv);
        let per = mf * (dv + 1);
        let mut sv = vec![0.0f32; heads * per];
        let mut c = vec![0.0f64; heads];
        self.buf_range_to_host(&state.s.buf, slot * heads * per, &mut sv)?;
        self.buf_range_to_host(&state.c.buf, slot * heads, &mut c)?;
        let shape = state.made_for.shape();
        // The query heads of a group hold equal states (the same keys): read the first.
        let values = (0..sig.kv_heads)
            .map(|kvh| {
                let h = shape.query_heads_of(kvh).start;
                let rows = &sv[h * per..(h + 1) * per];
                SlotHead {
                    c: c[h],
                    z: rows.chunks_exact(dv + 1).map(|r| r[dv] as f64).collect(),
                    s: rows.chunks_exact(dv + 1).flat_map(|r| r[..dv].iter().map(|&x| x as f64)).collect(),
                }
            })
            .collect();
        SlotState::new(sig, state.tokens[slot] as u64, values)
    }

    /// Overwrites one slot of a state (waits for the stream).
    pub(crate) fn write_slot_device(&self, state: &mut CudaState, slot: usize, value: &SlotState) -> Result<()> {
        check_slot_write(&state.made_for, slot, value)?;
        let sig = state.made_for.slot_signature();
        let (heads, mf, dv) = (sig.heads, sig.features, sig.dv);
        let per = mf * (dv + 1);
        let shape = state.made_for.shape();
        let mut sv = vec![0.0f32; heads * per];
        let mut c = vec![0.0f64; heads];
        for (kvh, v) in value.heads().iter().enumerate() {
            for h in shape.query_heads_of(kvh) {
                c[h] = v.c;
                for (f, row) in sv[h * per..(h + 1) * per].chunks_exact_mut(dv + 1).enumerate() {
                    row[..dv].iter_mut().zip(&v.s[f * dv..(f + 1) * dv]).for_each(|(d, &x)| *d = saturate_f32(x));
                    row[dv] = saturate_f32(v.z[f]);
                }
            }
        }
        self.buf_range_from_host(&mut state.s.buf, slot * heads * per, &sv)?;
        self.buf_range_from_host(&mut state.c.buf, slot * heads, &c)?;
        state.tokens[slot] = value.tokens() as usize;
        Ok(())
    }

    /// Stabilisers of `role` for feature-map calls (no padding mask).
    fn role_stabilisers(
        &self,
        x: DevPtr,
        shape: AttentionShape,
        map: &MapArgs,
        role: FeatureRole,
    ) -> Result<Scratch<f64>> {
        let rows = shape.problems() * shape.len;
        match role {
            FeatureRole::Query => {
                let c = self.scratch_f64(rows)?;
                if map.kind.is_exp() {
                    self.exec.launch_features(
                        x,
                        rows,
                        map,
                        StabMode::LogScaleOnly,
                        None,
                        Some(c.ptr()),
                        None,
                        shape.len,
                        None,
                    )?;
                }
                Ok(c)
            }
            FeatureRole::Key => self.key_stabilisers(x, shape, map, None, false, None),
            FeatureRole::CausalKey => self.key_stabilisers(x, shape, map, None, true, None),
        }
    }

    fn feature_call(
        &self,
        map: &FeatureMap,
        shape: AttentionShape,
        x: &DeviceRef<'_>,
        phi: &impl TensorHandle,
    ) -> Result<(Map, Scratch<f32>, usize)> {
        let sq = AttentionShape { dv: shape.d, ..shape };
        sq.validate()?;
        map.validate(shape.d)?;
        let mf = map.feature_dim(shape.d);
        check("x", x, shape.qk_len(), x.dtype(), "[batch, heads, len, d]")?;
        check("phi", phi, shape.problems() * shape.len * mf, x.dtype(), "[batch, heads, len, M]")?;
        let m = self.map_args(map, shape.d)?;
        self.check_sizes(sq, &m.args)?;
        let rows = shape.problems() * shape.len;
        let x32 = self.pack(x.dtype(), x.raw(), RowMap::contiguous(rows, shape.d), rows, shape.d, shape.d, false)?;
        Ok((m, x32, rows))
    }

    pub(crate) fn feature_map_device(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: DeviceRef<'_>,
        phi: DeviceMut<'_>,
    ) -> Result<()> {
        let (m, x32, rows) = self.feature_call(map, shape, &x, &phi)?;
        let mf = m.args.features();
        let c = self.role_stabilisers(x32.ptr(), shape, &m.args, role)?;
        let phi32 = self.scratch(rows * mf)?;
        self.exec.launch_features(
            x32.ptr(),
            rows,
            &m.args,
            StabMode::Given,
            Some(c.ptr()),
            None,
            None,
            shape.len,
            Some((phi32.ptr(), mf)),
        )?;
        self.exec.launch_unpack(x.dtype(), phi32.ptr(), mf, rows, mf, phi.raw(), RowMap::contiguous(rows, mf), 1)
    }

    pub(crate) fn feature_map_backward_device(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: DeviceRef<'_>,
        dphi: DeviceRef<'_>,
        dx: DeviceMut<'_>,
    ) -> Result<Option<ParamGrads>> {
        let (m, x32, rows) = self.feature_call(map, shape, &x, &dphi)?;
        check("dx", &dx, shape.qk_len(), x.dtype(), "[batch, heads, len, d]")?;
        let mf = m.args.features();
        let c = self.role_stabilisers(x32.ptr(), shape, &m.args, role)?;
        let g32 = self.pack(x.dtype(), dphi.raw(), RowMap::contiguous(rows, mf), rows, mf, mf, false)?;
        let dx32 = self.scratch(rows * shape.d)?;
        self.exec.launch_features_bwd(
            x32.ptr(),
            rows,
            &m.args,
            Some(c.ptr()),
            None,
            g32.ptr(),
            mf,
            None,
            shape.len,
            dx32.ptr(),
        )?;
        self.exec.launch_unpack(
            x.dtype(),
            dx32.ptr(),
            shape.d,
            rows,
            shape.d,
            dx.raw(),
            RowMap::contiguous(rows, shape.d),
            1,
        )?;
        Ok(None)
    }
}
