//! `curves`: the paper's Figure 3 on CPU and GPU. Time and peak memory versus sequence length
//! for FAVOR+ (bidirectional and causal, on every backend given), exact softmax attention (gemm,
//! scores materialised) and the identity "X (OPT)" line, forward and forward + backward, at the
//! paper's "Small" (1 head, d = 64) and "Regular" (8 heads, d = 64) attention settings. GPU
//! backends are timed device-resident (see [`crate::workload::time_method`]).

use std::path::{Path, PathBuf};

use favor_core::{AttentionShape, Direction};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backends::Backend;
use crate::error::{Context, Result};
use crate::measure::{self, Sample};
use crate::meta::RunInfo;
use crate::plot::{Figure, Panel, Series};
use crate::records::{Csv, Json, JsonExt};
use crate::workload::{self, Buffers, FavorConfig, Method, Pass};

/// A model setting of the paper's appendix (attention part only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// "small" or "regular".
    pub name: &'static str,
    /// Heads.
    pub heads: usize,
    /// Head dimension (d = d_v).
    pub d: usize,
}

impl Setting {
    /// (n_heads, d) = (1, 64).
    pub const SMALL: Setting = Setting { name: "small", heads: 1, d: 64 };
    /// (n_heads, d) = (8, 64): model width 512.
    pub const REGULAR: Setting = Setting { name: "regular", heads: 8, d: 64 };

    /// Parses "small" / "regular".
    pub fn parse(s: &str) -> Option<Setting> {
        match s {
            "small" => Some(Self::SMALL),
            "regular" => Some(Self::REGULAR),
            _ => None,
        }
    }
}

/// What to run.
#[derive(Debug)]
pub struct CurvesConfig {
    /// FAVOR backends to time (the reference only up to `reference_max_len`).
    pub backends: Vec<Backend>,
    /// Sequence lengths, ascending.
    pub lens: Vec<usize>,
    /// Settings.
    pub settings: Vec<Setting>,
    /// Passes.
    pub passes: Vec<Pass>,
    /// Batch size.
    pub batch: usize,
    /// Random features m.
    pub m: usize,
    /// Timed calls per point (at most).
    pub repeats: usize,
    /// A method's sweep stops before a point whose single call is predicted to take longer.
    pub max_point_s: f64,
    /// Points predicted to need more heap than this are refused.
    pub memory_budget: usize,
    /// Largest L timed on the reference backend.
    pub reference_max_len: usize,
    /// Include exact softmax attention.
    pub softmax: bool,
    /// Include the identity line.
    pub identity: bool,
    /// Folder for CSV, JSON and plots.
    pub out_dir: PathBuf,
    /// Seed of inputs and projection.
    pub seed: u64,
}

/// One measured or skipped point.
#[derive(Debug, Clone)]
pub struct Point {
    /// Setting.
    pub setting: Setting,
    /// Method label.
    pub method: String,
    /// Pass.
    pub pass: Pass,
    /// Sequence length.
    pub len: usize,
    /// Timing, or why the point was not run.
    pub result: std::result::Result<Sample, String>,
    /// Credited flops per call.
    pub flops: f64,
    /// Bytes of inputs, outputs (and gradients).
    pub io_bytes: usize,
    /// Predicted peak bytes.
    pub predicted_bytes: usize,
    /// Colour slot for plots (one per method).
    pub color: usize,
}

fn methods(backends: &[Backend], cfg: &CurvesConfig) -> Vec<Method> {
    let mut v = Vec::new();
    for b in 0..backends.len() {
        v.push(Method::Favor { backend: b, direction: Direction::Bidirectional });
        v.push(Method::Favor { backend: b, direction: Direction::Causal });
    }
    if cfg.softmax {
        v.push(Method::Softmax);
    }
    if cfg.identity {
        v.push(Method::Identity);
    }
    v
}

/// Runs the sweep, writes `curves.csv`, `curves.json` and the plots into `cfg.out_dir`, and
/// returns the points and the files written.
pub fn run(cfg: &CurvesConfig) -> Result<(Vec<Point>, Vec<PathBuf>)> {
    // Each of these would give a table with no measurement in it and exit as if it had worked.
    if cfg.lens.is_empty() || cfg.settings.is_empty() || cfg.passes.is_empty() || methods(&cfg.backends, cfg).is_empty()
    {
        crate::bail!("curves: nothing to measure (no lengths, settings, passes or methods)");
    }
    if cfg.repeats == 0 || !(cfg.max_point_s.is_finite() && cfg.max_point_s > 0.0) || cfg.memory_budget == 0 {
        crate::bail!(
            "curves: repeats ({}), the per-call budget ({} s) and the memory budget ({} bytes) must be above 0",
            cfg.repeats,
            cfg.max_point_s,
            cfg.memory_budget
        );
    }
    std::fs::create_dir_all(&cfg.out_dir).context(cfg.out_dir.display())?;
    let mut info = RunInfo::collect_for(&cfg.backends);
    let cpu = crate::meta::CpuShare::start();
    let methods = methods(&cfg.backends, cfg);
    let total = cfg.settings.len() * cfg.passes.len() * methods.len() * cfg.lens.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut points = Vec::new();
    for &setting in &cfg.settings {
        let favor = FavorConfig::positive(cfg.m, setting.d, cfg.seed)?;
        for &pass in &cfg.passes {
            for (color, &method) in methods.iter().enumerate() {
                let label = method.label(&cfg.backends);
                let mut last: Option<(usize, f64)> = None;
                let mut stopped: Option<String> = None;
                for &len in &cfg.lens {
                    bar.set_message(format!("{} {} {} L={len}", setting.name, pass.name(), label));
                    let shape = AttentionShape::new(cfg.batch, setting.heads, len, setting.d);
                    let predicted = workload::predicted_bytes(method, &cfg.backends, shape, cfg.m, pass);
                    let mut point = Point {
                        setting,
                        method: label.clone(),
                        pass,
                        len,
                        result: Err(String::new()),
                        flops: method.flops(shape, cfg.m, pass),
                        io_bytes: Buffers::io_bytes(shape, pass),
                        predicted_bytes: predicted,
                        color,
                    };
                    let is_ref =
                        matches!(method, Method::Favor { backend, .. } if cfg.backends[backend].is_reference());
                    let skip = if let Some(why) = &stopped {
                        Some(why.clone())
                    } else if is_ref && len > cfg.reference_max_len {
                        Some(format!("reference backend timed only at L ≤ {}", cfg.reference_max_len))
                    } else if predicted > cfg.memory_budget {
                        Some(format!(
                            "predicted memory {} > budget {}",
                            measure::human_bytes(predicted),
                            measure::human_bytes(cfg.memory_budget)
                        ))
                    } else if let Some((l0, t0)) = last
                        && t0 * (len as f64 / l0 as f64).powf(method.time_exponent()) > cfg.max_point_s
                    {
                        let t = t0 * (len as f64 / l0 as f64).powf(method.time_exponent());
                        Some(format!("predicted {:.1} s per call > time budget {:.1} s", t, cfg.max_point_s))
                    } else {
                        None
                    };
                    if let Some(why) = skip {
                        // Larger L only get slower and bigger: stop the sweep of this method here.
                        stopped.get_or_insert(why.clone());
                        point.result = Err(why);
                    } else {
                        let sample = workload::time_method(
                            method,
                            &cfg.backends,
                            &favor,
                            shape,
                            pass,
                            cfg.seed,
                            cfg.repeats,
                            cfg.max_point_s,
                        );
                        match sample {
                            Ok(s) => {
                                last = Some((len, s.median));
                                point.result = Ok(s);
                            }
                            Err(e) => {
                                stopped = Some(format!("error at L = {len}: {e}"));
                                point.result = Err(e.to_string());
                            }
                        }
                    }
                    if let Ok(s) = &point.result {
                        let line = format!(
                            "{:<8} {:<17} {:<44} L={:<6} {:>10}  {:>10}",
                            setting.name,
                            pass.name(),
                            label,
                            len,
                            measure::human_time(s.median),
                            measure::human_bytes(s.peak_bytes)
                        );
                        bar.suspend(|| println!("{line}"));
                    }
                    points.push(point);
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    info.cpu_share = cpu.share();
    if let Some(w) = cpu.warning() {
        eprintln!("{w}");
    }
    let files = write_outputs(cfg, &info, &points)?;
    Ok((points, files))
}

fn write_outputs(cfg: &CurvesConfig, info: &RunInfo, points: &[Point]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut csv = Csv::new(&[
        "setting",
        "heads",
        "d",
        "batch",
        "m",
        "method",
        "pass",
        "len",
        "status",
        "median_s",
        "min_s",
        "max_s",
        "repeats",
        "tokens_per_s",
        "gflops_per_s",
        "peak_bytes",
        "io_bytes",
        "predicted_bytes",
    ]);
    let mut json_points = Vec::new();
    for p in points {
        let (status, s) = match &p.result {
            Ok(s) => ("ok".to_string(), Some(s)),
            Err(why) => (format!("skipped: {why}"), None),
        };
        let f = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.6e}"));
        let tokens = s.map(|s| (cfg.batch * p.len) as f64 / s.median);
        let gflops = s.filter(|_| p.flops > 0.0).map(|s| p.flops / s.median / 1e9);
        csv.push(vec![
            p.setting.name.into(),
            p.setting.heads.to_string(),
            p.setting.d.to_string(),
            cfg.batch.to_string(),
            cfg.m.to_string(),
            p.method.clone(),
            p.pass.name().into(),
            p.len.to_string(),
            status.clone(),
            f(s.map(|s| s.median)),
            f(s.map(|s| s.min)),
            f(s.map(|s| s.max)),
            s.map_or(String::new(), |s| s.repeats.to_string()),
            f(tokens),
            f(gflops),
            s.map_or(String::new(), |s| s.peak_bytes.to_string()),
            p.io_bytes.to_string(),
            p.predicted_bytes.to_string(),
        ]);
        json_points.push(Json::obj(vec![
            ("setting", Json::str(p.setting.name)),
            ("heads", Json::num(p.setting.heads as f64)),
            ("d", Json::num(p.setting.d as f64)),
            ("method", Json::str(&p.method)),
            ("pass", Json::str(p.pass.name())),
            ("len", Json::num(p.len as f64)),
            ("status", Json::str(status)),
            ("median_s", Json::opt(s.map(|s| s.median))),
            ("min_s", Json::opt(s.map(|s| s.min))),
            ("max_s", Json::opt(s.map(|s| s.max))),
            ("repeats", Json::opt(s.map(|s| s.repeats as f64))),
            ("tokens_per_s", Json::opt(tokens)),
            ("gflops_per_s", Json::opt(gflops)),
            ("peak_bytes", Json::opt(s.map(|s| s.peak_bytes as f64))),
            ("io_bytes", Json::num(p.io_bytes as f64)),
            ("predicted_bytes", Json::num(p.predicted_bytes as f64)),
        ]));
    }
    let comment = format!(
        "{}# batch: {}, m: {}, dtype: f32, feature map: positive (orthogonal), memory budget: {} bytes\n",
        info.csv_comment(),
        cfg.batch,
        cfg.m,
        cfg.memory_budget
    );
    let csv_path = cfg.out_dir.join("curves.csv");
    std::fs::write(&csv_path, csv.render(&comment)).context(csv_path.display())?;
    files.push(csv_path);
    let json = Json::obj(vec![
        ("info", info.json()),
        (
            "config",
            Json::obj(vec![
                ("batch", Json::num(cfg.batch as f64)),
                ("m", Json::num(cfg.m as f64)),
                ("dtype", Json::str("f32")),
                ("feature_map", Json::str("positive, orthogonal projection")),
                ("repeats", Json::num(cfg.repeats as f64)),
                ("max_point_s", Json::num(cfg.max_point_s)),
                ("memory_budget_bytes", Json::num(cfg.memory_budget as f64)),
                ("lens", Json::Array(cfg.lens.iter().map(|&l| Json::num(l as f64)).collect())),
            ]),
        ),
        ("points", Json::Array(json_points)),
    ]);
    let json_path = cfg.out_dir.join("curves.json");
    std::fs::write(&json_path, json.pretty()).context(json_path.display())?;
    files.push(json_path);
    for setting in &cfg.settings {
        for (what, stem) in [("time", "time"), ("memory", "memory")] {
            let fig = figure(cfg, info, points, *setting, what);
            files.extend(crate::plot::save(&fig, &cfg.out_dir.join(format!("curves-{}-{stem}", setting.name)))?);
        }
    }
    Ok(files)
}

fn figure(cfg: &CurvesConfig, info: &RunInfo, points: &[Point], setting: Setting, what: &str) -> Figure {
    let panels = cfg
        .passes
        .iter()
        .map(|&pass| {
            let mut series: Vec<Series> = Vec::new();
            for p in points.iter().filter(|p| p.setting == setting && p.pass == pass) {
                let Ok(s) = &p.result else { continue };
                let y = if what == "time" { s.median } else { s.peak_bytes as f64 / (1u64 << 20) as f64 };
                match series.iter_mut().find(|x| x.label == p.method) {
                    Some(x) => x.points.push((p.len as f64, y)),
                    None => series.push(Series {
                        label: p.method.clone(),
                        points: vec![(p.len as f64, y)],
                        markers: true,
                        color: p.color,
                        band: (what == "time").then(Vec::new),
                        ..Series::default()
                    }),
                }
                if what == "time"
                    && let Some(b) = series.iter_mut().find(|x| x.label == p.method).and_then(|x| x.band.as_mut())
                {
                    b.push((p.len as f64, s.min, s.max));
                }
            }
            if what == "time" {
                add_guides(&mut series);
            }
            Panel {
                title: format!(
                    "{} {} ({}: H={}, d={}, B={}, m={})",
                    pass.name(),
                    if what == "time" { "time" } else { "peak memory" },
                    setting.name,
                    setting.heads,
                    setting.d,
                    cfg.batch,
                    cfg.m
                ),
                x_label: "sequence length L".into(),
                y_label: if what == "time" {
                    "seconds per call (median; band min-max)".into()
                } else {
                    "peak MiB (heap; device memory for GPU lines)".into()
                },
                log_x: true,
                log2_x: true,
                log_y: true,
                series,
                legend: crate::plot::Corner::LowerRight,
            }
        })
        .collect();
    Figure { panels, caption: info.caption() }
}

/// Dashed "∝ L" and "∝ L²" guides over the L range of the first FAVOR+ line and of the softmax
/// line, through their first point (shifted by 2× so they do not hide the data), to read the
/// slopes by eye.
fn add_guides(series: &mut Vec<Series>) {
    let span = |prefix: &str| {
        series.iter().find(|s| s.label.starts_with(prefix)).and_then(|s| Some((*s.points.first()?, s.points.last()?.0)))
    };
    let mut guides = Vec::new();
    for (prefix, power, shift, label) in [("favor+", 1, 0.5, "∝ L (guide)"), ("softmax", 2, 2.0, "∝ L² (guide)")] {
        if let Some(((x0, y0), x1)) = span(prefix)
            && x1 > x0
        {
            let y = |x: f64| shift * y0 * (x / x0).powi(power);
            guides.push(Series {
                label: label.into(),
                points: vec![(x0, y(x0)), (x1, y(x1))],
                dashed: true,
                color: 7,
                ..Series::default()
            });
        }
    }
    series.extend(guides);
}

/// Points of one method and pass, for tests and summaries.
pub fn measured<'a>(points: &'a [Point], setting: &str, method_prefix: &str, pass: Pass) -> Vec<(usize, &'a Sample)> {
    points
        .iter()
        .filter(|p| p.setting.name == setting && p.method.starts_with(method_prefix) && p.pass == pass)
        .filter_map(|p| p.result.as_ref().ok().map(|s| (p.len, s)))
        .collect()
}

/// The default output folder.
pub fn default_out_dir() -> &'static Path {
    Path::new("results")
}
