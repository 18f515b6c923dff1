//! Shared helpers of the integration tests: random problems, every feature map, and the
//! comparison against favor-core's f64 reference backend.
#![allow(dead_code)]

use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, Elementwise, FavorBackend, FeatureMap, GatedSoftplusParams,
    Grads, HostTensor, Inputs, Linear, ParamGrads, Problem, Projection, ProjectionConfig, ReferenceBackend,
};
use favor_simd::{Isa, SimdBackend};
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

pub fn rng(seed: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

pub fn normal(n: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let d = Normal::new(0.0, std).unwrap();
    (0..n).map(|_| d.sample(&mut r) as f32).collect()
}

/// A uniform pick in [0, n) from a seed stream.
pub fn pick(r: &mut Xoshiro256PlusPlus, n: usize) -> usize {
    use rand_xoshiro::rand_core::Rng;
    (r.next_u64() % n as u64) as usize
}

/// The sizes that cross vector-width and tile boundaries.
pub const SIZES: [usize; 13] = [1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 257, 1000];

/// Every feature map kind for inputs of dimension d with m draws.
pub fn all_maps(d: usize, m: usize, seed: u64) -> Vec<FeatureMap> {
    // Projections draw from their own seed range: a projection row built from the same Gaussian
    // stream as the data would be exactly orthogonal to some tokens (ReLU kinks at 0).
    let proj = || Projection::draw(ProjectionConfig::new(m, d, seed ^ 0x5eed_0000_0000)).unwrap();
    let lin = |s: u64, bias: bool| {
        let w = normal(m * d, 0.3 / (d as f64).sqrt(), s ^ 0x1ea2_0000_0000);
        let b = bias.then(|| normal(m, 0.3, s ^ 0xb1a5_0000_0000));
        Linear::new(m, d, w, b).unwrap()
    };
    vec![
        FeatureMap::positive(proj()),
        FeatureMap::hyperbolic(proj()),
        FeatureMap::trigonometric(proj()),
        FeatureMap::relu(Some(proj())),
        FeatureMap::relu(None),
        FeatureMap::elu_plus_one(),
        FeatureMap::generalized(Elementwise::Softplus, Some(proj()), true, 0.0),
        FeatureMap::Softplus(lin(seed + 10, true)),
        FeatureMap::GatedSoftplus(GatedSoftplusParams { filter: lin(seed + 20, false), gate: lin(seed + 30, false) }),
    ]
}

/// Relative Frobenius error ‖a − b‖ / max(‖b‖, √n); panics on a NaN or ∞ in `a`.
///
/// The floor (an RMS of 1, the scale of the test data and cotangents) only matters where the
/// exact result is zero or nearly so by cancellation, e.g. ∂out/∂q with a single key or a single
/// feature (exactly 0), which f32 can only resolve to its rounding noise.
pub fn rel_fro(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|x| x.is_finite()), "non-finite value in the backend's result");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().max(b.len() as f64);
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// One random attention problem.
pub struct Case {
    pub shape: AttentionShape,
    pub q: HostTensor,
    pub k: HostTensor,
    pub v: HostTensor,
    pub dout: HostTensor,
    pub mask: Option<Vec<bool>>,
}

impl Case {
    pub fn new(shape: AttentionShape, dtype: DType, masked: bool, seed: u64) -> Case {
        let qk = shape.qk_len();
        let mask = masked.then(|| {
            let mut r = rng(seed + 7);
            // Keep most keys; sometimes a whole prefix is padded (queries that see nothing).
            (0..shape.mask_len()).map(|i| i % shape.len >= shape.len / 5 || pick(&mut r, 3) == 0).collect()
        });
        Case {
            shape,
            q: HostTensor::from_f32(dtype, &normal(qk, 0.5, seed)),
            k: HostTensor::from_f32(dtype, &normal(qk, 0.5, seed + 1)),
            v: HostTensor::from_f32(dtype, &normal(shape.v_len(), 1.0, seed + 2)),
            dout: HostTensor::from_f32(dtype, &normal(shape.v_len(), 1.0, seed + 3)),
            mask,
        }
    }

    pub fn inputs(&self) -> Inputs<'_, favor_core::Host> {
        Inputs { q: self.q.view(), k: self.k.view(), v: self.v.view(), key_mask: self.mask.as_deref() }
    }

    pub fn forward(&self, b: &impl FavorBackend<Mem = favor_core::Host>, p: &Problem<'_>) -> Vec<f64> {
        let mut out = HostTensor::zeros(self.q.dtype(), self.shape.v_len());
        b.forward(p, self.inputs(), out.view_mut()).unwrap();
        out.to_f64_vec()
    }

    /// (dq, dk, dv, parameter gradients).
    pub fn backward(
        &self,
        b: &impl FavorBackend<Mem = favor_core::Host>,
        p: &Problem<'_>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Option<ParamGrads>) {
        let dt = self.q.dtype();
        let mut dq = HostTensor::zeros(dt, self.shape.qk_len());
        let mut dk = HostTensor::zeros(dt, self.shape.qk_len());
        let mut dv = HostTensor::zeros(dt, self.shape.v_len());
        let pg = b
            .backward(
                p,
                self.inputs(),
                self.dout.view(),
                Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() },
            )
            .unwrap();
        (dq.to_f64_vec(), dk.to_f64_vec(), dv.to_f64_vec(), pg)
    }
}

pub fn params_vec(p: &Option<ParamGrads>) -> Vec<f64> {
    match p {
        None => Vec::new(),
        Some(p) => {
            p.w.iter().chain(p.bias.iter().flatten()).chain(p.w_gate.iter().flatten()).map(|&x| x as f64).collect()
        }
    }
}

/// Checks forward and backward of `backend` against the reference; returns the worst error.
#[allow(clippy::too_many_arguments)]
pub fn check_against_reference(
    backend: &SimdBackend,
    map: &FeatureMap,
    shape: AttentionShape,
    direction: Direction,
    dtype: DType,
    masked: bool,
    seed: u64,
    backward: bool,
) -> f64 {
    let case = Case::new(shape, dtype, masked, seed);
    let opts = AttentionOptions { direction, ..Default::default() };
    let p = Problem::new(shape, map).with_options(opts);
    let tol = tolerance(dtype);
    let what = format!("{} {} {:?} {:?} {dtype} mask={masked}", backend.name(), map.name(), direction, shape);
    let ours = case.forward(backend, &p);
    let reference = case.forward(&ReferenceBackend, &p);
    // Trigonometric features are sign-indefinite: denominators cancel, and every error is
    // amplified by the condition number κ ≥ max|out|/max|v| (κ² for gradients). Scale by it.
    let tol = if matches!(map, FeatureMap::Trigonometric { .. }) {
        let vmax = case.v.to_f64_vec().iter().fold(0.0f64, |a, &b| a.max(b.abs()));
        let omax = reference.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
        tol * (omax / vmax).max(1.0).powi(2)
    } else {
        tol
    };
    let mut worst = rel_fro(&ours, &reference);
    assert!(worst <= tol, "forward {what}: rel. Frobenius error {worst:.3e} > {tol:.0e}");
    if backward {
        let (dq, dk, dv, pg) = case.backward(backend, &p);
        let (rq, rk, rv, rpg) = case.backward(&ReferenceBackend, &p);
        for (name, a, b) in
            [("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv), ("params", params_vec(&pg), params_vec(&rpg))]
        {
            let e = rel_fro(&a, &b);
            let rms = (b.iter().map(|x| x * x).sum::<f64>() / b.len().max(1) as f64).sqrt();
            // A gradient that is exactly zero (f64 rounding noise only, e.g. ∂out/∂q with d = 1,
            // one key or one feature) is computed in f32 as pure cancellation noise, whose size
            // scales with the cancelled terms (up to 1/κ with ReLU's floor κ); require it small.
            let e = if rms < 1e-10 { e * 1e-2 } else { e };
            assert!(
                e <= tol,
                "backward {name} {what}: rel. Frobenius error {e:.3e} > {tol:.0e} (reference RMS {rms:.2e})"
            );
            worst = worst.max(e);
        }
    }
    worst
}

/// Backends for every ISA this CPU supports.
pub fn backends() -> Vec<SimdBackend> {
    Isa::available().into_iter().map(|i| SimdBackend::with_isa(i).unwrap()).collect()
}
