//! Shapes, directions and options of an attention call.
//!
//! Layout: Q and K are `[batch, heads, len, d]`, V and the output `[batch, heads, len, d_v]`,
//! row-major and contiguous. The optional key padding mask is `[batch, len]` (true = keep).

use crate::validate::checked_len;
use crate::{FavorError, Result};

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    /// Batch size B.
    pub batch: usize,
    /// Heads per batch element H.
    pub heads: usize,
    /// Sequence length L (queries and keys).
    pub len: usize,
    /// Query/key head dimension d.
    pub d: usize,
    /// Value head dimension d_v (may differ from d).
    pub dv: usize,
}

impl AttentionShape {
    /// A shape with `d_v = d`.
    pub fn new(batch: usize, heads: usize, len: usize, d: usize) -> Self {
        Self { batch, heads, len, d, dv: d }
    }

    /// The same shape with another value dimension.
    pub fn with_dv(self, dv: usize) -> Self {
        Self { dv, ..self }
    }

    /// Independent (batch, head) problems; saturates at `usize::MAX` (see
    /// [`AttentionShape::validate`]).
    pub fn problems(&self) -> usize {
        self.batch.saturating_mul(self.heads)
    }

    /// Elements of Q (and K). Saturates at `usize::MAX`, a length no tensor has, when the
    /// product overflows; [`AttentionShape::checked_qk_len`] reports that as an error.
    pub fn qk_len(&self) -> usize {
        self.checked_qk_len().unwrap_or(usize::MAX)
    }

    /// Elements of V (and of the output); saturates like [`AttentionShape::qk_len`].
    pub fn v_len(&self) -> usize {
        self.checked_v_len().unwrap_or(usize::MAX)
    }

    /// Elements of the key padding mask; saturates like [`AttentionShape::qk_len`].
    pub fn mask_len(&self) -> usize {
        self.checked_mask_len().unwrap_or(usize::MAX)
    }

    /// Elements of Q (and K), or [`FavorError::SizeOverflow`].
    pub fn checked_qk_len(&self) -> Result<usize> {
        checked_len("q", &[self.batch, self.heads, self.len, self.d])
    }

    /// Elements of V (and of the output), or [`FavorError::SizeOverflow`].
    pub fn checked_v_len(&self) -> Result<usize> {
        checked_len("v", &[self.batch, self.heads, self.len, self.dv])
    }

    /// Elements of the key padding mask, or [`FavorError::SizeOverflow`].
    pub fn checked_mask_len(&self) -> Result<usize> {
        checked_len("key_mask", &[self.batch, self.len])
    }

    /// Rejects zero sizes and sizes whose element counts overflow ([`FavorError::SizeOverflow`]).
    /// After it succeeds the element counts above are exact.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in
            [("batch", self.batch), ("heads", self.heads), ("len", self.len), ("d", self.d), ("dv", self.dv)]
        {
            if v == 0 {
                return Err(FavorError::ZeroSize { arg });
            }
        }
        self.checked_qk_len()?;
        self.checked_v_len()?;
        Ok(())
    }
}

/// Which keys a query sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    /// Every query sees every (unpadded) key.
    #[default]
    Bidirectional,
    /// Query i sees keys 0..=i (unidirectional / autoregressive).
    Causal,
}

/// Options of an attention call beyond the feature map.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionOptions {
    /// Bidirectional (default) or causal.
    pub direction: Direction,
    /// Denominator guard δ: a denominator R with |R| ≤ δ becomes R + 2δ (the JAX rule). `None`
    /// takes the feature map's default ([`crate::FeatureMap::default_denominator_guard`]): 1e-6
    /// for trigonometric features, which can cancel to zero, and 0 for positive maps. With
    /// δ = 0 a denominator of exactly zero (a query that sees no key) gives an output of zero.
    pub denominator_guard: Option<f32>,
}

impl AttentionOptions {
    /// Causal attention with default options.
    pub fn causal() -> Self {
        Self { direction: Direction::Causal, ..Self::default() }
    }

    /// Bidirectional attention with default options.
    pub fn bidirectional() -> Self {
        Self::default()
    }
}
