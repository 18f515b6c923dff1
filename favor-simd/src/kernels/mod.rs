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
pub(crate) mod rows;
pub(crate) mod standalone;

use favor_core::HostRef;
pub(crate) use rows::{HeadRows, OutRows, load_rows, store_rows};
use std::sync::atomic::{AtomicBool, Ordering};

/// Tokens per tile (and per causal chunk). 64 rows keep a φ tile (64 × 256 floats = 64 KiB)
/// and the 64 × 64 intra-chunk matrices in L2 next to the M × d_v state, while the products
/// stay long enough (k = 64) to amortise loading the accumulators.
pub(crate) const TILE: usize = 64;

/// One (batch, head) of the inputs: tensors are whole, row positions select the head.
#[derive(Clone, Copy)]
pub(crate) struct HeadIn<'a> {
    pub q: HostRef<'a>,
    pub k: HostRef<'a>,
    pub v: HostRef<'a>,
    /// This head's rows in q.
    pub q_at: HeadRows,
    /// This head's rows in k.
    pub k_at: HeadRows,
    /// This head's rows in v.
    pub v_at: HeadRows,
    /// This head's rows in dout (backward only).
    pub dout_at: HeadRows,
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
