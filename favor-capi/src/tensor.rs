//! Tensors, problems and inputs as C passes them, and their conversion to favor's views: every
//! pointer, element type, alignment and size is checked here, and output buffers may not overlap
//! any other buffer of the call (Rust's `&mut` must be exclusive).

use crate::status::{CallResult, Failure, FavorStatus};
use favor::layout::Strides;
use favor::{
    AttentionOptions, AttentionShape, DType, Direction, FeatureMap, Host, HostMut, HostRef, Inputs, Layout,
    MemorySpace, Problem, TensorArg,
};
use half::{bf16, f16};
use std::ffi::c_void;

/// Element types of a tensor.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FavorDType {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

/// A strided tensor in host memory: `len` elements of `dtype` from `data`, read as
/// `[batch, heads, rows, width]` with the given strides (in elements; the last dimension is
/// contiguous), or device memory for a backend opened with `favor_backend_open_device`. All
/// three strides 0 means contiguous `[batch, heads, rows, width]`; a tensor of
/// `[batch, rows, heads, width]` has strides (rows·heads·width, width, heads·width), and a packed
/// `[batch, rows, 3, heads, d]` QKV buffer gives q, k and v the same buffer at element offsets
/// 0, heads·d and 2·heads·d with strides (rows·3·heads·d, d, 3·heads·d) (its `len` counts from
/// each tensor's own start).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorTensor {
    /// First element; must be aligned to the element size.
    pub data: *mut c_void,
    /// Elements addressable from `data`.
    pub len: usize,
    /// A `FavorDType` value.
    pub dtype: i32,
    /// Elements between batch elements (0 with the other two 0: contiguous).
    pub batch_stride: usize,
    /// Elements between heads.
    pub head_stride: usize,
    /// Elements between tokens (rows).
    pub token_stride: usize,
}

/// Q, K, V and the optional key padding mask of a call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorInputs {
    /// Queries `[batch, heads, len, d]`.
    pub q: FavorTensor,
    /// Keys `[batch, kv_heads, kv_len, d]`.
    pub k: FavorTensor,
    /// Values `[batch, kv_heads, kv_len, dv]`.
    pub v: FavorTensor,
    /// Key padding mask `[batch, kv_len]`, nonzero = keep; null for none.
    pub key_mask: *const u8,
    /// Bytes of `key_mask` (ignored when it is null).
    pub key_mask_len: usize,
}

/// The gradient outputs of a backward call (same shapes as q, k and v).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorGrads {
    /// ∂L/∂Q.
    pub dq: FavorTensor,
    /// ∂L/∂K.
    pub dk: FavorTensor,
    /// ∂L/∂V.
    pub dv: FavorTensor,
}

/// Sizes and options of an attention call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorProblem {
    /// Batch size (the number of slots for a decoding state).
    pub batch: usize,
    /// Query heads per batch element.
    pub heads: usize,
    /// Query tokens per sequence (the chunk length when decoding).
    pub len: usize,
    /// Query/key head dimension.
    pub d: usize,
    /// Value head dimension; 0 means d.
    pub dv: usize,
    /// Keys per sequence (cross-attention, bidirectional only); 0 means len.
    pub kv_len: usize,
    /// Key/value heads per batch element (grouped-query attention; must divide heads); 0 means
    /// heads.
    pub kv_heads: usize,
    /// 0: bidirectional, 1: causal.
    pub causal: i32,
    /// Denominator guard δ; negative selects the feature map's default.
    pub denominator_guard: f32,
}

impl FavorProblem {
    pub(crate) fn shape(&self) -> AttentionShape {
        let mut s = AttentionShape::new(self.batch, self.heads, self.len, self.d);
        if self.dv != 0 {
            s = s.with_dv(self.dv);
        }
        if self.kv_len != 0 {
            s = s.with_kv_len(self.kv_len);
        }
        if self.kv_heads != 0 {
            s = s.with_kv_heads(self.kv_heads);
        }
        s
    }

    pub(crate) fn options(&self) -> CallResult<AttentionOptions> {
        let direction = match self.causal {
            0 => Direction::Bidirectional,
            1 => Direction::Causal,
            c => return Err(Failure::param("causal", format!("must be 0 or 1, got {c}"))),
        };
        let guard = self.denominator_guard;
        Ok(AttentionOptions { direction, denominator_guard: if guard < 0.0 { None } else { Some(guard) } })
    }
}

/// Checks an array of `n` `T` the caller passes by pointer (argument `arg`): not null, aligned,
/// and exactly `want` long when a length is required.
pub(crate) fn check_array<T>(p: *const T, n: usize, want: Option<usize>, arg: &str) -> CallResult {
    if p.is_null() {
        return Err(Failure::null(arg));
    }
    if let Some(want) = want.filter(|&w| w != n) {
        return Err(Failure::new(FavorStatus::Shape, format!("argument `{arg}`: expected {want} elements, got {n}")));
    }
    if !(p as usize).is_multiple_of(align_of::<T>()) {
        return Err(Failure::param(arg, format!("not aligned to {} bytes", align_of::<T>())));
    }
    Ok(())
}

/// Reads `*p` (a struct the caller passes by pointer).
///
/// # Safety
/// `p` is null or valid for one read of `T`.
pub(crate) unsafe fn read<T: Copy>(p: *const T, arg: &str) -> CallResult<T> {
    if p.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: non-null and valid for one read (the caller's contract).
    Ok(unsafe { p.read() })
}

fn dtype_of(code: i32, arg: &str) -> CallResult<DType> {
    match code {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::Bf16),
        c => Err(Failure::new(
            FavorStatus::Dtype,
            format!("argument `{arg}`: unknown dtype {c} (FAVOR_D_TYPE_F32 = 0, F16 = 1, BF16 = 2)"),
        )),
    }
}

/// The byte range a call touches of one buffer, to find outputs that overlap other buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    arg: &'static str,
    start: usize,
    end: usize,
}

impl Span {
    /// The `bytes` bytes from `start` (argument `arg`).
    pub(crate) fn new(arg: &'static str, start: usize, bytes: usize) -> CallResult<Span> {
        let end = start.checked_add(bytes).ok_or_else(|| Failure::param(arg, "the buffer wraps the address space"))?;
        Ok(Span { arg, start, end })
    }
}

impl FavorTensor {
    /// The strides given, or `None` for the default contiguous layout.
    pub(crate) fn strides(&self) -> Option<Strides> {
        let s = Strides { batch: self.batch_stride, head: self.head_stride, token: self.token_stride };
        (s != Strides { batch: 0, head: 0, token: 0 }).then_some(s)
    }

    fn checked(&self, arg: &'static str) -> CallResult<(DType, Span)> {
        let dtype = dtype_of(self.dtype, arg)?;
        if self.data.is_null() {
            return Err(Failure::new(FavorStatus::NullPointer, format!("argument `{arg}`: data is a null pointer")));
        }
        let size = dtype.size();
        if !(self.data as usize).is_multiple_of(size) {
            return Err(Failure::param(arg, format!("data is not aligned to its {size}-byte elements")));
        }
        let bytes = self.len.checked_mul(size).filter(|&b| b <= isize::MAX as usize).ok_or_else(|| {
            Failure::new(
                FavorStatus::SizeOverflow,
                format!("argument `{arg}`: {} elements overflow the address space", self.len),
            )
        })?;
        Ok((dtype, Span::new(arg, self.data as usize, bytes)?))
    }

    /// A read-only view.
    ///
    /// # Safety
    /// `data` is valid for reads of `len` elements of `dtype` for `'a`, unwritten meanwhile.
    pub(crate) unsafe fn host_ref<'a>(&self, arg: &'static str) -> CallResult<(HostRef<'a>, Span)> {
        let (dtype, span) = self.checked(arg)?;
        let (p, n) = (self.data.cast_const(), self.len);
        // SAFETY: non-null, aligned, `n` elements within isize::MAX bytes (checked), valid for
        // reads for 'a (the caller's contract).
        let t = unsafe {
            match dtype {
                DType::F32 => HostRef::F32(std::slice::from_raw_parts(p.cast::<f32>(), n)),
                DType::F16 => HostRef::F16(std::slice::from_raw_parts(p.cast::<f16>(), n)),
                DType::Bf16 => HostRef::Bf16(std::slice::from_raw_parts(p.cast::<bf16>(), n)),
            }
        };
        Ok((t, span))
    }

    /// A writable view.
    ///
    /// # Safety
    /// `data` is valid for reads and writes of `len` elements of `dtype` for `'a`, and nothing
    /// else accesses it meanwhile; [`disjoint`] must confirm that no other buffer of the call
    /// overlaps it before the view is used.
    pub(crate) unsafe fn host_mut<'a>(&self, arg: &'static str) -> CallResult<(HostMut<'a>, Span)> {
        let (dtype, span) = self.checked(arg)?;
        let (p, n) = (self.data, self.len);
        // SAFETY: as `host_ref`, with exclusive access (the caller's contract and `disjoint`).
        let t = unsafe {
            match dtype {
                DType::F32 => HostMut::F32(std::slice::from_raw_parts_mut(p.cast::<f32>(), n)),
                DType::F16 => HostMut::F16(std::slice::from_raw_parts_mut(p.cast::<f16>(), n)),
                DType::Bf16 => HostMut::Bf16(std::slice::from_raw_parts_mut(p.cast::<bf16>(), n)),
            }
        };
        Ok((t, span))
    }
}

/// Where a call's tensors live: host memory, or (on a device backend) CUDA device memory of its
/// context, addressed by the same `FavorTensor` fields.
pub(crate) trait Space: MemorySpace {
    /// A read-only view of `t`.
    ///
    /// # Safety
    /// As [`FavorTensor::host_ref`], in this memory space.
    unsafe fn view<'a>(t: &FavorTensor, arg: &'static str) -> CallResult<(Self::Ref<'a>, Span)>;

    /// A writable view of `t`.
    ///
    /// # Safety
    /// As [`FavorTensor::host_mut`], in this memory space.
    unsafe fn view_mut<'a>(t: &FavorTensor, arg: &'static str) -> CallResult<(Self::Mut<'a>, Span)>;

    /// The same view for a shorter lifetime (every view type is covariant; the generic
    /// associated type does not say so).
    fn shorten<'s, 'l: 's>(t: Self::Ref<'l>) -> Self::Ref<'s>;
}

impl Space for Host {
    unsafe fn view<'a>(t: &FavorTensor, arg: &'static str) -> CallResult<(HostRef<'a>, Span)> {
        // SAFETY: forwarded contract.
        unsafe { t.host_ref(arg) }
    }

    unsafe fn view_mut<'a>(t: &FavorTensor, arg: &'static str) -> CallResult<(HostMut<'a>, Span)> {
        // SAFETY: forwarded contract.
        unsafe { t.host_mut(arg) }
    }

    fn shorten<'s, 'l: 's>(t: HostRef<'l>) -> HostRef<'s> {
        t
    }
}

#[cfg(feature = "cuda")]
impl Space for favor::cuda::CudaMem {
    unsafe fn view<'a>(t: &FavorTensor, arg: &'static str) -> CallResult<(favor::cuda::DeviceRef<'a>, Span)> {
        let (dtype, span) = t.checked(arg)?;
        // SAFETY: the caller's contract: `len` elements of device memory of the backend's
        // context, valid and unwritten by other streams until the backend's stream is done.
        Ok((unsafe { favor::cuda::DeviceRef::from_raw(t.data as u64, t.len, dtype) }, span))
    }

    unsafe fn view_mut<'a>(t: &FavorTensor, arg: &'static str) -> CallResult<(favor::cuda::DeviceMut<'a>, Span)> {
        let (dtype, span) = t.checked(arg)?;
        // SAFETY: as `view`, with exclusive access for the backend's stream.
        Ok((unsafe { favor::cuda::DeviceMut::from_raw(t.data as u64, t.len, dtype) }, span))
    }

    fn shorten<'s, 'l: 's>(t: favor::cuda::DeviceRef<'l>) -> favor::cuda::DeviceRef<'s> {
        t
    }
}

/// Fails when an output span overlaps any other span of the call (inputs may share memory with
/// each other, as a packed QKV buffer does).
pub(crate) fn disjoint(outputs: &[Span], inputs: &[Span]) -> CallResult {
    for (i, o) in outputs.iter().enumerate() {
        for other in outputs[i + 1..].iter().chain(inputs) {
            if o.start < other.end && other.start < o.end {
                return Err(Failure::new(
                    FavorStatus::Strides,
                    format!(
                        "argument `{}` overlaps `{}`: outputs may not share memory with other buffers",
                        o.arg, other.arg
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The inputs of a call as favor's views in memory space `M`, their layout and their spans.
/// The key mask is host memory on every backend.
pub(crate) struct CallInputs<'a, M: Space> {
    pub q: M::Ref<'a>,
    pub k: M::Ref<'a>,
    pub v: M::Ref<'a>,
    mask: Option<Vec<bool>>,
    pub strides: [Option<Strides>; 3],
    pub spans: Vec<Span>,
}

impl<'a, M: Space> CallInputs<'a, M> {
    /// # Safety
    /// Each tensor's `data` is valid for reads of its `len` elements for `'a` (in `M`), and
    /// `key_mask` (when not null) for `key_mask_len` host bytes.
    pub(crate) unsafe fn new(x: &FavorInputs) -> CallResult<CallInputs<'a, M>> {
        // SAFETY: forwarded contract.
        let ((q, sq), (k, sk), (v, sv)) = unsafe { (M::view(&x.q, "q")?, M::view(&x.k, "k")?, M::view(&x.v, "v")?) };
        let mut spans = vec![sq, sk, sv];
        let mask = if x.key_mask.is_null() {
            None
        } else {
            spans.push(Span::new("key_mask", x.key_mask as usize, x.key_mask_len)?);
            // SAFETY: non-null, valid for `key_mask_len` bytes (the caller's contract); u8 has no
            // invalid values, unlike bool, so the bytes are copied into bools.
            let bytes = unsafe { std::slice::from_raw_parts(x.key_mask, x.key_mask_len) };
            Some(bytes.iter().map(|&b| b != 0).collect())
        };
        Ok(CallInputs { q, k, v, mask, strides: [x.q.strides(), x.k.strides(), x.v.strides()], spans })
    }

    pub(crate) fn inputs(&self) -> Inputs<'_, M> {
        Inputs { q: M::shorten(self.q), k: M::shorten(self.k), v: M::shorten(self.v), key_mask: self.mask.as_deref() }
    }
}

/// The problem of a call: the C sizes and options, the map, and each tensor's strides.
pub(crate) fn problem<'m>(
    p: &FavorProblem,
    map: &'m FeatureMap,
    strides: impl Fn(TensorArg) -> Option<Strides>,
) -> CallResult<Problem<'m>> {
    Ok(Problem::new(p.shape(), map).with_options(p.options()?).with_layout(Layout::from_fn(strides)))
}
