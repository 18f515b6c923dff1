//! The reference backend: the f64 attention core of [`crate::attention`] applied head by head.
//! Slow and obviously correct; the oracle for every other backend.

use crate::attention::{
    self, CausalState, Head, HeadGrads, bidirectional_backward, bidirectional_forward, causal_backward, causal_forward,
};
use crate::backend::{
    Grads, Host, Inputs, Problem, check_backward, check_call_tensor, check_f64_attention_buffers, check_finite,
    check_finite_args, check_output, check_slot_write, check_tensor, validate_feature_call, validate_host_inputs,
    validate_slot_call,
};
use crate::features::ParamGradsF64;
use crate::layout::{gather, write_head_f64, write_rows_f64};
use crate::validate::try_with_capacity;
use crate::{
    AttentionOptions, AttentionShape, Direction, FavorBackend, FeatureMap, FeatureRole, HostMut, HostRef, ParamGrads,
    Result, SlotChunks, SlotHead, SlotState, StateSignature, TensorArg, TensorHandle,
};

/// The f64 reference backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReferenceBackend;

/// Decoding state of the reference backend: one [`CausalState`] per (batch, head).
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceState {
    made_for: StateSignature,
    heads: Vec<CausalState>,
}

impl ReferenceState {
    /// What the state was made for (its batch is its number of slots).
    pub fn signature(&self) -> &StateSignature {
        &self.made_for
    }

    /// Per-(batch, head) states, batch-major.
    pub fn heads(&self) -> &[CausalState] {
        &self.heads
    }
}

/// Host inputs widened to f64, split per (batch, head).
struct Widened {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

impl Widened {
    /// Q, K and V widened to f64, contiguous `[B, H, ·, ·]` whatever their layout.
    fn new(p: &Problem<'_>, inputs: &Inputs<'_, Host>) -> Result<Self> {
        Ok(Self {
            q: widen(p, TensorArg::Q, &inputs.q)?,
            k: widen(p, TensorArg::K, &inputs.k)?,
            v: widen(p, TensorArg::V, &inputs.v)?,
        })
    }

    /// Query head `bh` with the key/value head it reads.
    fn head<'a>(&'a self, s: AttentionShape, mask: Option<&'a [bool]>, bh: usize) -> Head<'a> {
        let (l, lk, d, dv) = (s.len, s.keys(), s.d, s.dv);
        let (b, kvh) = (bh / s.heads, s.kv_head_of(bh));
        Head {
            len: l,
            kv_len: lk,
            d,
            dv,
            q: &self.q[bh * l * d..(bh + 1) * l * d],
            k: &self.k[kvh * lk * d..(kvh + 1) * lk * d],
            v: &self.v[kvh * lk * dv..(kvh + 1) * lk * dv],
            mask: mask.map(|m| &m[b * lk..(b + 1) * lk]),
        }
    }
}

/// A validated tensor of the call widened to f64, contiguous `[B, H, rows, width]`.
fn widen(p: &Problem<'_>, arg: TensorArg, t: &HostRef<'_>) -> Result<Vec<f64>> {
    if p.layout.given(arg).is_none() {
        return Ok(t.to_f64_vec());
    }
    Ok(gather(*t, p.dims(arg), p.strides(arg))?.to_f64_vec())
}

/// Writes contiguous f64 `[B, H, rows, width]` values into a tensor of the call, in its layout.
fn store(p: &Problem<'_>, arg: TensorArg, t: &mut HostMut<'_>, src: &[f64]) -> Result<()> {
    if p.layout.given(arg).is_none() {
        return t.write_f64(0, src);
    }
    let (dims, strides) = (p.dims(arg), p.strides(arg));
    for (bh, head) in src.chunks_exact(dims.rows * dims.width).enumerate() {
        write_head_f64(t, dims, strides, bh, head)?;
    }
    Ok(())
}

/// `n` zeros, or an allocation error.
fn zeroed(arg: &'static str, n: usize) -> Result<Vec<f64>> {
    let mut v = try_with_capacity(arg, n)?;
    v.resize(n, 0.0);
    Ok(v)
}

/// `acc += part` elementwise.
fn add_into(acc: &mut [f64], part: &[f64]) {
    acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
}

fn add_params(acc: &mut Option<ParamGradsF64>, part: Option<ParamGradsF64>) {
    let (Some(acc), Some(part)) = (acc.as_mut(), part) else { return };
    add_into(&mut acc.w, &part.w);
    if let (Some(a), Some(b)) = (acc.bias.as_mut(), part.bias.as_ref()) {
        add_into(a, b);
    }
    if let (Some(a), Some(b)) = (acc.w_gate.as_mut(), part.w_gate.as_ref()) {
        add_into(a, b);
    }
}

impl ReferenceBackend {
    /// The forward pass in f64, before the output is rounded to its storage type: the oracle for
    /// 16-bit storage, where rounding the reference to 16 bits too would double the error.
    /// Contiguous `[B, H, L, d_v]` whatever the problem's layout.
    pub fn forward_f64(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>) -> Result<Vec<f64>> {
        validate_host_inputs(p, &inputs)?;
        check_f64_attention_buffers(p)?;
        let s = p.shape;
        let w = Widened::new(p, &inputs)?;
        let delta = p.denominator_guard() as f64;
        let mut out = try_with_capacity("out", s.out_len())?;
        for bh in 0..s.problems() {
            let h = w.head(s, inputs.key_mask, bh);
            out.extend(match p.options.direction {
                Direction::Bidirectional => bidirectional_forward(p.map, delta, &h),
                Direction::Causal => causal_forward(p.map, delta, &h),
            });
        }
        Ok(out)
    }

    /// The backward pass in f64 (see [`ReferenceBackend::forward_f64`]): dq, dk, dv contiguous
    /// `[B, H, ·, ·]` (`[B, H_kv, ·, ·]` for dk and dv) whatever the problem's layout, dk and dv
    /// summed over the query heads of each key/value head, parameter gradients over heads.
    pub fn backward_f64(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>, dout: HostRef<'_>) -> Result<HeadGrads> {
        let dtype = validate_host_inputs(p, &inputs)?;
        let s = p.shape;
        check_call_tensor(p, TensorArg::Dout, &dout, dtype)?;
        check_finite_args(p, &[(TensorArg::Dout, dout)])?;
        check_f64_attention_buffers(p)?;
        let w = Widened::new(p, &inputs)?;
        let g = widen(p, TensorArg::Dout, &dout)?;
        let delta = p.denominator_guard() as f64;
        let mut all = HeadGrads {
            dq: try_with_capacity("dq", s.qk_len())?,
            dk: zeroed("dk", s.k_len())?,
            dv: zeroed("dv", s.v_len())?,
            params: p.map.param_grads_f64(),
        };
        let (nk, nv) = (s.keys() * s.d, s.keys() * s.dv);
        for bh in 0..s.problems() {
            let h = w.head(s, inputs.key_mask, bh);
            let gh = &g[bh * s.len * s.dv..(bh + 1) * s.len * s.dv];
            let HeadGrads { dq, dk, dv, params } = match p.options.direction {
                Direction::Bidirectional => bidirectional_backward(p.map, delta, &h, gh),
                Direction::Causal => causal_backward(p.map, delta, &h, gh),
            };
            all.dq.extend(dq);
            let kvh = s.kv_head_of(bh);
            add_into(&mut all.dk[kvh * nk..(kvh + 1) * nk], &dk);
            add_into(&mut all.dv[kvh * nv..(kvh + 1) * nv], &dv);
            add_params(&mut all.params, params);
        }
        Ok(all)
    }
}

impl FavorBackend for ReferenceBackend {
    type Mem = Host;
    type State = ReferenceState;

    fn name(&self) -> String {
        "reference".into()
    }

    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        mut phi: HostMut<'_>,
    ) -> Result<()> {
        let (l, d) = (shape.len, shape.d);
        let mf = validate_feature_call(map, shape, &x, "phi", &phi)?;
        check_finite(&[("x", x)])?;
        let xs = x.to_f64_vec();
        for bh in 0..shape.problems() {
            let rows = &xs[bh * l * d..(bh + 1) * l * d];
            let c = stabilisers(map, role, rows, l, d);
            let mut out = vec![0.0; l * mf];
            for i in 0..l {
                map.features(&rows[i * d..(i + 1) * d], c[i], &mut out[i * mf..(i + 1) * mf]);
            }
            phi.write_f64(bh * l * mf, &out)?;
        }
        Ok(())
    }

    fn feature_map_backward(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        dphi: HostRef<'_>,
        mut dx: HostMut<'_>,
    ) -> Result<Option<ParamGrads>> {
        let (l, d) = (shape.len, shape.d);
        let mf = validate_feature_call(map, shape, &x, "dphi", &dphi)?;
        check_tensor("dx", &dx, shape.qk_len(), x.dtype(), "[batch, heads, len, d]")?;
        check_finite(&[("x", x), ("dphi", dphi)])?;
        let xs = x.to_f64_vec();
        let gs = dphi.to_f64_vec();
        let mut params = map.param_grads_f64();
        for bh in 0..shape.problems() {
            let rows = &xs[bh * l * d..(bh + 1) * l * d];
            let c = stabilisers(map, role, rows, l, d);
            let mut out = vec![0.0; l * d];
            for i in 0..l {
                map.features_backward(
                    &rows[i * d..(i + 1) * d],
                    c[i],
                    &gs[(bh * l + i) * mf..(bh * l + i + 1) * mf],
                    &mut out[i * d..(i + 1) * d],
                    params.as_mut(),
                );
            }
            dx.write_f64(bh * l * d, &out)?;
        }
        Ok(params.map(|p| p.to_f32()))
    }

    fn forward(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>, mut out: HostMut<'_>) -> Result<()> {
        let dtype = validate_host_inputs(p, &inputs)?;
        check_output(p, &out, dtype)?;
        store(p, TensorArg::Out, &mut out, &self.forward_f64(p, inputs)?)
    }

    fn backward(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> Result<Option<ParamGrads>> {
        let dtype = validate_host_inputs(p, &inputs)?;
        check_backward(p, &dout, &grads, dtype)?;
        let Grads { mut dq, mut dk, mut dv } = grads;
        let g = self.backward_f64(p, inputs, dout)?;
        store(p, TensorArg::Dq, &mut dq, &g.dq)?;
        store(p, TensorArg::Dk, &mut dk, &g.dk)?;
        store(p, TensorArg::Dv, &mut dv, &g.dv)?;
        Ok(g.params.map(|p| p.to_f32()))
    }

    fn new_state(&self, p: &Problem<'_>) -> Result<ReferenceState> {
        let made_for = StateSignature::new(p)?;
        let mf = p.features();
        let shape = made_for.shape();
        let mut heads = try_with_capacity("state", shape.problems())?;
        for _ in 0..shape.problems() {
            heads.push(CausalState::new(mf, shape.dv)?);
        }
        Ok(ReferenceState { made_for, heads })
    }

    fn decode(
        &self,
        p: &Problem<'_>,
        state: &mut ReferenceState,
        inputs: Inputs<'_, Host>,
        mut out: HostMut<'_>,
    ) -> Result<()> {
        let dtype = validate_host_inputs(p, &inputs)?;
        let s = p.shape;
        state.made_for.check(p)?;
        check_output(p, &out, dtype)?;
        check_f64_attention_buffers(p)?;
        let w = Widened::new(p, &inputs)?;
        let delta = p.denominator_guard() as f64;
        let (dims, strides) = (p.dims(TensorArg::Out), p.strides(TensorArg::Out));
        for (bh, head_state) in state.heads.iter_mut().enumerate() {
            let h = w.head(s, inputs.key_mask, bh);
            let o = head_state.advance(p.map, delta, &h);
            write_head_f64(&mut out, dims, strides, bh, &o)?;
        }
        Ok(())
    }

    fn state_signature<'s>(&self, state: &'s ReferenceState) -> &'s StateSignature {
        &state.made_for
    }

    fn decode_slots(
        &self,
        p: &Problem<'_>,
        state: &mut ReferenceState,
        chunks: SlotChunks<'_>,
        inputs: Inputs<'_, Host>,
        mut out: HostMut<'_>,
    ) -> Result<()> {
        validate_slot_call(p, &state.made_for, &chunks, &inputs, &out)?;
        check_finite_args(p, &[(TensorArg::Q, inputs.q), (TensorArg::K, inputs.k), (TensorArg::V, inputs.v)])?;
        check_f64_attention_buffers(p)?;
        let s = p.shape;
        let w = Widened::new(p, &inputs)?;
        let delta = p.denominator_guard() as f64;
        let (dims, strides) = (p.dims(TensorArg::Out), p.strides(TensorArg::Out));
        for (slot, r0, r1) in chunks.sequences() {
            for h in 0..s.heads {
                let head = w.head(s, inputs.key_mask, h).tokens(r0, r1);
                let o = state.heads[slot * s.heads + h].advance(p.map, delta, &head);
                write_rows_f64(&mut out, dims, strides, h, r0, &o)?;
            }
        }
        Ok(())
    }

    fn read_slot(&self, state: &ReferenceState, slot: usize) -> Result<SlotState> {
        state.made_for.check_slot("slot", slot)?;
        let s = state.made_for.shape();
        // The query heads of a group hold equal states (the same keys): read the first.
        let heads = (0..s.key_heads())
            .map(|kvh| {
                let h = &state.heads[slot * s.heads + s.query_heads_of(kvh).start];
                SlotHead { c: h.c, z: h.z.clone(), s: h.s.clone() }
            })
            .collect();
        let tokens = state.heads[slot * s.heads].tokens as u64;
        SlotState::new(state.made_for.slot_signature(), tokens, heads)
    }

    fn write_slot(&self, state: &mut ReferenceState, slot: usize, value: &SlotState) -> Result<()> {
        check_slot_write(&state.made_for, slot, value)?;
        let s = state.made_for.shape();
        for (kvh, v) in value.heads().iter().enumerate() {
            for h in s.query_heads_of(kvh) {
                let st = &mut state.heads[slot * s.heads + h];
                st.c = v.c;
                st.z.copy_from_slice(&v.z);
                st.s.copy_from_slice(&v.s);
                st.tokens = value.tokens() as usize;
            }
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// Per-row stabilisers of `l` tokens of one (batch, head) for `role`.
pub fn stabilisers(map: &FeatureMap, role: FeatureRole, x: &[f64], l: usize, d: usize) -> Vec<f64> {
    let s: Vec<f64> = (0..l).map(|i| map.log_scale(&x[i * d..(i + 1) * d])).collect();
    match role {
        FeatureRole::Query => s,
        FeatureRole::Key => vec![s.iter().copied().fold(f64::NEG_INFINITY, f64::max); l],
        FeatureRole::CausalKey => s
            .iter()
            .scan(f64::NEG_INFINITY, |c, &x| {
                *c = c.max(x);
                Some(*c)
            })
            .collect(),
    }
}

/// Exact softmax attention on host tensors (f64 inside): the accuracy reference.
pub fn softmax_attention(
    shape: AttentionShape,
    direction: Direction,
    inputs: Inputs<'_, Host>,
    mut out: HostMut<'_>,
) -> Result<()> {
    let map = FeatureMap::elu_plus_one();
    let p = Problem::new(shape, &map).with_options(AttentionOptions { direction, ..Default::default() });
    let dtype = validate_host_inputs(&p, &inputs)?;
    check_output(&p, &out, dtype)?;
    let w = Widened::new(&p, &inputs)?;
    for bh in 0..shape.problems() {
        let h = w.head(shape, inputs.key_mask, bh);
        let o = attention::softmax::softmax_forward(&h, direction == Direction::Causal);
        out.write_f64(bh * shape.len * shape.dv, &o)?;
    }
    Ok(())
}

/// Gradients of exact softmax attention on host tensors.
pub fn softmax_attention_backward(
    shape: AttentionShape,
    direction: Direction,
    inputs: Inputs<'_, Host>,
    dout: HostRef<'_>,
    grads: Grads<'_, Host>,
) -> Result<()> {
    let map = FeatureMap::elu_plus_one();
    let p = Problem::new(shape, &map).with_options(AttentionOptions { direction, ..Default::default() });
    let dtype = validate_host_inputs(&p, &inputs)?;
    check_backward(&p, &dout, &grads, dtype)?;
    check_finite(&[("dout", dout)])?;
    let Grads { mut dq, mut dk, mut dv } = grads;
    let w = Widened::new(&p, &inputs)?;
    let g = dout.to_f64_vec();
    let (mut gk, mut gv) = (zeroed("dk", shape.k_len())?, zeroed("dv", shape.v_len())?);
    let (nk, nv) = (shape.keys() * shape.d, shape.keys() * shape.dv);
    for bh in 0..shape.problems() {
        let h = w.head(shape, inputs.key_mask, bh);
        let gh = &g[bh * shape.len * shape.dv..(bh + 1) * shape.len * shape.dv];
        let r = attention::softmax::softmax_backward(&h, direction == Direction::Causal, gh);
        dq.write_f64(bh * shape.len * shape.d, &r.dq)?;
        let kvh = shape.kv_head_of(bh);
        add_into(&mut gk[kvh * nk..(kvh + 1) * nk], &r.dk);
        add_into(&mut gv[kvh * nv..(kvh + 1) * nv], &r.dv);
    }
    dk.write_f64(0, &gk)?;
    dv.write_f64(0, &gv)
}
