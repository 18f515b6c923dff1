//! `roofline`: this machine's ceilings measured in the same process on the same rayon threads
//! (f32 GEMM with the `gemm` crate at a large square size, memory bandwidth with a parallel copy),
//! then each favor kernel's achieved rate as a fraction of them. With the defaults this is the
//! CPU roofline benchmark: batch 1, heads 8, d = d_v = 64, m = 256, L ∈ {1024, 4096, 16384,
//! 65536}, f32, bidirectional and causal, forward and forward + backward, the unfused
//! φ-materialised FAVOR+ built from the same GEMM, and peak heap memory against the bytes of
//! inputs + outputs (+ gradients).
//!
//! A GPU backend gets its own ceilings, measured on its device: device-to-device copy bandwidth
//! and the bf16 matrix rate of cuBLAS (when libcublas is installed; otherwise the table says why
//! it is not measured). Its kernels run device-resident (no host↔device copies in the timings)
//! and their fractions refer to those ceilings; peak memory is then device memory.

use std::path::PathBuf;
use std::time::Instant;

use favor_core::{AttentionShape, Direction};
use rayon::prelude::*;

use crate::backends::{Backend, ResidentAttention};
use crate::baselines::{self, MatRef};
use crate::error::{Context, Result};
use crate::measure::{self, Sample};
use crate::meta::RunInfo;
use crate::records::{Csv, Json, JsonExt};
use crate::workload::{self, Buffers, FavorConfig, Method, Pass};

/// What to run.
#[derive(Debug)]
pub struct RooflineConfig {
    /// FAVOR backends to measure (the reference only up to `reference_max_len`).
    pub backends: Vec<Backend>,
    /// Sequence lengths.
    pub lens: Vec<usize>,
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// d = d_v.
    pub d: usize,
    /// Random features.
    pub m: usize,
    /// Square GEMM size for the CPU ceiling.
    pub gemm_size: usize,
    /// Square bf16 GEMM size for a GPU's matrix ceiling.
    pub device_gemm_size: usize,
    /// Bytes copied by the bandwidth probe.
    pub stream_bytes: usize,
    /// Timed calls per point.
    pub repeats: usize,
    /// Also time forward + backward.
    pub backward: bool,
    /// Include the unfused GEMM line.
    pub unfused: bool,
    /// Largest L timed on the reference backend.
    pub reference_max_len: usize,
    /// Output folder.
    pub out_dir: PathBuf,
}

/// The machine's ceilings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ceilings {
    /// f32 GEMM GFLOP/s on the rayon pool's threads.
    pub gemm_gflops: f64,
    /// f32 GEMM GFLOP/s on one thread.
    pub gemm_gflops_1t: f64,
    /// Copy bandwidth, GB/s, counting bytes read + written.
    pub copy_gbs: f64,
}

/// One kernel measurement.
#[derive(Debug, Clone)]
pub struct KernelPoint {
    /// Method label.
    pub method: String,
    /// Pass.
    pub pass: Pass,
    /// L.
    pub len: usize,
    /// Timing and memory.
    pub sample: Sample,
    /// Credited flops.
    pub flops: f64,
    /// Inputs + outputs (+ gradients) bytes.
    pub io_bytes: usize,
    /// The matrix rate (GFLOP/s) this kernel is compared with: f32 GEMM on the CPU, bf16 cuBLAS
    /// on a GPU (None when not measured).
    pub gemm_ceiling: Option<f64>,
    /// The copy bandwidth (GB/s) this kernel is compared with (None when not measured).
    pub copy_ceiling: Option<f64>,
}

impl KernelPoint {
    /// GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.flops / self.sample.median / 1e9
    }

    /// Inputs + outputs (+ gradients) GB/s: the rate a memory-bound kernel could at best reach.
    pub fn io_gbs(&self) -> f64 {
        self.io_bytes as f64 / self.sample.median / 1e9
    }

    /// Fraction of the matrix ceiling.
    pub fn of_gemm(&self) -> Option<f64> {
        self.gemm_ceiling.map(|c| self.gflops() / c)
    }

    /// Fraction of the copy ceiling.
    pub fn of_copy(&self) -> Option<f64> {
        self.copy_ceiling.map(|c| self.io_gbs() / c)
    }
}

/// A GPU backend's ceilings, measured on its device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCeilings {
    /// The device and driver.
    pub device: String,
    /// Device-to-device copy GB/s (read + write), or why not measured.
    pub copy_gbs: std::result::Result<f64, String>,
    /// bf16 GEMM GFLOP/s (cuBLAS, fp32 accumulation), or why not measured.
    pub matrix_gflops: std::result::Result<f64, String>,
}

/// Measures the ceilings of a resident (GPU) backend.
pub fn device_ceilings(dev: &dyn ResidentAttention, gemm_size: usize, copy_bytes: usize) -> DeviceCeilings {
    DeviceCeilings {
        device: dev.device().to_string(),
        copy_gbs: dev.copy_gbs(copy_bytes),
        matrix_gflops: dev.matrix_gflops(gemm_size),
    }
}

fn print_device_ceilings(d: &DeviceCeilings, gemm_size: usize, copy_bytes: usize) {
    let copy = match &d.copy_gbs {
        Ok(g) => format!("device copy {g:.1} GB/s (read+write, {})", measure::human_bytes(copy_bytes)),
        Err(why) => format!("device copy not measured: {why}"),
    };
    let matrix = match &d.matrix_gflops {
        Ok(g) => format!("bf16 GEMM {n}x{n}x{n} (cuBLAS, fp32 accumulation) {g:.1} GFLOP/s", n = gemm_size),
        Err(why) => format!("bf16 matrix ceiling not measured: {why}"),
    };
    println!("ceilings of {}: {copy}; {matrix}", d.device);
}

/// GEMM GFLOP/s of an n×n×n f32 product, best of a few runs, with `par`.
pub fn gemm_gflops(n: usize, par: gemm::Parallelism) -> f64 {
    let a = workload::gaussian(n * n, 1, 1.0);
    let b = workload::gaussian(n * n, 2, 1.0);
    let mut c = vec![0.0f32; n * n];
    let flops = 2.0 * (n as f64).powi(3);
    let mut best = f64::INFINITY;
    let mut spent = 0.0;
    let mut runs = 0;
    while runs < 3 || (runs < 10 && spent < 2.0) {
        let t = Instant::now();
        baselines::matmul(&mut c, MatRef::row_major(&a, n, n), MatRef::row_major(&b, n, n), 1.0, false, par);
        let dt = t.elapsed().as_secs_f64();
        best = best.min(dt);
        spent += dt;
        runs += 1;
    }
    std::hint::black_box(&c);
    flops / best / 1e9
}

/// Copy bandwidth (GB/s, read + write bytes) of a parallel copy of `bytes`, best of 5.
pub fn copy_gbs(bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = (n / (4 * rayon::current_num_threads().max(1))).max(1 << 14);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    2.0 * bytes as f64 / best / 1e9
}

/// Measures the ceilings.
pub fn ceilings(gemm_size: usize, stream_bytes: usize) -> Ceilings {
    Ceilings {
        gemm_gflops: gemm_gflops(gemm_size, baselines::parallelism()),
        gemm_gflops_1t: gemm_gflops(gemm_size, gemm::Parallelism::None),
        copy_gbs: copy_gbs(stream_bytes),
    }
}

/// The methods (with whether each is the reference backend) and passes of a run.
fn plan(cfg: &RooflineConfig) -> (Vec<(Method, bool)>, Vec<Pass>) {
    let mut methods = Vec::new();
    for (b, backend) in cfg.backends.iter().enumerate() {
        for direction in [Direction::Bidirectional, Direction::Causal] {
            methods.push((Method::Favor { backend: b, direction }, backend.is_reference()));
        }
    }
    if cfg.unfused {
        methods.push((Method::UnfusedFavor, false));
    }
    let mut passes = vec![Pass::Forward];
    if cfg.backward {
        passes.push(Pass::ForwardBackward);
    }
    (methods, passes)
}

/// Checks the configuration before anything is allocated: at least one length and repeat, and
/// every buffer (the ceilings' probes, every point's inputs, outputs and scratch) within the
/// memory available.
fn check(cfg: &RooflineConfig) -> Result<()> {
    use crate::limits::{bytes_of, check_available};
    if cfg.lens.is_empty() || cfg.repeats == 0 || cfg.gemm_size == 0 || cfg.stream_bytes == 0 {
        crate::bail!(
            "roofline: lengths, repeats, the GEMM size and the copy size must all be at least 1 \
             (got {} lengths, {} repeats, GEMM size {}, copy {} bytes)",
            cfg.lens.len(),
            cfg.repeats,
            cfg.gemm_size,
            cfg.stream_bytes
        );
    }
    let n = cfg.gemm_size;
    check_available(format!("roofline: the {n}x{n} f32 GEMM probe (three matrices)"), bytes_of(&[3, n, n], 4))?;
    check_available(
        format!("roofline: the copy probe of {} (source and destination)", measure::human_bytes(cfg.stream_bytes)),
        bytes_of(&[2, cfg.stream_bytes], 1),
    )?;
    let (methods, passes) = plan(cfg);
    for &(method, is_ref) in &methods {
        for &pass in &passes {
            for &len in cfg.lens.iter().filter(|&&l| method.supports(pass) && !(is_ref && l > cfg.reference_max_len)) {
                let shape = AttentionShape::new(cfg.batch, cfg.heads, len, cfg.d);
                let need = workload::predicted_bytes(method, &cfg.backends, shape, cfg.m, pass);
                // For a device backend this bounds the host copies of its inputs (its scratch is
                // on the device, which reports its own allocation failures).
                check_available(
                    format!(
                        "roofline: {} {} at L = {len} (batch {}, heads {}, d {}, m {})",
                        method.label(&cfg.backends),
                        pass.name(),
                        cfg.batch,
                        cfg.heads,
                        cfg.d,
                        cfg.m
                    ),
                    (need < usize::MAX).then_some(need as u128),
                )?;
            }
        }
    }
    Ok(())
}

/// Runs the benchmark, prints the table, writes `roofline.csv` and `roofline.json`.
pub fn run(cfg: &RooflineConfig) -> Result<(Ceilings, Vec<KernelPoint>, Vec<PathBuf>)> {
    check(cfg)?;
    std::fs::create_dir_all(&cfg.out_dir).context(cfg.out_dir.display())?;
    let mut info = RunInfo::collect_for(&cfg.backends);
    let cpu = crate::meta::CpuShare::start();
    eprintln!("measuring ceilings on {} rayon threads ...", rayon::current_num_threads());
    let c = ceilings(cfg.gemm_size, cfg.stream_bytes);
    println!(
        "ceilings: f32 GEMM {n}x{n}x{n} (gemm crate) {:.1} GFLOP/s on {} threads ({:.1} on 1 thread); copy {:.1} GB/s (read+write)",
        c.gemm_gflops,
        rayon::current_num_threads(),
        c.gemm_gflops_1t,
        c.copy_gbs,
        n = cfg.gemm_size
    );
    // Per backend: the ceilings its kernels are compared with.
    let mut device = Vec::new();
    let per_backend: Vec<(Option<f64>, Option<f64>)> = cfg
        .backends
        .iter()
        .map(|b| match b.imp.resident() {
            None => (Some(c.gemm_gflops), Some(c.copy_gbs)),
            Some(dev) => {
                eprintln!("measuring the ceilings of {} ...", dev.device());
                let d = device_ceilings(dev, cfg.device_gemm_size, cfg.stream_bytes);
                print_device_ceilings(&d, cfg.device_gemm_size, cfg.stream_bytes);
                let r = (d.matrix_gflops.clone().ok(), d.copy_gbs.clone().ok());
                device.push(d);
                r
            }
        })
        .collect();
    let favor = FavorConfig::positive(cfg.m, cfg.d, 1)?;
    let (methods, passes) = plan(cfg);
    println!(
        "{:<44} {:<17} {:>6} {:>10} {:>9} {:>8} {:>9} {:>10} {:>10} {:>6}",
        "kernel", "pass", "L", "median", "GFLOP/s", "of GEMM", "GB/s min", "of copy", "peak mem", "/ io"
    );
    let mut points = Vec::new();
    for &(method, is_ref) in &methods {
        for &pass in &passes {
            if !method.supports(pass) {
                continue;
            }
            for &len in &cfg.lens {
                if is_ref && len > cfg.reference_max_len {
                    continue;
                }
                let shape = AttentionShape::new(cfg.batch, cfg.heads, len, cfg.d);
                let sample = workload::time_method(method, &cfg.backends, &favor, shape, pass, 7, cfg.repeats, 30.0)?;
                let (gemm_ceiling, copy_ceiling) = match method {
                    Method::Favor { backend, .. } => per_backend[backend],
                    _ => (Some(c.gemm_gflops), Some(c.copy_gbs)),
                };
                let p = KernelPoint {
                    gemm_ceiling,
                    copy_ceiling,
                    method: method.label(&cfg.backends),
                    pass,
                    len,
                    flops: method.flops(shape, cfg.m, pass),
                    io_bytes: Buffers::io_bytes(shape, pass),
                    sample,
                };
                let percent = |f: Option<f64>| f.map_or_else(|| "n/a".to_string(), |f| format!("{:.1}%", 100.0 * f));
                println!(
                    "{:<44} {:<17} {:>6} {:>10} {:>9.1} {:>8} {:>9.1} {:>10} {:>10} {:>6.2}",
                    p.method,
                    pass.name(),
                    len,
                    measure::human_time(p.sample.median),
                    p.gflops(),
                    percent(p.of_gemm()),
                    p.io_gbs(),
                    percent(p.of_copy()),
                    measure::human_bytes(p.sample.peak_bytes),
                    p.sample.peak_bytes as f64 / p.io_bytes as f64
                );
                points.push(p);
            }
        }
    }
    info.cpu_share = cpu.share();
    if let Some(w) = cpu.warning() {
        eprintln!("{w}");
    }
    let files = write_outputs(cfg, &info, &c, &device, &points)?;
    Ok((c, points, files))
}

fn write_outputs(
    cfg: &RooflineConfig,
    info: &RunInfo,
    c: &Ceilings,
    device: &[DeviceCeilings],
    points: &[KernelPoint],
) -> Result<Vec<PathBuf>> {
    let shown = |r: &std::result::Result<f64, String>| match r {
        Ok(v) => format!("{v:.3}"),
        Err(why) => format!("not measured ({why})"),
    };
    let device_lines: String = device
        .iter()
        .map(|d| {
            format!(
                "# device: {}, device_copy_gbs: {}, device_bf16_gemm_gflops: {} (size {})\n",
                d.device,
                shown(&d.copy_gbs),
                shown(&d.matrix_gflops),
                cfg.device_gemm_size
            )
        })
        .collect();
    let comment = format!(
        "{}{device_lines}# gemm_gflops: {:.3}, gemm_gflops_1thread: {:.3}, copy_gbs: {:.3}, gemm size: {}, batch: {}, heads: {}, d: {}, m: {}, dtype: f32\n\
         # flops credited: favor forward 8*B*H*L*d*m (bidirectional and causal), forward+backward 24*B*H*L*d*m\n\
         # fractions of GPU kernels refer to their device's ceilings (empty when not measured)\n",
        info.csv_comment(),
        c.gemm_gflops,
        c.gemm_gflops_1t,
        c.copy_gbs,
        cfg.gemm_size,
        cfg.batch,
        cfg.heads,
        cfg.d,
        cfg.m
    );
    let mut csv = Csv::new(&[
        "method",
        "pass",
        "len",
        "median_s",
        "min_s",
        "max_s",
        "repeats",
        "gflops_per_s",
        "fraction_of_gemm",
        "io_gb_per_s",
        "fraction_of_copy",
        "peak_bytes",
        "io_bytes",
        "peak_over_io",
    ]);
    let mut jp = Vec::new();
    for p in points {
        let vals = [
            Some(p.sample.median),
            Some(p.sample.min),
            Some(p.sample.max),
            Some(p.sample.repeats as f64),
            Some(p.gflops()),
            p.of_gemm(),
            Some(p.io_gbs()),
            p.of_copy(),
            Some(p.sample.peak_bytes as f64),
            Some(p.io_bytes as f64),
            Some(p.sample.peak_bytes as f64 / p.io_bytes as f64),
        ];
        let mut row = vec![p.method.clone(), p.pass.name().into(), p.len.to_string()];
        row.extend(vals.iter().map(|v| v.map_or(String::new(), |v| format!("{v:.6e}"))));
        csv.push(row);
        let names = [
            "median_s",
            "min_s",
            "max_s",
            "repeats",
            "gflops_per_s",
            "fraction_of_gemm",
            "io_gb_per_s",
            "fraction_of_copy",
            "peak_bytes",
            "io_bytes",
            "peak_over_io",
        ];
        let mut obj = vec![
            ("method", Json::str(&p.method)),
            ("pass", Json::str(p.pass.name())),
            ("len", Json::num(p.len as f64)),
        ];
        obj.extend(names.iter().zip(vals).map(|(n, v)| (*n, Json::opt(v))));
        jp.push(Json::obj(obj));
    }
    let csv_path = cfg.out_dir.join("roofline.csv");
    std::fs::write(&csv_path, csv.render(&comment)).context(csv_path.display())?;
    let json = Json::obj(vec![
        ("info", info.json()),
        (
            "ceilings",
            Json::obj(vec![
                ("gemm_gflops", Json::num(c.gemm_gflops)),
                ("gemm_gflops_1thread", Json::num(c.gemm_gflops_1t)),
                ("gemm_size", Json::num(cfg.gemm_size as f64)),
                ("copy_gbs", Json::num(c.copy_gbs)),
            ]),
        ),
        (
            "device_ceilings",
            Json::Array(
                device
                    .iter()
                    .map(|d| {
                        let val = |r: &std::result::Result<f64, String>| match r {
                            Ok(v) => Json::num(*v),
                            Err(why) => Json::str(format!("not measured: {why}")),
                        };
                        Json::obj(vec![
                            ("device", Json::str(&d.device)),
                            ("copy_gbs", val(&d.copy_gbs)),
                            ("bf16_gemm_gflops", val(&d.matrix_gflops)),
                            ("bf16_gemm_size", Json::num(cfg.device_gemm_size as f64)),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "config",
            Json::obj(vec![
                ("batch", Json::num(cfg.batch as f64)),
                ("heads", Json::num(cfg.heads as f64)),
                ("d", Json::num(cfg.d as f64)),
                ("m", Json::num(cfg.m as f64)),
                ("dtype", Json::str("f32")),
                ("flops_forward", Json::str("8*B*H*L*d*m")),
                ("flops_forward_backward", Json::str("24*B*H*L*d*m")),
            ]),
        ),
        ("kernels", Json::Array(jp)),
    ]);
    let json_path = cfg.out_dir.join("roofline.json");
    std::fs::write(&json_path, json.pretty()).context(json_path.display())?;
    Ok(vec![csv_path, json_path])
}
