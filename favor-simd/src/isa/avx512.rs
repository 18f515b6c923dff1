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
    #[inline(always)]
    fn ldexp(self, n: Self) -> Self {
        // vscalefps computes self · 2^⌊n⌋ with a single rounding for any n, so it meets the
        // trait contract without splitting the scale in two.
        // SAFETY: avx512f is present (module invariant).
        Avx512(unsafe { _mm512_scalef_ps(self.0, n.0) })
    }
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, ld_src: usize, dst: *mut f32, ld_dst: usize) {
        // SAFETY: the caller guarantees 16 readable rows of 16 floats at src and 16 writable
        // rows at dst (trait contract); avx512f is present (module invariant).
        unsafe {
            let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ld_src)));
            // 32-bit interleave of row pairs within 128-bit lanes.
            let a: [__m512; 16] = std::array::from_fn(|i| {
                let (x, y) = (r[i & !1], r[i | 1]);
                if i % 2 == 0 { _mm512_unpacklo_ps(x, y) } else { _mm512_unpackhi_ps(x, y) }
            });
            // b[4h + c] holds, in 128-bit lane l, column 4l + c of rows 4h..4h+3 (a 4 × 4
            // transpose inside each lane, as in the AVX2 version).
            let b: [__m512; 16] = std::array::from_fn(|i| {
                let (h, c) = (i / 4, i % 4);
                let (x, y) = (a[4 * h + c / 2], a[4 * h + 2 + c / 2]);
                if c % 2 == 0 { _mm512_shuffle_ps::<0x44>(x, y) } else { _mm512_shuffle_ps::<0xEE>(x, y) }
            });
            // Gather lane l of b[c], b[4 + c], b[8 + c], b[12 + c] into output row 4l + c: first
            // lanes {0, 1} and {2, 3} of row-group pairs, then even and odd lanes of those.
            for c in 0..4 {
                let lo01 = _mm512_shuffle_f32x4::<0x44>(b[c], b[4 + c]);
                let hi01 = _mm512_shuffle_f32x4::<0xEE>(b[c], b[4 + c]);
                let lo23 = _mm512_shuffle_f32x4::<0x44>(b[8 + c], b[12 + c]);
                let hi23 = _mm512_shuffle_f32x4::<0xEE>(b[8 + c], b[12 + c]);
                _mm512_storeu_ps(dst.add(c * ld_dst), _mm512_shuffle_f32x4::<0x88>(lo01, lo23));
                _mm512_storeu_ps(dst.add((4 + c) * ld_dst), _mm512_shuffle_f32x4::<0xDD>(lo01, lo23));
                _mm512_storeu_ps(dst.add((8 + c) * ld_dst), _mm512_shuffle_f32x4::<0x88>(hi01, hi23));
                _mm512_storeu_ps(dst.add((12 + c) * ld_dst), _mm512_shuffle_f32x4::<0xDD>(hi01, hi23));
            }
        }
    }
}
