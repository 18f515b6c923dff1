//! The vectorised exp: ULP bound against f64 on every ISA, and its special values.

use favor_simd::Isa;

fn ulp_distance(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 { i32::MIN - i } else { i }
    };
    (key(a) as i64 - key(b) as i64).unsigned_abs() as u32
}

#[test]
fn exp_is_within_two_ulp_of_f64() {
    for isa in Isa::available() {
        // Dense sweep of the normal range plus the subnormal tail.
        let mut xs: Vec<f32> = (0..400_000).map(|i| -104.0 + i as f32 * (192.72 / 400_000.0)).collect();
        xs.extend([0.0, -0.0, 1.0, -1.0, 88.72, 88.7228, -87.33, -103.9, 1e-30, -1e-30]);
        let mut ys = xs.clone();
        favor_simd::testing::exp_slice(isa, &mut ys).unwrap();
        let mut worst = 0;
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp() as f32;
            let u = ulp_distance(y, want);
            // Below the normal range the absolute error is what matters (subnormal spacing).
            let ok = u <= 2 || (want < f32::MIN_POSITIVE && (y as f64 - (x as f64).exp()).abs() <= 1.5e-45);
            assert!(ok, "{}: exp({x}) = {y:e}, want {want:e} ({u} ulp)", isa.name());
            if want >= f32::MIN_POSITIVE {
                worst = worst.max(u);
            }
        }
        eprintln!("{}: max {worst} ulp over the normal range", isa.name());
    }
}

#[test]
fn exp_special_values() {
    for isa in Isa::available() {
        let mut v = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 89.0, 1e4, -105.0, -1e4, 88.8, 0.0];
        favor_simd::testing::exp_slice(isa, &mut v).unwrap();
        assert!(v[0].is_nan(), "{}", isa.name());
        assert_eq!(
            &v[1..],
            &[f32::INFINITY, 0.0, f32::INFINITY, f32::INFINITY, 0.0, 0.0, f32::INFINITY, 1.0],
            "{}",
            isa.name()
        );
    }
}

/// The variant the feature maps use for arguments ≤ 0 gives bitwise the same results as the
/// general exp there, subnormal and underflowing results, −∞ and NaN included.
#[test]
fn exp_nonpositive_matches_exp_for_nonpositive_arguments() {
    let mut xs: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 1.1e-3).collect();
    xs.extend([-0.0, -86.9, -87.5, -100.0, -103.9, -104.0, -104.1, -1e30, f32::NEG_INFINITY, f32::NAN]);
    xs.extend((0..4000).map(|i| -87.0 - i as f32 * 4.5e-3));
    for isa in Isa::available() {
        let (mut a, mut b) = (xs.clone(), xs.clone());
        favor_simd::testing::exp_slice(isa, &mut a).unwrap();
        favor_simd::testing::exp_nonpositive_slice(isa, &mut b).unwrap();
        for ((x, y), z) in a.iter().zip(&b).zip(&xs) {
            assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()), "{}: exp({z}) = {x} vs {y}", isa.name());
        }
    }
}
