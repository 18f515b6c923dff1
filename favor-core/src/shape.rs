//! Shapes, directions and options of an attention call.
//!
//! Layout: Q and K are `[batch, heads, len, d]`, V and the output `[batch, heads, len, d_v]`,
//! row-major and contiguous. The optional key padding mask is `[batch, len]` (true = keep).

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

    /// Independent (batch, head) problems.
    pub fn problems(&self) -> usize {
        self.batch * self.heads
    }

    /// Elements of Q (and K).
    pub fn qk_len(&self) -> usize {
        self.batch * self.heads * self.len * self.d
    }

    /// Elements of V (and of the output).
    pub fn v_len(&self) -> usize {
        self.batch * self.heads * self.len * self.dv
    }

    /// Elements of the key padding mask.
    pub fn mask_len(&self) -> usize {
        self.batch * self.len
    }

    /// Rejects zero sizes and sizes whose element counts overflow `usize`.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in
            [("batch", self.batch), ("heads", self.heads), ("len", self.len), ("d", self.d), ("dv", self.dv)]
        {
            if v == 0 {
                return Err(FavorError::ZeroSize { arg });
            }
        }
        let bhl = self.batch.checked_mul(self.heads).and_then(|x| x.checked_mul(self.len));
        let ok = bhl.and_then(|x| x.checked_mul(self.d.max(self.dv))).and_then(|x| x.checked_mul(4)).is_some();
        if !ok {
            return Err(FavorError::shape("shape", "element counts that fit in memory", format!("{self:?}")));
        }
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
