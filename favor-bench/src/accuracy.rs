//! `accuracy`: the paper's Figure 4 (MSE of the attention output against exact softmax attention
//! versus the number of random features m: iid vs orthogonal projections, trigonometric vs
//! positive vs hyperbolic features, Gaussian inputs, standard-deviation bands over seeds) and a
//! Figure 2 style panel (MSE ratio trigonometric / positive and trigonometric / hyperbolic of the
//! softmax-kernel estimators versus the angle between x and y at |x| = |y| = 1, measured and
//! overlaid on the closed forms of the paper's Lemma 2).

use std::path::PathBuf;

use favor_core::{
    AttentionShape, Direction, FeatureMap, HostRef, Inputs, Problem, Projection, ProjectionConfig, ProjectionKind,
    reference,
};
use indicatif::ProgressBar;
use rayon::prelude::*;

use crate::backends::Backend;
use crate::error::{Context, Result};
use crate::meta::RunInfo;
use crate::plot::{Figure, Panel, Series};
use crate::records::{Csv, Json, JsonExt};
use crate::workload::gaussian;

/// What to run.
#[derive(Debug)]
pub struct AccuracyConfig {
    /// Backend computing FAVOR+ (the f64 reference by default: the estimator itself).
    pub backend: Backend,
    /// Sequence length.
    pub len: usize,
    /// Head dimension d (= d_v).
    pub d: usize,
    /// Standard deviation of the Gaussian Q and K entries (V is N(0, 1)).
    pub sigma: f32,
    /// Numbers of random features drawn.
    pub ms: Vec<usize>,
    /// Seeds (independent inputs and projections) per point.
    pub seeds: usize,
    /// Angles of the Figure 2 panel.
    pub angles: usize,
    /// Projection draws per angle.
    pub draws: usize,
    /// Output folder.
    pub out_dir: PathBuf,
}

/// One (map, projection kind, m) point of Figure 4.
#[derive(Debug, Clone, PartialEq)]
pub struct MsePoint {
    /// "positive", "trigonometric" or "hyperbolic".
    pub map: &'static str,
    /// "iid" or "orthogonal".
    pub kind: &'static str,
    /// Random features drawn.
    pub m: usize,
    /// Mean MSE over seeds.
    pub mean: f64,
    /// Standard deviation over seeds.
    pub std: f64,
}

/// One angle of the Figure 2 panel.
#[derive(Debug, Clone, PartialEq)]
pub struct AnglePoint {
    /// Angle φ between x and y.
    pub angle: f64,
    /// Measured MSE(trig) / MSE(positive).
    pub trig_over_pos: f64,
    /// Lemma 2's value.
    pub trig_over_pos_theory: f64,
    /// Measured MSE(trig) / MSE(hyperbolic).
    pub trig_over_hyp: f64,
    /// Lemma 2's value.
    pub trig_over_hyp_theory: f64,
}

const MAPS: [&str; 3] = ["positive", "trigonometric", "hyperbolic"];
const KINDS: [(&str, ProjectionKind); 2] = [("iid", ProjectionKind::Iid), ("orthogonal", ProjectionKind::Orthogonal)];

fn map_of(name: &str, p: Projection, epsilon: f32) -> FeatureMap {
    match name {
        "positive" => FeatureMap::Positive { projection: p, epsilon, softmax_scale: None },
        "hyperbolic" => FeatureMap::Hyperbolic { projection: p, epsilon, softmax_scale: None },
        _ => FeatureMap::trigonometric(p),
    }
}

/// Runs both experiments and writes CSV, JSON and plots; returns the points and files.
pub fn run(cfg: &AccuracyConfig) -> Result<(Vec<MsePoint>, Vec<AnglePoint>, Vec<PathBuf>)> {
    std::fs::create_dir_all(&cfg.out_dir).context(cfg.out_dir.display())?;
    let info = RunInfo::collect_for(std::slice::from_ref(&cfg.backend));
    let mse = figure4(cfg)?;
    let angles = figure2(cfg)?;
    let files = write_outputs(cfg, &info, &mse, &angles)?;
    Ok((mse, angles, files))
}

/// MSE of FAVOR+ against exact softmax for every (map, kind, m), mean and std over seeds.
pub fn figure4(cfg: &AccuracyConfig) -> Result<Vec<MsePoint>> {
    let shape = AttentionShape::new(1, 1, cfg.len, cfg.d);
    let bar = ProgressBar::new((cfg.seeds * (1 + MAPS.len() * KINDS.len() * cfg.ms.len())) as u64);
    // errors[seed][(map, kind, m)]
    let per_seed: Vec<Result<Vec<f64>>> = (0..cfg.seeds)
        .into_par_iter()
        .map(|seed| {
            let seed = seed as u64;
            let q = gaussian(shape.qk_len(), 1000 + 3 * seed, cfg.sigma);
            let k = gaussian(shape.qk_len(), 1001 + 3 * seed, cfg.sigma);
            let v = gaussian(shape.v_len(), 1002 + 3 * seed, 1.0);
            let inputs = Inputs { q: HostRef::from(&q), k: HostRef::from(&k), v: HostRef::from(&v), key_mask: None };
            let mut exact = vec![0.0f32; shape.v_len()];
            reference::softmax_attention(shape, Direction::Bidirectional, inputs, (&mut exact).into())?;
            bar.inc(1);
            let mut errs = Vec::new();
            for map in MAPS {
                for (_, kind) in KINDS {
                    for &m in &cfg.ms {
                        let p = Projection::draw(ProjectionConfig {
                            kind,
                            ..ProjectionConfig::new(m, cfg.d, 77 + seed * 7919 + m as u64)
                        })?;
                        // ε = 0: the plain estimator of the paper (the floor ε only matters in tails).
                        let fm = map_of(map, p, 0.0);
                        let mut out = vec![0.0f32; shape.v_len()];
                        cfg.backend.imp.forward(&Problem::new(shape, &fm), inputs, (&mut out).into())?;
                        let e = out.iter().zip(&exact).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>()
                            / out.len() as f64;
                        errs.push(e);
                        bar.inc(1);
                    }
                }
            }
            Ok(errs)
        })
        .collect();
    bar.finish_and_clear();
    let per_seed: Vec<Vec<f64>> = per_seed.into_iter().collect::<Result<_>>()?;
    let mut points = Vec::new();
    let mut idx = 0;
    for map in MAPS {
        for (kind, _) in KINDS {
            for &m in &cfg.ms {
                let vals: Vec<f64> = per_seed.iter().map(|e| e[idx]).collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (vals.len().max(2) - 1) as f64;
                points.push(MsePoint { map, kind, m, mean, std: var.sqrt() });
                idx += 1;
            }
        }
    }
    Ok(points)
}

/// Lemma 2 at |x| = |y| = 1 with angle φ: (MSE_trig/MSE_pos, MSE_trig/MSE_hyp), independent of m.
pub fn lemma2_ratios(angle: f64) -> (f64, f64) {
    let c = angle.cos();
    let sm = c.exp();
    let z2 = 2.0 + 2.0 * c; // ‖x + y‖²
    let d2 = 2.0 - 2.0 * c; // ‖x − y‖²
    let trig = 0.5 * z2.exp() / (sm * sm) * (1.0 - (-d2).exp()).powi(2);
    let pos = z2.exp() * sm * sm * (1.0 - (-z2).exp());
    let hyp = 0.5 * (1.0 - (-z2).exp()) * pos;
    (trig / pos, trig / hyp)
}

/// Measured MSE ratios of the kernel estimators φ(x)ᵀφ(y) (favor-core's feature maps, iid
/// projections, ε = 0, no stabiliser) over `cfg.draws` projections per angle.
pub fn figure2(cfg: &AccuracyConfig) -> Result<Vec<AnglePoint>> {
    let d = cfg.d.max(2);
    let m = 16;
    let projections: Vec<Projection> = (0..cfg.draws)
        .map(|r| Projection::draw(ProjectionConfig::new(m, d, 5000 + r as u64).iid()))
        .collect::<favor_core::Result<_>>()?;
    // The maps scale inputs by d^{-1/4}; feed d^{1/4}·x so that they see x itself.
    let up = (d as f64).powf(0.25);
    let angles: Vec<f64> = (0..cfg.angles)
        .map(|i| -std::f64::consts::PI + (i as f64 + 0.5) * 2.0 * std::f64::consts::PI / cfg.angles as f64)
        .collect();
    Ok(angles
        .par_iter()
        .map(|&angle| {
            let mut x = vec![0.0; d];
            let mut y = vec![0.0; d];
            x[0] = up;
            y[0] = up * angle.cos();
            y[1] = up * angle.sin();
            let sm = angle.cos().exp();
            let mut sq = [0.0f64; 3];
            for p in &projections {
                for (i, name) in MAPS.iter().enumerate() {
                    let fm = map_of(name, p.clone(), 0.0);
                    let mf = fm.feature_dim(d);
                    let (mut fx, mut fy) = (vec![0.0; mf], vec![0.0; mf]);
                    fm.features(&x, 0.0, &mut fx);
                    fm.features(&y, 0.0, &mut fy);
                    let est: f64 = fx.iter().zip(&fy).map(|(a, b)| a * b).sum();
                    sq[i] += (est - sm).powi(2);
                }
            }
            let (tp, th) = lemma2_ratios(angle);
            AnglePoint {
                angle,
                trig_over_pos: sq[1] / sq[0],
                trig_over_pos_theory: tp,
                trig_over_hyp: sq[1] / sq[2],
                trig_over_hyp_theory: th,
            }
        })
        .collect())
}

fn write_outputs(
    cfg: &AccuracyConfig,
    info: &RunInfo,
    mse: &[MsePoint],
    angles: &[AnglePoint],
) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let comment = format!(
        "{}# L: {}, d: {}, seeds: {}, inputs: Q, K iid N(0, {}^2), V iid N(0, 1), epsilon: 0, reference: exact softmax (f64)\n",
        info.csv_comment(),
        cfg.len,
        cfg.d,
        cfg.seeds,
        cfg.sigma
    );
    let mut csv = Csv::new(&["map", "projection", "m", "features", "mse_mean", "mse_std", "seeds", "len", "d"]);
    for p in mse {
        let features = if p.map == "positive" { p.m } else { 2 * p.m };
        csv.push(vec![
            p.map.into(),
            p.kind.into(),
            p.m.to_string(),
            features.to_string(),
            format!("{:.6e}", p.mean),
            format!("{:.6e}", p.std),
            cfg.seeds.to_string(),
            cfg.len.to_string(),
            cfg.d.to_string(),
        ]);
    }
    let path = cfg.out_dir.join("accuracy-mse.csv");
    std::fs::write(&path, csv.render(&comment)).context(path.display())?;
    files.push(path);
    let mut csv =
        Csv::new(&["angle", "trig_over_pos", "trig_over_pos_theory", "trig_over_hyp", "trig_over_hyp_theory"]);
    for a in angles {
        csv.push(
            [a.angle, a.trig_over_pos, a.trig_over_pos_theory, a.trig_over_hyp, a.trig_over_hyp_theory]
                .iter()
                .map(|x| format!("{x:.6e}"))
                .collect(),
        );
    }
    let comment2 = format!(
        "{}# |x| = |y| = 1, d: {}, iid projections, draws per angle: {} (m = 16 each)\n",
        info.csv_comment(),
        cfg.d.max(2),
        cfg.draws
    );
    let path = cfg.out_dir.join("accuracy-angle.csv");
    std::fs::write(&path, csv.render(&comment2)).context(path.display())?;
    files.push(path);
    let json = Json::obj(vec![
        ("info", info.json()),
        (
            "config",
            Json::obj(vec![
                ("len", Json::num(cfg.len as f64)),
                ("d", Json::num(cfg.d as f64)),
                ("sigma", Json::num(cfg.sigma)),
                ("seeds", Json::num(cfg.seeds as f64)),
                ("ms", Json::Array(cfg.ms.iter().map(|&m| Json::num(m as f64)).collect())),
                ("angles", Json::num(cfg.angles as f64)),
                ("draws", Json::num(cfg.draws as f64)),
            ]),
        ),
        (
            "mse",
            Json::Array(
                mse.iter()
                    .map(|p| {
                        Json::obj(vec![
                            ("map", Json::str(p.map)),
                            ("projection", Json::str(p.kind)),
                            ("m", Json::num(p.m as f64)),
                            ("mse_mean", Json::num(p.mean)),
                            ("mse_std", Json::num(p.std)),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "angle",
            Json::Array(
                angles
                    .iter()
                    .map(|a| {
                        Json::obj(vec![
                            ("angle", Json::num(a.angle)),
                            ("trig_over_pos", Json::num(a.trig_over_pos)),
                            ("trig_over_pos_theory", Json::num(a.trig_over_pos_theory)),
                            ("trig_over_hyp", Json::num(a.trig_over_hyp)),
                            ("trig_over_hyp_theory", Json::num(a.trig_over_hyp_theory)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ]);
    let path = cfg.out_dir.join("accuracy.json");
    std::fs::write(&path, json.pretty()).context(path.display())?;
    files.push(path);

    let series = |map: &str, kind: &str, color: usize| {
        let pts: Vec<&MsePoint> = mse.iter().filter(|p| p.map == map && p.kind == kind).collect();
        let label = if map == "positive" { format!("{map}, {kind}") } else { format!("{map} (2m features), {kind}") };
        Series {
            label,
            points: pts.iter().map(|p| (p.m as f64, p.mean)).collect(),
            band: Some(pts.iter().map(|p| (p.m as f64, p.mean - p.std, p.mean + p.std)).collect()),
            markers: true,
            dashed: kind == "iid",
            no_line: false,
            color,
        }
    };
    let panel = |title: &str, series: Vec<Series>| Panel {
        title: title.into(),
        x_label: "random features drawn, m".into(),
        y_label: "MSE of attention output (mean ± std)".into(),
        log_x: true,
        log2_x: true,
        log_y: true,
        series,
        legend: crate::plot::Corner::UpperRight,
    };
    let caption =
        format!("{}; L={}, d={}, Q,K ~ N(0,{}^2), {} seeds", info.caption(), cfg.len, cfg.d, cfg.sigma, cfg.seeds);
    let fig = Figure {
        panels: vec![
            panel(
                "iid (dashed) vs orthogonal (solid)",
                vec![
                    series("positive", "iid", 0),
                    series("positive", "orthogonal", 0),
                    series("trigonometric", "iid", 1),
                    series("trigonometric", "orthogonal", 1),
                ],
            ),
            panel(
                "trigonometric vs positive vs hyperbolic (orthogonal)",
                vec![
                    series("trigonometric", "orthogonal", 1),
                    series("positive", "orthogonal", 0),
                    series("hyperbolic", "orthogonal", 2),
                ],
            ),
        ],
        caption,
    };
    files.extend(crate::plot::save(&fig, &cfg.out_dir.join("accuracy-mse"))?);

    let fine: Vec<f64> = (0..400)
        .map(|i| -std::f64::consts::PI * 0.995 + i as f64 * 2.0 * 0.995 * std::f64::consts::PI / 399.0)
        .collect();
    let fig = Figure {
        panels: vec![Panel {
            title: "MSE ratio of softmax-kernel estimators, |x| = |y| = 1".into(),
            x_label: "angle between x and y (radians)".into(),
            y_label: "MSE ratio (independent of m)".into(),
            log_x: false,
            log2_x: false,
            log_y: true,
            series: vec![
                Series {
                    label: "trig / positive: Lemma 2".into(),
                    points: fine.iter().map(|&a| (a, lemma2_ratios(a).0)).collect(),
                    dashed: true,
                    color: 0,
                    ..Series::default()
                },
                Series {
                    label: "trig / positive: measured".into(),
                    points: angles.iter().map(|a| (a.angle, a.trig_over_pos)).collect(),
                    markers: true,
                    no_line: true,
                    color: 0,
                    ..Series::default()
                },
                Series {
                    label: "trig / hyperbolic: Lemma 2".into(),
                    points: fine.iter().map(|&a| (a, lemma2_ratios(a).1)).collect(),
                    dashed: true,
                    color: 2,
                    ..Series::default()
                },
                Series {
                    label: "trig / hyperbolic: measured".into(),
                    points: angles.iter().map(|a| (a.angle, a.trig_over_hyp)).collect(),
                    markers: true,
                    no_line: true,
                    color: 2,
                    ..Series::default()
                },
            ],
            legend: crate::plot::Corner::LowerRight,
        }],
        caption: format!("{}; iid projections, {} draws per angle", info.caption(), cfg.draws),
    };
    files.extend(crate::plot::save(&fig, &cfg.out_dir.join("accuracy-angle"))?);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lemma2_at_a_right_angle() {
        // x ⟂ y, |x| = |y| = 1: ‖x+y‖² = ‖x−y‖² = 2, SM = 1.
        let (tp, th) = lemma2_ratios(std::f64::consts::FRAC_PI_2);
        assert!((tp - 0.5 * (1.0 - (-2f64).exp())).abs() < 1e-12, "{tp}");
        assert!((th - 1.0).abs() < 1e-12, "{th}");
    }

    #[test]
    fn measured_ratios_follow_lemma2() {
        let cfg = AccuracyConfig {
            backend: crate::backends::open("reference").unwrap(),
            len: 8,
            d: 4,
            sigma: 1.0,
            ms: vec![4],
            seeds: 1,
            angles: 8,
            draws: 10000,
            out_dir: std::env::temp_dir(),
        };
        let pts = figure2(&cfg).unwrap();
        assert_eq!(pts.len(), 8);
        // Wide angles only: there ‖x + y‖ is small and the positive estimator's squared error
        // has light enough tails for 10⁴ draws to pin its mean within 30 %.
        for p in pts.iter().filter(|p| p.angle.abs() > 1.5) {
            for (got, want) in [(p.trig_over_pos, p.trig_over_pos_theory), (p.trig_over_hyp, p.trig_over_hyp_theory)] {
                assert!((got / want - 1.0).abs() < 0.3, "angle {}: measured {got}, Lemma 2 {want}", p.angle);
            }
        }
    }
}
