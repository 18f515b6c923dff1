//! Shapes, directions and options of an attention call.
//!
//! Layout: Q is `[batch, heads, len, d]`, K `[batch, heads, kv_len, d]`, V
//! `[batch, heads, kv_len, d_v]` and the output `[batch, heads, len, d_v]`, row-major and
//! contiguous unless the problem's [`crate::Layout`] gives a tensor other strides; `kv_len` is
//! `len` unless set (cross-attention). The optional key padding mask is `[batch, kv_len]`
//! (true = keep).

use crate::validate::checked_len;
use crate::{FavorError, Result};

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    /// Batch size B.
    pub batch: usize,
    /// Heads per batch element H.
    pub heads: usize,
    /// Sequence length L: queries, and keys too unless `kv_len` is set.
    pub len: usize,
    /// Query/key head dimension d.
    pub d: usize,
    /// Value head dimension d_v (may differ from d).
    pub dv: usize,
    /// Keys (and values) per sequence when they differ from the queries (cross-attention:
    /// bidirectional only); `None` is `len`.
    pub kv_len: Option<usize>,
    /// Key/value heads per batch element when fewer than the query heads (grouped-query
    /// attention; 1 is multi-query): query head h reads key/value head h / (heads / kv_heads).
    /// Must divide `heads`; `None` is `heads`.
    pub kv_heads: Option<usize>,
}

impl AttentionShape {
    /// A shape with `d_v = d`.
    pub fn new(batch: usize, heads: usize, len: usize, d: usize) -> Self {
        Self { batch, heads, len, d, dv: d, kv_len: None, kv_heads: None }
    }

    /// The same shape with `kv_len` keys per sequence (cross-attention; bidirectional only).
    pub fn with_kv_len(self, kv_len: usize) -> Self {
        Self { kv_len: Some(kv_len), ..self }
    }

    /// The same shape with `kv_heads` key/value heads per batch element (grouped-query
    /// attention; `kv_heads` must divide `heads`).
    pub fn with_kv_heads(self, kv_heads: usize) -> Self {
        Self { kv_heads: Some(kv_heads), ..self }
    }

    /// Key/value heads per batch element: `kv_heads`, or `heads` when unset.
    pub fn key_heads(&self) -> usize {
        self.kv_heads.unwrap_or(self.heads)
    }

    /// Query heads per key/value head (1 without grouping). The shape must be valid.
    pub fn group(&self) -> usize {
        self.heads / self.key_heads().max(1)
    }

    /// Whether key/value heads are shared by several query heads.
    pub fn is_grouped(&self) -> bool {
        self.key_heads() != self.heads
    }

    /// The key/value head (batch-major, of `batch · key_heads`) read by query head `bh`
    /// (batch-major, of `batch · heads`).
    pub fn kv_head_of(&self, bh: usize) -> usize {
        let (b, h) = (bh / self.heads, bh % self.heads);
        b * self.key_heads() + h / self.group()
    }

    /// The query heads (batch-major) that read key/value head `kvh`: consecutive.
    pub fn query_heads_of(&self, kvh: usize) -> std::ops::Range<usize> {
        let (b, j) = (kvh / self.key_heads(), kvh % self.key_heads());
        let first = b * self.heads + j * self.group();
        first..first + self.group()
    }

    /// Independent (batch, key/value head) problems; saturates like
    /// [`AttentionShape::problems`].
    pub fn kv_problems(&self) -> usize {
        self.batch.saturating_mul(self.key_heads())
    }

    /// Keys (and values) per sequence: `kv_len`, or `len` when unset.
    pub fn keys(&self) -> usize {
        self.kv_len.unwrap_or(self.len)
    }

    /// Whether queries and keys have different lengths (cross-attention).
    pub fn is_cross(&self) -> bool {
        self.keys() != self.len
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

    /// Elements of Q (and of K without `kv_len` or `kv_heads`). Saturates at `usize::MAX`, a length no tensor
    /// has, when the product overflows; [`AttentionShape::checked_qk_len`] reports that as an
    /// error.
    pub fn qk_len(&self) -> usize {
        self.checked_qk_len().unwrap_or(usize::MAX)
    }

    /// Elements of K; saturates like [`AttentionShape::qk_len`].
    pub fn k_len(&self) -> usize {
        checked_len("k", &[self.batch, self.key_heads(), self.keys(), self.d]).unwrap_or(usize::MAX)
    }

    /// Elements of V (and of the output without `kv_len` or `kv_heads`); saturates like
    /// [`AttentionShape::qk_len`].
    pub fn v_len(&self) -> usize {
        self.checked_v_len().unwrap_or(usize::MAX)
    }

    /// Elements of the output (and of ∂ℒ/∂out); saturates like [`AttentionShape::qk_len`].
    pub fn out_len(&self) -> usize {
        checked_len("out", &[self.batch, self.heads, self.len, self.dv]).unwrap_or(usize::MAX)
    }

    /// Elements of the key padding mask; saturates like [`AttentionShape::qk_len`].
    pub fn mask_len(&self) -> usize {
        self.checked_mask_len().unwrap_or(usize::MAX)
    }

    /// Elements of Q (and K), or [`FavorError::SizeOverflow`].
    pub fn checked_qk_len(&self) -> Result<usize> {
        checked_len("q", &[self.batch, self.heads, self.len, self.d])
    }

    /// Elements of V, or [`FavorError::SizeOverflow`].
    pub fn checked_v_len(&self) -> Result<usize> {
        checked_len("v", &[self.batch, self.key_heads(), self.keys(), self.dv])
    }

    /// Elements of the key padding mask, or [`FavorError::SizeOverflow`].
    pub fn checked_mask_len(&self) -> Result<usize> {
        checked_len("key_mask", &[self.batch, self.keys()])
    }

    /// Rejects zero sizes and sizes whose element counts overflow ([`FavorError::SizeOverflow`]).
    /// After it succeeds the element counts above are exact.
    pub fn validate(&self) -> Result<()> {
        for (arg, v) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("len", self.len),
            ("kv_len", self.keys()),
            ("kv_heads", self.key_heads()),
            ("d", self.d),
            ("dv", self.dv),
        ] {
            if v == 0 {
                return Err(FavorError::ZeroSize { arg });
            }
        }
        if !self.heads.is_multiple_of(self.key_heads()) {
            return Err(FavorError::param(
                "kv_heads",
                format!(
                    "must divide heads (query head h reads key/value head h / (heads / kv_heads)), got {} query heads and {} key/value heads",
                    self.heads,
                    self.key_heads()
                ),
            ));
        }
        self.checked_qk_len()?;
        self.checked_v_len()?;
        checked_len("k", &[self.batch, self.key_heads(), self.keys(), self.d])?;
        checked_len("out", &[self.batch, self.heads, self.len, self.dv])?;
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
