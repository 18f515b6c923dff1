//! What the timing subcommands run: a method (a favor backend in one direction, or a baseline),
//! a pass (forward, or forward + backward), and the f32 buffers of one shape.

use favor_core::{
    AttentionOptions, AttentionShape, Direction, FeatureMap, Grads, HostRef, Inputs, Problem, Projection,
    ProjectionConfig,
};
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

use crate::backends::{Backend, PointInputs, ResidentPoint};
use crate::baselines::{self, GradsF32};
use crate::error::Result;
use crate::measure;

/// `n` values drawn from N(0, scale²), reproducibly from `seed`.
pub fn gaussian(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let x: f64 = StandardNormal.sample(&mut rng);
            scale * x as f32
        })
        .collect()
}

/// Which passes a measurement covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pass {
    /// Forward only.
    Forward,
    /// Forward then backward (a training step's attention work).
    ForwardBackward,
}

impl Pass {
    /// Short name for files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::ForwardBackward => "forward+backward",
        }
    }
}

/// Something to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// FAVOR+ (positive features) on backend number `backend` of the run's list.
    Favor {
        /// Index into the run's backends.
        backend: usize,
        /// Bidirectional or causal.
        direction: Direction,
    },
    /// FAVOR+ bidirectional forward from materialised φ and two GEMMs (gemm crate).
    UnfusedFavor,
    /// Exact softmax attention with materialised scores (gemm crate).
    Softmax,
    /// Attention that returns V ("X (OPT)").
    Identity,
}

impl Method {
    /// Name for tables, files and legends.
    pub fn label(self, backends: &[Backend]) -> String {
        match self {
            Method::Favor { backend, direction } => {
                let dir = match direction {
                    Direction::Bidirectional => "bidirectional",
                    Direction::Causal => "causal",
                };
                format!("favor+ {dir} ({})", backends[backend].name())
            }
            Method::UnfusedFavor => "favor+ unfused (gemm)".into(),
            Method::Softmax => "softmax (gemm)".into(),
            Method::Identity => "X (OPT): returns V".into(),
        }
    }

    /// Whether the method supports the pass.
    pub fn supports(self, pass: Pass) -> bool {
        !(self == Method::UnfusedFavor && pass == Pass::ForwardBackward)
    }

    /// How time grows with L (for predicting the next point): 2 for softmax, 1 otherwise.
    pub fn time_exponent(self) -> f64 {
        if self == Method::Softmax { 2.0 } else { 1.0 }
    }

    /// Flops credited to one call (0 for the identity). FAVOR+ bidirectional and causal forward:
    /// 8·B·H·L·d·m (= 4·L·m·(d + d_v) with d = d_v: the two projections, K'ᵀV and Q'(K'ᵀV));
    /// backward twice that, so forward + backward 24·B·H·L·d·m. Softmax forward 4·B·H·L²·d,
    /// backward 8·B·H·L²·d. Stabiliser, exp, normalisation and causal intra-chunk work are not
    /// credited.
    pub fn flops(self, s: AttentionShape, m: usize, pass: Pass) -> f64 {
        let (bh, l, d, dv) = ((s.batch * s.heads) as f64, s.len as f64, s.d as f64, s.dv as f64);
        let factor = match pass {
            Pass::Forward => 1.0,
            Pass::ForwardBackward => 3.0,
        };
        match self {
            Method::Favor { .. } | Method::UnfusedFavor => factor * bh * 4.0 * l * m as f64 * (d + dv),
            Method::Softmax => factor * bh * 2.0 * l * l * (d + dv),
            Method::Identity => 0.0,
        }
    }
}

/// The f32 buffers of one shape.
#[derive(Debug)]
pub struct Buffers {
    /// Sizes.
    pub shape: AttentionShape,
    /// Queries.
    pub q: Vec<f32>,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Output.
    pub out: Vec<f32>,
    /// Output gradient and input gradients (present for forward + backward).
    pub grads: Option<GradBuffers>,
}

/// Gradient buffers.
#[derive(Debug)]
pub struct GradBuffers {
    /// ∂ℒ/∂out (input of the backward).
    pub dout: Vec<f32>,
    /// ∂ℒ/∂Q.
    pub dq: Vec<f32>,
    /// ∂ℒ/∂K.
    pub dk: Vec<f32>,
    /// ∂ℒ/∂V.
    pub dv: Vec<f32>,
}

impl Buffers {
    /// Gaussian inputs (σ = `scale`) for `shape`; gradient buffers when `pass` needs them.
    pub fn new(shape: AttentionShape, pass: Pass, seed: u64, scale: f32) -> Self {
        let grads = (pass == Pass::ForwardBackward).then(|| GradBuffers {
            dout: gaussian(shape.v_len(), seed + 3, 1.0),
            dq: vec![0.0; shape.qk_len()],
            dk: vec![0.0; shape.qk_len()],
            dv: vec![0.0; shape.v_len()],
        });
        Self {
            shape,
            q: gaussian(shape.qk_len(), seed, scale),
            k: gaussian(shape.qk_len(), seed + 1, scale),
            v: gaussian(shape.v_len(), seed + 2, 1.0),
            out: vec![0.0; shape.v_len()],
            grads,
        }
    }

    /// Bytes of inputs and outputs (and gradients): the floor of any implementation (saturating
    /// at `usize::MAX` for shapes no machine could hold).
    pub fn io_bytes(shape: AttentionShape, pass: Pass) -> usize {
        sat(io_bytes_wide(shape, pass))
    }
}

/// The FAVOR+ configuration shared by every method of a run.
#[derive(Debug, Clone)]
pub struct FavorConfig {
    /// The positive feature map (orthogonal projection, m features).
    pub map: FeatureMap,
    /// The projection (for the unfused baseline).
    pub projection: Projection,
}

impl FavorConfig {
    /// Positive features, orthogonal projection with χ norms, `m` features, for head size `d`.
    pub fn positive(m: usize, d: usize, seed: u64) -> Result<Self> {
        let projection = Projection::draw(ProjectionConfig::new(m, d, seed))?;
        Ok(Self { map: FeatureMap::positive(projection.clone()), projection })
    }
}

/// Runs `method` once on `buf` (the pass is implied by whether `buf` has gradient buffers).
pub fn run_once(method: Method, backends: &[Backend], cfg: &FavorConfig, buf: &mut Buffers) -> Result<()> {
    let s = buf.shape;
    match method {
        Method::Favor { backend, direction } => {
            let b = &backends[backend].imp;
            let p = problem(cfg, s, direction);
            let inputs =
                Inputs { q: HostRef::from(&buf.q), k: HostRef::from(&buf.k), v: HostRef::from(&buf.v), key_mask: None };
            b.forward(&p, inputs, (&mut buf.out).into())?;
            if let Some(g) = buf.grads.as_mut() {
                let grads = Grads { dq: (&mut g.dq).into(), dk: (&mut g.dk).into(), dv: (&mut g.dv).into() };
                b.backward(&p, inputs, HostRef::from(&g.dout), grads)?;
            }
        }
        Method::UnfusedFavor => {
            let m = cfg.projection.m();
            let eps = match cfg.map {
                FeatureMap::Positive { epsilon, .. } => epsilon,
                _ => favor_core::features::DEFAULT_EPSILON,
            };
            baselines::unfused_favor_forward(s, cfg.projection.matrix(), m, eps, &buf.q, &buf.k, &buf.v, &mut buf.out);
        }
        Method::Softmax => match buf.grads.as_mut() {
            None => baselines::softmax_forward(s, false, &buf.q, &buf.k, &buf.v, &mut buf.out),
            Some(g) => baselines::softmax_forward_backward(
                s,
                false,
                &buf.q,
                &buf.k,
                &buf.v,
                &g.dout,
                &mut buf.out,
                GradsF32 { dq: &mut g.dq, dk: &mut g.dk, dv: &mut g.dv },
            ),
        },
        Method::Identity => {
            baselines::identity_forward(&buf.v, &mut buf.out);
            if let Some(g) = buf.grads.as_mut() {
                baselines::identity_backward(&g.dout, GradsF32 { dq: &mut g.dq, dk: &mut g.dk, dv: &mut g.dv });
            }
        }
    }
    Ok(())
}

/// The problem `method` runs (FAVOR+ methods only).
fn problem<'a>(cfg: &'a FavorConfig, shape: AttentionShape, direction: Direction) -> Problem<'a> {
    Problem::new(shape, &cfg.map).with_options(AttentionOptions { direction, ..AttentionOptions::default() })
}

/// Times `method` at one point (Gaussian inputs from `seed`): FAVOR+ on a backend with device
/// memory runs device-resident (inputs uploaded once in the untimed setup, no host↔device copies
/// in the calls, peak from the backend's allocation tracking); everything else runs on host
/// buffers with the heap peak.
#[allow(clippy::too_many_arguments)]
pub fn time_method(
    method: Method,
    backends: &[Backend],
    cfg: &FavorConfig,
    shape: AttentionShape,
    pass: Pass,
    seed: u64,
    repeats: usize,
    budget_s: f64,
) -> Result<measure::Sample> {
    if let Method::Favor { backend, direction } = method
        && let Some(dev) = backends[backend].imp.resident()
    {
        let p = problem(cfg, shape, direction);
        let setup = || {
            let buf = Buffers::new(shape, pass, seed, 1.0);
            let inputs = PointInputs {
                q: HostRef::from(&buf.q),
                k: HostRef::from(&buf.k),
                v: HostRef::from(&buf.v),
                dout: buf.grads.as_ref().map(|g| HostRef::from(&g.dout)),
            };
            Ok(dev.upload(inputs)?)
        };
        let call = |point: &mut Box<dyn ResidentPoint + '_>| {
            point.forward(&p)?;
            if pass == Pass::ForwardBackward {
                point.backward(&p)?;
            }
            Ok(())
        };
        return measure::time_point_in(&measure::DeviceMemory(dev), setup, call, repeats, budget_s);
    }
    measure::time_point(
        || Ok(Buffers::new(shape, pass, seed, 1.0)),
        |buf| run_once(method, backends, cfg, buf),
        repeats,
        budget_s,
    )
}

fn sat(x: u128) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

/// Product of `dims` in u128, saturating (four factors from usize cannot always fit).
fn prod(dims: &[usize]) -> u128 {
    dims.iter().fold(1u128, |acc, &d| acc.saturating_mul(d as u128))
}

fn io_bytes_wide(s: AttentionShape, pass: Pass) -> u128 {
    let (b, h, l) = (s.batch, s.heads, s.len);
    let fwd = prod(&[4, 2, b, h, l, s.d]).saturating_add(prod(&[4, 2, b, h, l, s.dv]));
    match pass {
        Pass::Forward => fwd,
        Pass::ForwardBackward => fwd.saturating_mul(2),
    }
}

/// Predicted peak heap bytes of one measurement (inputs, outputs, gradients and the method's
/// scratch), used to refuse points over the memory budget before allocating. Computed without
/// overflow: a shape too large for any machine predicts `usize::MAX`.
pub fn predicted_bytes(method: Method, backends: &[Backend], s: AttentionShape, m: usize, pass: Pass) -> usize {
    let io = io_bytes_wide(s, pass);
    let mf = m; // positive features
    let (bh, l) = (s.batch.saturating_mul(s.heads), s.len);
    sat(match method {
        Method::Favor { backend, .. } if backends[backend].is_reference() => {
            // f64 copies of the inputs and gradients, plus per-head φ(Q), φ(K) in f64.
            io.saturating_mul(3).saturating_add(prod(&[4, 8, l, mf])).saturating_add(16 << 20)
        }
        // The CUDA kernels keep φ(Q), φ(K) and intermediates in fp32 scratch for a call.
        Method::Favor { backend, .. } if backends[backend].imp.resident().is_some() => {
            io.saturating_add(prod(&[3, 4, bh, l, mf])).saturating_add(32 << 20)
        }
        // Fused kernels: O(threads × tile + B·H·m·d_v) beyond the buffers; allow 25 % + 32 MiB.
        Method::Favor { .. } => io.saturating_add(io / 4).saturating_add(32 << 20),
        // The scratch of baselines::unfused_favor_forward.
        Method::UnfusedFavor => {
            // φ(Q), φ(K) (L×m each), K'ᵀV, K'ᵀ1 and per-key stabilisers of one head.
            io.saturating_add(prod(&[4, 2, l, m]).saturating_add(prod(&[4, m, s.dv + 1])).saturating_add(prod(&[4, l])))
        }
        Method::Softmax => {
            let scores = prod(&[4, l, l]);
            io.saturating_add(if pass == Pass::ForwardBackward { scores.saturating_mul(2) } else { scores })
        }
        Method::Identity => io,
    })
}

/// Feature-map names accepted on the command line.
pub const MAP_NAMES: &str = "positive, hyperbolic, trigonometric, relu, elu+1";

/// Whether the named map draws a projection.
pub fn map_uses_projection(name: &str) -> bool {
    !matches!(name, "elu+1" | "elu")
}

/// Builds the named feature map around `projection` (ignored by ELU+1).
pub fn make_map(name: &str, projection: Projection) -> Result<FeatureMap> {
    Ok(match name {
        "positive" => FeatureMap::positive(projection),
        "hyperbolic" => FeatureMap::hyperbolic(projection),
        "trigonometric" | "trig" => FeatureMap::trigonometric(projection),
        "relu" => FeatureMap::relu(Some(projection)),
        "elu+1" | "elu" => FeatureMap::elu_plus_one(),
        other => crate::bail!("unknown feature map `{other}`; expected one of: {MAP_NAMES}"),
    })
}

/// Parses "bidirectional" / "causal".
pub fn parse_direction(s: &str) -> Result<Direction> {
    match s {
        "bidirectional" | "bidir" => Ok(Direction::Bidirectional),
        "causal" => Ok(Direction::Causal),
        other => crate::bail!("unknown direction `{other}`; expected bidirectional or causal"),
    }
}
