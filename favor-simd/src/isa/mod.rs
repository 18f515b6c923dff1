//! Instruction sets: the internal SIMD trait every kernel is written against, its three
//! implementations, run-time detection and the dispatcher.
//!
//! Kernels are `#[inline(always)]` functions generic over [`SimdF32`]. A [`SimdTask`] is run
//! through [`IsaToken::run`], which calls a thin `#[target_feature]` entry point per ISA so that
//! the whole inlined kernel is compiled for that ISA (AVX2+FMA, AVX-512F) in a default build.
//! The portable path uses `wide::f32x8`: SSE2 on baseline x86_64, NEON on aarch64.

pub(crate) mod portable;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use std::sync::OnceLock;

/// The widest lane count of any ISA; internal buffers pad their rows to a multiple of it so that
/// every kernel can use whole vectors.
pub(crate) const MAX_LANES: usize = 16;

#[cfg(test)]
mod tests;

/// A SIMD vector of f32 lanes. Implementations for `std::arch` types may only be used after the
/// CPU was checked for the instruction set (see [`IsaToken`]); the crate only instantiates them
/// inside the `#[target_feature]` entry points of [`IsaToken::run`].
pub(crate) trait SimdF32: Copy + Send + Sync + 'static {
    /// Lanes per vector.
    const LANES: usize;
    /// Rows of the product microkernel ([`crate::kernels::gemm`]): MR × 2 accumulators must fit
    /// in the register file next to two B vectors and one broadcast.
    const MR: usize;
    /// Result of a lane-wise comparison.
    type Mask: Copy;

    fn splat(x: f32) -> Self;
    /// Loads `LANES` floats from `p`.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` consecutive f32 (no alignment needed).
    unsafe fn load(p: *const f32) -> Self;
    /// Stores `LANES` floats to `p`.
    ///
    /// # Safety
    /// `p` must be valid for writing `LANES` consecutive f32 (no alignment needed).
    unsafe fn store(self, p: *mut f32);
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// self · b + c (fused where the ISA has FMA).
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// Lane-wise maximum (NaN handling unspecified; callers fix NaN up explicitly).
    fn max(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn abs(self) -> Self;
    /// Round to nearest, ties to even.
    fn round(self) -> Self;
    /// 2^n for lanes holding integers n in [-126, 127].
    fn pow2i(self) -> Self;
    fn gt(self, o: Self) -> Self::Mask;
    fn lt(self, o: Self) -> Self::Mask;
    fn is_nan(self) -> Self::Mask;
    /// `t` where `m` is set, `f` elsewhere.
    fn select(m: Self::Mask, t: Self, f: Self) -> Self;
    fn reduce_add(self) -> f32;
    fn reduce_max(self) -> f32;

    /// self · 2^n for lanes of `n` holding integers in [−252, 254], rounded once (so exact
    /// unless the result is subnormal or overflows) provided self · 2^h is normal or zero,
    /// where h is n/2 rounded to nearest even. That holds for every such n when 1 ≤ |self| < 2,
    /// and for exp's use (|self| in [0.7, 1.5), n ≥ −150).
    ///
    /// The default multiplies by 2^h and then by 2^(n−h): both exponents lie in [−126, 127],
    /// [`SimdF32::pow2i`]'s range, which is what bounds n below by −252 (n = −253 would need
    /// 2^−127). It rounds twice when self · 2^h is already subnormal. AVX-512 overrides it with
    /// vscalefps, which rounds once for any n and self.
    #[inline(always)]
    fn ldexp(self, n: Self) -> Self {
        let n1 = n.mul(Self::splat(0.5)).round();
        self.mul(n1.pow2i()).mul(n.sub(n1).pow2i())
    }

    /// Transposes the LANES × LANES block at `src` (row stride `ld_src`) into `dst` (row stride
    /// `ld_dst`): dst[c·ld_dst + r] = src[r·ld_src + c]. The default moves scalars through a
    /// register-sized buffer; AVX2 (8 × 8) and AVX-512 (16 × 16) transpose in registers with
    /// unpack and shuffle instructions.
    ///
    /// # Safety
    /// Rows r < LANES of `src` must be valid for reading LANES floats at src + r·ld_src, and
    /// rows of `dst` likewise for writing; the two blocks must not overlap.
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, ld_src: usize, dst: *mut f32, ld_dst: usize) {
        let mut buf = [0.0f32; MAX_LANES * MAX_LANES];
        let l = Self::LANES;
        for r in 0..l {
            for c in 0..l {
                // SAFETY: r, c < LANES: inside the source block (caller's contract).
                buf[c * MAX_LANES + r] = unsafe { *src.add(r * ld_src + c) };
            }
        }
        for c in 0..l {
            for r in 0..l {
                // SAFETY: r, c < LANES: inside the destination block (caller's contract).
                unsafe { *dst.add(c * ld_dst + r) = buf[c * MAX_LANES + r] };
            }
        }
    }
}

/// A CPU instruction set favor-simd has kernels for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// `wide::f32x8`: SSE2 on baseline x86_64, NEON on aarch64, scalar elsewhere.
    Portable,
    /// AVX2 with FMA (x86_64).
    Avx2,
    /// AVX-512F (x86_64).
    Avx512,
}

impl Isa {
    /// Every ISA this CPU can run, narrowest first (always starts with [`Isa::Portable`]).
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.is_supported()).collect()
    }

    /// Lower-case name: "portable", "avx2", "avx512" (the values `FAVOR_ISA` accepts).
    pub fn name(&self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a name as [`Isa::name`] writes it.
    pub fn from_name(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "neon" | "sse2" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512f" | "avx-512" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// Whether this CPU supports the ISA (run-time detection).
    pub fn is_supported(&self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }
}

/// The environment variable that forces an ISA: `FAVOR_ISA=portable|avx2|avx512`. An ISA the CPU
/// lacks (or an unknown name) is ignored with a warning on stderr and the best ISA is used.
pub const ISA_ENV: &str = "FAVOR_ISA";

/// The ISA [`crate::SimdBackend::new`] uses: `FAVOR_ISA` if set and supported, otherwise the
/// widest supported one. Detected once and cached.
pub fn best_isa() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| {
        let widest = *Isa::available().last().unwrap_or(&Isa::Portable);
        match std::env::var(ISA_ENV) {
            Ok(v) if !v.trim().is_empty() => match Isa::from_name(&v) {
                Some(isa) if isa.is_supported() => isa,
                Some(isa) => {
                    eprintln!(
                        "favor-simd: {ISA_ENV}={v}: {} is not supported by this CPU, using {}",
                        isa.name(),
                        widest.name()
                    );
                    widest
                }
                None => {
                    eprintln!("favor-simd: {ISA_ENV}={v}: unknown ISA (portable|avx2|avx512), using {}", widest.name());
                    widest
                }
            },
            _ => widest,
        }
    })
}

/// Proof that the CPU supports an ISA: only [`IsaToken::new`] builds one, after detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IsaToken(Isa);

/// A kernel to run with the vector type of the dispatched ISA.
pub(crate) trait SimdTask {
    type Output;
    fn run<S: SimdF32>(self) -> Self::Output;
}

impl IsaToken {
    pub(crate) fn new(isa: Isa) -> Option<Self> {
        isa.is_supported().then_some(IsaToken(isa))
    }

    pub(crate) fn isa(self) -> Isa {
        self.0
    }

    /// Runs `task` compiled for this ISA.
    #[inline]
    pub(crate) fn run<T: SimdTask>(self, task: T) -> T::Output {
        match self.0 {
            Isa::Portable => task.run::<wide::f32x8>(),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a token for Avx2 exists only after `is_x86_feature_detected!` confirmed
            // avx2 and fma on this CPU.
            Isa::Avx2 => unsafe { avx2::run(task) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a token for Avx512 exists only after `is_x86_feature_detected!` confirmed
            // avx512f on this CPU.
            Isa::Avx512 => unsafe { avx512::run(task) },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => task.run::<wide::f32x8>(),
        }
    }
}

/// Rounds `n` up to a multiple of [`MAX_LANES`].
pub(crate) fn pad(n: usize) -> usize {
    n.div_ceil(MAX_LANES) * MAX_LANES
}
