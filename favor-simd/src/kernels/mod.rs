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
use features::{Kind, Plan};
pub(crate) use rows::{HeadRows, OutRows, load_rows, store_rows};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::LocalKey;

/// Tokens per tile (and per causal chunk). 64 rows keep a φ tile (64 × 256 floats = 64 KiB)
/// and the 64 × 64 intra-chunk matrices in L2 next to the M × d_v state, while the products
/// stay long enough (k = 64) to amortise loading the accumulators.
pub(crate) const TILE: usize = 64;

/// What a kernel's scratch was made for: the map's kind and the exact sizes, so that a reused
/// buffer holds what the same kernel left in it for the same sizes — padding columns included,
/// which only a zeroing allocation writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScratchKey {
    kind: std::mem::Discriminant<Kind>,
    d: usize,
    m: usize,
    mf: usize,
    dv: usize,
    rows: usize,
}

pub(crate) fn scratch_key(p: &Plan, dv: usize, rows: usize) -> ScratchKey {
    ScratchKey { kind: std::mem::discriminant(&p.kind), d: p.d, m: p.m, mf: p.mf, dv, rows }
}

/// Zeroes `v` at length `n` (no allocation once it has the capacity): how kept buffers are
/// reset for the next call.
pub(crate) fn zeroed(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

/// Scratch entries a thread keeps per kind.
const SCRATCH_KEPT: usize = 4;

/// A per-thread cache of kernel scratch of one kind, reused while the sizes match, so that
/// repeated calls allocate nothing after the first (reusing scratch across calls is what the
/// tile loops already do across the tiles of one call: every kernel overwrites what it reads).
pub(crate) struct KeptScratch<T: 'static>(pub &'static LocalKey<RefCell<Vec<(ScratchKey, T)>>>);

/// Drops this thread's kept kernel scratch of every kind.
pub(crate) fn release_kept_scratch() {
    bidirectional::release_scratch();
    causal::release_scratch();
}

impl<T> KeptScratch<T> {
    /// Drops this thread's entries.
    pub(crate) fn clear(&self) {
        self.0.with(|c| c.borrow_mut().clear());
    }

    /// This thread's entry for `key`, or a new one from `make`.
    pub(crate) fn take(&self, key: ScratchKey, make: impl FnOnce() -> T) -> T {
        let kept = self.0.with(|c| {
            let mut c = c.borrow_mut();
            c.iter().position(|(k, _)| *k == key).map(|i| c.swap_remove(i).1)
        });
        kept.unwrap_or_else(make)
    }

    /// Keeps `value` for the next task on this thread (the oldest entry makes room).
    pub(crate) fn give_back(&self, key: ScratchKey, value: T) {
        self.0.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() == SCRATCH_KEPT {
                c.remove(0);
            }
            c.push((key, value));
        });
    }
}

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
