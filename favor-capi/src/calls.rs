//! Attention forward and backward (dense and ragged batches) and the feature map on its own.

use crate::handles::{FavorBackend, FavorMap, get, on_engine};
use crate::status::{CallResult, Failure, FavorStatus, guard};
use crate::tensor::{
    CallInputs, FavorGrads, FavorInputs, FavorProblem, FavorTensor, Space, Span, check_array, disjoint, problem, read,
};
use favor::{FavorBackend as Calls, FeatureMap, FeatureRole, Grads, ParamGrads, Problem, Ragged, TensorArg};

/// Which stabiliser the feature map gives a batch of tokens.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FavorRole {
    /// Per-token stabiliser (queries).
    Query = 0,
    /// One stabiliser per (batch, head): the maximum over its tokens (bidirectional keys).
    Key = 1,
    /// Running maximum along the sequence (causal keys).
    CausalKey = 2,
}

fn role_of(code: i32) -> CallResult<FeatureRole> {
    match code {
        0 => Ok(FeatureRole::Query),
        1 => Ok(FeatureRole::Key),
        2 => Ok(FeatureRole::CausalKey),
        c => Err(Failure::param("role", format!("unknown role {c} (0 query, 1 key, 2 causal key)"))),
    }
}

/// Where a backward call writes the gradients of a learned map's parameters (Softplus, gated
/// Softplus); same layouts as the parameters. Ignored for maps without parameters.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorParamGrads {
    /// ∂L/∂W (∂L/∂W_f for the gated map), m·d floats.
    pub dw: *mut f32,
    /// Floats at `dw`.
    pub dw_len: usize,
    /// ∂L/∂b (m floats) for maps with a bias; null otherwise.
    pub dbias: *mut f32,
    /// Floats at `dbias`.
    pub dbias_len: usize,
    /// ∂L/∂W_g (m·d floats) for the gated map; null otherwise.
    pub dw_gate: *mut f32,
    /// Floats at `dw_gate`.
    pub dw_gate_len: usize,
}

/// A ragged batch: sequences packed back to back (batch 1, `len` = all their query tokens),
/// `offsets[i]..offsets[i + 1]` the query tokens of sequence i (FlashAttention's `cu_seqlens`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorRagged {
    /// Cumulative query offsets, starting at 0 and ending at `len`.
    pub offsets: *const usize,
    /// Entries of `offsets` (sequences + 1).
    pub n_offsets: usize,
    /// Cumulative key offsets for cross-attention (ending at `kv_len`); null: the query offsets.
    pub kv_offsets: *const usize,
    /// Entries of `kv_offsets`.
    pub n_kv_offsets: usize,
}

/// # Safety
/// `p` null or valid for `n` reads.
pub(crate) unsafe fn sizes<'a>(p: *const usize, n: usize, arg: &str) -> CallResult<&'a [usize]> {
    check_array(p, n, None, arg)?;
    // SAFETY: non-null, aligned, `n` entries readable (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// The validated parameter-gradient buffers of a call, when the map has parameters and the
/// caller asked for them.
struct ParamOut<'a> {
    w: &'a mut [f32],
    bias: Option<&'a mut [f32]>,
    w_gate: Option<&'a mut [f32]>,
}

/// The byte span of a float buffer, for the overlap check.
fn float_span(arg: &'static str, b: &[f32]) -> CallResult<Span> {
    Span::new(arg, b.as_ptr() as usize, size_of_val(b))
}

/// # Safety
/// `p` null or valid for `n` float writes, exclusively for `'a`.
unsafe fn out_floats<'a>(p: *mut f32, n: usize, want: usize, arg: &str) -> CallResult<&'a mut [f32]> {
    check_array(p.cast_const(), n, Some(want), arg)?;
    // SAFETY: non-null, aligned, writable for `n` floats (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

impl<'a> ParamOut<'a> {
    /// Checks the buffers against the map's parameters before anything runs.
    ///
    /// # Safety
    /// `g` null or readable; its buffers valid for their lengths and not otherwise accessed.
    unsafe fn new(map: &FeatureMap, g: *const FavorParamGrads) -> CallResult<Option<ParamOut<'a>>> {
        let (w, bias, gate) = match map {
            FeatureMap::Softplus(l) => (l.w.len(), l.bias.as_ref().map(Vec::len), None),
            FeatureMap::GatedSoftplus(p) => {
                (p.filter.w.len(), p.filter.bias.as_ref().map(Vec::len), Some(p.gate.w.len()))
            }
            _ => return Ok(None),
        };
        if g.is_null() {
            return Ok(None);
        }
        // SAFETY: forwarded contract.
        let g = unsafe { read(g, "param_grads")? };
        // SAFETY: forwarded contract.
        unsafe {
            Ok(Some(ParamOut {
                w: out_floats(g.dw, g.dw_len, w, "param_grads.dw")?,
                bias: bias.map(|n| out_floats(g.dbias, g.dbias_len, n, "param_grads.dbias")).transpose()?,
                w_gate: gate.map(|n| out_floats(g.dw_gate, g.dw_gate_len, n, "param_grads.dw_gate")).transpose()?,
            }))
        }
    }

    /// The buffers' spans (they are outputs too).
    fn spans(&self) -> CallResult<Vec<Span>> {
        let mut v = vec![float_span("param_grads.dw", self.w)?];
        if let Some(b) = &self.bias {
            v.push(float_span("param_grads.dbias", b)?);
        }
        if let Some(g) = &self.w_gate {
            v.push(float_span("param_grads.dw_gate", g)?);
        }
        Ok(v)
    }

    fn write(self, grads: Option<ParamGrads>) {
        let Some(g) = grads else { return };
        let copy = |dst: &mut [f32], src: &[f32]| dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s);
        copy(self.w, &g.w);
        if let (Some(dst), Some(src)) = (self.bias, g.bias.as_deref()) {
            copy(dst, src);
        }
        if let (Some(dst), Some(src)) = (self.w_gate, g.w_gate.as_deref()) {
            copy(dst, src);
        }
    }
}

/// The strides of each tensor of an attention call.
fn layout_of<'t, M: Space>(
    x: &'t CallInputs<'_, M>,
    out: &'t [(TensorArg, &'t FavorTensor)],
) -> impl Fn(TensorArg) -> Option<favor::Strides> + 't {
    move |arg| match arg {
        TensorArg::Q => x.strides[0],
        TensorArg::K => x.strides[1],
        TensorArg::V => x.strides[2],
        other => out.iter().find(|(a, _)| *a == other).and_then(|(_, t)| t.strides()),
    }
}

/// The pieces of a call with one output (forward, decoding): its inputs, the output's view
/// (checked not to overlap them) and the problem with every tensor's strides.
///
/// # Safety
/// As `favor_forward`.
pub(crate) unsafe fn output_call<'a, 'm, M: Space>(
    map: &'m FeatureMap,
    p: &FavorProblem,
    x: &FavorInputs,
    o: &FavorTensor,
) -> CallResult<(CallInputs<'a, M>, M::Mut<'a>, Problem<'m>)> {
    // SAFETY: forwarded contract; the output is checked for overlaps before it is returned.
    let (x, (out, span)) = unsafe { (CallInputs::<M>::new(x)?, M::view_mut(o, "out")?) };
    disjoint(&[span], &x.spans)?;
    let outs = [(TensorArg::Out, o)];
    let prob = problem(p, map, layout_of(&x, &outs))?;
    Ok((x, out, prob))
}

/// A dense or ragged forward on one backend.
///
/// # Safety
/// As `favor_forward`.
unsafe fn forward_on<B: Calls>(
    b: &B,
    map: &FeatureMap,
    p: &FavorProblem,
    ragged: Option<Ragged<'_>>,
    x: &FavorInputs,
    o: &FavorTensor,
) -> CallResult
where
    B::Mem: Space,
{
    // SAFETY: forwarded contract.
    let (x, out, prob) = unsafe { output_call::<B::Mem>(map, p, x, o)? };
    match ragged {
        None => Ok(b.forward(&prob, x.inputs(), out)?),
        Some(r) => Ok(b.forward_ragged(&prob, r, x.inputs(), out)?),
    }
}

/// A dense or ragged backward on one backend.
///
/// # Safety
/// As `favor_backward`.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_on<B: Calls>(
    b: &B,
    map: &FeatureMap,
    p: &FavorProblem,
    ragged: Option<Ragged<'_>>,
    x: &FavorInputs,
    dout: &FavorTensor,
    g: &FavorGrads,
    param_grads: *const FavorParamGrads,
) -> CallResult
where
    B::Mem: Space,
{
    // SAFETY: forwarded contract; the outputs are checked for overlaps before use.
    unsafe {
        let x = CallInputs::<B::Mem>::new(x)?;
        let (dout_t, dout_span) = <B::Mem as Space>::view(dout, "dout")?;
        let (dq, sq) = <B::Mem as Space>::view_mut(&g.dq, "dq")?;
        let (dk, sk) = <B::Mem as Space>::view_mut(&g.dk, "dk")?;
        let (dv, sv) = <B::Mem as Space>::view_mut(&g.dv, "dv")?;
        let mut input_spans = x.spans.clone();
        input_spans.push(dout_span);
        let params = ParamOut::new(map, param_grads)?;
        let mut outputs = vec![sq, sk, sv];
        outputs.extend(params.as_ref().map(ParamOut::spans).transpose()?.unwrap_or_default());
        disjoint(&outputs, &input_spans)?;
        let outs = [(TensorArg::Dout, dout), (TensorArg::Dq, &g.dq), (TensorArg::Dk, &g.dk), (TensorArg::Dv, &g.dv)];
        let prob = problem(p, map, layout_of(&x, &outs))?;
        let grads = Grads { dq, dk, dv };
        let pg = match ragged {
            None => b.backward(&prob, x.inputs(), dout_t, grads)?,
            Some(r) => b.backward_ragged(&prob, r, x.inputs(), dout_t, grads)?,
        };
        if let Some(po) = params {
            po.write(pg);
        }
        Ok(())
    }
}

/// Attention forward: out `[batch, heads, len, dv]` (any strides) from Q, K, V. Causal or
/// bidirectional, grouped heads, cross-attention and the softmax scale come from `problem` and
/// the map.
///
/// # Safety
/// Every pointer null or valid (handles live; tensors valid for their `len` elements, the output
/// writable and accessed by nothing else during the call; device memory on a device backend).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_forward(
    backend: *const FavorBackend,
    map: *const FavorMap,
    problem_: *const FavorProblem,
    inputs: *const FavorInputs,
    out: *const FavorTensor,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (e, map, p) = (get(backend, "backend")?, get(map, "map")?, read(problem_, "problem")?);
            let (x, o) = (read(inputs, "inputs")?, read(out, "out")?);
            on_engine!(e, b => forward_on(b, map, &p, None, &x, &o))
        }
    })
}

/// Attention backward: dq, dk, dv (any strides) from Q, K, V and ∂L/∂out, and the learned
/// map's parameter gradients into `param_grads` (host memory; null: not wanted).
///
/// # Safety
/// As `favor_forward`; the gradient buffers writable and disjoint from every other buffer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backward(
    backend: *const FavorBackend,
    map: *const FavorMap,
    problem_: *const FavorProblem,
    inputs: *const FavorInputs,
    dout: *const FavorTensor,
    grads: *const FavorGrads,
    param_grads: *const FavorParamGrads,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (e, map, p) = (get(backend, "backend")?, get(map, "map")?, read(problem_, "problem")?);
            let (x, dout, g) = (read(inputs, "inputs")?, read(dout, "dout")?, read(grads, "grads")?);
            on_engine!(e, b => backward_on(b, map, &p, None, &x, &dout, &g, param_grads))
        }
    })
}

/// # Safety
/// `r` null or readable, its arrays valid for their lengths.
unsafe fn ragged_of<'a>(r: *const FavorRagged) -> CallResult<Ragged<'a>> {
    // SAFETY: forwarded contract.
    unsafe {
        let r = read(r, "ragged")?;
        let ragged = Ragged::new(sizes(r.offsets, r.n_offsets, "ragged.offsets")?);
        Ok(if r.kv_offsets.is_null() {
            ragged
        } else {
            ragged.with_kv_offsets(sizes(r.kv_offsets, r.n_kv_offsets, "ragged.kv_offsets")?)
        })
    }
}

/// Forward over a ragged batch (`problem.batch` = 1, `problem.len` = all query tokens): each
/// sequence attends only to its own keys; no work is spent on padding.
///
/// # Safety
/// As `favor_forward`; `ragged` null or readable with its (host) arrays valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_forward_ragged(
    backend: *const FavorBackend,
    map: *const FavorMap,
    problem_: *const FavorProblem,
    ragged: *const FavorRagged,
    inputs: *const FavorInputs,
    out: *const FavorTensor,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (e, map, p) = (get(backend, "backend")?, get(map, "map")?, read(problem_, "problem")?);
            let ragged = ragged_of(ragged)?;
            let (x, o) = (read(inputs, "inputs")?, read(out, "out")?);
            on_engine!(e, b => forward_on(b, map, &p, Some(ragged), &x, &o))
        }
    })
}

/// Backward of `favor_forward_ragged`; parameter gradients summed over the sequences.
///
/// # Safety
/// As `favor_backward` and `favor_forward_ragged`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backward_ragged(
    backend: *const FavorBackend,
    map: *const FavorMap,
    problem_: *const FavorProblem,
    ragged: *const FavorRagged,
    inputs: *const FavorInputs,
    dout: *const FavorTensor,
    grads: *const FavorGrads,
    param_grads: *const FavorParamGrads,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (e, map, p) = (get(backend, "backend")?, get(map, "map")?, read(problem_, "problem")?);
            let ragged = ragged_of(ragged)?;
            let (x, dout, g) = (read(inputs, "inputs")?, read(dout, "dout")?, read(grads, "grads")?);
            on_engine!(e, b => backward_on(b, map, &p, Some(ragged), &x, &dout, &g, param_grads))
        }
    })
}

/// Fails for a tensor with strides: the feature map reads and writes contiguous tensors.
fn contiguous(t: &FavorTensor, arg: &str) -> CallResult {
    match t.strides() {
        None => Ok(()),
        Some(_) => Err(Failure::new(
            FavorStatus::Unsupported,
            format!("argument `{arg}`: the feature map takes contiguous tensors (strides 0, 0, 0)"),
        )),
    }
}

/// # Safety
/// As `favor_feature_map`.
unsafe fn feature_map_on<B: Calls>(
    b: &B,
    map: &FeatureMap,
    role: i32,
    p: &FavorProblem,
    x: &FavorTensor,
    phi: &FavorTensor,
) -> CallResult
where
    B::Mem: Space,
{
    contiguous(x, "x")?;
    contiguous(phi, "phi")?;
    // SAFETY: forwarded contract; the output is checked for overlaps before use.
    let ((xv, sx), (phiv, sp)) =
        unsafe { (<B::Mem as Space>::view(x, "x")?, <B::Mem as Space>::view_mut(phi, "phi")?) };
    disjoint(&[sp], &[sx])?;
    Ok(b.feature_map(map, role_of(role)?, p.shape(), xv, phiv)?)
}

/// # Safety
/// As `favor_feature_map_backward`.
#[allow(clippy::too_many_arguments)]
unsafe fn feature_map_backward_on<B: Calls>(
    b: &B,
    map: &FeatureMap,
    role: i32,
    p: &FavorProblem,
    x: &FavorTensor,
    dphi: &FavorTensor,
    dx: &FavorTensor,
    param_grads: *const FavorParamGrads,
) -> CallResult
where
    B::Mem: Space,
{
    for (t, arg) in [(x, "x"), (dphi, "dphi"), (dx, "dx")] {
        contiguous(t, arg)?;
    }
    // SAFETY: forwarded contract; the outputs are checked for overlaps before use.
    unsafe {
        let (xv, sx) = <B::Mem as Space>::view(x, "x")?;
        let (gv, sg) = <B::Mem as Space>::view(dphi, "dphi")?;
        let (dxv, sd) = <B::Mem as Space>::view_mut(dx, "dx")?;
        let params = ParamOut::new(map, param_grads)?;
        let mut outputs = vec![sd];
        outputs.extend(params.as_ref().map(ParamOut::spans).transpose()?.unwrap_or_default());
        disjoint(&outputs, &[sx, sg])?;
        let pg = b.feature_map_backward(map, role_of(role)?, p.shape(), xv, gv, dxv)?;
        if let Some(po) = params {
            po.write(pg);
        }
        Ok(())
    }
}

/// The feature map alone: φ(x) `[batch, heads, len, M]` from x `[batch, heads, len, d]`
/// (contiguous; sizes from `problem`'s batch, heads, len and d).
///
/// # Safety
/// As `favor_forward`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_feature_map(
    backend: *const FavorBackend,
    map: *const FavorMap,
    role: i32,
    problem_: *const FavorProblem,
    x: *const FavorTensor,
    phi: *const FavorTensor,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (e, map, p) = (get(backend, "backend")?, get(map, "map")?, read(problem_, "problem")?);
            let (xt, pt) = (read(x, "x")?, read(phi, "phi")?);
            on_engine!(e, b => feature_map_on(b, map, role, &p, &xt, &pt))
        }
    })
}

/// Backward of the feature map: dx from x and ∂L/∂φ, and the learned map's parameter gradients
/// into `param_grads` (host memory; null: not wanted).
///
/// # Safety
/// As `favor_backward`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_feature_map_backward(
    backend: *const FavorBackend,
    map: *const FavorMap,
    role: i32,
    problem_: *const FavorProblem,
    x: *const FavorTensor,
    dphi: *const FavorTensor,
    dx: *const FavorTensor,
    param_grads: *const FavorParamGrads,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (e, map, p) = (get(backend, "backend")?, get(map, "map")?, read(problem_, "problem")?);
            let (xt, gt, dt) = (read(x, "x")?, read(dphi, "dphi")?, read(dx, "dx")?);
            on_engine!(e, b => feature_map_backward_on(b, map, role, &p, &xt, &gt, &dt, param_grads))
        }
    })
}
