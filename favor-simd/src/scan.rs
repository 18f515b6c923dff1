//! The one pass over the inputs before the kernels run: whether Q, K, V (and ∂ℒ/∂out) hold a
//! NaN or an infinity — reported by favor-core's exact check, which only runs when something
//! was found — and which heads hold values beyond the kernels' f32 range
//! ([`VALUE_LIMIT`]), to be recomputed in f64.
//!
//! Each row is reduced to the largest magnitude's bit pattern (for IEEE floats of one sign the
//! bit order is the value order, and ∞/NaN sit above every finite value), which vectorises;
//! rows are visited in memory order ([`RowOrder`]) in parallel blocks, and tensors with the same
//! blocks in lockstep, so packed QKV is swept once instead of three sparse times.

use favor_core::backend::check_finite_args;
use favor_core::layout::RowOrder;
use favor_core::limits::VALUE_LIMIT;
use favor_core::{HostRef, Problem, Result, TensorArg};
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Most tensors one scan takes: Q, K, V and ∂ℒ/∂out.
const MAX_SCANNED: usize = 4;

/// One tensor to scan; `flag` marks heads with values beyond [`VALUE_LIMIT`].
pub(crate) struct Scanned<'a> {
    pub arg: TensorArg,
    pub t: HostRef<'a>,
    pub flag: bool,
}

/// (non-finite, beyond the limit) of one row.
#[inline]
fn row_state(t: &HostRef<'_>, start: usize, width: usize) -> (bool, bool) {
    match t {
        HostRef::F32(x) => {
            let m = x[start..start + width].iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
            (m >= f32::INFINITY.to_bits(), m > VALUE_LIMIT.to_bits())
        }
        HostRef::Bf16(x) => {
            let m = x[start..start + width].iter().fold(0u16, |m, v| m.max(v.to_bits() & 0x7fff));
            (m >= bf16::INFINITY.to_bits(), m > bf16::from_f32(VALUE_LIMIT).to_bits())
        }
        // f16's largest finite value (65504) is far below the limit.
        HostRef::F16(x) => {
            let m = x[start..start + width].iter().fold(0u16, |m, v| m.max(v.to_bits() & 0x7fff));
            (m >= f16::INFINITY.to_bits(), false)
        }
    }
}

/// Scans `tensors` of the call (validated against its shape and layout); sets `risk[bh]` for
/// the query heads of flagged tensors with values beyond the limit (`risk` may be empty: not tracked).
/// A NaN or an infinity anywhere is [`favor_core::FavorError::NonFinite`], the first one of
/// the first tensor holding one.
pub(crate) fn scan_inputs(p: &Problem<'_>, tensors: &[Scanned<'_>], risk: &[AtomicBool]) -> Result<()> {
    assert!(tensors.len() <= MAX_SCANNED, "at most {MAX_SCANNED} tensors per scan");
    if tensors.is_empty() {
        return Ok(());
    }
    // Fixed-size bookkeeping: a decoding step allocates nothing (entries past the tensors repeat
    // the last one and are never read).
    let orders: [RowOrder; MAX_SCANNED] = std::array::from_fn(|j| {
        let s = &tensors[j.min(tensors.len() - 1)];
        RowOrder::new(p.dims(s.arg), p.strides(s.arg))
    });
    let bad = AtomicBool::new(false);
    let mut done = [false; MAX_SCANNED];
    for i in 0..tensors.len() {
        if done[i] {
            continue;
        }
        // The tensors with the same blocks as this one go in lockstep.
        let lead = orders[i];
        let (mut members, mut n) = ([0usize; MAX_SCANNED], 0);
        for (j, done) in done.iter_mut().enumerate().take(tensors.len()).skip(i) {
            let o = orders[j];
            if !*done && o.blocks() == lead.blocks() && o.block_rows() == lead.block_rows() {
                (members[n], *done) = (j, true);
                n += 1;
            }
        }
        let group = &members[..n];
        // Blocks of at least ~4K elements per task.
        let per_block: usize = group.iter().map(|&j| orders[j].block_rows() * p.dims(tensors[j].arg).width).sum();
        let min_len = (4096 / per_block.max(1)).max(1);
        (0..lead.blocks()).into_par_iter().with_min_len(min_len).for_each(|o| {
            for &j in group {
                let (s, width) = (&tensors[j], p.dims(tensors[j].arg).width);
                for (bh, start) in orders[j].block(o) {
                    let (non_finite, large) = row_state(&s.t, start, width);
                    if non_finite {
                        bad.store(true, Ordering::Relaxed);
                    }
                    if large && s.flag {
                        // Rows of K and V belong to a key/value head: every query head reading it
                        // is at risk.
                        let heads = if matches!(s.arg, TensorArg::K | TensorArg::V) {
                            p.shape.query_heads_of(bh)
                        } else {
                            bh..bh + 1
                        };
                        heads.filter_map(|h| risk.get(h)).for_each(|f| f.store(true, Ordering::Relaxed));
                    }
                }
            }
        });
    }
    if bad.load(Ordering::Relaxed) {
        let args: Vec<(TensorArg, HostRef<'_>)> = tensors.iter().map(|s| (s.arg, s.t)).collect();
        check_finite_args(p, &args)?;
    }
    Ok(())
}
