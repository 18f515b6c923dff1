//! `profile`: one kernel, N times, nothing else, so that `perf`, `ncu` or `nsys` can be attached
//! to exactly that kernel. Prints the time per iteration and, on the CPU SIMD backend, the time
//! of each phase (feature map, state build, apply, backward sweeps, feature-map backward, I/O)
//! from favor-simd's opt-in counters (`favor_simd::phases`; CPU time summed over threads, scaled
//! to wall time per iteration). `--pass feature-map` times the standalone feature map.
//!
//! On a GPU backend the inputs are uploaded once before the loop and every iteration runs on
//! device-resident tensors (waiting for the device at the end), so no host↔device copy is in
//! the process's kernel timeline but the kernels themselves.

use std::time::Instant;

use favor_core::{
    AttentionOptions, AttentionShape, DType, Direction, FeatureRole, Grads, HostTensor, Inputs, Problem, Projection,
    ProjectionConfig,
};

use crate::backends::{Backend, PointInputs};
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
    /// Per-phase timers (where the backend has them).
    pub phases: bool,
}

/// Time of one phase per iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseReport {
    /// Phase name ("feature-map", "state-build", "apply", "backward-sweep", "feature-backward",
    /// "io").
    pub name: &'static str,
    /// CPU seconds per iteration, summed over threads.
    pub cpu_s: f64,
    /// The phase's share of all phase time.
    pub share: f64,
}

/// What one profile run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileReport {
    /// Seconds of every timed iteration.
    pub times: Vec<f64>,
    /// Per-phase times, when the backend has phase timers and they were on.
    pub phases: Option<Vec<PhaseReport>>,
}

/// Phase counters of the backend, if it has them (favor-simd's are process-wide).
fn phase_counters(backend: &Backend, on: bool) -> Option<PhaseCounters> {
    let simd = backend.id == "simd" || backend.id.starts_with("simd:");
    (on && simd).then_some(PhaseCounters)
}

struct PhaseCounters;

impl PhaseCounters {
    fn start(&self) {
        favor_simd::phases::set_enabled(true);
        favor_simd::phases::reset();
    }

    fn finish(&self, iters: usize) -> Vec<PhaseReport> {
        favor_simd::phases::set_enabled(false);
        let snap = favor_simd::phases::snapshot();
        let total: f64 = snap.iter().map(|t| t.total.as_secs_f64()).sum();
        snap.iter()
            .filter(|t| t.spans > 0)
            .map(|t| PhaseReport {
                name: t.phase.name(),
                cpu_s: t.total.as_secs_f64() / iters.max(1) as f64,
                share: if total > 0.0 { t.total.as_secs_f64() / total } else { 0.0 },
            })
            .collect()
    }
}

/// Checks, before allocating, that the buffers of the run fit: Q, K, V, the output gradient, the
/// output, three gradients, the feature buffer (up to 2m features) and the drawn projection.
fn check_sizes(cfg: &ProfileConfig) -> Result<()> {
    use crate::limits::{bytes_of, total};
    let s = cfg.shape;
    let elem = if cfg.dtype == DType::F32 { 4 } else { 2 };
    let (b, h, l) = (s.batch, s.heads, s.len);
    let mf = cfg.m.saturating_mul(2).max(s.d);
    let need = total(&[
        bytes_of(&[4, b, h, l, s.d], elem),
        bytes_of(&[4, b, h, l, s.dv], elem),
        bytes_of(&[b, h, l, mf], elem),
        bytes_of(&[cfg.m, s.d], 12),
    ]);
    crate::limits::check_available(format!("profile: the buffers of shape {s:?} with m = {}", cfg.m), need)?;
    Ok(())
}

/// Runs the kernel and prints per-iteration and per-phase times.
pub fn run(cfg: &ProfileConfig) -> Result<ProfileReport> {
    let s = cfg.shape;
    if cfg.iters == 0 {
        crate::bail!("profile: at least one timed iteration is needed (iters = 0)");
    }
    check_sizes(cfg)?;
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
    let key_role = if cfg.direction == Direction::Causal { FeatureRole::CausalKey } else { FeatureRole::Key };
    let fs = AttentionShape { dv: s.d, ..s };
    if let Some(dev) = b.resident() {
        eprintln!("profile: on {}, device-resident: inputs uploaded once, no host-device copies timed", dev.device());
    }
    let mut resident = match b.resident() {
        Some(dev) => {
            let dout = matches!(cfg.pass, ProfilePass::Backward | ProfilePass::ForwardBackward).then(|| g.view());
            Some(dev.upload(PointInputs { q: q.view(), k: k.view(), v: v.view(), dout })?)
        }
        None => None,
    };
    let mut step = || -> Result<()> {
        if let Some(point) = resident.as_mut() {
            match cfg.pass {
                ProfilePass::Forward => point.forward(&p)?,
                ProfilePass::Backward => drop(point.backward(&p)?),
                ProfilePass::ForwardBackward => {
                    point.forward(&p)?;
                    point.backward(&p)?;
                }
                ProfilePass::FeatureMap => point.feature_maps(&map, key_role, fs)?,
            }
            return Ok(());
        }
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
    let counters = phase_counters(&cfg.backend, cfg.phases);
    if let Some(c) = &counters {
        c.start();
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
    let phases = counters.map(|c| c.finish(times.len()));
    let med = median(&times);
    println!(
        "per iteration: median {}, min {}, max {} over {} iterations; {:.1} GFLOP/s credited",
        measure::human_time(med),
        measure::human_time(times.iter().copied().fold(f64::INFINITY, f64::min)),
        measure::human_time(times.iter().copied().fold(0.0, f64::max)),
        times.len(),
        flops / med / 1e9
    );
    match &phases {
        Some(ph) => {
            let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
            let threads = rayon::current_num_threads();
            println!(
                "per phase (CPU time per iteration summed over {threads} threads; wall share = share × mean {}):",
                measure::human_time(mean)
            );
            for p in ph {
                println!(
                    "  {:<17} {:>10} CPU {:>5.1} %  ≈ {:>10} wall",
                    p.name,
                    measure::human_time(p.cpu_s),
                    100.0 * p.share,
                    measure::human_time(p.share * mean)
                );
            }
        }
        None if cfg.phases => println!(
            "per phase: backend {} has no phase timers (the CPU SIMD backend has; on a GPU use nsys or ncu)",
            cfg.backend.name()
        ),
        None => {}
    }
    Ok(ProfileReport { times, phases })
}
