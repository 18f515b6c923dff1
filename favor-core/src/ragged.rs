//! Ragged batches: sequences of different lengths packed back to back along the token axis of
//! one batch element, split by cumulative offsets (FlashAttention's `cu_seqlens` convention).
//!
//! A ragged call has `batch = 1` and `len` = the total query tokens (`kv_len` = the total key
//! tokens for cross-attention); its tensors may take any layout. [`Ragged`] says where each
//! sequence starts; each sequence attends only to its own keys, so a short sequence costs only
//! its own tokens: no padding work.

use crate::{Direction, FavorError, Problem, Result};

/// Where the sequences of a ragged call lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ragged<'a> {
    /// Cumulative query offsets (`cu_seqlens_q`): sequence i is query tokens
    /// `offsets[i]..offsets[i + 1]`; `offsets[0] = 0`, the last is the call's `len`, and they
    /// never decrease.
    pub offsets: &'a [usize],
    /// Cumulative key offsets (`cu_seqlens_k`) for bidirectional cross-attention, as many as
    /// `offsets`, the last being the call's key count; `None`: the keys are split like the queries.
    pub kv_offsets: Option<&'a [usize]>,
}

/// One sequence of a ragged call: its query and key token ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// First query token.
    pub q0: usize,
    /// End of its query tokens.
    pub q1: usize,
    /// First key token.
    pub k0: usize,
    /// End of its key tokens.
    pub k1: usize,
}

impl<'a> Ragged<'a> {
    /// Self-attention sequences split at `offsets`.
    pub fn new(offsets: &'a [usize]) -> Self {
        Self { offsets, kv_offsets: None }
    }

    /// Cross-attention: the keys split at `kv_offsets`.
    pub fn with_kv_offsets(self, kv_offsets: &'a [usize]) -> Self {
        Self { kv_offsets: Some(kv_offsets), ..self }
    }

    /// The sequences, in order. Call [`Ragged::validate`] first.
    pub fn sequences(&self) -> impl Iterator<Item = Sequence> + '_ {
        let kv = self.kv_offsets.unwrap_or(self.offsets);
        self.offsets.windows(2).zip(kv.windows(2)).map(|(q, k)| Sequence { q0: q[0], q1: q[1], k0: k[0], k1: k[1] })
    }

    /// Checks the offsets against a call's problem: one packed batch element, offsets from 0 to
    /// the token counts that never decrease, as many key offsets as query offsets, equal ones for
    /// causal attention, and every sequence either empty or with both queries and keys.
    pub fn validate(&self, p: &Problem<'_>) -> Result<()> {
        let s = p.shape;
        check_packed_batch("ragged", p)?;
        if self.offsets.len() < 2 {
            return Err(FavorError::shape("offsets", "at least 2 offsets (one sequence)", self.offsets.len()));
        }
        check_offsets("offsets", self.offsets, self.offsets.len(), s.len)?;
        let Some(kv) = self.kv_offsets else {
            if s.is_cross() {
                return Err(FavorError::param(
                    "kv_offsets",
                    format!("cross-attention ({} queries, {} keys) needs the keys' offsets", s.len, s.keys()),
                ));
            }
            return Ok(());
        };
        check_offsets("kv_offsets", kv, self.offsets.len(), s.keys())?;
        if p.options.direction == Direction::Causal && kv != self.offsets {
            return Err(FavorError::param(
                "kv_offsets",
                "causal attention needs as many keys as queries in every sequence: the key offsets must equal the query offsets",
            ));
        }
        if let Some((i, q)) = self.sequences().enumerate().find(|(_, q)| (q.q1 == q.q0) != (q.k1 == q.k0)) {
            return Err(FavorError::param(
                "kv_offsets",
                format!(
                    "sequence {i} has {} queries and {} keys: a sequence is empty or has both",
                    q.q1 - q.q0,
                    q.k1 - q.k0
                ),
            ));
        }
        Ok(())
    }
}

/// Checks that a packed call (`kind`: ragged or slot-decoding) has one batch element.
pub(crate) fn check_packed_batch(kind: &str, p: &Problem<'_>) -> Result<()> {
    if p.shape.batch == 1 {
        return Ok(());
    }
    Err(FavorError::param(
        "batch",
        format!(
            "a {kind} call packs its sequences along the tokens of one batch element: batch must be 1, got {}",
            p.shape.batch
        ),
    ))
}

/// Checks cumulative offsets: `count` of them, from 0 to `total`, never decreasing.
pub(crate) fn check_offsets(arg: &'static str, offsets: &[usize], count: usize, total: usize) -> Result<()> {
    if offsets.len() != count {
        return Err(FavorError::shape(arg, format!("{count} offsets"), offsets.len()));
    }
    if offsets[0] != 0 {
        return Err(FavorError::param(arg, format!("must start at 0, got {}", offsets[0])));
    }
    if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
        return Err(FavorError::param(
            arg,
            format!("must not decrease: [{}] = {} > [{}] = {}", i, offsets[i], i + 1, offsets[i + 1]),
        ));
    }
    let last = offsets[count - 1];
    if last != total {
        return Err(FavorError::param(
            arg,
            format!("the last offset must be the call's token count {total}, got {last}"),
        ));
    }
    Ok(())
}
