//! Shared helpers of the integration tests: random problems, every feature map, and the
//! comparison against favor-core's f64 reference backend.
#![allow(dead_code)]

use favor_core::testing::{RelError, denominator_condition, rel_error, rel_error_or_cancelled, storage_tolerance};
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
        // Softmax scales other than 1/√d (above and below it for every d ≥ 1 tested).
        FeatureMap::hyperbolic(proj()).with_softmax_scale(1.3).unwrap(),
        FeatureMap::generalized(Elementwise::Softplus, Some(proj()), true, 0.0).with_softmax_scale(0.02).unwrap(),
    ]
}

/// The f32 compute error allowed against the f64 reference, outputs and gradients alike (f32
/// rounding of the tiled sums): measured worst 1.7e-6 (outputs) and 3.5e-6 (gradients, a learned
/// map's dW) in the sweeps, 7e-6 (ELU+1 dq at input scale 1e3, magnitudes.rs); the gradients'
/// extra reduction needs no extra factor.
pub const TOL_F32: f64 = 1e-5;

/// A gradient that vanishes in exact arithmetic is f32 noise, whatever the storage (16-bit
/// rounding of a value that small is smaller still): its error against the scale of the terms
/// that cancel is bounded by f32's resolution of them: measured worst 1.3e-7 in the sweeps, 6e-8
/// in magnitudes.rs (its nearly saturated hyperbolic gradients included).
pub const TOL_CANCELLED: f64 = 1e-6;

/// The tolerance of an error measured by [`rel_error_or_cancelled`].
pub fn grad_tolerance(err: RelError, tol: f64) -> f64 {
    if err.cancelled { TOL_CANCELLED } else { tol }
}

/// Trigonometric data must stay this well-conditioned (denominator condition number, see
/// [`Case::conditioned_for`]): measured ≤ 6.3. The error grows ∝ κ (≤ 5e-7·κ measured on
/// unconditioned data up to κ = 390), so up to this bound TOL_F32 still holds.
pub const TRIG_KAPPA_MAX: f64 = 10.0;

/// The tolerance for a storage dtype: [`TOL_F32`] plus the rounding of the result to 16 bits
/// (favor_core::testing::storage_tolerance; measured 2.2e-4 in f16 vs 2^-11 = 4.9e-4 and 2.0e-3
/// in bf16 vs 2^-8 = 3.9e-3: the rounding of uniformly spread values is ~u/2 RMS). The causal
/// backward's stash in the caller's dv/dk rows holds raw f32/f64 bytes, not 16-bit values, so
/// it adds nothing.
pub fn tolerance(dtype: DType) -> f64 {
    storage_tolerance(dtype, TOL_F32)
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
        let lk = shape.keys();
        let mask = masked.then(|| {
            let mut r = rng(seed + 7);
            // Keep most keys; sometimes a whole prefix is padded (queries that see nothing).
            (0..shape.mask_len()).map(|i| i % lk >= lk / 5 || pick(&mut r, 3) == 0).collect()
        });
        Case {
            shape,
            q: HostTensor::from_f32(dtype, &normal(shape.qk_len(), 0.5, seed)),
            k: HostTensor::from_f32(dtype, &normal(shape.k_len(), 0.5, seed + 1)),
            v: HostTensor::from_f32(dtype, &normal(shape.v_len(), 1.0, seed + 2)),
            dout: HostTensor::from_f32(dtype, &normal(shape.out_len(), 1.0, seed + 3)),
            mask,
        }
    }

    pub fn inputs(&self) -> Inputs<'_, favor_core::Host> {
        Inputs { q: self.q.view(), k: self.k.view(), v: self.v.view(), key_mask: self.mask.as_deref() }
    }

    pub fn forward(&self, b: &impl FavorBackend<Mem = favor_core::Host>, p: &Problem<'_>) -> Vec<f64> {
        let mut out = HostTensor::zeros(self.q.dtype(), self.shape.out_len());
        b.forward(p, self.inputs(), out.view_mut()).unwrap();
        out.to_f64_vec()
    }

    /// Trigonometric features are sign-indefinite: their denominators cancel more as ‖q − k‖
    /// grows (the phases w·(q − k) spread over more than a period), amplifying the f32 rounding
    /// by the condition number. Queries and keys are scaled to d·σ² ≤ 4 for them (σ = 0.5 up to
    /// d = 16), which keeps the measured condition number ≤ 6.3 (bound: [`TRIG_KAPPA_MAX`]).
    pub fn conditioned_for(mut self, map: &FeatureMap) -> Case {
        if matches!(map, FeatureMap::Trigonometric { .. }) {
            let f = (4.0 / (self.shape.d as f64).sqrt()).min(1.0);
            let scale = |t: &HostTensor| {
                HostTensor::from_f32(
                    t.dtype(),
                    &t.to_f32_vec().iter().map(|&x| (x as f64 * f) as f32).collect::<Vec<_>>(),
                )
            };
            self.q = scale(&self.q);
            self.k = scale(&self.k);
        }
        self
    }

    /// The reference's f64 result on the same stored inputs, not rounded to the storage type.
    pub fn reference_forward(&self, p: &Problem<'_>) -> Vec<f64> {
        ReferenceBackend.forward_f64(p, self.inputs()).unwrap()
    }

    /// The reference's f64 gradients (dq, dk, dv, parameter gradients) for the same stored dout.
    pub fn reference_backward(&self, p: &Problem<'_>) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let g = ReferenceBackend.backward_f64(p, self.inputs(), self.dout.view()).unwrap();
        let params = g.params.as_ref().map(favor_core::testing::flat_param_grads).unwrap_or_default();
        (g.dq, g.dk, g.dv, params)
    }

    /// The scale of the terms that cancel in a gradient that is zero in exact arithmetic, for
    /// dq/dk and for parameter gradients: √d_v·RMS(dout)·RMS(v) (the size of ⟨g_i, v_j⟩) times the
    /// slopes of the log-denominators ([`log_denominator_slopes`]).
    pub fn cancel_scales(&self, p: &Problem<'_>) -> (f64, f64) {
        favor_core::testing::cancel_scales(p, self.inputs(), self.dout.view())
    }

    /// (dq, dk, dv, parameter gradients).
    pub fn backward(
        &self,
        b: &impl FavorBackend<Mem = favor_core::Host>,
        p: &Problem<'_>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Option<ParamGrads>) {
        let dt = self.q.dtype();
        let mut dq = HostTensor::zeros(dt, self.shape.qk_len());
        let mut dk = HostTensor::zeros(dt, self.shape.k_len());
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

/// Errors of one check against the reference (backward ones 0 when not run).
#[derive(Debug, Clone, Copy)]
pub struct Errors {
    pub out: f64,
    pub dq: RelError,
    pub dk: RelError,
    pub dv: f64,
    pub params: RelError,
    /// Denominator condition number of the data (1 for non-negative features).
    pub kappa: f64,
}

impl Errors {
    pub fn worst(&self) -> f64 {
        self.out.max(self.dq.value).max(self.dk.value).max(self.dv).max(self.params.value)
    }
}

/// Checks forward and backward of `backend` against the reference's f64 result on the same
/// stored inputs (and dout); returns the errors. Outputs and dq/dk/dv are stored in `dtype`
/// ([`tolerance`]); parameter gradients are returned in f32 whatever the storage ([`TOL_F32`]).
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
) -> Errors {
    let case = Case::new(shape, dtype, masked, seed).conditioned_for(map);
    let opts = AttentionOptions { direction, ..Default::default() };
    let p = Problem::new(shape, map).with_options(opts);
    let tol = tolerance(dtype);
    let what = format!("{} {} {:?} {:?} {dtype} mask={masked}", backend.name(), map.name(), direction, shape);
    let kappa = denominator_condition(&p, case.inputs());
    assert!(kappa <= TRIG_KAPPA_MAX, "{what}: the data's denominators are ill-conditioned (κ = {kappa:.1e})");
    let zero = RelError { value: 0.0, cancelled: false };
    let mut e = Errors { out: 0.0, dq: zero, dk: zero, dv: 0.0, params: zero, kappa };
    e.out = rel_error(&what, &case.forward(backend, &p), &case.reference_forward(&p));
    assert!(e.out <= tol, "forward {what}: rel. error {:.2e} > {tol:.1e}", e.out);
    if backward {
        let (dq, dk, dv, pg) = case.backward(backend, &p);
        let (rq, rk, rv, rpg) = case.reference_backward(&p);
        // dq and dk vanish in exact arithmetic with a single key, d = 1 or a single feature.
        let (scale, pscale) = case.cancel_scales(&p);
        e.dq = rel_error_or_cancelled(&format!("{what} dq"), &dq, &rq, scale);
        e.dk = rel_error_or_cancelled(&format!("{what} dk"), &dk, &rk, scale);
        e.dv = rel_error(&format!("{what} dv"), &dv, &rv);
        let pg = params_vec(&pg);
        if !rpg.is_empty() {
            e.params = rel_error_or_cancelled(&format!("{what} params"), &pg, &rpg, pscale);
        }
        for (name, err, tol) in [("dq", e.dq, tol), ("dk", e.dk, tol), ("params", e.params, TOL_F32)] {
            let tol = grad_tolerance(err, tol);
            assert!(err.value <= tol, "backward {name} {what}: error {err} > {tol:.1e}");
        }
        assert!(e.dv <= tol, "backward dv {what}: rel. error {:.2e} > {tol:.1e}", e.dv);
    }
    eprintln!("{what}: out {:.1e} dq {} dk {} dv {:.1e} params {} κ {:.2}", e.out, e.dq, e.dk, e.dv, e.params, e.kappa);
    e
}

/// Backends for every ISA this CPU supports.
pub fn backends() -> Vec<SimdBackend> {
    Isa::available().into_iter().map(|i| SimdBackend::with_isa(i).unwrap()).collect()
}
