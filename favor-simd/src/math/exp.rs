//! exp(x) for every ISA, written once.
//!
//! Range reduction x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in a high part exact in f32 and a
//! low correction), the Cephes degree-6 minimax polynomial for e^r, and the scale 2^n applied by
//! `SimdF32::ldexp` (two factors 2^h·2^(n−h) with h = n/2 rounded to even; one vscalefps on
//! AVX-512) so that results down in the subnormal range (x ≥ −104) are rounded once and
//! correctly, and x up to ln(f32::MAX) does not overflow early. Here n ∈ [−150, 128] and
//! e^r ∈ [0.7, 1.5), inside ldexp's contract.
//! Special cases: x > ln(f32::MAX) → +∞, x < −104 (below half the smallest subnormal) → 0,
//! NaN → NaN. Tested error: ≤ 2 ulp against f64 (see `tests/exp.rs`).

use crate::isa::SimdF32;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Largest x with a finite f32 result (f32 nearest above ln(f32::MAX) overflows).
const X_MAX: f32 = 88.722_84;
/// Below this e^x rounds to zero even as a subnormal.
const X_MIN: f32 = -104.0;

/// e^x lane-wise.
#[inline(always)]
pub(crate) fn exp<S: SimdF32>(x: S) -> S {
    exp_impl::<S, true>(x)
}

/// e^x lane-wise for x ≤ 0 (stabilised feature maps): skips the overflow select. Any x ≤ 0,
/// −∞ and NaN included, gives the same result as [`exp`]; x > ln(f32::MAX) gives a finite
/// value near f32::MAX instead of ∞.
#[inline(always)]
pub(crate) fn exp_nonpositive<S: SimdF32>(x: S) -> S {
    exp_impl::<S, false>(x)
}

#[inline(always)]
fn exp_impl<S: SimdF32, const OVERFLOW: bool>(x: S) -> S {
    let xc = x.max(S::splat(X_MIN)).min(S::splat(X_MAX));
    let n = xc.mul(S::splat(LOG2E)).round();
    let r = n.mul_add(S::splat(-LN2_HI), xc);
    let r = n.mul_add(S::splat(-LN2_LO), r);
    let r2 = r.mul(r);
    let p = S::splat(1.987_569_1e-4);
    let p = p.mul_add(r, S::splat(1.398_199_9e-3));
    let p = p.mul_add(r, S::splat(8.333_452e-3));
    let p = p.mul_add(r, S::splat(4.166_579_6e-2));
    let p = p.mul_add(r, S::splat(1.666_666_5e-1));
    let p = p.mul_add(r, S::splat(0.5));
    let p = p.mul_add(r2, r).add(S::splat(1.0));
    let y = p.ldexp(n);
    let y = if OVERFLOW { S::select(x.gt(S::splat(X_MAX)), S::splat(f32::INFINITY), y) } else { y };
    let y = S::select(x.lt(S::splat(X_MIN)), S::splat(0.0), y);
    S::select(x.is_nan(), x, y)
}

/// e^x for one f32 through the vector path (for per-row factors).
#[inline(always)]
pub(crate) fn exp1<S: SimdF32>(x: f32) -> f32 {
    let mut out = [0.0f32; crate::isa::MAX_LANES];
    // SAFETY: `out` holds MAX_LANES ≥ LANES floats.
    unsafe { exp(S::splat(x)).store(out.as_mut_ptr()) };
    out[0]
}

/// exp(c_old − c_new): the decay of a state kept relative to c_old when the stabiliser becomes
/// c_new ≥ c_old. Exactly 1 for equal values, including −∞ = −∞ (nothing seen yet). The
/// stabilisers are f64 (they carry ‖x̃‖²/2, which f32 would round by far more than 1 for large
/// inputs); their difference is what gets exponentiated.
#[inline(always)]
pub(crate) fn decay<S: SimdF32>(c_old: f64, c_new: f64) -> f32 {
    if c_old == c_new { 1.0 } else { exp1::<S>((c_old - c_new) as f32) }
}

/// Lane-wise e^x of a slice, in place (test and tool helper); [`exp_nonpositive`] when
/// `nonpositive`.
#[inline(always)]
pub(crate) fn exp_slice<S: SimdF32>(xs: &mut [f32], nonpositive: bool) {
    let f = |x: S| if nonpositive { exp_nonpositive(x) } else { exp(x) };
    let mut chunks = xs.chunks_exact_mut(S::LANES);
    for c in &mut chunks {
        // SAFETY: each chunk holds exactly LANES floats.
        unsafe { f(S::load(c.as_ptr())).store(c.as_mut_ptr()) };
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut buf = [0.0f32; crate::isa::MAX_LANES];
        buf[..rest.len()].copy_from_slice(rest);
        // SAFETY: `buf` holds MAX_LANES ≥ LANES floats.
        unsafe { f(S::load(buf.as_ptr())).store(buf.as_mut_ptr()) };
        rest.copy_from_slice(&buf[..rest.len()]);
    }
}
