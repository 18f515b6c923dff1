//! The ISA primitives that have per-ISA overrides (`ldexp`, `transpose_block`) against their
//! definitions, on every ISA this CPU runs.

use super::{Isa, IsaToken, MAX_LANES, SimdF32, SimdTask};

fn tokens() -> Vec<IsaToken> {
    Isa::available().into_iter().filter_map(IsaToken::new).collect()
}

/// self · 2^n exactly in f64 (24-bit significand times a power of two in f64's range), then
/// rounded once to f32: the value `ldexp` must return.
fn ldexp_exact(x: f32, n: i32) -> f32 {
    (x as f64 * 2f64.powi(n)) as f32
}

/// Whether (x, n) is inside `SimdF32::ldexp`'s contract: n in [−252, 254] and x · 2^h normal
/// or zero, h = n/2 rounded to nearest even.
fn in_contract(x: f32, n: i32) -> bool {
    let h = (n as f32 / 2.0).round_ties_even() as i32;
    let y = x as f64 * 2f64.powi(h);
    (-252..=254).contains(&n) && (y == 0.0 || (y.abs() >= f32::MIN_POSITIVE as f64 && y.abs() <= f32::MAX as f64))
}

/// Runs `S::ldexp` lane-wise over (x, n) pairs.
struct Ldexp<'a>(&'a [(f32, i32)]);

impl SimdTask for Ldexp<'_> {
    type Output = Vec<f32>;
    #[inline(always)]
    fn run<S: SimdF32>(self) -> Vec<f32> {
        let l = S::LANES;
        let mut out = Vec::with_capacity(self.0.len());
        for chunk in self.0.chunks(l) {
            let (mut xs, mut ns) = ([0.0f32; MAX_LANES], [0.0f32; MAX_LANES]);
            for (i, &(x, n)) in chunk.iter().enumerate() {
                (xs[i], ns[i]) = (x, n as f32);
            }
            let mut ys = [0.0f32; MAX_LANES];
            // SAFETY: the three buffers hold MAX_LANES ≥ LANES floats.
            unsafe { S::load(xs.as_ptr()).ldexp(S::load(ns.as_ptr())).store(ys.as_mut_ptr()) };
            out.extend_from_slice(&ys[..chunk.len()]);
        }
        out
    }
}

/// Significands in [1, 2) and exp's [0.7, 1.5), signs, zeros, and values from the subnormal
/// range up to f32::MAX, each with every n in [−254, 254].
fn ldexp_cases() -> Vec<(f32, i32)> {
    let mut xs = vec![1.0, 1.5, 1.999_999_9, -1.25, 0.7, 1.499_999_9, -std::f32::consts::FRAC_1_SQRT_2, 0.0, -0.0];
    xs.extend((0..40).map(|i| 1.0 + i as f32 * 0.024_691_358));
    xs.extend([f32::MAX, -f32::MAX, 2f32.powi(100), 2f32.powi(-100), f32::MIN_POSITIVE, 1.0e-40, 1.5e-45]);
    xs.iter().flat_map(|&x| (-254..=254).map(move |n| (x, n))).collect()
}

#[test]
fn ldexp_is_correctly_rounded_within_its_contract_on_every_isa() {
    let cases = ldexp_cases();
    for t in tokens() {
        let ys = t.run(Ldexp(&cases));
        let mut checked = 0;
        for (&(x, n), &y) in cases.iter().zip(&ys) {
            if !in_contract(x, n) {
                continue;
            }
            checked += 1;
            let want = ldexp_exact(x, n);
            assert_eq!(y.to_bits(), want.to_bits(), "{}: ldexp({x:e}, {n}) = {y:e}, want {want:e}", t.isa().name());
        }
        // The edge exponents of the contract are among the checked cases.
        assert!(checked > 20_000, "{}: only {checked} cases in the contract", t.isa().name());
        for n in [-252, -150, -149, -127, -126, 127, 128, 254] {
            let i = cases.iter().position(|&c| c == (1.0, n)).unwrap();
            assert_eq!(ys[i], ldexp_exact(1.0, n), "{}: ldexp(1, {n})", t.isa().name());
        }
    }
}

/// AVX-512's vscalefps rounds once for any n and self: also outside the default's contract
/// (n = −253 and −254, subnormal intermediates, subnormal inputs) and for ±∞ and NaN.
#[test]
fn avx512_ldexp_is_correctly_rounded_everywhere() {
    let Some(t) = IsaToken::new(Isa::Avx512) else {
        eprintln!("skipped: this CPU has no AVX-512F");
        return;
    };
    let cases = ldexp_cases();
    let ys = t.run(Ldexp(&cases));
    let mut outside = 0;
    for (&(x, n), &y) in cases.iter().zip(&ys) {
        outside += usize::from(!in_contract(x, n));
        let want = ldexp_exact(x, n);
        assert_eq!(y.to_bits(), want.to_bits(), "avx512: ldexp({x:e}, {n}) = {y:e}, want {want:e}");
    }
    assert!(outside > 1000, "only {outside} cases outside the default's contract");
    let special = [(f32::INFINITY, -200), (f32::NEG_INFINITY, 100), (f32::NAN, 3), (0.0, 254)];
    let ys = t.run(Ldexp(&special));
    assert_eq!(&ys[..2], &[f32::INFINITY, f32::NEG_INFINITY]);
    assert!(ys[2].is_nan());
    assert_eq!(ys[3], 0.0);
}

/// The default ldexp really is limited to n ≥ −252 (what its contract says): at n = −253 it
/// needs 2^−127, which pow2i does not give, while the exact result is normal.
#[test]
fn default_ldexp_lower_bound_is_tight() {
    let t = IsaToken::new(Isa::Portable).unwrap();
    let ys = t.run(Ldexp(&[(f32::MAX, -252), (f32::MAX, -253)]));
    assert_eq!(ys[0], ldexp_exact(f32::MAX, -252));
    assert!(ldexp_exact(f32::MAX, -253) >= f32::MIN_POSITIVE);
    assert_ne!(ys[1], ldexp_exact(f32::MAX, -253), "the contract's lower bound could be widened");
}

/// Transposes one LANES × LANES block with `S::transpose_block` between padded, strided
/// buffers filled with distinct values; returns (src, dst, ld_src, ld_dst, lanes).
struct Transpose;

impl SimdTask for Transpose {
    type Output = (Vec<f32>, Vec<f32>, usize, usize, usize);
    #[inline(always)]
    fn run<S: SimdF32>(self) -> Self::Output {
        let l = S::LANES;
        // Strides longer than a row and not multiples of the vector width.
        let (ld_src, ld_dst) = (l + 3, l + 5);
        let src: Vec<f32> = (0..l * ld_src).map(|i| i as f32 + 0.25).collect();
        let mut dst = vec![-1.0f32; l * ld_dst];
        // SAFETY: src holds l rows of ld_src ≥ l floats, dst l rows of ld_dst ≥ l floats, and
        // they are separate allocations.
        unsafe { S::transpose_block(src.as_ptr(), ld_src, dst.as_mut_ptr(), ld_dst) };
        (src, dst, ld_src, ld_dst, l)
    }
}

#[test]
fn transpose_block_matches_its_definition_on_every_isa() {
    for t in tokens() {
        let (src, dst, ld_src, ld_dst, l) = t.run(Transpose);
        let name = t.isa().name();
        for c in 0..l {
            for r in 0..ld_dst {
                let got = dst[c * ld_dst + r];
                if r < l {
                    assert_eq!(got, src[r * ld_src + c], "{name}: dst[{c}][{r}]");
                } else {
                    assert_eq!(got, -1.0, "{name}: wrote past the block at dst[{c}][{r}]");
                }
            }
        }
    }
}

/// With an ldexp that rounds once, AVX-512's exp is bitwise AVX2's (same FMA sequence), also in
/// the subnormal tail where the scale matters most.
#[test]
fn avx512_exp_matches_avx2_bitwise() {
    let (Some(a2), Some(a5)) = (IsaToken::new(Isa::Avx2), IsaToken::new(Isa::Avx512)) else {
        eprintln!("skipped: this CPU lacks AVX2 or AVX-512F");
        return;
    };
    struct Exp(Vec<f32>);
    impl SimdTask for Exp {
        type Output = Vec<f32>;
        #[inline(always)]
        fn run<S: SimdF32>(mut self) -> Vec<f32> {
            crate::math::exp::exp_slice::<S>(&mut self.0, false);
            self.0
        }
    }
    let xs: Vec<f32> = (0..200_000).map(|i| -110.0 + i as f32 * (200.0 / 200_000.0)).collect();
    let (y2, y5) = (a2.run(Exp(xs.clone())), a5.run(Exp(xs.clone())));
    for ((x, a), b) in xs.iter().zip(&y2).zip(&y5) {
        assert_eq!(a.to_bits(), b.to_bits(), "exp({x}): avx2 {a:e}, avx512 {b:e}");
    }
}
