//! The portable path: `wide::f32x8` (SSE2 on baseline x86_64, NEON `fmla` on aarch64).

use super::SimdF32;
use wide::{f32x8, i32x8};

impl SimdF32 for f32x8 {
    const LANES: usize = 8;
    // 8 accumulators: 16 xmm on SSE2 (two per f32x8), 16 of NEON's 32 q registers.
    const MR: usize = 4;
    type Mask = f32x8;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        f32x8::splat(x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable floats at `p`; read_unaligned needs no alignment.
        f32x8::from(unsafe { p.cast::<[f32; 8]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable floats at `p`; write_unaligned needs no alignment.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(self.to_array()) }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        f32x8::mul_add(self, b, c)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        self.fast_max(o)
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        self.fast_min(o)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32x8::abs(self)
    }
    #[inline(always)]
    fn round(self) -> Self {
        f32x8::round(self)
    }
    #[inline(always)]
    fn pow2i(self) -> Self {
        let e: i32x8 = (self.round_int() + i32x8::splat(127)) << 23u32;
        bytemuck::cast(e)
    }
    #[inline(always)]
    fn gt(self, o: Self) -> Self::Mask {
        self.simd_gt(o)
    }
    #[inline(always)]
    fn lt(self, o: Self) -> Self::Mask {
        self.simd_lt(o)
    }
    #[inline(always)]
    fn is_nan(self) -> Self::Mask {
        f32x8::is_nan(self)
    }
    #[inline(always)]
    fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        m.select(t, f)
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        f32x8::reduce_add(self)
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self.to_array().into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}
