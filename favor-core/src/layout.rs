//! Where each tensor's rows lie: element strides for the batch, head and token dimensions, the
//! last dimension (d or d_v) contiguous. Engines hand favor their projections' memory as it is:
//! `[B, H, L, d]` (the default), `[B, L, H, d]`, or one packed `[B, L, 3, H, d]` QKV tensor, and
//! the kernels read and write those rows in place.
//!
//! A tensor with explicit strides may be a slice of a larger buffer (Q, K and V slices of one
//! packed buffer, say): its slice must reach the last element the strides address, and its rows
//! may not overlap each other (for any tensor: overlapping rows of an input are almost always a
//! stride mistake, and of an output a data race). Different tensors may share a buffer when
//! they are only read.

use crate::validate::{checked_len, try_with_capacity, try_zeroed};
use crate::{AttentionShape, FavorError, HostMut, HostRef, HostTensor, Result, TensorHandle};

/// Element strides of a tensor's batch, head and token dimensions: row (b, h, t) starts at
/// element `b·batch + h·head + t·token` and holds the tensor's last dimension contiguously.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strides {
    /// Elements from one batch element to the next.
    pub batch: usize,
    /// Elements from one head to the next.
    pub head: usize,
    /// Elements from one token (row) to the next.
    pub token: usize,
}

impl Strides {
    /// `[batch, heads, len, width]` row-major: favor's default layout.
    pub fn bhld(heads: usize, len: usize, width: usize) -> Strides {
        let token = width;
        let head = len.saturating_mul(width);
        Strides { batch: heads.saturating_mul(head), head, token }
    }

    /// `[batch, len, heads, width]` row-major: what a projection `x·W` reshaped to heads gives.
    pub fn blhd(heads: usize, len: usize, width: usize) -> Strides {
        let token = heads.saturating_mul(width);
        Strides { batch: len.saturating_mul(token), head: width, token }
    }

    /// One of Q, K or V in a packed `[batch, len, heads + 2·kv_heads, d]` tensor (`[batch, len,
    /// 3, heads, d]` without grouping): each token holds its query heads, then its key heads, then
    /// its value heads. Pass the buffer sliced at [`Layout::packed_qkv_offsets`] as Q, K and V.
    pub fn packed_qkv(heads: usize, kv_heads: usize, len: usize, d: usize) -> Strides {
        let token = heads.saturating_add(kv_heads.saturating_mul(2)).saturating_mul(d);
        Strides { batch: len.saturating_mul(token), head: d, token }
    }

    /// First element of row (b, h, t); the caller has checked the tensor's extent.
    #[inline]
    pub fn offset(&self, b: usize, h: usize, t: usize) -> usize {
        b * self.batch + h * self.head + t * self.token
    }

    /// First element of row 0 of (batch, head) number `bh` (batch-major, `heads` per batch).
    #[inline]
    pub fn head_base(&self, heads: usize, bh: usize) -> usize {
        self.offset(bh / heads, bh % heads, 0)
    }
}

/// The tensors of an attention call, to name the one whose strides are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorArg {
    /// Queries.
    Q,
    /// Keys.
    K,
    /// Values.
    V,
    /// The attention output.
    Out,
    /// ∂ℒ/∂out.
    Dout,
    /// ∂ℒ/∂Q.
    Dq,
    /// ∂ℒ/∂K.
    Dk,
    /// ∂ℒ/∂V.
    Dv,
}

impl TensorArg {
    /// The argument's name in errors.
    pub fn name(self) -> &'static str {
        match self {
            TensorArg::Q => "q",
            TensorArg::K => "k",
            TensorArg::V => "v",
            TensorArg::Out => "out",
            TensorArg::Dout => "dout",
            TensorArg::Dq => "dq",
            TensorArg::Dk => "dk",
            TensorArg::Dv => "dv",
        }
    }

    /// (batch, heads, rows, width) of this tensor for `shape`.
    pub fn dims(self, s: &AttentionShape) -> TensorDims {
        let (heads, rows, width) = match self {
            TensorArg::Q | TensorArg::Dq => (s.heads, s.len, s.d),
            TensorArg::K | TensorArg::Dk => (s.key_heads(), s.keys(), s.d),
            TensorArg::V | TensorArg::Dv => (s.key_heads(), s.keys(), s.dv),
            TensorArg::Out | TensorArg::Dout => (s.heads, s.len, s.dv),
        };
        TensorDims { batch: s.batch, heads, rows, width }
    }
}

/// The logical sizes of one tensor: `batch × heads` matrices of `rows × width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorDims {
    /// Batch elements.
    pub batch: usize,
    /// Heads per batch element.
    pub heads: usize,
    /// Rows (tokens) per head.
    pub rows: usize,
    /// Elements per row (contiguous).
    pub width: usize,
}

impl TensorDims {
    /// Rows of all heads: `batch · heads · rows` (the shape was validated, so no overflow).
    pub fn total_rows(&self) -> usize {
        self.batch * self.heads * self.rows
    }
}

/// The strides of every tensor of a call; `None` is the contiguous `[B, H, L, ·]` default, which
/// also requires the tensor's length to match its shape exactly. Gradients are separate from
/// the tensors they belong to, so a packed QKV input may get separate or packed gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Layout {
    /// Queries.
    pub q: Option<Strides>,
    /// Keys.
    pub k: Option<Strides>,
    /// Values.
    pub v: Option<Strides>,
    /// Attention output.
    pub out: Option<Strides>,
    /// ∂ℒ/∂out.
    pub dout: Option<Strides>,
    /// ∂ℒ/∂Q.
    pub dq: Option<Strides>,
    /// ∂ℒ/∂K.
    pub dk: Option<Strides>,
    /// ∂ℒ/∂V.
    pub dv: Option<Strides>,
}

impl Layout {
    /// Every tensor contiguous `[B, H, L, ·]` (the default).
    pub fn contiguous() -> Layout {
        Layout::default()
    }

    /// Every tensor `[B, L, H, ·]`.
    pub fn blhd(s: &AttentionShape) -> Layout {
        Layout::from_fn(|arg| {
            let t = arg.dims(s);
            Some(Strides::blhd(t.heads, t.rows, t.width))
        })
    }

    /// Q, K and V in one packed `[B, L, H + 2·H_kv, d]` tensor (`[B, L, 3, H, d]` without
    /// grouped key/value heads), sliced at [`Layout::packed_qkv_offsets`]; the output, ∂ℒ/∂out and the gradients
    /// `[B, L, H, ·]` (three tensors written by one call cannot share one mutable Rust slice;
    /// set `dq`, `dk` and `dv` to packed strides for separate buffers in that layout). Needs
    /// d_v = d and equal query and key lengths.
    pub fn packed_qkv(s: &AttentionShape) -> Layout {
        let packed = Some(Strides::packed_qkv(s.heads, s.key_heads(), s.len, s.d));
        Layout { q: packed, k: packed, v: packed, ..Layout::blhd(s) }
    }

    /// Where Q, K and V start in a packed QKV buffer ([`Layout::packed_qkv`]): 0, `heads·d` and
    /// `(heads + kv_heads)·d`.
    pub fn packed_qkv_offsets(s: &AttentionShape) -> [usize; 3] {
        [0, s.heads * s.d, (s.heads + s.key_heads()) * s.d]
    }

    /// A layout from the strides of each tensor.
    pub fn from_fn(mut f: impl FnMut(TensorArg) -> Option<Strides>) -> Layout {
        use TensorArg::*;
        Layout { q: f(Q), k: f(K), v: f(V), out: f(Out), dout: f(Dout), dq: f(Dq), dk: f(Dk), dv: f(Dv) }
    }

    /// Whether every tensor has the contiguous default.
    pub fn is_contiguous(&self) -> bool {
        *self == Layout::default()
    }

    /// The strides given for `arg`, if any.
    pub fn given(&self, arg: TensorArg) -> Option<Strides> {
        match arg {
            TensorArg::Q => self.q,
            TensorArg::K => self.k,
            TensorArg::V => self.v,
            TensorArg::Out => self.out,
            TensorArg::Dout => self.dout,
            TensorArg::Dq => self.dq,
            TensorArg::Dk => self.dk,
            TensorArg::Dv => self.dv,
        }
    }

    /// The strides in effect for `arg`: the given ones or the contiguous default.
    pub fn strides(&self, arg: TensorArg, s: &AttentionShape) -> Strides {
        self.given(arg).unwrap_or_else(|| {
            let t = arg.dims(s);
            Strides::bhld(t.heads, t.rows, t.width)
        })
    }
}

/// The rows of a tensor in the order they lie in memory (the axis of the largest stride
/// outermost): scans in this order stream through memory instead of striding across it, which
/// the hardware prefetchers follow far better.
#[derive(Debug, Clone, Copy)]
pub struct RowOrder {
    /// (stride, size, axis: 0 batch, 1 head, 2 token), largest stride first.
    axes: [(usize, usize, usize); 3],
    heads: usize,
}

impl RowOrder {
    /// The memory order of the rows of `dims` with `strides`.
    pub fn new(dims: TensorDims, strides: Strides) -> RowOrder {
        let mut axes = [(strides.batch, dims.batch, 0), (strides.head, dims.heads, 1), (strides.token, dims.rows, 2)];
        axes.sort_by_key(|a| std::cmp::Reverse(a.0));
        RowOrder { axes, heads: dims.heads }
    }

    /// Rows in all.
    pub fn len(&self) -> usize {
        self.axes.iter().map(|a| a.1).product()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks of rows along the two outer axes; each holds [`RowOrder::block_rows`] rows.
    pub fn blocks(&self) -> usize {
        self.axes[0].1 * self.axes[1].1
    }

    /// Rows per block (the innermost axis).
    pub fn block_rows(&self) -> usize {
        self.axes[2].1
    }

    /// (batch·heads + head, first element) of each row of block `o`, in memory order.
    #[inline]
    pub fn block(&self, o: usize) -> impl Iterator<Item = (usize, usize)> + use<> {
        let [a0, a1, a2] = self.axes;
        let mut ix = [0usize; 3];
        (ix[a0.2], ix[a1.2]) = (o / a1.1, o % a1.1);
        let start = (o / a1.1) * a0.0 + (o % a1.1) * a1.0;
        let heads = self.heads;
        (0..a2.1).map(move |i| {
            let mut ix = ix;
            ix[a2.2] = i;
            (ix[0] * heads + ix[1], start + i * a2.0)
        })
    }
}

/// Elements a tensor of `dims` with `strides` spans: one past its last addressed element, or
/// [`FavorError::SizeOverflow`].
pub fn extent(arg: &'static str, dims: TensorDims, strides: Strides) -> Result<usize> {
    let overflow = || FavorError::SizeOverflow {
        arg,
        dims: format!("strides {strides:?} over {}×{}×{}×{}", dims.batch, dims.heads, dims.rows, dims.width),
    };
    let last = [(dims.batch, strides.batch), (dims.heads, strides.head), (dims.rows, strides.token)]
        .iter()
        .try_fold(dims.width, |acc, &(n, s)| (n - 1).checked_mul(s).and_then(|x| x.checked_add(acc)))
        .ok_or_else(overflow)?;
    // Element counts stay within what the backends may allocate as f64.
    checked_len(arg, &[last]).map_err(|_| overflow())
}

/// Checks that no two rows of a tensor of `dims` with `strides` share an element: the
/// dimensions of more than one entry, ordered by stride, must each step past everything the
/// inner ones span (a row of `width` elements innermost). Zero strides (broadcasting) and
/// interleaved rows are rejected; the three standard layouts all pass.
pub fn check_disjoint_rows(arg: &'static str, dims: TensorDims, strides: Strides) -> Result<()> {
    // On the stack: decoding steps check their output's rows and allocate nothing.
    let mut axes =
        [(dims.batch, strides.batch, "batch"), (dims.heads, strides.head, "head"), (dims.rows, strides.token, "token")];
    // Axes of one element cannot overlap: sorted last (largest key) and skipped.
    axes.sort_by_key(|&(n, s, _)| (n <= 1, s));
    let mut spanned = dims.width;
    for (n, stride, name) in axes.into_iter().take_while(|&(n, _, _)| n > 1) {
        if stride < spanned {
            return Err(FavorError::Strides {
                arg,
                reason: format!(
                    "rows overlap: the {name} stride {stride} is smaller than the {spanned} elements the \
                     dimensions inside it span ({strides:?}, {}×{}×{}×{})",
                    dims.batch, dims.heads, dims.rows, dims.width
                ),
            });
        }
        // Cannot overflow: bounded by the extent, which was checked first.
        spanned += (n - 1) * stride;
    }
    Ok(())
}

/// Validates explicit strides for a tensor of `len` elements: in range and without overlapping
/// rows.
pub fn check_strides(arg: &'static str, dims: TensorDims, strides: Strides, len: usize) -> Result<()> {
    let end = extent(arg, dims, strides)?;
    if end > len {
        return Err(FavorError::Shape {
            arg,
            expected: format!("at least {end} elements (the last row its strides {strides:?} address)"),
            actual: format!("{len} elements"),
        });
    }
    check_disjoint_rows(arg, dims, strides)
}

/// The rows of head `bh` (batch-major) of a host tensor widened to f64, contiguous
/// (`dims.rows × dims.width`). The tensor was validated against `dims` and `strides`.
pub fn read_head_f64(t: &HostRef<'_>, dims: TensorDims, strides: Strides, bh: usize) -> Result<Vec<f64>> {
    let mut row = try_zeroed::<f32>("row", dims.width)?;
    let mut out = try_with_capacity("head", dims.rows * dims.width)?;
    let base = strides.head_base(dims.heads, bh);
    for r in 0..dims.rows {
        t.read_f32(base + r * strides.token, &mut row)?;
        out.extend(row.iter().map(|&x| f64::from(x)));
    }
    Ok(out)
}

/// Writes head `bh` of a host tensor from contiguous f64 rows (rounded like
/// [`HostMut::write_f64`]).
pub fn write_head_f64(t: &mut HostMut<'_>, dims: TensorDims, strides: Strides, bh: usize, src: &[f64]) -> Result<()> {
    write_rows_f64(t, dims, strides, bh, 0, src)
}

/// Writes rows `first..` of head `bh` of a host tensor from contiguous f64 rows (at most up to
/// the head's last row).
pub fn write_rows_f64(
    t: &mut HostMut<'_>,
    dims: TensorDims,
    strides: Strides,
    bh: usize,
    first: usize,
    src: &[f64],
) -> Result<()> {
    let base = strides.head_base(dims.heads, bh);
    for (r, row) in src.chunks_exact(dims.width).take(dims.rows.saturating_sub(first)).enumerate() {
        t.write_f64(base + (first + r) * strides.token, row)?;
    }
    Ok(())
}

/// A contiguous `[B, H, rows, width]` copy of a strided host tensor, in its own dtype.
pub fn gather(t: HostRef<'_>, dims: TensorDims, strides: Strides) -> Result<HostTensor> {
    fn go<T: Copy>(s: &[T], dims: TensorDims, strides: Strides) -> Result<Vec<T>> {
        let mut out = try_with_capacity("gathered", dims.total_rows() * dims.width)?;
        for bh in 0..dims.batch * dims.heads {
            let base = strides.head_base(dims.heads, bh);
            for r in 0..dims.rows {
                let start = base + r * strides.token;
                let row = s.get(start..start + dims.width).ok_or(FavorError::OutOfRange {
                    start,
                    count: dims.width,
                    len: s.len(),
                })?;
                out.extend_from_slice(row);
            }
        }
        Ok(out)
    }
    Ok(match t {
        HostRef::F32(s) => HostTensor::F32(go(s, dims, strides)?),
        HostRef::F16(s) => HostTensor::F16(go(s, dims, strides)?),
        HostRef::Bf16(s) => HostTensor::Bf16(go(s, dims, strides)?),
    })
}

/// Copies a contiguous `[B, H, rows, width]` tensor into the rows of a strided one (same dtype).
pub fn scatter(src: HostRef<'_>, dst: HostMut<'_>, dims: TensorDims, strides: Strides) -> Result<()> {
    fn go<T: Copy>(src: &[T], dst: &mut [T], dims: TensorDims, strides: Strides) -> Result<()> {
        for (i, row) in src.chunks_exact(dims.width).take(dims.total_rows()).enumerate() {
            let start = strides.head_base(dims.heads, i / dims.rows) + (i % dims.rows) * strides.token;
            let len = dst.len();
            dst.get_mut(start..start + dims.width)
                .ok_or(FavorError::OutOfRange { start, count: dims.width, len })?
                .copy_from_slice(row);
        }
        Ok(())
    }
    match (src, dst) {
        (HostRef::F32(s), HostMut::F32(d)) => go(s, d, dims, strides),
        (HostRef::F16(s), HostMut::F16(d)) => go(s, d, dims, strides),
        (HostRef::Bf16(s), HostMut::Bf16(d)) => go(s, d, dims, strides),
        (s, d) => Err(FavorError::DType { arg: "scatter", expected: s.dtype(), actual: d.dtype() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(batch: usize, heads: usize, rows: usize, width: usize) -> TensorDims {
        TensorDims { batch, heads, rows, width }
    }

    #[test]
    fn standard_layouts_are_disjoint_and_span_their_tensor() {
        let t = dims(2, 3, 5, 4);
        for s in [Strides::bhld(3, 5, 4), Strides::blhd(3, 5, 4)] {
            assert_eq!(extent("q", t, s), Ok(2 * 3 * 5 * 4));
            assert_eq!(check_strides("q", t, s, 120), Ok(()));
        }
        // Packed: K's slice starts H·d into the buffer; its strides reach 2·H·d short of the
        // buffer's end, within the slice.
        let p = Strides::packed_qkv(3, 3, 5, 4);
        assert_eq!(extent("k", t, p), Ok(2 * 5 * 3 * 3 * 4 - 2 * 3 * 4));
        assert_eq!(check_disjoint_rows("k", t, p), Ok(()));
    }

    #[test]
    fn overlapping_and_short_layouts_are_errors() {
        let t = dims(2, 3, 5, 4);
        // Token stride smaller than the row.
        let e = check_strides("q", t, Strides { batch: 60, head: 20, token: 3 }, 1000).unwrap_err();
        assert!(matches!(e, FavorError::Strides { arg: "q", .. }), "{e}");
        // Heads interleaved with tokens: head stride 4, token stride 8 over 3 heads.
        let e = check_strides("q", t, Strides { batch: 60, head: 4, token: 8 }, 1000).unwrap_err();
        assert!(matches!(e, FavorError::Strides { arg: "q", .. }), "{e}");
        // Broadcast over heads.
        assert!(check_strides("q", t, Strides { batch: 20, head: 0, token: 4 }, 1000).is_err());
        // A single head may have any head stride.
        assert_eq!(check_strides("q", dims(2, 1, 5, 4), Strides { batch: 20, head: 0, token: 4 }, 40), Ok(()));
        // Past the end.
        let e = check_strides("out", t, Strides::blhd(3, 5, 4), 119).unwrap_err();
        assert!(matches!(e, FavorError::Shape { arg: "out", .. }), "{e}");
        // Wrapping extent.
        let e = extent("v", t, Strides { batch: usize::MAX / 2, head: 20, token: 4 }).unwrap_err();
        assert!(matches!(e, FavorError::SizeOverflow { arg: "v", .. }), "{e}");
    }
}
