//! The kernels, each written once over [`crate::isa::SimdF32`]:
//!
//! * [`gemm`]: the register-blocked product and small vector helpers;
//! * [`features`]: feature maps on tiles (projection, stabiliser, φ, backward);
//! * [`bidirectional`]: key-segment summaries, query tiles, and their backward;
//! * [`causal`]: the chunked causal forward/decode and its two-sweep backward.

pub(crate) mod bidirectional;
pub(crate) mod causal;
pub(crate) mod features;
pub(crate) mod gemm;
pub(crate) mod standalone;

use favor_core::{HostMut, HostRef};
use std::sync::atomic::{AtomicBool, Ordering};

/// Tokens per tile (and per causal chunk). 64 rows keep a φ tile (64 × 256 floats = 64 KiB)
/// and the 64 × 64 intra-chunk matrices in L2 next to the M × d_v state, while the products
/// stay long enough (k = 64) to amortise loading the accumulators.
pub(crate) const TILE: usize = 64;

/// One (batch, head) of the inputs: tensors are whole, offsets select the head.
#[derive(Clone, Copy)]
pub(crate) struct HeadIn<'a> {
    pub q: HostRef<'a>,
    pub k: HostRef<'a>,
    pub v: HostRef<'a>,
    /// Element offset of this head in q (and dq).
    pub q_off: usize,
    /// Element offset of this head in k (and dk).
    pub k_off: usize,
    /// Element offset of this head in v (and dv).
    pub v_off: usize,
    /// Element offset of this head in out and dout (query rows × d_v).
    pub o_off: usize,
    /// Key padding mask of this head's batch element (one entry per key).
    pub mask: Option<&'a [bool]>,
    pub d: usize,
    pub dv: usize,
    /// Set when a row of this head is at risk (see [`bidirectional::at_risk`]): the backend then
    /// recomputes the head in f64.
    pub risk: Option<&'a AtomicBool>,
}

impl HeadIn<'_> {
    #[inline(always)]
    pub(crate) fn keep(&self, j: usize) -> bool {
        self.mask.is_none_or(|m| m[j])
    }

    /// Records that a row of this head is at risk.
    #[inline(always)]
    pub(crate) fn flag_risk(&self) {
        if let Some(r) = self.risk {
            r.store(true, Ordering::Relaxed);
        }
    }
}

/// Widens rows r0..r0+rows of a `[.., row_len]` tensor starting at `base` into `dst` (stride ld).
#[inline(always)]
pub(crate) fn load_rows(
    src: &HostRef<'_>,
    base: usize,
    row_len: usize,
    r0: usize,
    rows: usize,
    dst: &mut [f32],
    ld: usize,
) {
    for i in 0..rows {
        src.read_f32(base + (r0 + i) * row_len, &mut dst[i * ld..i * ld + row_len])
            .expect("rows lie within the tensors validated against the shape");
    }
}

/// Rounds rows of `src` (stride ld) into rows r0.. of `dst` (`row_len` elements per row).
#[inline(always)]
pub(crate) fn store_rows(dst: &mut HostMut<'_>, row_len: usize, r0: usize, rows: usize, src: &[f32], ld: usize) {
    for i in 0..rows {
        dst.write_f32((r0 + i) * row_len, &src[i * ld..i * ld + row_len])
            .expect("rows lie within the tensors validated against the shape");
    }
}
