//! `profile`: one kernel, N times, nothing else, so that `perf`, `ncu` or `nsys` can be attached
//! to exactly that kernel. The backend trait exposes no per-phase timers, so the tool prints the
//! time of each iteration; `--pass feature-map` times the feature map (the first phase of every
//! pass) on its own.

use std::time::Instant;

use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FeatureRole, Grads, HostTensor, Inputs, Problem, Projection,
    ProjectionConfig,
};

use crate::backends::Backend;
use crate::error::Result;
use crate::measure::{self, median};
use crate::workload;

/// Which kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfilePass {
    /// Attention forward.
    Forward,
    /// Attention backward (as the backend implements it, including any recomputation).
    Backward,
    /// Forward then backward.
    ForwardBackward,
    /// The feature map of Q and K only.
    FeatureMap,
}

impl ProfilePass {
    /// Parses the command-line name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "forward" => ProfilePass::Forward,
            "backward" => ProfilePass::Backward,
            "forward-backward" | "forward+backward" => ProfilePass::ForwardBackward,
            "feature-map" => ProfilePass::FeatureMap,
            other => {
                crate::bail!("unknown pass `{other}`; expected forward, backward, forward-backward or feature-map")
            }
        })
    }
}

/// What to run.
#[derive(Debug)]
pub struct ProfileConfig {
    /// The backend.
    pub backend: Backend,
    /// Direction.
    pub direction: Direction,
    /// Kernel.
    pub pass: ProfilePass,
    /// Shape.
    pub shape: AttentionShape,
    /// Storage type.
    pub dtype: DType,
    /// Feature map name.
    pub map: String,
    /// Random features.
    pub m: usize,
    /// Timed iterations.
    pub iters: usize,
    /// Untimed warm-up iterations.
    pub warmup: usize,
    /// Print every iteration's time.
    pub verbose: bool,
}

/// Per-iteration seconds.
pub fn run(cfg: &ProfileConfig) -> Result<Vec<f64>> {
    let s = cfg.shape;
    let proj = Projection::draw(ProjectionConfig::new(cfg.m, s.d, 1))?;
    let map = workload::make_map(&cfg.map, proj)?;
    let t = |n, seed| HostTensor::from_f32(cfg.dtype, &workload::gaussian(n, seed, 1.0));
    let (q, k, v, g) = (t(s.qk_len(), 1), t(s.qk_len(), 2), t(s.v_len(), 3), t(s.v_len(), 4));
    let mut out = HostTensor::zeros(cfg.dtype, s.v_len());
    let (mut dq, mut dk, mut dv) = (
        HostTensor::zeros(cfg.dtype, s.qk_len()),
        HostTensor::zeros(cfg.dtype, s.qk_len()),
        HostTensor::zeros(cfg.dtype, s.v_len()),
    );
    let mf = map.feature_dim(s.d);
    let mut phi = HostTensor::zeros(cfg.dtype, s.problems() * s.len * mf);
    let p = Problem::new(s, &map)
        .with_options(AttentionOptions { direction: cfg.direction, ..AttentionOptions::default() });
    let b = &cfg.backend.imp;
    let mut step = || -> Result<()> {
        let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: None };
        match cfg.pass {
            ProfilePass::Forward => b.forward(&p, inputs, out.view_mut())?,
            ProfilePass::Backward | ProfilePass::ForwardBackward => {
                if cfg.pass == ProfilePass::ForwardBackward {
                    b.forward(&p, inputs, out.view_mut())?;
                }
                b.backward(&p, inputs, g.view(), Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() })?;
            }
            ProfilePass::FeatureMap => {
                let key_role =
                    if cfg.direction == Direction::Causal { FeatureRole::CausalKey } else { FeatureRole::Key };
                let fs = AttentionShape { dv: s.d, ..s };
                b.feature_map(&map, FeatureRole::Query, fs, q.view(), phi.view_mut())?;
                b.feature_map(&map, key_role, fs, k.view(), phi.view_mut())?;
            }
        }
        Ok(())
    };
    eprintln!(
        "profile: pid {}, backend {}, {:?} {:?}, shape {:?}, {} features ({}), {}, {} warm-up + {} timed iterations",
        std::process::id(),
        cfg.backend.name(),
        cfg.direction,
        cfg.pass,
        s,
        mf,
        cfg.map,
        cfg.dtype,
        cfg.warmup,
        cfg.iters
    );
    for _ in 0..cfg.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(cfg.iters);
    for _ in 0..cfg.iters {
        let t0 = Instant::now();
        step()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    if cfg.verbose {
        for (i, t) in times.iter().enumerate() {
            println!("iteration {i}: {}", measure::human_time(*t));
        }
    }
    let flops = match cfg.pass {
        ProfilePass::Forward => 4.0 * (s.problems() * s.len * mf) as f64 * (s.d + s.dv) as f64,
        ProfilePass::Backward => 8.0 * (s.problems() * s.len * mf) as f64 * (s.d + s.dv) as f64,
        ProfilePass::ForwardBackward => 12.0 * (s.problems() * s.len * mf) as f64 * (s.d + s.dv) as f64,
        ProfilePass::FeatureMap => 4.0 * (s.problems() * s.len * s.d) as f64 * cfg.m as f64,
    };
    let med = median(&times);
    println!(
        "per iteration: median {}, min {}, max {} over {} iterations; {:.1} GFLOP/s credited (no per-phase timers in the backend trait; use --pass feature-map for the feature map alone)",
        measure::human_time(med),
        measure::human_time(times.iter().copied().fold(f64::INFINITY, f64::min)),
        measure::human_time(times.iter().copied().fold(0.0, f64::max)),
        times.len(),
        flops / med / 1e9
    );
    Ok(times)
}
