//! AVX-512F: `__m512`, 16 lanes. (On Zen 4 the 512-bit ops are double-pumped, so this runs at
//! about AVX2 speed; it is kept for CPUs with full-width units.)

use super::{SimdF32, SimdTask};
use std::arch::x86_64::*;

/// An AVX-512 vector. Only used inside [`run`], whose caller proved avx512f is present.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Avx512(__m512);

// SAFETY: a plain vector of f32 values, no references.
unsafe impl Send for Avx512 {}
// SAFETY: as above.
unsafe impl Sync for Avx512 {}

/// Runs `task` compiled for AVX-512F.
///
/// # Safety
/// The CPU must support avx512f.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn run<T: SimdTask>(task: T) -> T::Output {
    task.run::<Avx512>()
}

// Every method below wraps one or two AVX-512F intrinsics. They are only reached from kernels
// inlined into `run`, which requires the CPU feature (see the module docs).
impl SimdF32 for Avx512 {
    const LANES: usize = 16;
    // 16 of the 32 zmm registers hold accumulators.
    const MR: usize = 8;
    type Mask = __mmask16;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 16 readable floats; loadu needs no alignment.
        Avx512(unsafe { _mm512_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 16 writable floats; storeu needs no alignment.
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_add_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_sub_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_mul_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_max_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_min_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn abs(self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_abs_ps(self.0) })
    }
    #[inline(always)]
    fn round(self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0) })
    }
    #[inline(always)]
    fn pow2i(self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe {
            let n = _mm512_add_epi32(_mm512_cvtps_epi32(self.0), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(n))
        })
    }
    #[inline(always)]
    fn gt(self, o: Self) -> Self::Mask {
        // SAFETY: avx512f is present (module invariant).
        unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> Self::Mask {
        // SAFETY: avx512f is present (module invariant).
        unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn is_nan(self) -> Self::Mask {
        // SAFETY: avx512f is present (module invariant).
        unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0) }
    }
    #[inline(always)]
    fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_mask_blend_ps(m, f.0, t.0) })
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        // SAFETY: avx512f is present (module invariant).
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        // SAFETY: avx512f is present (module invariant).
        unsafe { _mm512_reduce_max_ps(self.0) }
    }
}
