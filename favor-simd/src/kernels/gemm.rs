//! The register-blocked matrix product every attention kernel is built from:
//!
//! C[i, 0..n] (= or +=) Σ_p A(i, p) · B[p, 0..n],   A(i, p) = a[i·ars + p·acs]
//!
//! A is read through arbitrary strides (so Aᵀ costs nothing), B and C are row-major with `n` a
//! multiple of the vector width (internal buffers are padded, see [`crate::isa::pad`]). The
//! microkernel keeps MR × 2 vectors of C in registers (MR = 6 on AVX2, 8 on AVX-512, 4 on the
//! portable path: 12–16 independent FMA chains, more than the 8 needed to hide an FMA latency of
//! 4 cycles at 2 FMAs per cycle) and streams one row of B and one
//! broadcast of A per step. The callers keep B small enough to stay in L1/L2: a 64-row tile of
//! K'/Q' (64 × 256 floats = 64 KiB) or an M × d_v state (256 × 64 floats = 64 KiB).

use crate::isa::SimdF32;

/// See the module docs. `overwrite` replaces C instead of accumulating into it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn gemm<S: SimdF32>(
    rows: usize,
    k: usize,
    n: usize,
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    overwrite: bool,
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(n.is_multiple_of(S::LANES) && ldb >= n && ldc >= n, "gemm: unpadded operand");
    assert!(c.len() >= (rows - 1) * ldc + n, "gemm: C too short");
    if k > 0 {
        assert!(a.len() > (rows - 1) * ars + (k - 1) * acs, "gemm: A too short");
        assert!(b.len() >= (k - 1) * ldb + n, "gemm: B too short");
    }
    let g = Gemm { k, a: a.as_ptr(), ars, acs, b: b.as_ptr(), ldb, c: c.as_mut_ptr(), ldc, overwrite };
    let mut j = 0;
    while j + 2 * S::LANES <= n {
        g.rows::<S, 2>(rows, j);
        j += 2 * S::LANES;
    }
    while j < n {
        g.rows::<S, 1>(rows, j);
        j += S::LANES;
    }
}

/// Raw operands of one product, bounds-checked by [`gemm`] before any access.
struct Gemm {
    k: usize,
    a: *const f32,
    ars: usize,
    acs: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
}

impl Gemm {
    #[inline(always)]
    fn rows<S: SimdF32, const NV: usize>(&self, rows: usize, j: usize) {
        let mut i = 0;
        // Const generics cannot take S::MR directly; the three register budgets in use.
        match S::MR {
            8 => {
                while i + 8 <= rows {
                    self.micro::<S, 8, NV>(i, j);
                    i += 8;
                }
            }
            6 => {
                while i + 6 <= rows {
                    self.micro::<S, 6, NV>(i, j);
                    i += 6;
                }
            }
            _ => {}
        }
        while i + 4 <= rows {
            self.micro::<S, 4, NV>(i, j);
            i += 4;
        }
        while i < rows {
            self.micro::<S, 1, NV>(i, j);
            i += 1;
        }
    }

    /// C[i..i+R, j..j+NV·LANES] for R ≤ rows − i and j + NV·LANES ≤ n (checked in [`gemm`]).
    #[inline(always)]
    fn micro<S: SimdF32, const R: usize, const NV: usize>(&self, i: usize, j: usize) {
        let mut acc = [[S::splat(0.0); NV]; R];
        if !self.overwrite {
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    // SAFETY: (i + r) < rows and j + (v+1)·LANES ≤ n, so the vector lies inside C.
                    *x = unsafe { S::load(self.c.add((i + r) * self.ldc + j + v * S::LANES)) };
                }
            }
        }
        for p in 0..self.k {
            // SAFETY: p < k and j + NV·LANES ≤ n: inside B (checked in `gemm`).
            let bp = unsafe { self.b.add(p * self.ldb + j) };
            let mut bv = [S::splat(0.0); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                // SAFETY: see above.
                *x = unsafe { S::load(bp.add(v * S::LANES)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: (i + r) < rows and p < k: inside A (checked in `gemm`).
                let av = S::splat(unsafe { *self.a.add((i + r) * self.ars + p * self.acs) });
                for (x, &bvv) in row.iter_mut().zip(&bv) {
                    *x = av.mul_add(bvv, *x);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                // SAFETY: as for the loads of C above.
                unsafe { x.store(self.c.add((i + r) * self.ldc + j + v * S::LANES)) };
            }
        }
    }
}

/// Σ_t x[t]·y[t] over equal-length padded slices (length a multiple of LANES).
#[inline(always)]
pub(crate) fn dot<S: SimdF32>(x: &[f32], y: &[f32]) -> f32 {
    assert!(x.len() == y.len() && x.len().is_multiple_of(S::LANES));
    let mut acc = [S::splat(0.0); 4];
    let n = x.len() / S::LANES;
    let mut v = 0;
    while v + 4 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            // SAFETY: (v + u + 1)·LANES ≤ len for both slices.
            unsafe {
                *a =
                    S::load(x.as_ptr().add((v + u) * S::LANES)).mul_add(S::load(y.as_ptr().add((v + u) * S::LANES)), *a)
            };
        }
        v += 4;
    }
    while v < n {
        // SAFETY: (v + 1)·LANES ≤ len for both slices.
        unsafe {
            acc[0] = S::load(x.as_ptr().add(v * S::LANES)).mul_add(S::load(y.as_ptr().add(v * S::LANES)), acc[0])
        };
        v += 1;
    }
    acc[0].add(acc[1]).add(acc[2].add(acc[3])).reduce_add()
}

/// Σ_t x[t] over a padded slice (length a multiple of LANES).
#[inline(always)]
pub(crate) fn sum<S: SimdF32>(x: &[f32]) -> f32 {
    assert!(x.len().is_multiple_of(S::LANES));
    let mut acc = [S::splat(0.0); 2];
    for (v, c) in x.chunks_exact(S::LANES).enumerate() {
        // SAFETY: each chunk holds exactly LANES floats.
        acc[v % 2] = acc[v % 2].add(unsafe { S::load(c.as_ptr()) });
    }
    acc[0].add(acc[1]).reduce_add()
}

/// y[t] += alpha · x[t] over equal-length padded slices.
#[inline(always)]
pub(crate) fn axpy<S: SimdF32>(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert!(x.len() == y.len() && x.len().is_multiple_of(S::LANES));
    let a = S::splat(alpha);
    for v in 0..x.len() / S::LANES {
        // SAFETY: (v + 1)·LANES ≤ len for both slices.
        unsafe {
            let p = y.as_mut_ptr().add(v * S::LANES);
            a.mul_add(S::load(x.as_ptr().add(v * S::LANES)), S::load(p)).store(p)
        };
    }
}

/// y[t] *= alpha over a padded slice.
#[inline(always)]
pub(crate) fn scale<S: SimdF32>(alpha: f32, y: &mut [f32]) {
    assert!(y.len().is_multiple_of(S::LANES));
    let a = S::splat(alpha);
    for v in 0..y.len() / S::LANES {
        // SAFETY: (v + 1)·LANES ≤ len.
        unsafe {
            let p = y.as_mut_ptr().add(v * S::LANES);
            S::load(p).mul(a).store(p)
        };
    }
}

/// dst[c·ld_dst + r] = src[r·ld_src + c] for r < rows, c < cols: whole LANES × LANES blocks
/// in registers ([`SimdF32::transpose_block`]), the ragged edges by scalars.
#[inline(always)]
pub(crate) fn transpose<S: SimdF32>(
    rows: usize,
    cols: usize,
    src: &[f32],
    ld_src: usize,
    dst: &mut [f32],
    ld_dst: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(ld_src >= cols && ld_dst >= rows, "transpose: stride shorter than a row");
    assert!(src.len() >= (rows - 1) * ld_src + cols && dst.len() >= (cols - 1) * ld_dst + rows, "transpose: short");
    let l = S::LANES;
    let (rb, cb) = (rows / l * l, cols / l * l);
    for r0 in (0..rb).step_by(l) {
        for c0 in (0..cb).step_by(l) {
            // SAFETY: r0 + l ≤ rows and c0 + l ≤ cols, so the source block lies within the
            // checked extent of `src` and the destination block (rows c0.., columns r0..) within
            // that of `dst`; `src` and `dst` are distinct slices.
            unsafe {
                S::transpose_block(
                    src.as_ptr().add(r0 * ld_src + c0),
                    ld_src,
                    dst.as_mut_ptr().add(c0 * ld_dst + r0),
                    ld_dst,
                )
            };
        }
    }
    for r in 0..rows {
        let cs = if r < rb { cb } else { 0 };
        for c in cs..cols {
            dst[c * ld_dst + r] = src[r * ld_src + c];
        }
    }
}
