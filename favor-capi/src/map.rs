//! Feature maps: drawn from a seed, from the caller's W, or learned (Softplus, gated Softplus).

use crate::handles::{FavorMap, emit, free, get};
use crate::status::{CallResult, Failure, FavorStatus, guard};
use crate::tensor::{check_array, read};
use favor::{FeatureMap, GatedSoftplusParams, Linear, Projection, ProjectionConfig, ProjectionKind, RowNorms};

/// Feature maps with a random projection W (`FavorMapConfig::kind`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FavorMapKind {
    /// FAVOR+ positive softmax features m^{-1/2}(exp(Wx̃ − ‖x̃‖²/2) + ε·(the token's largest
    /// feature)), x̃ = √τ·x (m features).
    Positive = 0,
    /// Hyperbolic positive softmax features (2m features from m rows of W).
    Hyperbolic = 1,
    /// Trigonometric (random Fourier) softmax features (2m).
    Trigonometric = 2,
    /// Performer-ReLU: ReLU(Wx/√m) + 0.001 (m features).
    Relu = 3,
    /// ELU(x) + 1 without a projection (d features; m, seed and iid are ignored).
    EluPlusOne = 4,
}

/// A feature map to draw or build.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorMapConfig {
    /// A `FavorMapKind` value.
    pub kind: i32,
    /// Rows of W (random features drawn).
    pub m: usize,
    /// Head dimension d (columns of W).
    pub d: usize,
    /// Seed of the random projection.
    pub seed: u64,
    /// 0: block-orthogonal rows with χ(d) norms (the FAVOR+ default); 1: iid Gaussian rows.
    pub iid: i32,
    /// Softmax scale τ (the map estimates exp(τ·qᵀk)); 0 means 1/√d. Exponential maps only.
    pub softmax_scale: f32,
    /// ε added after the exp of the positive and hyperbolic maps, negative for the default 1e-6;
    /// 0 or negative for the other maps, which have no ε.
    pub epsilon: f32,
}

fn kind_of(code: i32) -> CallResult<FavorMapKind> {
    Ok(match code {
        0 => FavorMapKind::Positive,
        1 => FavorMapKind::Hyperbolic,
        2 => FavorMapKind::Trigonometric,
        3 => FavorMapKind::Relu,
        4 => FavorMapKind::EluPlusOne,
        c => return Err(Failure::param("kind", format!("unknown feature map kind {c} (0 … 4, see FavorMapKind)"))),
    })
}

/// The map of `kind` on `projection` with the config's ε and τ.
fn build(c: &FavorMapConfig, projection: Option<Projection>) -> CallResult<FeatureMap> {
    let kind = kind_of(c.kind)?;
    let projection = || projection.ok_or_else(|| Failure::param("kind", "this map has no projection"));
    let mut map = match kind {
        FavorMapKind::Positive => FeatureMap::positive(projection()?),
        FavorMapKind::Hyperbolic => FeatureMap::hyperbolic(projection()?),
        FavorMapKind::Trigonometric => FeatureMap::trigonometric(projection()?),
        FavorMapKind::Relu => FeatureMap::relu(Some(projection()?)),
        FavorMapKind::EluPlusOne => FeatureMap::elu_plus_one(),
    };
    match &mut map {
        FeatureMap::Positive { epsilon, .. } | FeatureMap::Hyperbolic { epsilon, .. }
            if c.epsilon >= 0.0 || c.epsilon.is_nan() =>
        {
            *epsilon = c.epsilon;
        }
        FeatureMap::Positive { .. } | FeatureMap::Hyperbolic { .. } => {}
        _ if c.epsilon > 0.0 || c.epsilon.is_nan() => {
            return Err(Failure::param(
                "epsilon",
                format!("the {} map has no ε; pass 0 or a negative value", map.name()),
            ));
        }
        _ => {}
    }
    if c.softmax_scale != 0.0 {
        map = map.with_softmax_scale(c.softmax_scale)?;
    }
    map.validate(c.d)?;
    Ok(map)
}

/// Draws a feature map: W (m×d) from `config.seed`, block-orthogonal unless `config.iid`.
/// The same seed and sizes give the same W as favor's Rust API (`ProjectionConfig`).
///
/// # Safety
/// `config` is null or valid for one read; `out` is null or valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_map_draw(config: *const FavorMapConfig, out: *mut *mut FavorMap) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { read(config, "config")? };
        let projection = if kind_of(c.kind)? == FavorMapKind::EluPlusOne {
            None
        } else {
            let kind = match c.iid {
                0 => ProjectionKind::Orthogonal,
                1 => ProjectionKind::Iid,
                v => return Err(Failure::param("iid", format!("must be 0 or 1, got {v}"))),
            };
            Some(Projection::draw(ProjectionConfig { m: c.m, d: c.d, kind, norms: RowNorms::Chi, seed: c.seed })?)
        };
        let map = build(&c, projection)?;
        // SAFETY: forwarded contract.
        unsafe { emit(out, map) }
    })
}

/// Copies `len` floats from `p` (argument `arg`), which must be exactly `want` long.
///
/// # Safety
/// `p` is null or valid for reads of `len` floats.
unsafe fn floats(p: *const f32, len: usize, want: usize, arg: &'static str) -> CallResult<Vec<f32>> {
    check_array(p, len, Some(want), arg)?;
    // SAFETY: non-null, aligned, `len` floats readable (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(p, len) }.to_vec())
}

/// `m·d`, or a size-overflow failure.
fn matrix_len(m: usize, d: usize) -> CallResult<usize> {
    m.checked_mul(d).ok_or_else(|| Failure::new(FavorStatus::SizeOverflow, format!("m×d = {m}×{d} overflows")))
}

/// A feature map on the caller's W (row-major m×d floats, `w_len` of them; copied), e.g. one
/// drawn by another framework. `config.seed` and `config.iid` are ignored.
///
/// # Safety
/// `config` null or readable; `w` null or valid for `w_len` floats; `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_map_from_matrix(
    config: *const FavorMapConfig,
    w: *const f32,
    w_len: usize,
    out: *mut *mut FavorMap,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let c = unsafe { read(config, "config")? };
        if kind_of(c.kind)? == FavorMapKind::EluPlusOne {
            return Err(Failure::param("kind", "ELU+1 has no projection; use favor_map_draw"));
        }
        // SAFETY: forwarded contract.
        let w = unsafe { floats(w, w_len, matrix_len(c.m, c.d)?, "w")? };
        let map = build(&c, Some(Projection::from_matrix(c.m, c.d, w)?))?;
        // SAFETY: forwarded contract.
        unsafe { emit(out, map) }
    })
}

/// A learned map φ(x) = softplus(Wx + b): W row-major m×d (`w_len` floats), b of m floats or
/// null for none. The parameters are copied; backward calls return their gradients.
///
/// # Safety
/// `w` null or valid for `w_len` floats; `bias` null or valid for `bias_len` floats; `out` null
/// or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_map_softplus(
    m: usize,
    d: usize,
    w: *const f32,
    w_len: usize,
    bias: *const f32,
    bias_len: usize,
    out: *mut *mut FavorMap,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let w = unsafe { floats(w, w_len, matrix_len(m, d)?, "w")? };
        // SAFETY: forwarded contract.
        let bias = (!bias.is_null()).then(|| unsafe { floats(bias, bias_len, m, "bias") }).transpose()?;
        let map = FeatureMap::Softplus(Linear::new(m, d, w, bias)?);
        map.validate(d)?;
        // SAFETY: forwarded contract.
        unsafe { emit(out, map) }
    })
}

/// A learned gated map φ(x) = softplus(W_f x) ⊙ σ(W_g x): W_f and W_g row-major m×d (`w_len`
/// floats each; copied).
///
/// # Safety
/// Each pointer null or valid for its length in floats; `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_map_gated_softplus(
    m: usize,
    d: usize,
    w_filter: *const f32,
    w_gate: *const f32,
    w_len: usize,
    out: *mut *mut FavorMap,
) -> FavorStatus {
    guard(|| {
        let n = matrix_len(m, d)?;
        // SAFETY: forwarded contract.
        let (wf, wg) = unsafe { (floats(w_filter, w_len, n, "w_filter")?, floats(w_gate, w_len, n, "w_gate")?) };
        let params = GatedSoftplusParams { filter: Linear::new(m, d, wf, None)?, gate: Linear::new(m, d, wg, None)? };
        let map = FeatureMap::GatedSoftplus(params);
        map.validate(d)?;
        // SAFETY: forwarded contract.
        unsafe { emit(out, map) }
    })
}

/// The number of features M the map produces for head dimension `d` (m, 2m or d).
///
/// # Safety
/// `map` null or a live handle; `features` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_map_features(map: *const FavorMap, d: usize, features: *mut usize) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let map = unsafe { get(map, "map")? };
        map.validate(d)?;
        if features.is_null() {
            return Err(Failure::null("features"));
        }
        // SAFETY: non-null, writable (the caller's contract).
        unsafe { features.write(map.feature_dim(d)) };
        Ok(())
    })
}

/// Copies the map's W (row-major m×d; W_f for the gated map) into `w` (capacity `cap` floats)
/// and writes m and d; `BUFFER_TOO_SMALL` (with m and d written) when `cap < m·d`, and
/// `UNSUPPORTED` for maps without a matrix (ELU+1).
///
/// # Safety
/// `map` null or live; `w` null or valid for `cap` floats; `m`, `d` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_map_matrix(
    map: *const FavorMap,
    w: *mut f32,
    cap: usize,
    m: *mut usize,
    d: *mut usize,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let map = unsafe { get(map, "map")? };
        let (rows, cols, data): (usize, usize, &[f32]) = match map {
            FeatureMap::Positive { projection, .. }
            | FeatureMap::Hyperbolic { projection, .. }
            | FeatureMap::Trigonometric { projection, .. }
            | FeatureMap::Generalized { projection: Some(projection), .. } => {
                (projection.m(), projection.d(), projection.matrix())
            }
            FeatureMap::Softplus(l) => (l.m, l.d, &l.w),
            FeatureMap::GatedSoftplus(g) => (g.filter.m, g.filter.d, &g.filter.w),
            FeatureMap::Generalized { projection: None, .. } => {
                return Err(Failure::new(FavorStatus::Unsupported, format!("the {} map has no matrix", map.name())));
            }
        };
        if m.is_null() || d.is_null() {
            return Err(Failure::null(if m.is_null() { "m" } else { "d" }));
        }
        // SAFETY: non-null, writable (the caller's contract).
        unsafe { (m.write(rows), d.write(cols)) };
        if w.is_null() || cap < data.len() {
            return Err(Failure::new(
                FavorStatus::BufferTooSmall,
                format!("argument `w`: W has {} floats, the buffer holds {cap}", data.len()),
            ));
        }
        // SAFETY: `w` holds `cap ≥ data.len()` floats and is the caller's memory, not ours.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), w, data.len()) };
        Ok(())
    })
}

/// Frees a map (null is a no-op). States and calls do not keep the map.
///
/// # Safety
/// `map` null or live, and not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_map_free(map: *mut FavorMap) -> FavorStatus {
    // SAFETY: forwarded contract.
    guard(|| unsafe { free(map, "map") })
}
