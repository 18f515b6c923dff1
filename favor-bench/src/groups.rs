//! What grouped key/value heads save: one problem with `heads` query heads and several key/value
//! head counts (heads = kv_heads, grouped-query, multi-query), forward and forward + backward,
//! both directions. Variants are timed in alternation (one call of each per round) so that a
//! noisy machine slows them alike; each point also reports the heap its calls allocate beyond
//! the caller's tensors (the counting allocator's peak) and the bytes of the caller's tensors.

use crate::alloc;
use crate::error::Result;
use crate::measure::median;
use crate::workload::gaussian;
use favor::Backend;
use favor_core::{
    AttentionOptions, AttentionShape, Direction, FavorBackend, FeatureMap, Grads, HostMut, HostRef, Inputs, Problem,
    Projection, ProjectionConfig,
};
use std::time::Instant;

/// One run of the comparison.
#[derive(Debug, Clone)]
pub struct GroupsConfig {
    /// Backend id (see [`favor::Backend::from_id`]).
    pub backend: String,
    /// Sizes; `kv_heads` is ignored (see `kv_heads`).
    pub shape: AttentionShape,
    /// Key/value head counts to compare, each dividing `shape.heads`; the first is the baseline.
    pub kv_heads: Vec<usize>,
    /// Random features.
    pub m: usize,
    /// Rounds (each times every variant once); the median is reported.
    pub rounds: usize,
}

/// The median time and peak heap of one variant.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupPoint {
    /// Key/value heads per batch element.
    pub kv_heads: usize,
    /// Direction.
    pub direction: Direction,
    /// "forward" or "forward+backward".
    pub pass: &'static str,
    /// Median seconds per call.
    pub median_s: f64,
    /// Median over the baseline's median.
    pub ratio: f64,
    /// Most heap bytes the calls held at once beyond what was live before them.
    pub call_heap_bytes: usize,
    /// Bytes of the caller's Q, K, V, output (and ∂ℒ/∂out and gradients for the backward).
    pub tensor_bytes: usize,
}

/// The caller's tensors of one variant.
struct Tensors {
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    dout: Vec<f32>,
    grads: [Vec<f32>; 3],
}

impl Tensors {
    fn new(shape: AttentionShape) -> Tensors {
        let fill = |len: usize, seed: u64| gaussian(len, seed, 0.5);
        Tensors {
            shape,
            q: fill(shape.qk_len(), 1),
            k: fill(shape.k_len(), 2),
            v: fill(shape.v_len(), 3),
            out: vec![0.0; shape.out_len()],
            dout: fill(shape.out_len(), 4),
            grads: [vec![0.0; shape.qk_len()], vec![0.0; shape.k_len()], vec![0.0; shape.v_len()]],
        }
    }

    fn bytes(&self, backward: bool) -> usize {
        let s = self.shape;
        let fwd = s.qk_len() + s.k_len() + s.v_len() + s.out_len();
        4 * if backward { 2 * fwd } else { fwd }
    }

    fn call(&mut self, backend: &Backend, p: &Problem<'_>, backward: bool) -> Result<()> {
        let inputs =
            Inputs { q: HostRef::F32(&self.q), k: HostRef::F32(&self.k), v: HostRef::F32(&self.v), key_mask: None };
        backend.forward(p, inputs, HostMut::F32(&mut self.out))?;
        if backward {
            let [dq, dk, dv] = &mut self.grads;
            let grads = Grads { dq: HostMut::F32(dq), dk: HostMut::F32(dk), dv: HostMut::F32(dv) };
            backend.backward(p, inputs, HostRef::F32(&self.dout), grads)?;
        }
        Ok(())
    }
}

/// Times every variant of `cfg`; points in (direction, pass, variant) order.
pub fn run(cfg: &GroupsConfig) -> Result<Vec<GroupPoint>> {
    let backend = Backend::from_id(&cfg.backend)?;
    let base = AttentionShape { kv_heads: None, ..cfg.shape };
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(cfg.m, base.d, 0))?);
    let mut variants: Vec<Tensors> = Vec::with_capacity(cfg.kv_heads.len());
    for &kv in &cfg.kv_heads {
        let s = base.with_kv_heads(kv);
        s.validate()?;
        variants.push(Tensors::new(s));
    }
    let mut points = Vec::new();
    for direction in [Direction::Bidirectional, Direction::Causal] {
        let opts = AttentionOptions { direction, ..Default::default() };
        for (pass, backward) in [("forward", false), ("forward+backward", true)] {
            let mut times = vec![Vec::with_capacity(cfg.rounds); variants.len()];
            let mut heap = vec![0usize; variants.len()];
            for round in 0..=cfg.rounds {
                for ((t, h), v) in times.iter_mut().zip(heap.iter_mut()).zip(variants.iter_mut()) {
                    let p = Problem::new(v.shape, &map).with_options(opts);
                    // The warm-up call makes the kept scratch anew, so that the heap figure
                    // counts it; the timed calls run warm, as repeated calls do.
                    if round == 0 {
                        favor::release_scratch();
                    }
                    let live = alloc::reset_peak();
                    let start = Instant::now();
                    v.call(&backend, &p, backward)?;
                    let elapsed = start.elapsed().as_secs_f64();
                    *h = (*h).max(alloc::peak().saturating_sub(live));
                    // Round 0 warms every variant up.
                    if round > 0 {
                        t.push(elapsed);
                    }
                }
            }
            let first = median(&times[0]);
            for ((t, &h), v) in times.iter().zip(&heap).zip(&variants) {
                let m = median(t);
                points.push(GroupPoint {
                    kv_heads: v.shape.key_heads(),
                    direction,
                    pass,
                    median_s: m,
                    ratio: m / first,
                    call_heap_bytes: h,
                    tensor_bytes: v.bytes(backward),
                });
            }
        }
    }
    Ok(points)
}
