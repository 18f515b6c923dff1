//! Line plots (PNG and SVG) with plotters and the DejaVu Sans font shipped in `assets/`, so no
//! system font library is needed.

use crate::error::{BenchError, Result};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// One line of a panel.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points, drawn in order; points with a non-positive coordinate on a log axis are skipped.
    pub points: Vec<(f64, f64)>,
    /// Optional shaded band (x, low, high), e.g. mean ± one standard deviation.
    pub band: Option<Vec<(f64, f64, f64)>>,
    /// Draw markers at the points.
    pub markers: bool,
    /// Draw a dashed line (closed-form curves, references).
    pub dashed: bool,
    /// Markers only, no line.
    pub no_line: bool,
    /// Colour index into the palette (series with the same index share a colour).
    pub color: usize,
}

/// One chart.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// X-axis label.
    pub x_label: String,
    /// Y-axis label.
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic x axis with ticks at powers of two (for L and m); overrides `log_x`.
    pub log2_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// The lines.
    pub series: Vec<Series>,
    /// Where the legend goes.
    pub legend: Corner,
}

/// A corner of a chart (legend position).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Corner {
    /// Top left.
    #[default]
    UpperLeft,
    /// Top right.
    UpperRight,
    /// Bottom left.
    LowerLeft,
    /// Bottom right.
    LowerRight,
}

/// A tick label without float noise: "0.001", "512", "1e-6", "2e5".
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if (1e-3..1e6).contains(&a) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    }
}

/// Panels side by side, with a caption line at the bottom (machine, date).
#[derive(Debug, Clone, Default)]
pub struct Figure {
    /// Panels, left to right.
    pub panels: Vec<Panel>,
    /// Small text at the bottom.
    pub caption: String,
}

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn plot_err(e: impl std::fmt::Display) -> BenchError {
    BenchError(format!("plotting failed: {e}"))
}

/// Writes `<stem>.png` and `<stem>.svg`; returns their paths.
pub fn save(fig: &Figure, stem: &Path) -> Result<Vec<PathBuf>> {
    REGISTER.call_once(|| {
        // The font is a valid TTF compiled into the binary; failure would be a build defect,
        // and the SVG output (which needs no font) still works, so it is ignored here.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let size = (560 * fig.panels.len().max(1) as u32, 460);
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(fig, &root)?;
        root.present().map_err(plot_err)?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(fig, &root)?;
        root.present().map_err(plot_err)?;
    }
    Ok(vec![png, svg])
}

fn draw<DB: DrawingBackend>(fig: &Figure, root: &DrawingArea<DB, Shift>) -> Result<()> {
    root.fill(&WHITE).map_err(plot_err)?;
    let (main, foot) = root.split_vertically(root.dim_in_pixel().1 - 22);
    foot.draw_text(&fig.caption, &("sans-serif", 11).into_font().color(&BLACK.mix(0.7)), (8, 4)).map_err(plot_err)?;
    let areas = main.split_evenly((1, fig.panels.len().max(1)));
    for (panel, area) in fig.panels.iter().zip(areas) {
        // Powers of two: plot log2(x) on a linear axis and label the ticks 2^k.
        let log2_panel;
        let panel = if panel.log2_x {
            let mut p = panel.clone();
            p.log_x = false;
            for s in &mut p.series {
                s.points.retain(|&(x, _)| x > 0.0);
                s.points.iter_mut().for_each(|pt| pt.0 = pt.0.log2());
                if let Some(b) = s.band.as_mut() {
                    b.retain(|&(x, _, _)| x > 0.0);
                    b.iter_mut().for_each(|pt| pt.0 = pt.0.log2());
                }
            }
            log2_panel = p;
            &log2_panel
        } else {
            panel
        };
        let (xr, yr) = ranges(panel);
        match (panel.log_x, panel.log_y) {
            (true, true) => chart(panel, &area, (xr.0..xr.1).log_scale(), (yr.0..yr.1).log_scale())?,
            (true, false) => chart(panel, &area, (xr.0..xr.1).log_scale(), yr.0..yr.1)?,
            (false, true) => chart(panel, &area, xr.0..xr.1, (yr.0..yr.1).log_scale())?,
            (false, false) => chart(panel, &area, xr.0..xr.1, yr.0..yr.1)?,
        }
    }
    Ok(())
}

/// Data ranges with a margin (multiplicative on log axes).
fn ranges(p: &Panel) -> ((f64, f64), (f64, f64)) {
    let ok = |v: f64, log: bool| v.is_finite() && (!log || v > 0.0);
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for s in &p.series {
        for &(x, y) in &s.points {
            if ok(x, p.log_x) && ok(y, p.log_y) {
                xs.push(x);
                ys.push(y);
            }
        }
        for &(x, lo, hi) in s.band.iter().flatten() {
            if ok(x, p.log_x) {
                xs.push(x);
                ys.extend([lo, hi].into_iter().filter(|&v| ok(v, p.log_y)));
            }
        }
    }
    let span = |v: &[f64], log: bool| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return if log { (0.1, 10.0) } else { (0.0, 1.0) };
        }
        if log {
            let (lo, hi) = if hi / lo < 1.5 { (lo / 1.5, hi * 1.5) } else { (lo, hi) };
            (lo / 1.25, hi * 1.25)
        } else {
            let pad = ((hi - lo) * 0.05).max(1e-12);
            (lo - pad, hi + pad)
        }
    };
    (span(&xs, p.log_x), span(&ys, p.log_y))
}

fn chart<DB, X, Y>(p: &Panel, area: &DrawingArea<DB, Shift>, x: X, y: Y) -> Result<()>
where
    DB: DrawingBackend,
    X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut ch = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(62)
        .build_cartesian_2d(x, y)
        .map_err(plot_err)?;
    let x_span = (p.series.iter().flat_map(|s| s.points.iter().map(|pt| pt.0)).fold(f64::NEG_INFINITY, f64::max)
        - p.series.iter().flat_map(|s| s.points.iter().map(|pt| pt.0)).fold(f64::INFINITY, f64::min))
    .max(1.0);
    let pow2 = |v: &f64| {
        if (v - v.round()).abs() < 1e-6 { tick_label(2f64.powi(v.round() as i32)) } else { String::new() }
    };
    let x_fmt: &dyn Fn(&f64) -> String = if p.log2_x { &pow2 } else { &|v: &f64| tick_label(*v) };
    let mut mesh = ch.configure_mesh();
    if p.log2_x {
        mesh.x_labels(x_span as usize + 1);
    }
    mesh.x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .x_label_formatter(x_fmt)
        .y_label_formatter(&|v: &f64| tick_label(*v))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.15))
        .draw()
        .map_err(plot_err)?;
    let valid = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!p.log_x || x > 0.0) && (!p.log_y || y > 0.0);
    for s in &p.series {
        let color = PALETTE[s.color % PALETTE.len()];
        if let Some(band) = &s.band {
            let floor = |v: f64| if p.log_y { v.max(1e-300) } else { v };
            let mut poly: Vec<(f64, f64)> = band.iter().map(|&(x, _, hi)| (x, floor(hi))).collect();
            poly.extend(band.iter().rev().map(|&(x, lo, _)| (x, floor(lo))));
            poly.retain(valid);
            if poly.len() >= 3 {
                ch.draw_series(std::iter::once(Polygon::new(poly, color.mix(0.18)))).map_err(plot_err)?;
            }
        }
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(valid).collect();
        let style = ShapeStyle::from(&color).stroke_width(2);
        let legend = if s.no_line {
            ch.draw_series(pts.iter().map(|&pt| Circle::new(pt, 3, color.filled()))).map_err(plot_err)?
        } else if s.dashed {
            ch.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style)).map_err(plot_err)?
        } else {
            ch.draw_series(LineSeries::new(pts.clone(), style)).map_err(plot_err)?
        };
        if !s.label.is_empty() {
            legend.label(&s.label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        if s.markers {
            ch.draw_series(pts.iter().map(|&pt| Circle::new(pt, 3, color.filled()))).map_err(plot_err)?;
        }
    }
    if p.series.iter().any(|s| !s.label.is_empty()) {
        ch.configure_series_labels()
            .position(match p.legend {
                Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
                Corner::UpperRight => SeriesLabelPosition::UpperRight,
                Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
                Corner::LowerRight => SeriesLabelPosition::LowerRight,
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}
