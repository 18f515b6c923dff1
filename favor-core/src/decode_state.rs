//! What a decoding state was made for, and the one check every backend runs before it
//! continues a state.
//!
//! A state holds sums over φ(k)·vᵀ of the tokens seen so far, so it only means something for the
//! problem it was made for: the same (batch, heads, d, d_v), the same feature map kind and
//! feature count, and the same map parameters (projection W, ε, κ, learned weights). A state
//! records a [`StateSignature`] of that problem; [`StateSignature::check`] compares it with the
//! problem of a decode call and names the first field that differs.
//!
//! The storage dtype of the tokens is not part of it: states accumulate in the backend's own
//! precision, so a prefill in f32 may be continued by decoding in bf16.

use crate::validate::checked_len;
use crate::{AttentionShape, FavorError, FeatureMap, Problem, Projection, Result};

/// The problem a decoding state was made for. Made by [`StateSignature::new`] in each backend's
/// `new_state`, checked by [`StateSignature::check`] in each backend's `decode`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateSignature {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    dv: usize,
    map: &'static str,
    features: usize,
    seed: Option<u64>,
    projection: Option<u64>,
    params: u64,
}

impl StateSignature {
    /// Validates `problem` for a new state (its `len` is ignored) and records what the state is
    /// made for. The state's size, batch·heads·M·(d_v + 1) values, must not overflow (backends
    /// that keep one state per key/value head need less).
    pub fn new(problem: &Problem<'_>) -> Result<Self> {
        let shape = AttentionShape { len: 1, kv_len: None, ..problem.shape };
        Problem { shape, ..*problem }.validate()?;
        let features = problem.features();
        let dv1 = shape.dv.checked_add(1).ok_or_else(|| FavorError::SizeOverflow {
            arg: "state",
            dims: format!("{}×{}×{features}×({}+1)", shape.batch, shape.heads, shape.dv),
        })?;
        checked_len("state", &[shape.batch, shape.heads, features, dv1])?;
        Ok(Self::of(shape, problem.map))
    }

    fn of(s: AttentionShape, map: &FeatureMap) -> Self {
        let projection = map_projection(map);
        Self {
            batch: s.batch,
            heads: s.heads,
            kv_heads: s.key_heads(),
            d: s.d,
            dv: s.dv,
            map: map.name(),
            features: map.feature_dim(s.d),
            seed: projection.and_then(|p| p.config()).map(|c| c.seed),
            projection: projection.map(Projection::fingerprint),
            params: params_fingerprint(map),
        }
    }

    /// The shape the state was made for, with `len = 1`.
    pub fn shape(&self) -> AttentionShape {
        let s = AttentionShape::new(self.batch, self.heads, 1, self.d).with_dv(self.dv);
        if self.kv_heads == self.heads { s } else { s.with_kv_heads(self.kv_heads) }
    }

    /// Ok when a state made for `self` may continue with `problem` (any `len`);
    /// otherwise [`FavorError::StateMismatch`] naming the first field that differs, with the
    /// problem's value as `expected` and the state's as `actual`.
    pub fn check(&self, problem: &Problem<'_>) -> Result<()> {
        if problem.shape.is_cross() {
            return Err(FavorError::param(
                "kv_len",
                "decoding continues causal attention, where each query comes with its own key: kv_len must be unset",
            ));
        }
        let want = Self::of(problem.shape, problem.map);
        self.first_difference(&want)
    }

    /// [`StateSignature::check`] for a slot-decoding call (see [`crate::slots`]), whose one
    /// packed batch element is not the state's batch of slots.
    pub fn check_slot_call(&self, problem: &Problem<'_>) -> Result<()> {
        let shape = AttentionShape { batch: self.batch, ..problem.shape };
        self.check(&Problem { shape, ..*problem })
    }

    /// Batch elements of the state: its slots (see [`crate::slots`]).
    pub fn slots(&self) -> usize {
        self.batch
    }

    /// Ok when `slot` is one of the state's slots.
    pub fn check_slot(&self, arg: &'static str, slot: usize) -> Result<()> {
        if slot < self.batch {
            return Ok(());
        }
        Err(FavorError::param(arg, format!("slot {slot} is out of range of a state of {} slots", self.batch)))
    }

    /// What one slot of the state holds: the signature without the batch size, its identity
    /// (map kind, W, parameters) folded into a fingerprint.
    pub fn slot_signature(&self) -> SlotSignature {
        let mut h = Fingerprint::new();
        h.word(self.map.len() as u64);
        self.map.bytes().for_each(|b| h.word(b as u64));
        h.word(self.seed.map_or(u64::MAX, |s| s.rotate_left(1) ^ 1));
        h.word(self.projection.unwrap_or(0));
        h.word(self.projection.is_some() as u64);
        h.word(self.params);
        SlotSignature {
            heads: self.heads,
            kv_heads: self.kv_heads,
            d: self.d,
            dv: self.dv,
            features: self.features,
            map: h.finish(),
        }
    }

    /// The first field where a state made for `want` differs from `self`.
    fn first_difference(&self, want: &StateSignature) -> Result<()> {
        // Every decoding call checks its state: equal signatures allocate nothing.
        if self == want {
            return Ok(());
        }
        let hex = |x: Option<u64>| x.map_or_else(|| "none".to_string(), |x| format!("{x:016x}"));
        let fields: [(&'static str, String, String); 10] = [
            ("batch", want.batch.to_string(), self.batch.to_string()),
            ("heads", want.heads.to_string(), self.heads.to_string()),
            ("kv_heads", want.kv_heads.to_string(), self.kv_heads.to_string()),
            ("d", want.d.to_string(), self.d.to_string()),
            ("d_v", want.dv.to_string(), self.dv.to_string()),
            ("feature map", want.map.to_string(), self.map.to_string()),
            ("features", want.features.to_string(), self.features.to_string()),
            ("projection seed", opt(want.seed), opt(self.seed)),
            ("projection W (fingerprint)", hex(want.projection), hex(self.projection)),
            ("map parameters (fingerprint)", hex(Some(want.params)), hex(Some(self.params))),
        ];
        match fields.into_iter().find(|(_, e, a)| e != a) {
            Some((field, expected, actual)) => Err(FavorError::StateMismatch { field, expected, actual }),
            None => Ok(()),
        }
    }
}

fn opt(x: Option<u64>) -> String {
    x.map_or_else(|| "none (a fixed matrix)".to_string(), |x| x.to_string())
}

fn map_projection(map: &FeatureMap) -> Option<&Projection> {
    match map {
        FeatureMap::Positive { projection, .. }
        | FeatureMap::Hyperbolic { projection, .. }
        | FeatureMap::Trigonometric { projection, .. } => Some(projection),
        FeatureMap::Generalized { projection, .. } => projection.as_ref(),
        FeatureMap::Softplus(_) | FeatureMap::GatedSoftplus(_) => None,
    }
}

/// What one slot of a decoding state is made for: sizes, and a fingerprint of the feature
/// map's kind, projection W and parameters. Slot values carry it so that importing a slot into a
/// state made for another problem fails with [`FavorError::StateMismatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlotSignature {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Query/key dimension.
    pub d: usize,
    /// Value dimension.
    pub dv: usize,
    /// Feature count M.
    pub features: usize,
    /// Fingerprint of the map kind, W and the map's parameters.
    pub map: u64,
}

impl SlotSignature {
    /// Ok when values made for `actual` may be written into a slot made for `self`; otherwise
    /// [`FavorError::StateMismatch`] naming the first field that differs (`expected` is this
    /// state's value, `actual` the imported one's).
    pub fn check(&self, actual: &SlotSignature) -> Result<()> {
        let fields: [(&'static str, u64, u64); 6] = [
            ("heads", self.heads as u64, actual.heads as u64),
            ("kv_heads", self.kv_heads as u64, actual.kv_heads as u64),
            ("d", self.d as u64, actual.d as u64),
            ("d_v", self.dv as u64, actual.dv as u64),
            ("features", self.features as u64, actual.features as u64),
            ("feature map (fingerprint)", self.map, actual.map),
        ];
        match fields.into_iter().find(|(_, e, a)| e != a) {
            Some((field, e, a)) if field.ends_with("(fingerprint)") => {
                Err(FavorError::StateMismatch { field, expected: format!("{e:016x}"), actual: format!("{a:016x}") })
            }
            Some((field, e, a)) => {
                Err(FavorError::StateMismatch { field, expected: e.to_string(), actual: a.to_string() })
            }
            None => Ok(()),
        }
    }
}

/// Fingerprint of every parameter of `map` other than its projection (already fingerprinted
/// when the projection is made).
fn params_fingerprint(map: &FeatureMap) -> u64 {
    let mut h = Fingerprint::new();
    // The softmax scale as set (`None` and an explicit 1/√d differ in name only, but a state
    // remembers what the map said).
    let tau = |h: &mut Fingerprint, t: &Option<f32>| h.word(t.map_or(u64::MAX, |t| t.to_bits() as u64));
    match map {
        FeatureMap::Positive { epsilon, softmax_scale, .. } | FeatureMap::Hyperbolic { epsilon, softmax_scale, .. } => {
            h.f32s(&[*epsilon]);
            tau(&mut h, softmax_scale);
        }
        FeatureMap::Trigonometric { softmax_scale, .. } => tau(&mut h, softmax_scale),
        FeatureMap::Generalized { f, normalize_data, softmax_scale, scale, kappa, .. } => {
            h.word(*f as u64);
            h.word(*normalize_data as u64);
            tau(&mut h, softmax_scale);
            h.f32s(&[*scale, *kappa]);
        }
        FeatureMap::Softplus(l) => {
            h.f32s(&l.w);
            h.f32s(l.bias.as_deref().unwrap_or(&[]));
            h.word(l.bias.is_some() as u64);
        }
        FeatureMap::GatedSoftplus(g) => {
            h.f32s(&g.filter.w);
            h.f32s(&g.gate.w);
        }
    }
    h.finish()
}

/// A 64-bit fingerprint of f32 bit patterns (not cryptographic: it tells apart parameters
/// that differ by accident). Each step is a bijection of the running value for a fixed input, so
/// two sequences of equal length that differ in one element never collide.
pub(crate) struct Fingerprint(u64);

impl Fingerprint {
    pub(crate) fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn word(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(23);
    }

    pub(crate) fn f32s(&mut self, xs: &[f32]) {
        self.word(xs.len() as u64);
        xs.iter().for_each(|x| self.word(x.to_bits() as u64));
    }

    /// The value, mixed so that nearby inputs print differently.
    pub(crate) fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
