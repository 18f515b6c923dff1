//! Row access for the kernels in the caller's layout: one head's rows are `base + t·stride`
//! (strides of any [`favor_core::Layout`]), read into the kernels' padded tiles and written back
//! in place, so `[B, L, H, d]` and packed QKV tensors cost no transposing copy.
//!
//! Writing: rows of different heads interleave in memory in most layouts, so an output cannot be
//! split into one contiguous slice per task. [`SharedOut`] holds the output's one mutable borrow
//! and hands out [`OutRows`] — the rows of one head within one segment — for a set of tasks it
//! has checked to be disjoint; the layout was checked for non-overlapping rows, so distinct
//! (head, row) pairs are distinct memory.

use favor_core::layout::{TensorDims, check_disjoint_rows};
use favor_core::{HostMut, HostRef, Result, Strides, TensorHandle};
use half::{bf16, f16};
use std::marker::PhantomData;

/// Where one head's rows lie in a tensor: row t starts at element `base + t·stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadRows {
    pub base: usize,
    pub stride: usize,
}

impl HeadRows {
    /// Head `bh` (batch-major) of a tensor with `heads` heads per batch element.
    pub(crate) fn of(strides: Strides, heads: usize, bh: usize) -> HeadRows {
        HeadRows { base: strides.head_base(heads, bh), stride: strides.token }
    }

    #[inline(always)]
    fn row(&self, t: usize) -> usize {
        self.base + t * self.stride
    }
}

/// Widens rows r0..r0+rows of one head (`row_len` elements each) into `dst` (stride ld).
#[inline(always)]
pub(crate) fn load_rows(
    src: &HostRef<'_>,
    at: HeadRows,
    row_len: usize,
    r0: usize,
    rows: usize,
    dst: &mut [f32],
    ld: usize,
) {
    for i in 0..rows {
        src.read_f32(at.row(r0 + i), &mut dst[i * ld..i * ld + row_len])
            .expect("rows lie within the tensors validated against the shape");
    }
}

/// Rounds rows of `src` (stride ld) into rows r0..r0+rows of `dst` (local to its segment).
#[inline(always)]
pub(crate) fn store_rows(dst: &mut OutRows<'_>, r0: usize, rows: usize, src: &[f32], ld: usize) {
    let w = dst.width;
    for i in 0..rows {
        dst.row(r0 + i).write_f32(0, &src[i * ld..i * ld + w]).expect("a row holds `width` elements");
    }
}

#[derive(Clone, Copy)]
enum RawMut {
    F32(*mut f32),
    F16(*mut f16),
    Bf16(*mut bf16),
}

/// An output tensor shared by the tasks of one call, each writing its own rows.
pub(crate) struct SharedOut<'a> {
    ptr: RawMut,
    len: usize,
    strides: Strides,
    dims: TensorDims,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a `SharedOut` is only used to hand out `OutRows` of disjoint memory (see `split`), each
// of which is used by one thread at a time; the element types are plain data.
unsafe impl Send for SharedOut<'_> {}
// SAFETY: as for `Send`: through `&SharedOut` only the unsafe `rows_unchecked` reaches the
// memory, whose callers hand out each row once (`split` and `head` take `&mut self`).
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    /// Takes the output's borrow. The tensor was validated against `dims` and `strides` (in
    /// range); row disjointness, which the safety of [`OutRows`] rests on, is checked here again.
    pub(crate) fn new(t: HostMut<'a>, dims: TensorDims, strides: Strides, arg: &'static str) -> Result<Self> {
        check_disjoint_rows(arg, dims, strides)?;
        let len = t.len();
        let ptr = match t {
            HostMut::F32(s) => RawMut::F32(s.as_mut_ptr()),
            HostMut::F16(s) => RawMut::F16(s.as_mut_ptr()),
            HostMut::Bf16(s) => RawMut::Bf16(s.as_mut_ptr()),
        };
        Ok(SharedOut { ptr, len, strides, dims, _borrow: PhantomData })
    }

    /// The rows r0..r1 of head bh for every task `(bh, r0, r1)`. Tasks must be sorted by head
    /// and row and must not overlap (the backend's task lists are); anything else is a bug in
    /// the caller and panics before a row is handed out.
    pub(crate) fn split(&mut self, tasks: &[(usize, usize, usize)]) -> Vec<OutRows<'_>> {
        let heads = self.dims.batch * self.dims.heads;
        for w in tasks.windows(2) {
            let ((h0, _, e0), (h1, s1, _)) = (w[0], w[1]);
            assert!(h0 < h1 || (h0 == h1 && e0 <= s1), "output tasks overlap: {:?}, {:?}", w[0], w[1]);
        }
        for &(bh, r0, r1) in tasks {
            assert!(bh < heads && r0 <= r1 && r1 <= self.dims.rows, "output task {:?} out of range", (bh, r0, r1));
        }
        tasks
            .iter()
            .map(|&(bh, r0, r1)| OutRows {
                out: SharedRef { ptr: self.ptr, len: self.len },
                at: HeadRows::of(self.strides, self.dims.heads, bh),
                r0,
                rows: r1 - r0,
                width: self.dims.width,
                _borrow: PhantomData,
            })
            .collect()
    }

    /// Rows r0..r1 of head bh through a shared borrow, so that parallel tasks can each take
    /// their own rows without a task list (a decoding step allocates nothing). Out-of-range
    /// rows panic before anything is handed out.
    ///
    /// # Safety
    /// No two `OutRows` live at the same time may cover the same row of the same head: the
    /// caller hands out every (head, row) at most once while they live.
    pub(crate) unsafe fn rows_unchecked(&self, bh: usize, r0: usize, r1: usize) -> OutRows<'_> {
        let heads = self.dims.batch * self.dims.heads;
        assert!(bh < heads && r0 <= r1 && r1 <= self.dims.rows, "output rows {:?} out of range", (bh, r0, r1));
        OutRows {
            out: SharedRef { ptr: self.ptr, len: self.len },
            at: HeadRows::of(self.strides, self.dims.heads, bh),
            r0,
            rows: r1 - r0,
            width: self.dims.width,
            _borrow: PhantomData,
        }
    }

    /// All rows of head bh, for the serial f64 recomputation of flagged heads.
    pub(crate) fn head(&mut self, bh: usize) -> OutRows<'_> {
        self.split(&[(bh, 0, self.dims.rows)]).pop().expect("one task, one piece")
    }
}

#[derive(Clone, Copy)]
struct SharedRef {
    ptr: RawMut,
    len: usize,
}

/// Rows r0..r0+rows of one head of a [`SharedOut`], indexed from r0; no other `OutRows` of the
/// same split covers them.
pub(crate) struct OutRows<'s> {
    out: SharedRef,
    at: HeadRows,
    r0: usize,
    rows: usize,
    /// Elements per row.
    pub width: usize,
    _borrow: PhantomData<&'s mut ()>,
}

// SAFETY: the rows of one `OutRows` are disjoint from those of every other live `OutRows` of the
// same `SharedOut` (checked by `SharedOut::split`, which borrows it mutably for their lifetime).
unsafe impl Send for OutRows<'_> {}

impl OutRows<'_> {
    /// Row `i` of this segment (row r0 + i of the head) as a mutable slice.
    #[inline]
    pub(crate) fn row(&mut self, i: usize) -> HostMut<'_> {
        assert!(i < self.rows, "row {i} outside a segment of {} rows", self.rows);
        let start = self.at.row(self.r0 + i);
        assert!(start + self.width <= self.out.len, "row beyond the validated tensor");
        // SAFETY: start..start + width lies in the tensor (asserted); no other live `OutRows`
        // covers this row (split's disjointness + the layout's disjoint rows), and `&mut self`
        // keeps this slice the only one from this `OutRows` while it lives.
        unsafe {
            match self.out.ptr {
                RawMut::F32(p) => HostMut::F32(std::slice::from_raw_parts_mut(p.add(start), self.width)),
                RawMut::F16(p) => HostMut::F16(std::slice::from_raw_parts_mut(p.add(start), self.width)),
                RawMut::Bf16(p) => HostMut::Bf16(std::slice::from_raw_parts_mut(p.add(start), self.width)),
            }
        }
    }

    /// Writes contiguous f64 rows (rounded like [`HostMut::write_f64`]).
    pub(crate) fn write_f64(&mut self, src: &[f64]) -> Result<()> {
        let w = self.width;
        for (i, row) in src.chunks_exact(w).take(self.rows).enumerate() {
            self.row(i).write_f64(0, row)?;
        }
        Ok(())
    }
}
