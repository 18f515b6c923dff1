//! The backend trait: the one interface every favor backend (reference, CPU SIMD, CUDA)
//! implements, and the argument structs it takes.
//!
//! Tensors live in the backend's [`MemorySpace`]: [`Host`] slices for CPU backends, device
//! buffers for a GPU backend, so an engine can hand a GPU backend its own buffers (and stream)
//! without a round trip through host memory. Every backend also offers the host path: CPU
//! backends natively, GPU backends through a host adapter that copies.

use crate::layout::{RowOrder, TensorDims, check_strides};
use crate::ragged::{Ragged, Sequence};
use crate::slots::{SlotChunks, SlotState};
/// Size arithmetic and fallible allocation for backends: a buffer whose size comes from a
/// caller goes through these, so that it fails with a typed error instead of aborting.
pub use crate::validate::{check_allocatable, checked_len, try_with_capacity, try_zeroed};
use crate::{
    AttentionOptions, AttentionShape, DType, Direction, FavorError, FeatureMap, FeatureRole, HostMut, HostRef,
    ParamGrads, Result, StateSignature, TensorHandle,
};
use crate::{Layout, Strides, TensorArg};

const QK_DIMS: &str = "[batch, heads, len, d]";
const K_DIMS: &str = "[batch, heads, kv_len, d]";
const V_DIMS: &str = "[batch, heads, kv_len, d_v]";
const OUT_DIMS: &str = "[batch, heads, len, d_v]";

/// Where a backend's tensors live.
pub trait MemorySpace: 'static {
    /// Read-only tensor handle.
    type Ref<'a>: TensorHandle + Copy;
    /// Writable tensor handle.
    type Mut<'a>: TensorHandle;

    /// Elements `start..` of a tensor (`None` past its end): one sequence of a packed call.
    fn skip<'t>(t: Self::Ref<'t>, start: usize) -> Option<Self::Ref<'t>>;

    /// Elements `start..` of a writable tensor, reborrowed (`None` past its end).
    fn skip_mut<'s>(t: &'s mut Self::Mut<'_>, start: usize) -> Option<Self::Mut<'s>>;
}

/// Host memory: tensors are [`HostRef`] / [`HostMut`] slices.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl MemorySpace for Host {
    type Ref<'a> = HostRef<'a>;
    type Mut<'a> = HostMut<'a>;

    fn skip<'t>(t: Self::Ref<'t>, start: usize) -> Option<Self::Ref<'t>> {
        Some(match t {
            HostRef::F32(s) => HostRef::F32(s.get(start..)?),
            HostRef::F16(s) => HostRef::F16(s.get(start..)?),
            HostRef::Bf16(s) => HostRef::Bf16(s.get(start..)?),
        })
    }

    fn skip_mut<'s>(t: &'s mut Self::Mut<'_>, start: usize) -> Option<Self::Mut<'s>> {
        Some(match t {
            HostMut::F32(s) => HostMut::F32(s.get_mut(start..)?),
            HostMut::F16(s) => HostMut::F16(s.get_mut(start..)?),
            HostMut::Bf16(s) => HostMut::Bf16(s.get_mut(start..)?),
        })
    }
}

/// One sequence of a packed (ragged or slot-decoding) call as a call of its own: batch 1, its lengths, the parent's
/// strides made explicit (a sequence is a slice of the packed tensors).
pub fn sequence_problem<'a>(p: &Problem<'a>, q: &Sequence) -> Problem<'a> {
    let (nq, nk) = (q.q1 - q.q0, q.k1 - q.k0);
    // Per-sequence key counts may differ from the query counts even when the totals agree.
    let shape = AttentionShape { len: nq, kv_len: (nk != nq).then_some(nk), ..p.shape };
    Problem { shape, layout: Layout::from_fn(|arg| Some(p.strides(arg))), ..*p }
}

/// The first element of a sequence's rows in the tensor `arg` of a ragged call.
fn sequence_start(p: &Problem<'_>, arg: TensorArg, q: &Sequence) -> usize {
    let first = match arg {
        TensorArg::K | TensorArg::V | TensorArg::Dk | TensorArg::Dv => q.k0,
        _ => q.q0,
    };
    first * p.strides(arg).token
}

fn sequence_ref<'t, M: MemorySpace>(
    p: &Problem<'_>,
    arg: TensorArg,
    q: &Sequence,
    t: M::Ref<'t>,
) -> Result<M::Ref<'t>> {
    let start = sequence_start(p, arg, q);
    M::skip(t, start).ok_or(FavorError::OutOfRange { start, count: 0, len: t.len() })
}

/// The writable rows of one sequence in the tensor `arg` of a packed call.
pub fn sequence_mut<'s, M: MemorySpace>(
    p: &Problem<'_>,
    arg: TensorArg,
    q: &Sequence,
    t: &'s mut M::Mut<'_>,
) -> Result<M::Mut<'s>> {
    let (start, len) = (sequence_start(p, arg, q), t.len());
    M::skip_mut(t, start).ok_or(FavorError::OutOfRange { start, count: 0, len })
}

/// The inputs of one sequence of a packed (ragged or slot-decoding) call.
pub fn sequence_inputs<'t, M: MemorySpace>(p: &Problem<'_>, q: &Sequence, x: &Inputs<'t, M>) -> Result<Inputs<'t, M>> {
    Ok(Inputs {
        q: sequence_ref::<M>(p, TensorArg::Q, q, x.q)?,
        k: sequence_ref::<M>(p, TensorArg::K, q, x.k)?,
        v: sequence_ref::<M>(p, TensorArg::V, q, x.v)?,
        key_mask: x.key_mask.map(|m| &m[q.k0..q.k1]),
    })
}

/// `acc += part` for the parameter gradients of learned maps.
fn add_param_grads(acc: &mut Option<ParamGrads>, part: Option<ParamGrads>) {
    let Some(part) = part else { return };
    let Some(a) = acc.as_mut() else {
        *acc = Some(part);
        return;
    };
    let add = |a: &mut Vec<f32>, b: &[f32]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    add(&mut a.w, &part.w);
    if let (Some(x), Some(y)) = (a.bias.as_mut(), part.bias.as_ref()) {
        add(x, y);
    }
    if let (Some(x), Some(y)) = (a.w_gate.as_mut(), part.w_gate.as_ref()) {
        add(x, y);
    }
}

/// What to compute: sizes, feature map and options.
#[derive(Debug, Clone, Copy)]
pub struct Problem<'a> {
    /// Sizes.
    pub shape: AttentionShape,
    /// Feature map (with its projection or parameters).
    pub map: &'a FeatureMap,
    /// Direction and denominator guard.
    pub options: AttentionOptions,
    /// Strides of each tensor (default: contiguous `[B, H, L, ·]`).
    pub layout: Layout,
}

impl<'a> Problem<'a> {
    /// A problem with default (bidirectional) options.
    pub fn new(shape: AttentionShape, map: &'a FeatureMap) -> Self {
        Self { shape, map, options: AttentionOptions::default(), layout: Layout::default() }
    }

    /// The same problem with tensors laid out by `layout` (see [`crate::layout`]).
    pub fn with_layout(self, layout: Layout) -> Self {
        Self { layout, ..self }
    }

    /// The strides in effect for one tensor.
    pub fn strides(&self, arg: TensorArg) -> Strides {
        self.layout.strides(arg, &self.shape)
    }

    /// The logical sizes of one tensor.
    pub fn dims(&self, arg: TensorArg) -> TensorDims {
        arg.dims(&self.shape)
    }

    /// The same problem with other options.
    pub fn with_options(self, options: AttentionOptions) -> Self {
        Self { options, ..self }
    }

    /// Number of features M.
    pub fn features(&self) -> usize {
        self.map.feature_dim(self.shape.d)
    }

    /// The denominator guard δ in effect.
    pub fn denominator_guard(&self) -> f32 {
        self.options.denominator_guard.unwrap_or_else(|| self.map.default_denominator_guard())
    }

    /// Checks sizes, the map and the guard.
    pub fn validate(&self) -> Result<()> {
        self.shape.validate()?;
        self.map.validate(self.shape.d)?;
        let g = self.denominator_guard();
        if !(g.is_finite() && g >= 0.0) {
            return Err(FavorError::param("denominator_guard", format!("must be finite and ≥ 0, got {g}")));
        }
        if self.options.direction == Direction::Causal && self.shape.is_cross() {
            return Err(FavorError::param(
                "kv_len",
                format!(
                    "causal attention needs as many keys as queries (query i sees keys 0..=i), got {} queries and {} keys; \
                     cross-attention is bidirectional only",
                    self.shape.len,
                    self.shape.keys()
                ),
            ));
        }
        Ok(())
    }
}

/// Q, K, V and the optional key padding mask (`[batch, kv_len]`, true = keep) of one call.
pub struct Inputs<'a, M: MemorySpace> {
    /// Queries `[B, H, L, d]`.
    pub q: M::Ref<'a>,
    /// Keys `[B, H, L_kv, d]` (L_kv = `kv_len`, L unless set).
    pub k: M::Ref<'a>,
    /// Values `[B, H, L_kv, d_v]`.
    pub v: M::Ref<'a>,
    /// Key padding mask `[B, L_kv]`; padded keys get φ(k) = 0 and are left out of the stabiliser.
    pub key_mask: Option<&'a [bool]>,
}

impl<M: MemorySpace> Clone for Inputs<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M: MemorySpace> Copy for Inputs<'_, M> {}

/// Gradient outputs of a backward call.
pub struct Grads<'a, M: MemorySpace> {
    /// ∂ℒ/∂Q `[B, H, L, d]`.
    pub dq: M::Mut<'a>,
    /// ∂ℒ/∂K `[B, H, L_kv, d]`.
    pub dk: M::Mut<'a>,
    /// ∂ℒ/∂V `[B, H, L_kv, d_v]`.
    pub dv: M::Mut<'a>,
}

/// A FAVOR backend. Implementations are `Send + Sync`; every method validates its arguments
/// and returns a typed error instead of panicking.
pub trait FavorBackend: Send + Sync {
    /// Where tensors live.
    type Mem: MemorySpace;
    /// Recurrent decoding state (per batch element and head).
    type State: Send;

    /// A name for logs: "reference", "cpu-avx2", "cuda:NVIDIA H100", ...
    fn name(&self) -> String;

    /// φ(x) for tokens `x` `[B, H, L, d]` into `phi` `[B, H, L, M]`, with the stabiliser of `role`.
    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: <Self::Mem as MemorySpace>::Ref<'_>,
        phi: <Self::Mem as MemorySpace>::Mut<'_>,
    ) -> Result<()>;

    /// ∂ℒ/∂x from ∂ℒ/∂φ (stabilisers held constant); parameter gradients for learned maps.
    fn feature_map_backward(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: <Self::Mem as MemorySpace>::Ref<'_>,
        dphi: <Self::Mem as MemorySpace>::Ref<'_>,
        dx: <Self::Mem as MemorySpace>::Mut<'_>,
    ) -> Result<Option<ParamGrads>>;

    /// Attention output `[B, H, L, d_v]` (direction from `problem.options`).
    fn forward(
        &self,
        problem: &Problem<'_>,
        inputs: Inputs<'_, Self::Mem>,
        out: <Self::Mem as MemorySpace>::Mut<'_>,
    ) -> Result<()>;

    /// Gradients of the attention output given ∂ℒ/∂out; parameter gradients for learned maps.
    fn backward(
        &self,
        problem: &Problem<'_>,
        inputs: Inputs<'_, Self::Mem>,
        dout: <Self::Mem as MemorySpace>::Ref<'_>,
        grads: Grads<'_, Self::Mem>,
    ) -> Result<Option<ParamGrads>>;

    /// Attention over a ragged batch (see [`crate::ragged`]): the tensors hold the sequences back
    /// to back (batch 1, `len` = their total query tokens, any layout), each attending only to
    /// its own keys. Backends run it sequence by sequence unless they have a kernel for it.
    fn forward_ragged(
        &self,
        problem: &Problem<'_>,
        ragged: Ragged<'_>,
        inputs: Inputs<'_, Self::Mem>,
        mut out: <Self::Mem as MemorySpace>::Mut<'_>,
    ) -> Result<()> {
        let dtype = validate_inputs(problem, &inputs)?;
        ragged.validate(problem)?;
        check_output(problem, &out, dtype)?;
        for q in ragged.sequences().filter(|q| q.q1 > q.q0) {
            let sub = sequence_problem(problem, &q);
            let x = sequence_inputs(problem, &q, &inputs)?;
            self.forward(&sub, x, sequence_mut::<Self::Mem>(problem, TensorArg::Out, &q, &mut out)?)?;
        }
        Ok(())
    }

    /// Gradients of [`FavorBackend::forward_ragged`]; parameter gradients summed over the
    /// sequences.
    fn backward_ragged(
        &self,
        problem: &Problem<'_>,
        ragged: Ragged<'_>,
        inputs: Inputs<'_, Self::Mem>,
        dout: <Self::Mem as MemorySpace>::Ref<'_>,
        mut grads: Grads<'_, Self::Mem>,
    ) -> Result<Option<ParamGrads>> {
        let dtype = validate_inputs(problem, &inputs)?;
        ragged.validate(problem)?;
        check_backward(problem, &dout, &grads, dtype)?;
        let mut params = None;
        for q in ragged.sequences().filter(|q| q.q1 > q.q0) {
            let sub = sequence_problem(problem, &q);
            let x = sequence_inputs(problem, &q, &inputs)?;
            let g = Grads {
                dq: sequence_mut::<Self::Mem>(problem, TensorArg::Dq, &q, &mut grads.dq)?,
                dk: sequence_mut::<Self::Mem>(problem, TensorArg::Dk, &q, &mut grads.dk)?,
                dv: sequence_mut::<Self::Mem>(problem, TensorArg::Dv, &q, &mut grads.dv)?,
            };
            let d = sequence_ref::<Self::Mem>(problem, TensorArg::Dout, &q, dout)?;
            add_param_grads(&mut params, self.backward(&sub, x, d, g)?);
        }
        Ok(params)
    }

    /// An empty decoding state for `problem.shape` (its `len` is ignored).
    fn new_state(&self, problem: &Problem<'_>) -> Result<Self::State>;

    /// Causal attention continuing from `state` over a chunk of `problem.shape.len` tokens:
    /// prefill with a long chunk, decoding with one token per call. Equal to full causal
    /// attention over the concatenated chunks.
    fn decode(
        &self,
        problem: &Problem<'_>,
        state: &mut Self::State,
        inputs: Inputs<'_, Self::Mem>,
        out: <Self::Mem as MemorySpace>::Mut<'_>,
    ) -> Result<()>;

    /// What `state` was made for; its batch is the state's number of slots.
    fn state_signature<'s>(&self, state: &'s Self::State) -> &'s StateSignature;

    /// Continues some of the state's slots, each by its own chunk of tokens, in one call (see
    /// [`crate::slots`]): the tensors hold the chunks back to back (batch 1, `len` = their total
    /// tokens, any layout) and `chunks` says which tokens continue which slot. Each chunk's
    /// output equals full causal attention over everything its slot has consumed.
    fn decode_slots(
        &self,
        problem: &Problem<'_>,
        state: &mut Self::State,
        chunks: SlotChunks<'_>,
        inputs: Inputs<'_, Self::Mem>,
        out: <Self::Mem as MemorySpace>::Mut<'_>,
    ) -> Result<()>;

    /// A backend-independent copy of one slot (to export, or to copy elsewhere).
    fn read_slot(&self, state: &Self::State, slot: usize) -> Result<SlotState>;

    /// Overwrites one slot with `value`, which must be made for the same problem
    /// ([`FavorError::StateMismatch`] otherwise).
    fn write_slot(&self, state: &mut Self::State, slot: usize, value: &SlotState) -> Result<()>;

    /// Empties one slot, as if it had consumed nothing.
    fn reset_slot(&self, state: &mut Self::State, slot: usize) -> Result<()> {
        let made_for = self.state_signature(state);
        made_for.check_slot("slot", slot)?;
        let empty = SlotState::empty(made_for.slot_signature())?;
        self.write_slot(state, slot, &empty)
    }

    /// Copies slot `from` over slot `to` (beam search, a shared prompt prefix).
    fn copy_slot(&self, state: &mut Self::State, from: usize, to: usize) -> Result<()> {
        let made_for = self.state_signature(state);
        made_for.check_slot("from", from)?;
        made_for.check_slot("to", to)?;
        let value = self.read_slot(state, from)?;
        self.write_slot(state, to, &value)
    }

    /// Wait for queued work (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<()>;
}

/// Checks a [`FavorBackend::write_slot`] call: the slot is in range and `value` is made for
/// the state's problem.
pub fn check_slot_write(made_for: &StateSignature, slot: usize, value: &SlotState) -> Result<()> {
    made_for.check_slot("slot", slot)?;
    made_for.slot_signature().check(value.signature())
}

/// Validates a slot-decoding call: the problem and the packed inputs, the state's problem, the
/// chunks and the output; returns the dtype.
pub fn validate_slot_call<M: MemorySpace>(
    p: &Problem<'_>,
    made_for: &StateSignature,
    chunks: &SlotChunks<'_>,
    inputs: &Inputs<'_, M>,
    out: &impl TensorHandle,
) -> Result<DType> {
    let dtype = validate_inputs(p, inputs)?;
    made_for.check_slot_call(p)?;
    chunks.validate(p, made_for)?;
    check_output(p, out, dtype)?;
    Ok(dtype)
}

/// Checks one tensor's length and dtype.
pub fn check_tensor(arg: &'static str, t: &impl TensorHandle, len: usize, dtype: DType, dims: &str) -> Result<()> {
    if t.dtype() != dtype {
        return Err(FavorError::DType { arg, expected: dtype, actual: t.dtype() });
    }
    if t.len() != len {
        return Err(FavorError::Shape {
            arg,
            expected: format!("{len} elements ({dims})"),
            actual: format!("{} elements", t.len()),
        });
    }
    Ok(())
}

/// Checks one tensor of an attention call: its dtype, and its length against the shape
/// (contiguous default) or its strides against its length (in range, rows disjoint).
pub fn check_call_tensor(p: &Problem<'_>, arg: TensorArg, t: &impl TensorHandle, dtype: DType) -> Result<()> {
    let dims = p.dims(arg);
    match p.layout.given(arg) {
        None => {
            // Validated shapes have exact element counts.
            let len = dims.total_rows() * dims.width;
            let text = match arg {
                TensorArg::Q | TensorArg::Dq => QK_DIMS,
                TensorArg::K | TensorArg::Dk => K_DIMS,
                TensorArg::V | TensorArg::Dv => V_DIMS,
                TensorArg::Out | TensorArg::Dout => OUT_DIMS,
            };
            check_tensor(arg.name(), t, len, dtype, text)
        }
        Some(strides) => {
            if t.dtype() != dtype {
                return Err(FavorError::DType { arg: arg.name(), expected: dtype, actual: t.dtype() });
            }
            check_strides(arg.name(), dims, strides, t.len())
        }
    }
}

/// Validates the problem and the inputs of a forward/backward/decode call; returns the dtype.
pub fn validate_inputs<M: MemorySpace>(p: &Problem<'_>, inputs: &Inputs<'_, M>) -> Result<DType> {
    p.validate()?;
    let s = p.shape;
    let dtype = inputs.q.dtype();
    check_call_tensor(p, TensorArg::Q, &inputs.q, dtype)?;
    check_call_tensor(p, TensorArg::K, &inputs.k, dtype)?;
    check_call_tensor(p, TensorArg::V, &inputs.v, dtype)?;
    if let Some(m) = inputs.key_mask
        && m.len() != s.mask_len()
    {
        return Err(FavorError::shape("key_mask", format!("{} elements ([batch, kv_len])", s.mask_len()), m.len()));
    }
    Ok(dtype)
}

/// [`validate_inputs`] for host tensors, plus the finiteness check of Q, K and V.
pub fn validate_host_inputs(p: &Problem<'_>, inputs: &Inputs<'_, Host>) -> Result<DType> {
    let dtype = validate_inputs(p, inputs)?;
    check_finite_args(p, &[(TensorArg::Q, inputs.q), (TensorArg::K, inputs.k), (TensorArg::V, inputs.v)])?;
    Ok(dtype)
}

/// Checks the output of a forward or decode call: `[B, H, L, d_v]` in the call's dtype.
pub fn check_output(p: &Problem<'_>, out: &impl TensorHandle, dtype: DType) -> Result<()> {
    check_call_tensor(p, TensorArg::Out, out, dtype)
}

/// Checks ∂ℒ/∂out and the three gradient outputs of a backward call against the call's dtype.
pub fn check_backward<M: MemorySpace>(
    p: &Problem<'_>,
    dout: &M::Ref<'_>,
    grads: &Grads<'_, M>,
    dtype: DType,
) -> Result<()> {
    check_call_tensor(p, TensorArg::Dout, dout, dtype)?;
    check_call_tensor(p, TensorArg::Dq, &grads.dq, dtype)?;
    check_call_tensor(p, TensorArg::Dk, &grads.dk, dtype)?;
    check_call_tensor(p, TensorArg::Dv, &grads.dv, dtype)
}

/// Validates a feature-map call: the map against d, tokens `x` `[B, H, L, d]` and the feature
/// tensor `features` (named `features_arg`: φ or ∂ℒ/∂φ) `[B, H, L, M]` in x's dtype. Returns M.
pub fn validate_feature_call(
    map: &FeatureMap,
    shape: AttentionShape,
    x: &impl TensorHandle,
    features_arg: &'static str,
    features: &impl TensorHandle,
) -> Result<usize> {
    // One tensor of `len` tokens: `kv_len` plays no part.
    AttentionShape { dv: shape.d, kv_len: None, kv_heads: None, ..shape }.validate()?;
    map.validate(shape.d)?;
    let mf = map.feature_dim(shape.d);
    let features_len = checked_len(features_arg, &[shape.batch, shape.heads, shape.len, mf])?;
    check_tensor("x", x, shape.qk_len(), x.dtype(), QK_DIMS)?;
    check_tensor(features_arg, features, features_len, x.dtype(), "[batch, heads, len, M]")?;
    Ok(mf)
}

/// Checks the per-head buffers of favor-core's f64 attention functions ([`crate::attention`]),
/// which have no error path: M×d_v sums (`state`) and L×M features (`phi`) of f64, sizes that
/// nothing the caller allocated bounds (V is L×d_v, W is M×d). Call it before running them.
pub fn check_f64_attention_buffers(p: &Problem<'_>) -> Result<()> {
    let (mf, s) = (p.features(), p.shape);
    check_allocatable::<f64>("state", &[mf, s.dv])?;
    check_allocatable::<f64>("phi", &[s.len.max(s.keys()), mf])
}

/// Reports the first NaN or infinity of host tensors of a call, looking only at the rows their
/// strides address (a packed or padded buffer may hold anything between them); the index is the
/// element's position in the tensor's slice. Call it after the tensors were validated.
pub fn check_finite_args(p: &Problem<'_>, args: &[(TensorArg, HostRef<'_>)]) -> Result<()> {
    for &(arg, t) in args {
        if p.layout.given(arg).is_none() {
            check_finite(&[(arg.name(), t)])?;
            continue;
        }
        let (dims, order) = (p.dims(arg), RowOrder::new(p.dims(arg), p.strides(arg)));
        for o in 0..order.blocks() {
            for (_, start) in order.block(o) {
                if let Some((i, value)) = t.first_non_finite_in(start, dims.width) {
                    return Err(FavorError::NonFinite { arg: arg.name(), index: start + i, value });
                }
            }
        }
    }
    Ok(())
}

/// Reports the first NaN or infinity of the host inputs (favor's documented policy: non-finite
/// inputs are rejected, never propagated).
pub fn check_finite(args: &[(&'static str, HostRef<'_>)]) -> Result<()> {
    for (arg, t) in args {
        if let Some((index, value)) = t.first_non_finite() {
            return Err(FavorError::NonFinite { arg, index, value });
        }
    }
    Ok(())
}
