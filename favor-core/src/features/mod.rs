//! Feature maps φ: R^d → R^M whose inner products approximate (or define) the attention kernel.
//!
//! | map | φ(x) | M | default ε/κ |
//! |---|---|---|---|
//! | [`FeatureMap::Positive`] (FAVOR+) | m^{-1/2}(exp(Wx̃ − ‖x̃‖²/2 − c) + ε·exp(s(x) − c)) | m | ε = 1e-6 |
//! | [`FeatureMap::Hyperbolic`] | (2m)^{-1/2}[exp(±Wx̃ − ‖x̃‖²/2 − c) + ε·exp(s(x) − c)] | 2m | ε = 1e-6 |
//! | [`FeatureMap::Trigonometric`] | m^{-1/2}[cos Wx̃, sin Wx̃]·exp(‖x̃‖²/2 − c) | 2m | — |
//! | [`FeatureMap::Generalized`] | f(s·W x̂) + κ, or f(x̂) + κ without projection | m or d | κ = 1e-3 (ReLU), 0 (ELU+1) |
//! | [`FeatureMap::Softplus`] (learned) | softplus(xWᵀ + b) | m | — |
//! | [`FeatureMap::GatedSoftplus`] (learned) | softplus(xW_fᵀ) ⊙ σ(xW_gᵀ) | m | — |
//!
//! x̃ = d^{-1/4}x is the data normaliser (so that x̃ᵀỹ = xᵀy/√d); x̂ is x̃ when
//! `normalize_data` is set and x otherwise. A softmax scale τ other than 1/√d
//! ([`FeatureMap::with_softmax_scale`]) makes it x̃ = √τ·x, so that x̃ᵀỹ = τ·xᵀy.
//!
//! # Stabilisers, and what is computed
//! Write a_j = ω_jᵀx̃ and h = ‖x̃‖²/2. Every token x has a *log-scale* s(x)
//! ([`FeatureMap::log_scale`]): max_j(a_j − h) for positive features (the −‖x̃‖²/2 term is
//! included so that large-norm tokens do not underflow), max_j|a_j| − h for hyperbolic, h for
//! trigonometric. The exponential maps are evaluated against a stabiliser c ≥ s(x):
//! * a query uses its own log-scale, c = s(q) (per token);
//! * bidirectional keys use c = max over the unpadded keys of one (batch, head);
//! * causal keys use the *running* maximum c_j = max_{l≤j} s(k_l), never a future key. Key j's
//!   features are computed against c_j and the prefix state is rescaled by exp(c_old − c_new) ≤ 1
//!   whenever the maximum grows (see [`crate::attention`]).
//!
//! Every exp argument is therefore ≤ 0, and c enters φ only as the common factor exp(−c):
//! φ(x; c) = exp(−c)·φ̂(x) with the *unstabilised* features
//! φ̂_j(x) = m^{-1/2}(exp(a_j − h) + ε·exp(s(x))) = m^{-1/2}exp(s(x))·(exp(a_j − h − s(x)) + ε),
//! i.e. ε is a floor relative to the token's own largest feature. A query's factor cancels in
//! its normalised output, and all keys a query sees share one factor (in the causal case after
//! the decay exp(c_j − c_i)), so **the attention output is a function of φ̂ alone: it does not
//! depend on any shared stabiliser**, and full causal attention, chunked prefill, step-by-step
//! decoding and bidirectional attention over a prefix all compute the same function.
//!
//! # Gradients
//! The backward holds c constant — exact, since the output does not depend on it — and
//! differentiates everything else, including the ε floor through the token's own log-scale:
//! with s = a_{j*} − h (j* the arg-max, the first one on ties; for hyperbolic features
//! s = |a_{j*}| − h), ∂ℒ/∂s = ratio·ε·exp(s − c)·Σ_j ∂ℒ/∂φ_j flows to a_{j*} (with the sign of
//! a_{j*} for hyperbolic features) and to −h. s is not differentiable where the arg-max ties,
//! like the max it is (a measure-zero set). A denominator guard δ > 0 that fires (|R| ≤ δ)
//! breaks the scale invariance for that row; the backward then still holds c constant.

mod exp_maps;
mod generalized;
mod learned;

#[cfg(test)]
pub(crate) use exp_maps::DROP_FLOOR_GRADIENT;
pub use generalized::Elementwise;
pub use learned::{GatedSoftplusParams, Linear};

use crate::{FavorError, Projection, Result};

/// A feature map with its parameters. Construct with the helper functions
/// ([`FeatureMap::positive`], [`FeatureMap::relu`], ...), which set the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureMap {
    /// FAVOR+ positive softmax features (m features).
    Positive {
        /// Random projection W (m×d).
        projection: Projection,
        /// ε added after the exp (default 1e-6, the JAX/TF value).
        epsilon: f32,
        /// Softmax scale τ (the kernel is exp(τ·qᵀk)); `None` is 1/√d.
        softmax_scale: Option<f32>,
    },
    /// Hyperbolic positive softmax features (2m features from m draws); lower variance than
    /// [`FeatureMap::Positive`] at the same number of draws.
    Hyperbolic {
        /// Random projection W (m×d).
        projection: Projection,
        /// ε added after the exp (default 1e-6).
        epsilon: f32,
        /// Softmax scale τ (the kernel is exp(τ·qᵀk)); `None` is 1/√d.
        softmax_scale: Option<f32>,
    },
    /// Trigonometric (random Fourier) softmax features (2m): unbiased but sign-indefinite, so
    /// denominators need the guard δ (default 1e-6).
    Trigonometric {
        /// Random projection W (m×d).
        projection: Projection,
        /// Softmax scale τ (the kernel is exp(τ·qᵀk)); `None` is 1/√d.
        softmax_scale: Option<f32>,
    },
    /// φ(x) = f(scale·W x̂) + κ, or f(x̂) + κ without a projection (deterministic features).
    Generalized {
        /// Elementwise nonlinearity f.
        f: Elementwise,
        /// Optional projection W (m×d).
        projection: Option<Projection>,
        /// Apply the data normaliser √τ (d^{-1/4} by default) before projecting.
        normalize_data: bool,
        /// τ of the data normaliser √τ when `normalize_data` is set (`None`: 1/√d, so that the
        /// normaliser is d^{-1/4}); must be `None` otherwise.
        softmax_scale: Option<f32>,
        /// Scale applied inside f (1/√m for Performer-ReLU, 1 otherwise).
        scale: f32,
        /// κ added after f.
        kappa: f32,
    },
    /// Learned φ(x) = softplus(xWᵀ + b).
    Softplus(Linear),
    /// Learned gated φ(x) = softplus(xW_fᵀ) ⊙ σ(xW_gᵀ).
    GatedSoftplus(GatedSoftplusParams),
}

/// Which stabiliser a batch of tokens gets (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureRole {
    /// Per-token stabiliser.
    Query,
    /// One stabiliser per (batch, head): the maximum over all its tokens.
    Key,
    /// Running maximum along the sequence (no look-ahead).
    CausalKey,
}

/// Gradients of a learned map's parameters, same layout as the parameters.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamGrads {
    /// ∂ℒ/∂W (or ∂ℒ/∂W_f for the gated map), row-major m×d.
    pub w: Vec<f32>,
    /// ∂ℒ/∂b when the map has a bias.
    pub bias: Option<Vec<f32>>,
    /// ∂ℒ/∂W_g for the gated map.
    pub w_gate: Option<Vec<f32>>,
}

/// Default ε of the positive and hyperbolic maps (the value JAX and TF pass in practice).
pub const DEFAULT_EPSILON: f32 = 1e-6;
/// Default κ of Performer-ReLU features (TF `relu_kernel_transformation`).
pub const DEFAULT_RELU_KAPPA: f32 = 1e-3;
/// Default denominator guard of trigonometric features (JAX `numerical_stabilizer`).
pub const DEFAULT_TRIG_GUARD: f32 = 1e-6;
/// Largest magnitude accepted for a map parameter (ε, κ, scale, projection, weight and bias
/// entries). Far beyond any trained or drawn value, and small enough that a parameter times an
/// input of f32's range stays inside f64's, where the f32 kernels evaluate extreme rows.
pub const PARAM_LIMIT: f32 = 1e6;

/// Rejects a softmax scale outside (0, [`PARAM_LIMIT`]] (or not finite).
fn check_softmax_scale(tau: Option<f32>) -> Result<()> {
    match tau {
        Some(t) if !(t.is_finite() && t > 0.0 && t <= PARAM_LIMIT) => {
            Err(FavorError::param("softmax_scale", format!("must lie in (0, {PARAM_LIMIT:e}], got {t}")))
        }
        _ => Ok(()),
    }
}

/// Rejects an entry of a parameter tensor beyond [`PARAM_LIMIT`] in magnitude.
pub(crate) fn check_entries(name: &'static str, w: &[f32]) -> Result<()> {
    // NaN counts as out of range (validation rejects it earlier with its own error).
    match w.iter().position(|x| x.is_nan() || x.abs() > PARAM_LIMIT) {
        Some(i) => Err(FavorError::param(name, format!("entry {i} is {}, beyond ±{PARAM_LIMIT:e}", w[i]))),
        None => Ok(()),
    }
}

impl FeatureMap {
    /// FAVOR+ positive features with ε = 1e-6.
    pub fn positive(projection: Projection) -> Self {
        FeatureMap::Positive { projection, epsilon: DEFAULT_EPSILON, softmax_scale: None }
    }

    /// Hyperbolic positive features with ε = 1e-6.
    pub fn hyperbolic(projection: Projection) -> Self {
        FeatureMap::Hyperbolic { projection, epsilon: DEFAULT_EPSILON, softmax_scale: None }
    }

    /// Trigonometric sin/cos features.
    pub fn trigonometric(projection: Projection) -> Self {
        FeatureMap::Trigonometric { projection, softmax_scale: None }
    }

    /// Performer-ReLU: ReLU(m^{-1/2}·Wx) + 1e-3 with a projection (TF
    /// `relu_kernel_transformation`), or the deterministic ReLU(x) + 1e-3 without.
    pub fn relu(projection: Option<Projection>) -> Self {
        let scale = projection.as_ref().map_or(1.0, |p| 1.0 / (p.m() as f32).sqrt());
        FeatureMap::Generalized {
            f: Elementwise::Relu,
            projection,
            normalize_data: false,
            softmax_scale: None,
            scale,
            kappa: DEFAULT_RELU_KAPPA,
        }
    }

    /// The generalized kernel f(x̂Wᵀ) + κ of JAX `make_fast_generalized_attention`.
    pub fn generalized(f: Elementwise, projection: Option<Projection>, normalize_data: bool, kappa: f32) -> Self {
        FeatureMap::Generalized { f, projection, normalize_data, softmax_scale: None, scale: 1.0, kappa }
    }

    /// ELU(x) + 1 features without projection (the linear transformer of Katharopoulos et al.).
    pub fn elu_plus_one() -> Self {
        FeatureMap::Generalized {
            f: Elementwise::EluPlusOne,
            projection: None,
            normalize_data: false,
            softmax_scale: None,
            scale: 1.0,
            kappa: 0.0,
        }
    }

    /// The same map with softmax scale (temperature) τ: it estimates exp(τ·qᵀk) instead of
    /// exp(qᵀk/√d), by using x̃ = √τ·x in place of d^{-1/4}x. For the exponential maps and the
    /// generalized maps with `normalize_data`; the others do not normalise their input, and
    /// asking them for a scale is an [`FavorError::InvalidParameter`]. τ must be finite and in
    /// (0, [`PARAM_LIMIT`]] (checked here and by [`FeatureMap::validate`]).
    pub fn with_softmax_scale(mut self, tau: f32) -> Result<Self> {
        check_softmax_scale(Some(tau))?;
        let name = self.name();
        match &mut self {
            FeatureMap::Positive { softmax_scale, .. }
            | FeatureMap::Hyperbolic { softmax_scale, .. }
            | FeatureMap::Trigonometric { softmax_scale, .. }
            | FeatureMap::Generalized { normalize_data: true, softmax_scale, .. } => *softmax_scale = Some(tau),
            _ => {
                return Err(FavorError::param(
                    "softmax_scale",
                    format!("the {name} map does not normalise its input, so it has no softmax scale"),
                ));
            }
        }
        Ok(self)
    }

    /// The softmax scale τ in effect for inputs of dimension `d` (1/√d unless set), `None` for
    /// maps that do not normalise their input.
    pub fn softmax_scale(&self, d: usize) -> Option<f64> {
        let tau = |t: &Option<f32>| t.map_or_else(|| (d as f64).powf(-0.5), f64::from);
        match self {
            FeatureMap::Positive { softmax_scale, .. }
            | FeatureMap::Hyperbolic { softmax_scale, .. }
            | FeatureMap::Trigonometric { softmax_scale, .. }
            | FeatureMap::Generalized { normalize_data: true, softmax_scale, .. } => Some(tau(softmax_scale)),
            _ => None,
        }
    }

    /// The data normaliser: the map sees x̃ = `data_normalizer(d)`·x, which is √τ (d^{-1/4} by
    /// default) for maps with a softmax scale and 1 for the others.
    pub fn data_normalizer(&self, d: usize) -> f64 {
        match self {
            FeatureMap::Positive { softmax_scale, .. }
            | FeatureMap::Hyperbolic { softmax_scale, .. }
            | FeatureMap::Trigonometric { softmax_scale, .. }
            | FeatureMap::Generalized { normalize_data: true, softmax_scale, .. } => {
                softmax_scale.map_or_else(|| (d as f64).powf(-0.25), |t| f64::from(t).sqrt())
            }
            _ => 1.0,
        }
    }

    /// [`FeatureMap::data_normalizer`] for token `x`.
    fn nrm(&self, x: &[f64]) -> f64 {
        self.data_normalizer(x.len())
    }

    /// Input dimension d this map expects, `None` for maps without a projection (any d).
    pub fn input_dim(&self) -> Option<usize> {
        match self {
            FeatureMap::Positive { projection, .. }
            | FeatureMap::Hyperbolic { projection, .. }
            | FeatureMap::Trigonometric { projection, .. } => Some(projection.d()),
            FeatureMap::Generalized { projection, .. } => projection.as_ref().map(Projection::d),
            FeatureMap::Softplus(l) => Some(l.d),
            FeatureMap::GatedSoftplus(g) => Some(g.filter.d),
        }
    }

    /// Number of features M for inputs of dimension `d`.
    pub fn feature_dim(&self, d: usize) -> usize {
        match self {
            FeatureMap::Positive { projection, .. } => projection.m(),
            FeatureMap::Hyperbolic { projection, .. } | FeatureMap::Trigonometric { projection, .. } => {
                2 * projection.m()
            }
            FeatureMap::Generalized { projection, .. } => projection.as_ref().map_or(d, Projection::m),
            FeatureMap::Softplus(l) => l.m,
            FeatureMap::GatedSoftplus(g) => g.filter.m,
        }
    }

    /// True for the exponential maps, which carry a log-scale stabiliser.
    pub fn is_stabilised(&self) -> bool {
        matches!(self, FeatureMap::Positive { .. } | FeatureMap::Hyperbolic { .. } | FeatureMap::Trigonometric { .. })
    }

    /// True when the map has trainable parameters (and the backward returns [`ParamGrads`]).
    pub fn has_params(&self) -> bool {
        matches!(self, FeatureMap::Softplus(_) | FeatureMap::GatedSoftplus(_))
    }

    /// The denominator guard δ used when the options do not set one.
    pub fn default_denominator_guard(&self) -> f32 {
        match self {
            FeatureMap::Trigonometric { .. } => DEFAULT_TRIG_GUARD,
            _ => 0.0,
        }
    }

    /// A short name for logs and result files.
    pub fn name(&self) -> &'static str {
        match self {
            FeatureMap::Positive { .. } => "positive",
            FeatureMap::Hyperbolic { .. } => "hyperbolic",
            FeatureMap::Trigonometric { .. } => "trigonometric",
            FeatureMap::Generalized { f: Elementwise::Relu, .. } => "relu",
            FeatureMap::Generalized { f: Elementwise::EluPlusOne, .. } => "elu+1",
            FeatureMap::Generalized { f: Elementwise::Softplus, .. } => "generalized-softplus",
            FeatureMap::Softplus(_) => "learned-softplus",
            FeatureMap::GatedSoftplus(_) => "learned-gated-softplus",
        }
    }

    /// Checks the map against the input dimension `d` and its own parameters: ε, κ, |scale| and
    /// every projection, weight and bias entry must lie within [`PARAM_LIMIT`].
    pub fn validate(&self, d: usize) -> Result<()> {
        if let Some(want) = self.input_dim()
            && want != d
        {
            return Err(FavorError::shape("d", format!("{want} (the feature map's input dimension)"), d));
        }
        let check_eps = |name: &'static str, e: f32| {
            if !(e.is_finite() && (0.0..=PARAM_LIMIT).contains(&e)) {
                Err(FavorError::param(name, format!("must lie in [0, {PARAM_LIMIT:e}], got {e}")))
            } else {
                Ok(())
            }
        };
        let projection = match self {
            FeatureMap::Positive { projection, .. }
            | FeatureMap::Hyperbolic { projection, .. }
            | FeatureMap::Trigonometric { projection, .. } => Some(projection),
            FeatureMap::Generalized { projection, .. } => projection.as_ref(),
            FeatureMap::Softplus(_) | FeatureMap::GatedSoftplus(_) => None,
        };
        if let Some(p) = projection {
            check_entries("projection", p.matrix())?;
        }
        match self {
            FeatureMap::Positive { softmax_scale, .. }
            | FeatureMap::Hyperbolic { softmax_scale, .. }
            | FeatureMap::Trigonometric { softmax_scale, .. }
            | FeatureMap::Generalized { normalize_data: true, softmax_scale, .. } => {
                check_softmax_scale(*softmax_scale)?
            }
            FeatureMap::Generalized { normalize_data: false, softmax_scale: Some(_), .. } => {
                return Err(FavorError::param(
                    "softmax_scale",
                    "set on a generalized map without normalize_data, which does not normalise its input",
                ));
            }
            _ => {}
        }
        match self {
            FeatureMap::Positive { epsilon, .. } | FeatureMap::Hyperbolic { epsilon, .. } => {
                check_eps("epsilon", *epsilon)
            }
            FeatureMap::Trigonometric { .. } => Ok(()),
            FeatureMap::Generalized { scale, kappa, .. } => {
                check_eps("kappa", *kappa)?;
                if !(scale.is_finite() && scale.abs() <= PARAM_LIMIT) {
                    return Err(FavorError::param(
                        "scale",
                        format!("must lie in [-{PARAM_LIMIT:e}, {PARAM_LIMIT:e}], got {scale}"),
                    ));
                }
                Ok(())
            }
            FeatureMap::Softplus(l) => l.validate("w"),
            FeatureMap::GatedSoftplus(g) => {
                g.filter.validate("w")?;
                g.gate.validate("w_gate")?;
                if g.filter.bias.is_some() || g.gate.bias.is_some() {
                    return Err(FavorError::Unsupported("biases in the gated softplus map".into()));
                }
                if g.filter.m != g.gate.m || g.filter.d != g.gate.d {
                    return Err(FavorError::shape(
                        "w_gate",
                        format!("{}×{} like w", g.filter.m, g.filter.d),
                        format!("{}×{}", g.gate.m, g.gate.d),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The log-scale s(x) of one token (module docs), or 0 for maps without a stabiliser.
    /// Computed in f64.
    pub fn log_scale(&self, x: &[f64]) -> f64 {
        match self {
            FeatureMap::Positive { projection, .. } => exp_maps::positive_log_scale(projection, self.nrm(x), x),
            FeatureMap::Hyperbolic { projection, .. } => exp_maps::hyperbolic_log_scale(projection, self.nrm(x), x),
            FeatureMap::Trigonometric { .. } => exp_maps::half_sq_norm(self.nrm(x), x),
            _ => 0.0,
        }
    }

    /// φ(x) with stabiliser `c` (ignored by maps without one), in f64. `out` has
    /// [`FeatureMap::feature_dim`] entries.
    pub fn features(&self, x: &[f64], c: f64, out: &mut [f64]) {
        match self {
            FeatureMap::Positive { projection, epsilon, .. } => {
                exp_maps::positive(projection, self.nrm(x), *epsilon, x, c, out)
            }
            FeatureMap::Hyperbolic { projection, epsilon, .. } => {
                exp_maps::hyperbolic(projection, self.nrm(x), *epsilon, x, c, out)
            }
            FeatureMap::Trigonometric { projection, .. } => exp_maps::trigonometric(projection, self.nrm(x), x, c, out),
            FeatureMap::Generalized { f, projection, scale, kappa, .. } => {
                generalized::forward(*f, projection.as_ref(), self.nrm(x), *scale, *kappa, x, out)
            }
            FeatureMap::Softplus(l) => learned::softplus_forward(l, x, out),
            FeatureMap::GatedSoftplus(g) => learned::gated_forward(g, x, out),
        }
    }

    /// Backward of [`FeatureMap::features`] with `c` held constant (the ε floor is differentiated
    /// through the token's own log-scale, see the module docs): adds ∂ℒ/∂x to `dx` and, for
    /// learned maps, parameter gradients to `grads` (f64, laid out like [`ParamGrads`]).
    pub fn features_backward(
        &self,
        x: &[f64],
        c: f64,
        dphi: &[f64],
        dx: &mut [f64],
        grads: Option<&mut ParamGradsF64>,
    ) {
        self.backward_impl(x, c, dphi, false, dx, grads)
    }

    /// [`FeatureMap::features_backward`] for a token whose use does not depend on the scale of
    /// its own features — a query, whose features enter its output as a ratio (without a
    /// denominator guard that fires). The gradient along that scale is then exactly zero, and
    /// for the exponential maps the term of ∂ℒ/∂x that carries it (∂ℒ/∂h·x̃, a sum that cancels)
    /// is left out rather than computed as rounding noise. Equal to the plain backward in exact
    /// arithmetic; much more accurate for large-norm tokens.
    pub fn features_backward_scale_invariant(
        &self,
        x: &[f64],
        c: f64,
        dphi: &[f64],
        dx: &mut [f64],
        grads: Option<&mut ParamGradsF64>,
    ) {
        self.backward_impl(x, c, dphi, true, dx, grads)
    }

    fn backward_impl(
        &self,
        x: &[f64],
        c: f64,
        dphi: &[f64],
        invariant: bool,
        dx: &mut [f64],
        grads: Option<&mut ParamGradsF64>,
    ) {
        match self {
            FeatureMap::Positive { projection, epsilon, .. } => {
                exp_maps::positive_backward(projection, self.nrm(x), *epsilon, x, c, dphi, invariant, dx)
            }
            FeatureMap::Hyperbolic { projection, epsilon, .. } => {
                exp_maps::hyperbolic_backward(projection, self.nrm(x), *epsilon, x, c, dphi, invariant, dx)
            }
            FeatureMap::Trigonometric { projection, .. } => {
                exp_maps::trigonometric_backward(projection, self.nrm(x), x, c, dphi, invariant, dx)
            }
            FeatureMap::Generalized { f, projection, scale, .. } => {
                generalized::backward(*f, projection.as_ref(), self.nrm(x), *scale, x, dphi, dx)
            }
            FeatureMap::Softplus(l) => learned::softplus_backward(l, x, dphi, dx, grads),
            FeatureMap::GatedSoftplus(g) => learned::gated_backward(g, x, dphi, dx, grads),
        }
    }

    /// Zeroed f64 gradient accumulators for this map's parameters (`None` without parameters).
    pub fn param_grads_f64(&self) -> Option<ParamGradsF64> {
        match self {
            FeatureMap::Softplus(l) => Some(ParamGradsF64 {
                w: vec![0.0; l.m * l.d],
                bias: l.bias.as_ref().map(|b| vec![0.0; b.len()]),
                w_gate: None,
            }),
            FeatureMap::GatedSoftplus(g) => Some(ParamGradsF64 {
                w: vec![0.0; g.filter.m * g.filter.d],
                bias: None,
                w_gate: Some(vec![0.0; g.gate.m * g.gate.d]),
            }),
            _ => None,
        }
    }
}

/// f64 accumulators for parameter gradients (the reference backend's precision).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamGradsF64 {
    /// ∂ℒ/∂W (or W_f).
    pub w: Vec<f64>,
    /// ∂ℒ/∂b.
    pub bias: Option<Vec<f64>>,
    /// ∂ℒ/∂W_g.
    pub w_gate: Option<Vec<f64>>,
}

impl ParamGradsF64 {
    /// Round to the public f32 form.
    pub fn to_f32(&self) -> ParamGrads {
        let r = |v: &Vec<f64>| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        ParamGrads { w: r(&self.w), bias: self.bias.as_ref().map(r), w_gate: self.w_gate.as_ref().map(r) }
    }
}

#[cfg(test)]
mod tests;
