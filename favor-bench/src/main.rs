//! The `favor-bench` binary: see `favor-bench --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use favor_bench::accuracy::{self, AccuracyConfig};
use favor_bench::curves::{self, CurvesConfig, Setting};
use favor_bench::error::{BenchError, Result};
use favor_bench::profile::{self, ProfileConfig, ProfilePass};
use favor_bench::roofline::{self, RooflineConfig};
use favor_bench::runcmd::{self, RunArgs};
use favor_bench::workload::{self, Pass};
use favor_bench::{backends, measure};
use favor_core::{AttentionShape, DType};

#[global_allocator]
static ALLOC: favor_bench::alloc::CountingAlloc = favor_bench::alloc::CountingAlloc;

/// favor's benchmark and I/O tool: the Performer paper's speed/memory curves and accuracy
/// figures, this machine's roofline, single-kernel profiling and .npy round trips.
#[derive(Parser, Debug)]
#[command(name = "favor-bench", version, about, long_about = None)]
struct Cli {
    /// Threads of the rayon pool every backend and baseline runs on (default: all CPUs; at most
    /// 2 × the CPUs, and at least 256 are always allowed).
    #[arg(long, global = true, value_parser = parse_threads)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Paper Fig. 3: time and peak memory vs sequence length (FAVOR+, softmax, X (OPT)).
    Curves(CurvesArgs),
    /// Paper Fig. 4 and Fig. 2: approximation error vs m, and the MSE ratio vs angle.
    Accuracy(AccuracyArgs),
    /// This machine's GEMM and copy ceilings, and each kernel's rate as a fraction of them.
    Roofline(RooflineArgs),
    /// Run one kernel N times with nothing else (attach perf/ncu/nsys to it).
    Profile(ProfileArgs),
    /// Time [B, H, L, d] against [B, L, H, d] and packed-QKV tensors (forward, forward + backward).
    Layouts(LayoutsArgs),
    /// Grouped-query and multi-query attention against one key/value head per query head: time
    /// and heap per call.
    Groups(GroupsArgs),
    /// Serving: one-token decode steps of many slots in one call (time per step, tokens/s,
    /// allocations per step).
    Serve(ServeArgs),
    /// Read Q, K, V (W, mask, dout) from .npy, run attention, write out (and grads) to .npy.
    Run(RunCmdArgs),
    /// List the backends this build can run here.
    Backends,
}

#[derive(Args, Debug)]
struct CurvesArgs {
    /// Backends, comma-separated ("best", "cuda", "cuda:1", "simd", "simd:avx2", "reference",
    /// ...). Default: the best backend (and the SIMD backend when the best is the GPU), plus the
    /// reference at small L.
    #[arg(long)]
    backends: Option<String>,
    /// Smallest L is 2^min_log2 (0 ... 30).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(0..=MAX_LOG2))]
    min_log2: u32,
    /// Largest L is 2^max_log2 (default 15; 16 with --full; at most 30).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=MAX_LOG2))]
    max_log2: Option<u32>,
    /// Explicit comma-separated lengths (overrides the log2 range).
    #[arg(long, value_delimiter = ',', value_parser = positive)]
    lens: Option<Vec<usize>>,
    /// The whole range L = 2^9 ... 2^16 with a 60 s per-call budget.
    #[arg(long)]
    full: bool,
    /// Settings: small (1 head, d = 64), regular (8 heads, d = 64).
    #[arg(long, value_delimiter = ',', default_value = "small,regular")]
    settings: Vec<String>,
    /// Passes: forward, forward+backward.
    #[arg(long, value_delimiter = ',', default_value = "forward,forward+backward")]
    passes: Vec<String>,
    /// Batch size.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    batch: usize,
    /// Random features m.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    m: usize,
    /// Timed calls per point (at most; fewer when the point budget runs out).
    #[arg(long, default_value_t = 3, value_parser = positive)]
    repeats: usize,
    /// Per-call time budget in seconds: a method stops before a point predicted to be slower
    /// (default 2; 60 with --full).
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    max_point_s: Option<f64>,
    /// Heap budget in GiB: points predicted to need more are refused (default: min(16, 60 % of
    /// available memory)).
    #[arg(long, value_parser = positive_f64, allow_negative_numbers = true)]
    memory_budget_gib: Option<f64>,
    /// Largest L timed on the f64 reference backend.
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    reference_max_len: usize,
    /// Leave out exact softmax attention.
    #[arg(long)]
    no_softmax: bool,
    /// Leave out the identity X (OPT) line.
    #[arg(long)]
    no_identity: bool,
    /// Output folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Seed of inputs and projection.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args, Debug)]
struct AccuracyArgs {
    /// Backend computing FAVOR+ (default: the f64 reference, i.e. the estimator itself).
    #[arg(long, default_value = "reference")]
    backend: String,
    /// The paper's setting: L = 4096, 15 seeds, m = 16 ... 256, 24 angles x 4000 draws.
    #[arg(long)]
    full: bool,
    /// Sequence length (default 1024; 4096 with --full).
    #[arg(long, value_parser = positive)]
    len: Option<usize>,
    /// Head dimension.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    d: usize,
    /// Standard deviation of the Gaussian Q and K entries.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f32, allow_negative_numbers = true)]
    sigma: f32,
    /// Seeds per point (default 5; 15 with --full).
    #[arg(long, value_parser = positive)]
    seeds: Option<usize>,
    /// Random features m, comma-separated (default 16,32,64,128,256).
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256", value_parser = positive)]
    ms: Vec<usize>,
    /// Angles in the MSE-ratio panel (default 24; 48 with --full).
    #[arg(long, value_parser = positive)]
    angles: Option<usize>,
    /// Projection draws per angle (default 1000; 4000 with --full).
    #[arg(long, value_parser = positive)]
    draws: Option<usize>,
    /// Output folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct RooflineArgs {
    /// Backends, comma-separated (default: the best one).
    #[arg(long, default_value = "best")]
    backends: String,
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384,65536", value_parser = positive)]
    lens: Vec<usize>,
    /// Batch.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    batch: usize,
    /// Heads.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    heads: usize,
    /// d = d_v.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    d: usize,
    /// Random features.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    m: usize,
    /// Square size of the CPU's f32 GEMM ceiling.
    #[arg(long, default_value_t = 2048, value_parser = positive)]
    gemm_size: usize,
    /// Square size of a GPU's bf16 GEMM ceiling (cuBLAS, when installed).
    #[arg(long, default_value_t = 8192, value_parser = positive)]
    device_gemm_size: usize,
    /// MiB copied by the bandwidth probe.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    stream_mib: usize,
    /// Timed calls per point.
    #[arg(long, default_value_t = 3, value_parser = positive)]
    repeats: usize,
    /// Forward only.
    #[arg(long)]
    no_backward: bool,
    /// Leave out the unfused GEMM line.
    #[arg(long)]
    no_unfused: bool,
    /// Largest L timed on the reference backend.
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    reference_max_len: usize,
    /// Output folder.
    #[arg(long, default_value = "results")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct LayoutsArgs {
    /// Backend id: best, simd, simd:<isa>, cuda (host tensors) or reference.
    #[arg(long, default_value = "simd")]
    backend: String,
    /// Batch.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    batch: usize,
    /// Heads.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    heads: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 4096, value_parser = positive)]
    len: usize,
    /// Head dimension (d = d_v).
    #[arg(long, default_value_t = 64, value_parser = positive)]
    d: usize,
    /// Random features.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    m: usize,
    /// Timed rounds (each calls every layout once).
    #[arg(long, default_value_t = 15, value_parser = positive)]
    rounds: usize,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Backend id: best, simd, simd:<isa>, cuda (host tensors) or reference.
    #[arg(long, default_value = "simd")]
    backend: String,
    /// Query heads.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    heads: usize,
    /// Key/value heads (dividing --heads; default: --heads).
    #[arg(long, value_parser = positive)]
    kv_heads: Option<usize>,
    /// Head dimension (d = d_v).
    #[arg(long, default_value_t = 128, value_parser = positive)]
    d: usize,
    /// Random features.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    m: usize,
    /// Slot counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64", value_parser = positive)]
    slots: Vec<usize>,
    /// Prompt tokens prefilled into every slot first.
    #[arg(long, default_value_t = 128, value_parser = positive)]
    prompt: usize,
    /// Timed one-token steps.
    #[arg(long, default_value_t = 50, value_parser = positive)]
    steps: usize,
}

#[derive(Args, Debug)]
struct GroupsArgs {
    /// Backend id: best, simd, simd:<isa>, cuda (host tensors) or reference.
    #[arg(long, default_value = "simd")]
    backend: String,
    /// Batch.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    heads: usize,
    /// Key/value head counts to compare (each dividing --heads); the first is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "32,8,1", value_parser = positive)]
    kv_heads: Vec<usize>,
    /// Sequence length.
    #[arg(long, default_value_t = 4096, value_parser = positive)]
    len: usize,
    /// Head dimension (d = d_v).
    #[arg(long, default_value_t = 64, value_parser = positive)]
    d: usize,
    /// Random features.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    m: usize,
    /// Timed rounds (each calls every variant once).
    #[arg(long, default_value_t = 5, value_parser = positive)]
    rounds: usize,
}

#[derive(Args, Debug)]
struct ProfileArgs {
    /// Backend id: best, cuda, cuda:<n>, simd, simd:<isa> or reference.
    #[arg(long, default_value = "best")]
    backend: String,
    /// bidirectional or causal.
    #[arg(long, default_value = "bidirectional")]
    direction: String,
    /// forward, backward, forward-backward or feature-map.
    #[arg(long, default_value = "forward")]
    pass: String,
    /// Batch.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    batch: usize,
    /// Heads.
    #[arg(long, default_value_t = 8, value_parser = positive)]
    heads: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 4096, value_parser = positive)]
    len: usize,
    /// Query/key head dimension.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    d: usize,
    /// Value head dimension (default d).
    #[arg(long, value_parser = positive)]
    dv: Option<usize>,
    /// Random features.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    m: usize,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Feature map: positive, hyperbolic, trigonometric, relu, elu+1.
    #[arg(long, default_value = "positive")]
    map: String,
    /// Timed iterations.
    #[arg(long, default_value_t = 20, value_parser = positive)]
    iters: usize,
    /// Warm-up iterations.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Print each iteration's time.
    #[arg(long)]
    verbose: bool,
    /// Leave the per-phase timers off (the CPU backend's phase counters cost two clock reads per
    /// tile-sized piece of work)
    #[arg(long)]
    no_phases: bool,
}

#[derive(Args, Debug)]
struct RunCmdArgs {
    /// Queries .npy: [B, H, L, d], [H, L, d] or [L, d]; float32 or float16.
    #[arg(long)]
    q: PathBuf,
    /// Keys .npy (Q's shape).
    #[arg(long)]
    k: PathBuf,
    /// Values .npy (Q's leading dimensions, any last dimension).
    #[arg(long)]
    v: PathBuf,
    /// Projection W .npy [m, d] float32 (default: drawn with --m, --seed and written to w.npy).
    #[arg(long)]
    w: Option<PathBuf>,
    /// Key padding mask .npy [B, L] bool (true = keep).
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Output gradient .npy (the output's shape): also runs the backward.
    #[arg(long)]
    dout: Option<PathBuf>,
    /// Backend id: best, cuda, cuda:<n>, simd, simd:<isa> or reference.
    #[arg(long, default_value = "best")]
    backend: String,
    /// Feature map: positive, hyperbolic, trigonometric, relu, elu+1.
    #[arg(long, default_value = "positive")]
    map: String,
    /// bidirectional or causal.
    #[arg(long, default_value = "bidirectional")]
    direction: String,
    /// Random features when W is not given.
    #[arg(long, default_value_t = 256, value_parser = positive)]
    m: usize,
    /// Seed of the drawn W.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for out.npy (and dq.npy, dk.npy, dv.npy, w.npy).
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
}

/// Largest log2 of a curves length: 2^30 tokens is far beyond any memory budget already, and
/// larger shifts would overflow.
const MAX_LOG2: i64 = 30;

/// A count that must be at least 1 (lengths, sizes, repeats, seeds, ...).
fn positive(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|e| format!("`{s}` is not a whole number: {e}"))?;
    if n == 0 { Err("must be at least 1".into()) } else { Ok(n) }
}

/// A finite number above 0 (budgets in seconds or GiB).
fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|e| format!("`{s}` is not a number: {e}"))?;
    if x.is_finite() && x > 0.0 { Ok(x) } else { Err(format!("must be a finite number above 0, got {x}")) }
}

fn positive_f32(s: &str) -> std::result::Result<f32, String> {
    let x = positive_f64(s)?;
    if x <= f32::MAX as f64 && x as f32 > 0.0 {
        Ok(x as f32)
    } else {
        Err(format!("must be a finite float32 above 0, got {x}"))
    }
}

/// Most rayon threads accepted: twice the CPUs (oversubscription beyond that only measures the
/// scheduler), never less than 256. Far larger counts make the pool's startup hang.
fn max_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cpus).max(256)
}

fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|e| format!("`{s}` is not a whole number: {e}"))?;
    let cap = max_threads();
    if (1..=cap).contains(&n) {
        Ok(n)
    } else {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Err(format!("{n} threads is outside 1..={cap} (the cap is the larger of 256 and 2 × the {cpus} CPUs here)"))
    }
}

/// The best backend, the best CPU backend too when the best is the GPU, and the reference.
fn default_backends() -> String {
    let ids = backends::available();
    let mut chosen: Vec<&str> = ids.iter().take(1).map(String::as_str).collect();
    if chosen.first() == Some(&"cuda")
        && let Some(cpu) = ids.iter().find(|id| id.as_str() == "simd")
    {
        chosen.push(cpu);
    }
    if !chosen.contains(&"reference") {
        chosen.push("reference");
    }
    chosen.join(",")
}

fn curves_cmd(a: CurvesArgs) -> Result<()> {
    let max_log2 = a.max_log2.unwrap_or(if a.full { 16 } else { 15 });
    let mut lens = match a.lens {
        Some(lens) if lens.is_empty() => return Err(BenchError("--lens is empty: give at least one length".into())),
        Some(lens) => lens,
        None if a.min_log2 > max_log2 => {
            return Err(BenchError(format!(
                "--min-log2 {} is above --max-log2 {max_log2}: the length range is empty",
                a.min_log2
            )));
        }
        None => (a.min_log2..=max_log2).map(|k| 1usize << k).collect(),
    };
    // The sweep predicts each point from the previous one: ascending, each length once.
    lens.sort_unstable();
    lens.dedup();
    let settings = a
        .settings
        .iter()
        .map(|s| {
            Setting::parse(s).ok_or_else(|| BenchError(format!("unknown setting `{s}`; expected small or regular")))
        })
        .collect::<Result<Vec<_>>>()?;
    let passes = a
        .passes
        .iter()
        .map(|p| match p.as_str() {
            "forward" => Ok(Pass::Forward),
            "forward+backward" | "forward-backward" => Ok(Pass::ForwardBackward),
            other => Err(BenchError(format!("unknown pass `{other}`; expected forward or forward+backward"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = CurvesConfig {
        backends: open_some(&a.backends.unwrap_or_else(default_backends))?,
        lens,
        settings,
        passes,
        batch: a.batch,
        m: a.m,
        repeats: a.repeats,
        max_point_s: a.max_point_s.unwrap_or(if a.full { 60.0 } else { 2.0 }),
        memory_budget: a
            .memory_budget_gib
            .map_or_else(measure::default_memory_budget, |g| (g * (1u64 << 30) as f64) as usize),
        reference_max_len: a.reference_max_len,
        softmax: !a.no_softmax,
        identity: !a.no_identity,
        out_dir: a.out,
        seed: a.seed,
    };
    eprintln!(
        "curves: backends {}, L = {:?}, batch {}, m {}, memory budget {}, per-call budget {} s",
        cfg.backends.iter().map(|b| b.name()).collect::<Vec<_>>().join(", "),
        cfg.lens,
        cfg.batch,
        cfg.m,
        measure::human_bytes(cfg.memory_budget),
        cfg.max_point_s
    );
    let (_, files) = curves::run(&cfg)?;
    print_files(&files);
    Ok(())
}

/// Opens a comma-separated list of backends, at least one.
fn open_some(ids: &str) -> Result<Vec<backends::Backend>> {
    let list = backends::open_list(ids)?;
    if list.is_empty() {
        return Err(BenchError(format!(
            "--backends `{ids}` names no backend; give at least one of: {} (or \"best\")",
            backends::available().join(", ")
        )));
    }
    Ok(list)
}

fn print_files(files: &[PathBuf]) {
    println!("wrote:");
    for f in files {
        println!("  {}", f.display());
    }
}

fn accuracy_cmd(a: AccuracyArgs) -> Result<()> {
    let cfg = AccuracyConfig {
        backend: backends::open(&a.backend)?,
        len: a.len.unwrap_or(if a.full { 4096 } else { 1024 }),
        d: a.d,
        sigma: a.sigma,
        ms: a.ms,
        seeds: a.seeds.unwrap_or(if a.full { 15 } else { 5 }),
        angles: a.angles.unwrap_or(if a.full { 48 } else { 24 }),
        draws: a.draws.unwrap_or(if a.full { 4000 } else { 1000 }),
        out_dir: a.out,
    };
    eprintln!(
        "accuracy: backend {}, L = {}, d = {}, m = {:?}, {} seeds",
        cfg.backend.name(),
        cfg.len,
        cfg.d,
        cfg.ms,
        cfg.seeds
    );
    let (mse, _, files) = accuracy::run(&cfg)?;
    println!("{:<14} {:<11} {:>5} {:>12} {:>12}", "map", "projection", "m", "MSE mean", "MSE std");
    for p in &mse {
        println!("{:<14} {:<11} {:>5} {:>12.4e} {:>12.4e}", p.map, p.kind, p.m, p.mean, p.std);
    }
    print_files(&files);
    Ok(())
}

fn roofline_cmd(a: RooflineArgs) -> Result<()> {
    let stream_bytes = a.stream_mib.checked_mul(1 << 20).ok_or_else(|| {
        BenchError(format!("--stream-mib {}: more bytes than this machine can address", a.stream_mib))
    })?;
    let cfg = RooflineConfig {
        backends: open_some(&a.backends)?,
        lens: a.lens,
        batch: a.batch,
        heads: a.heads,
        d: a.d,
        m: a.m,
        gemm_size: a.gemm_size,
        device_gemm_size: a.device_gemm_size,
        stream_bytes,
        repeats: a.repeats,
        backward: !a.no_backward,
        unfused: !a.no_unfused,
        reference_max_len: a.reference_max_len,
        out_dir: a.out,
    };
    let (_, _, files) = roofline::run(&cfg)?;
    print_files(&files);
    Ok(())
}

fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::Bf16),
        other => Err(BenchError(format!("unknown dtype `{other}`; expected f32, f16 or bf16"))),
    }
}

fn profile_cmd(a: ProfileArgs) -> Result<()> {
    let cfg = ProfileConfig {
        backend: backends::open(&a.backend)?,
        direction: workload::parse_direction(&a.direction)?,
        pass: ProfilePass::parse(&a.pass)?,
        shape: AttentionShape::new(a.batch, a.heads, a.len, a.d).with_dv(a.dv.unwrap_or(a.d)),
        dtype: parse_dtype(&a.dtype)?,
        map: a.map,
        m: a.m,
        iters: a.iters,
        warmup: a.warmup,
        verbose: a.verbose,
        phases: !a.no_phases,
    };
    profile::run(&cfg)?;
    Ok(())
}

fn layouts_cmd(a: LayoutsArgs) -> Result<()> {
    let cfg = favor_bench::layouts::LayoutsConfig {
        backend: a.backend,
        shape: AttentionShape::new(a.batch, a.heads, a.len, a.d),
        m: a.m,
        rounds: a.rounds,
    };
    let s = cfg.shape;
    println!(
        "{} B={} H={} L={} d={} m={} f32, median of {} rounds",
        cfg.backend, s.batch, s.heads, s.len, s.d, cfg.m, cfg.rounds
    );
    println!("{:<14} {:<17} {:<11} {:>10} {:>8}", "direction", "pass", "layout", "median", "ratio");
    for p in favor_bench::layouts::run(&cfg)? {
        let dir = format!("{:?}", p.direction).to_lowercase();
        println!(
            "{dir:<14} {:<17} {:<11} {:>10} {:>8.3}",
            p.pass,
            p.layout,
            favor_bench::measure::human_time(p.median_s),
            p.ratio
        );
    }
    Ok(())
}

fn groups_cmd(a: GroupsArgs) -> Result<()> {
    let cfg = favor_bench::groups::GroupsConfig {
        backend: a.backend,
        shape: AttentionShape::new(a.batch, a.heads, a.len, a.d),
        kv_heads: a.kv_heads,
        m: a.m,
        rounds: a.rounds,
    };
    let s = cfg.shape;
    println!(
        "{} B={} H={} L={} d={} m={} f32, median of {} rounds",
        cfg.backend, s.batch, s.heads, s.len, s.d, cfg.m, cfg.rounds
    );
    println!(
        "{:<14} {:<17} {:>8} {:>10} {:>7} {:>13} {:>13}",
        "direction", "pass", "kv_heads", "median", "ratio", "call heap MiB", "tensors MiB"
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    for p in favor_bench::groups::run(&cfg)? {
        let dir = format!("{:?}", p.direction).to_lowercase();
        println!(
            "{dir:<14} {:<17} {:>8} {:>10} {:>7.3} {:>13.1} {:>13.1}",
            p.pass,
            p.kv_heads,
            favor_bench::measure::human_time(p.median_s),
            p.ratio,
            mib(p.call_heap_bytes),
            mib(p.tensor_bytes)
        );
    }
    Ok(())
}

fn serve_cmd(a: ServeArgs) -> Result<()> {
    let cfg = favor_bench::serve::ServeConfig {
        backend: a.backend,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        d: a.d,
        m: a.m,
        slots: a.slots,
        prompt: a.prompt,
        steps: a.steps,
    };
    println!(
        "{} heads={} kv_heads={} d={} m={} f32, prompt {} tokens per slot, median of {} one-token steps",
        cfg.backend, cfg.heads, cfg.kv_heads, cfg.d, cfg.m, cfg.prompt, cfg.steps
    );
    println!(
        "{:>6} {:>10} {:>10} {:>12} {:>12} {:>14}",
        "slots", "prefill", "step", "tokens/s", "allocs/step", "step heap KiB"
    );
    for p in favor_bench::serve::run(&cfg)? {
        println!(
            "{:>6} {:>10} {:>10} {:>12.0} {:>12} {:>14.1}",
            p.slots,
            favor_bench::measure::human_time(p.prefill_s),
            favor_bench::measure::human_time(p.step_s),
            p.tokens_per_s,
            p.allocations,
            p.step_heap_bytes as f64 / 1024.0
        );
    }
    Ok(())
}

fn run_cmd(a: RunCmdArgs) -> Result<()> {
    let args = RunArgs {
        q: a.q,
        k: a.k,
        v: a.v,
        w: a.w,
        mask: a.mask,
        dout: a.dout,
        backend: a.backend,
        map: a.map,
        direction: workload::parse_direction(&a.direction)?,
        m: a.m,
        seed: a.seed,
        out_dir: a.out_dir,
    };
    let r = runcmd::run(&args)?;
    eprintln!("run: backend {}, shape {:?}", r.backend, r.shape);
    print_files(&r.files);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global()
    {
        eprintln!("error: cannot set {n} threads: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Curves(a) => curves_cmd(a),
        Command::Accuracy(a) => accuracy_cmd(a),
        Command::Roofline(a) => roofline_cmd(a),
        Command::Profile(a) => profile_cmd(a),
        Command::Run(a) => run_cmd(a),
        Command::Layouts(a) => layouts_cmd(a),
        Command::Groups(a) => groups_cmd(a),
        Command::Serve(a) => serve_cmd(a),
        Command::Backends => {
            for id in backends::available() {
                let name = backends::open(&id).map_or_else(|e| format!("unavailable: {e}"), |b| b.name());
                println!("{id:<16} {name}");
            }
            match backends::cuda_status() {
                Ok(dev) => println!("GPU (cuda):      {dev}"),
                Err(why) => println!("GPU (cuda):      not available: {why}"),
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
