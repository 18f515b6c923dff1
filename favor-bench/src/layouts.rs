//! What the caller's layout costs: one problem with its tensors `[B, H, L, ·]` (favor's default),
//! `[B, L, H, ·]` and packed QKV (`[B, L, 3, H, d]`, output `[B, L, H, d_v]`), forward and
//! forward + backward, both directions. The layouts are timed in alternation (one call of each
//! per round) so that a noisy machine slows them alike; ratios are against `[B, H, L, ·]`.

use crate::error::Result;
use crate::measure::median;
use favor::Backend;
use favor_core::{
    AttentionOptions, AttentionShape, Direction, FavorBackend, FeatureMap, Grads, HostMut, HostRef, Inputs, Layout,
    Problem, Projection, ProjectionConfig, Strides,
};
use std::time::Instant;

/// One run of the comparison.
#[derive(Debug, Clone)]
pub struct LayoutsConfig {
    /// Backend id (see [`favor::Backend::from_id`]).
    pub backend: String,
    /// Sizes (d_v = d, so QKV can be packed).
    pub shape: AttentionShape,
    /// Random features.
    pub m: usize,
    /// Rounds (each times every layout once); the median is reported.
    pub rounds: usize,
}

/// The median time of one layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutPoint {
    /// "bhld", "blhd" or "packed-qkv".
    pub layout: &'static str,
    /// Direction.
    pub direction: Direction,
    /// "forward" or "forward+backward".
    pub pass: &'static str,
    /// Median seconds per call.
    pub median_s: f64,
    /// Median over the `[B, H, L, ·]` median.
    pub ratio: f64,
}

/// Buffers of one layout: Q, K, V as `span`-element slices of `qkv` at `offsets`, output and
/// gradients.
struct Placed {
    name: &'static str,
    layout: Layout,
    qkv: Vec<f32>,
    offsets: [usize; 3],
    span: usize,
    out: Vec<f32>,
    dout: Vec<f32>,
    grads: [Vec<f32>; 3],
}

impl Placed {
    fn new(name: &'static str, layout: Layout, s: &AttentionShape) -> Placed {
        let n = s.qk_len();
        let fill = |len: usize, seed: u64| -> Vec<f32> {
            // Cheap deterministic values in [-0.5, 0.5): the layout comparison needs no
            // particular distribution.
            (0..len)
                .map(|i| (((i as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as f32 / 16_777_216.0) - 0.5)
                .collect()
        };
        // Packed: one interleaved buffer, each slice to its end; separate: exact slices (the
        // contiguous default checks lengths exactly).
        let packed = Layout::packed_qkv_offsets(s);
        let (offsets, span) = if name == "packed-qkv" { (packed, 3 * n - packed[2]) } else { ([0, n, 2 * n], n) };
        Placed {
            name,
            layout,
            qkv: fill(3 * n, 1),
            offsets,
            span,
            out: vec![0.0; s.out_len()],
            dout: fill(s.out_len(), 2),
            grads: [vec![0.0; n], vec![0.0; n], vec![0.0; n]],
        }
    }

    fn call(&mut self, backend: &Backend, p: &Problem<'_>, backward: bool) -> Result<()> {
        let p = p.with_layout(self.layout);
        let at = |i: usize| HostRef::F32(&self.qkv[self.offsets[i]..self.offsets[i] + self.span]);
        let inputs = Inputs { q: at(0), k: at(1), v: at(2), key_mask: None };
        backend.forward(&p, inputs, HostMut::F32(&mut self.out))?;
        if backward {
            let [dq, dk, dv] = &mut self.grads;
            let grads = Grads { dq: HostMut::F32(dq), dk: HostMut::F32(dk), dv: HostMut::F32(dv) };
            backend.backward(&p, inputs, HostRef::F32(&self.dout), grads)?;
        }
        Ok(())
    }
}

/// `[B, H, L, ·]` given as explicit strides.
fn explicit_bhld(s: &AttentionShape) -> Layout {
    Layout::from_fn(|arg| {
        let t = arg.dims(s);
        Some(Strides::bhld(t.heads, t.rows, t.width))
    })
}

/// Times every layout of `cfg`; points in (direction, pass, layout) order.
pub fn run(cfg: &LayoutsConfig) -> Result<Vec<LayoutPoint>> {
    let backend = Backend::from_id(&cfg.backend)?;
    let s = cfg.shape;
    if s.dv != s.d || s.is_cross() {
        crate::bail!("layouts: packed QKV needs d_v = d and equal query and key lengths");
    }
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(cfg.m, s.d, 0))?);
    let mut placed = [
        Placed::new("bhld", Layout::contiguous(), &s),
        Placed::new("blhd", Layout::blhd(&s), &s),
        // A control: explicit strides that address the default layout (same memory, strided
        // code path); its ratio shows the machine's noise.
        Placed::new("bhld-strided", explicit_bhld(&s), &s),
        Placed::new("packed-qkv", Layout::packed_qkv(&s), &s),
    ];
    let mut points = Vec::new();
    for direction in [Direction::Bidirectional, Direction::Causal] {
        let p = Problem::new(s, &map).with_options(AttentionOptions { direction, ..Default::default() });
        for (pass, backward) in [("forward", false), ("forward+backward", true)] {
            let mut times = vec![Vec::with_capacity(cfg.rounds); placed.len()];
            for round in 0..=cfg.rounds {
                for (t, pl) in times.iter_mut().zip(placed.iter_mut()) {
                    let start = Instant::now();
                    pl.call(&backend, &p, backward)?;
                    // Round 0 warms every layout up.
                    if round > 0 {
                        t.push(start.elapsed().as_secs_f64());
                    }
                }
            }
            let base = median(&times[0]);
            for (t, pl) in times.iter().zip(&placed) {
                let m = median(t);
                points.push(LayoutPoint { layout: pl.name, direction, pass, median_s: m, ratio: m / base });
            }
        }
    }
    Ok(points)
}
