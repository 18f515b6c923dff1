//! Decoding for serving: one state holds many independent sequences ("slots"), each at its own
//! position.
//!
//! A state made by [`FavorBackend::new_state`](crate::FavorBackend::new_state) for a batch of
//! `B` has `B` slots. One [`FavorBackend::decode_slots`](crate::FavorBackend::decode_slots) call
//! continues any subset of them, each by its own number of tokens: a long chunk to prefill a new
//! prompt, one token to decode. The call's tensors hold the sequences back to back along the
//! token axis of a single batch element (batch = 1, len = the total), and [`SlotChunks`] says
//! which tokens continue which slot, with cumulative offsets as FlashAttention's `cu_seqlens`.
//! Each sequence's output equals full causal attention over everything its slot has consumed.
//!
//! Slots are reset, copied (beam search, prefix sharing) and read or written as [`SlotState`]:
//! a backend-independent copy of one slot, which [`SlotState::to_bytes`] serialises with a format
//! version and a [`SlotSignature`] (sizes and a fingerprint of the feature map), so that a slot
//! moved to another process, or cached with a prompt prefix, can only be imported into a state
//! made for the same problem.

use crate::decode_state::Fingerprint;
use crate::ragged::{check_offsets, check_packed_batch};
use crate::validate::{checked_len, try_zeroed};
use crate::{FavorError, Problem, Result, SlotSignature, StateSignature};

/// Which slot each sequence of a slot-decoding call continues, and where its tokens are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotChunks<'a> {
    /// The slot that sequence i continues; no slot twice in one call.
    pub slots: &'a [usize],
    /// Cumulative token offsets, one more than `slots`: sequence i is tokens
    /// `offsets[i]..offsets[i + 1]` of the call's tensors. `offsets[0] = 0`, the last is the
    /// call's `len`, and they never decrease (an empty sequence leaves its slot as it is).
    pub offsets: &'a [usize],
}

impl<'a> SlotChunks<'a> {
    /// Sequences `slots`, tokens split at `offsets`.
    pub fn new(slots: &'a [usize], offsets: &'a [usize]) -> Self {
        Self { slots, offsets }
    }

    /// (slot, first token, end token) of each sequence. Call [`SlotChunks::validate`] first.
    pub fn sequences(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.slots.iter().zip(self.offsets.windows(2)).map(|(&slot, w)| (slot, w[0], w[1]))
    }

    /// Checks the chunks against a call's problem and its state: one packed batch element, as
    /// many offsets as slots plus one, offsets from 0 to `len` that never decrease, slots in range
    /// and distinct.
    pub fn validate(&self, p: &Problem<'_>, state: &StateSignature) -> Result<()> {
        let s = p.shape;
        check_packed_batch("slot-decoding", p)?;
        check_offsets("offsets", self.offsets, self.slots.len() + 1, s.len)?;
        for (i, &slot) in self.slots.iter().enumerate() {
            state.check_slot("slots", slot)?;
            // Calls name few slots: a quadratic scan allocates nothing.
            if let Some(j) = self.slots[..i].iter().position(|&o| o == slot) {
                return Err(FavorError::param(
                    "slots",
                    format!("slot {slot} is continued twice in one call (sequences {j} and {i})"),
                ));
            }
        }
        Ok(())
    }
}

/// One key/value head of a slot: the sums S and z relative to exp(c), as in
/// [`CausalState`](crate::attention::CausalState).
#[derive(Debug, Clone, PartialEq)]
pub struct SlotHead {
    /// Running maximum of the key log-scales (−∞ before the first key).
    pub c: f64,
    /// Σ exp(c_j − c)·k'_j, M values.
    pub z: Vec<f64>,
    /// Σ exp(c_j − c)·k'_j v_jᵀ, row-major M × d_v.
    pub s: Vec<f64>,
}

/// A backend-independent copy of one slot of a decoding state: what it is made for, the tokens
/// it has consumed, and one [`SlotHead`] per key/value head. Backends that keep a state per query
/// head write the group's one state to each of its query heads.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    signature: SlotSignature,
    tokens: u64,
    heads: Vec<SlotHead>,
}

/// First bytes of a serialised slot.
const MAGIC: &[u8; 8] = b"FAVORSLT";
/// Format version of [`SlotState::to_bytes`]; bumped when the layout changes.
pub const SLOT_FORMAT_VERSION: u32 = 1;
/// Bytes before the values: magic, version, six signature words, tokens.
const HEADER_BYTES: usize = 8 + 4 + 6 * 8 + 8;

impl SlotState {
    /// A slot that has consumed `tokens` tokens with these per-key/value-head sums; checks their
    /// count and sizes against `signature`, and that they are finite (c may be −∞: no key yet).
    pub fn new(signature: SlotSignature, tokens: u64, heads: Vec<SlotHead>) -> Result<Self> {
        if heads.len() != signature.kv_heads {
            return Err(FavorError::shape("heads", format!("{} key/value heads", signature.kv_heads), heads.len()));
        }
        let (mf, dv) = (signature.features, signature.dv);
        for h in &heads {
            if h.z.len() != mf || h.s.len() != mf * dv {
                return Err(FavorError::shape(
                    "heads",
                    format!("z of {mf} and S of {mf}×{dv} values"),
                    format!("z of {} and S of {} values", h.z.len(), h.s.len()),
                ));
            }
            if h.c.is_nan() || h.c == f64::INFINITY || h.z.iter().chain(&h.s).any(|x| !x.is_finite()) {
                return Err(FavorError::param("heads", "a stabiliser or sum is not finite"));
            }
        }
        Ok(Self { signature, tokens, heads })
    }

    /// A slot that has consumed nothing (what a reset writes).
    pub fn empty(signature: SlotSignature) -> Result<Self> {
        let (mf, dv) = (signature.features, signature.dv);
        let mut heads = Vec::with_capacity(signature.kv_heads);
        for _ in 0..signature.kv_heads {
            heads.push(SlotHead {
                c: f64::NEG_INFINITY,
                z: try_zeroed("slot", mf)?,
                s: try_zeroed("slot", checked_len("slot", &[mf, dv])?)?,
            });
        }
        Ok(Self { signature, tokens: 0, heads })
    }

    /// What the slot is made for.
    pub fn signature(&self) -> &SlotSignature {
        &self.signature
    }

    /// Tokens the slot has consumed (the position of its next token).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The sums of each key/value head.
    pub fn heads(&self) -> &[SlotHead] {
        &self.heads
    }

    /// The slot as bytes: `FAVORSLT`, the format version (u32), the signature (heads, kv_heads,
    /// d, d_v, M, map fingerprint: u64 each), the token count (u64), per key/value head c, z and S
    /// (f64), and a checksum (u64); little-endian throughout.
    pub fn to_bytes(&self) -> Vec<u8> {
        let sig = &self.signature;
        let values = self.heads.len() * (1 + sig.features * (sig.dv + 1));
        let mut out = Vec::with_capacity(HEADER_BYTES + 8 * values + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SLOT_FORMAT_VERSION.to_le_bytes());
        for w in [sig.heads as u64, sig.kv_heads as u64, sig.d as u64, sig.dv as u64, sig.features as u64, sig.map] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.tokens.to_le_bytes());
        for h in &self.heads {
            out.extend_from_slice(&h.c.to_le_bytes());
            h.z.iter().chain(&h.s).for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads what [`SlotState::to_bytes`] wrote. Bytes of another format version, truncated or
    /// altered bytes, and sizes that do not add up are [`FavorError::InvalidParameter`] naming
    /// `slot bytes`; whether the slot fits a state is checked when it is written into one.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |why: String| FavorError::param("slot bytes", why);
        if bytes.len() < HEADER_BYTES + 8 || &bytes[..8] != MAGIC {
            return Err(bad(format!("not a favor slot ({} bytes without the `FAVORSLT` header)", bytes.len())));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != SLOT_FORMAT_VERSION {
            return Err(bad(format!("format version {version}; this build reads version {SLOT_FORMAT_VERSION}")));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 8);
        if checksum(body).to_le_bytes() != tail {
            return Err(bad("checksum mismatch: the bytes were truncated or altered".to_string()));
        }
        let word = |i: usize| u64::from_le_bytes(body[12 + 8 * i..20 + 8 * i].try_into().expect("8 bytes"));
        let size = |i: usize| usize::try_from(word(i)).map_err(|_| bad(format!("size {} does not fit", word(i))));
        let signature = SlotSignature {
            heads: size(0)?,
            kv_heads: size(1)?,
            d: size(2)?,
            dv: size(3)?,
            features: size(4)?,
            map: word(5),
        };
        let tokens = word(6);
        let (kv, mf, dv) = (signature.kv_heads, signature.features, signature.dv);
        let per_head = mf.checked_mul(dv.saturating_add(1)).and_then(|x| x.checked_add(1));
        let expected = per_head.and_then(|x| x.checked_mul(kv)).and_then(|x| x.checked_mul(8));
        if expected != Some(body.len() - HEADER_BYTES) {
            return Err(bad(format!(
                "{} value bytes for {kv} key/value heads of M = {mf}, d_v = {dv}",
                body.len() - HEADER_BYTES
            )));
        }
        let mut values =
            body[HEADER_BYTES..].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")));
        let mut heads = Vec::with_capacity(kv);
        for _ in 0..kv {
            let c = values.next().expect("sized above");
            let z: Vec<f64> = values.by_ref().take(mf).collect();
            let s: Vec<f64> = values.by_ref().take(mf * dv).collect();
            heads.push(SlotHead { c, z, s });
        }
        Self::new(signature, tokens, heads).map_err(|e| bad(e.to_string()))
    }
}

/// A fingerprint of serialised bytes, 8 at a time (the tail zero-padded).
fn checksum(bytes: &[u8]) -> u64 {
    let mut h = Fingerprint::new();
    h.word(bytes.len() as u64);
    bytes.chunks(8).for_each(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        h.word(u64::from_le_bytes(w));
    });
    h.finish()
}
