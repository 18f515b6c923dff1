//! AVX2 + FMA: `__m256`, 8 lanes.

use super::{SimdF32, SimdTask};
use std::arch::x86_64::*;

/// An AVX2 vector. Only used inside [`run`], whose caller proved avx2 and fma are present.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct Avx2(__m256);

// SAFETY: a plain vector of f32 values, no references.
unsafe impl Send for Avx2 {}
// SAFETY: as above.
unsafe impl Sync for Avx2 {}

/// Runs `task` compiled for AVX2+FMA.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn run<T: SimdTask>(task: T) -> T::Output {
    task.run::<Avx2>()
}

// Every method below wraps one or two AVX2/FMA intrinsics. They are only reached from kernels
// inlined into `run`, which requires the CPU features (see the module docs).
impl SimdF32 for Avx2 {
    const LANES: usize = 8;
    // 12 of the 16 ymm registers hold accumulators.
    const MR: usize = 6;
    type Mask = __m256;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_set1_ps(x) })
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable floats; loadu needs no alignment.
        Avx2(unsafe { _mm256_loadu_ps(p) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable floats; storeu needs no alignment.
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_add_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_sub_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_mul_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        // SAFETY: fma is present (module invariant).
        Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_max_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_min_ps(self.0, o.0) })
    }
    #[inline(always)]
    fn abs(self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
    }
    #[inline(always)]
    fn round(self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0) })
    }
    #[inline(always)]
    fn pow2i(self) -> Self {
        // SAFETY: avx2 is present (module invariant).
        Avx2(unsafe {
            let n = _mm256_add_epi32(_mm256_cvtps_epi32(self.0), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n))
        })
    }
    #[inline(always)]
    fn gt(self, o: Self) -> Self::Mask {
        // SAFETY: avx is present (module invariant).
        unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn lt(self, o: Self) -> Self::Mask {
        // SAFETY: avx is present (module invariant).
        unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, o.0) }
    }
    #[inline(always)]
    fn is_nan(self) -> Self::Mask {
        // SAFETY: avx is present (module invariant).
        unsafe { _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0) }
    }
    #[inline(always)]
    fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        // SAFETY: avx is present (module invariant).
        Avx2(unsafe { _mm256_blendv_ps(f.0, t.0, m) })
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        // SAFETY: avx is present (module invariant).
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        // SAFETY: avx is present (module invariant).
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps::<1>(self.0));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, ld_src: usize, dst: *mut f32, ld_dst: usize) {
        // SAFETY: the caller guarantees 8 readable rows of 8 floats at src and 8 writable rows
        // at dst (trait contract); avx is present (module invariant).
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ld_src)));
            // 32-bit interleave of row pairs within 128-bit lanes.
            let a: [__m256; 8] = std::array::from_fn(|i| {
                let (x, y) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 { _mm256_unpacklo_ps(x, y) } else { _mm256_unpackhi_ps(x, y) }
            });
            // b[4h + c] holds, in 128-bit lane l, column 4l + c of rows 4h..4h+3.
            let b: [__m256; 8] = std::array::from_fn(|i| {
                let (h, c) = (i / 4, i % 4);
                let (x, y) = (a[4 * h + c / 2], a[4 * h + 2 + c / 2]);
                if c % 2 == 0 { _mm256_shuffle_ps::<0x44>(x, y) } else { _mm256_shuffle_ps::<0xEE>(x, y) }
            });
            for c in 0..4 {
                _mm256_storeu_ps(dst.add(c * ld_dst), _mm256_permute2f128_ps::<0x20>(b[c], b[4 + c]));
                _mm256_storeu_ps(dst.add((4 + c) * ld_dst), _mm256_permute2f128_ps::<0x31>(b[c], b[4 + c]));
            }
        }
    }
}
