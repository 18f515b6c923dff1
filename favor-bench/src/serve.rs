//! Serving-style decoding with the slot decoder: a state of N slots, each prefilled with a
//! prompt in one call, then one-token steps that advance every slot in one call. Reports the
//! median time per step, tokens per second (N per step), and the heap allocations and peak heap
//! each step makes: the per-call overhead an engine pays for every generated token.

use crate::alloc;
use crate::error::Result;
use crate::measure::median;
use crate::workload::gaussian;
use favor::Backend;
use favor_core::{
    AttentionOptions, AttentionShape, FavorBackend, FeatureMap, HostMut, HostRef, Inputs, Layout, Problem, Projection,
    ProjectionConfig, SlotChunks,
};
use std::time::Instant;

/// One run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Backend id (see [`favor::Backend::from_id`]).
    pub backend: String,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Head dimension (d = d_v).
    pub d: usize,
    /// Random features.
    pub m: usize,
    /// Slot counts to measure.
    pub slots: Vec<usize>,
    /// Prompt tokens prefilled into every slot.
    pub prompt: usize,
    /// Timed one-token steps (after one warm-up step).
    pub steps: usize,
}

/// The measurement of one slot count.
#[derive(Debug, Clone, PartialEq)]
pub struct ServePoint {
    /// Slots advanced per step.
    pub slots: usize,
    /// Seconds of the one prefill call (every slot, `prompt` tokens each).
    pub prefill_s: f64,
    /// Median seconds per one-token step.
    pub step_s: f64,
    /// Tokens per second: slots / step.
    pub tokens_per_s: f64,
    /// Heap allocations per step (median).
    pub allocations: usize,
    /// Most heap bytes a step held at once beyond what was live before it.
    pub step_heap_bytes: usize,
}

/// Runs every slot count of `cfg`.
pub fn run(cfg: &ServeConfig) -> Result<Vec<ServePoint>> {
    let backend = Backend::from_id(&cfg.backend)?;
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(cfg.m, cfg.d, 0))?);
    let causal = AttentionOptions::causal();
    let mut points = Vec::new();
    for &n in &cfg.slots {
        let state_shape = AttentionShape::new(n, cfg.heads, 1, cfg.d).with_kv_heads(cfg.kv_heads);
        let mut state = backend.new_state(&Problem::new(state_shape, &map).with_options(causal))?;
        let slots: Vec<usize> = (0..n).collect();
        // Tokens packed [1, tokens, heads, d], as an engine's projections give them; made
        // outside the timed regions.
        let packed = |per_slot: usize, seed: u64| {
            let shape = AttentionShape { batch: 1, len: n * per_slot, ..state_shape };
            let (q, k) = (gaussian(shape.qk_len(), seed, 0.5), gaussian(shape.k_len(), seed + 1, 0.5));
            let v = gaussian(shape.v_len(), seed + 2, 0.5);
            let offsets: Vec<usize> = (0..=n).map(|i| i * per_slot).collect();
            (shape, q, k, v, vec![0.0f32; shape.out_len()], offsets)
        };
        let (shape, q, k, v, mut out, offsets) = packed(cfg.prompt, 1);
        let p = Problem::new(shape, &map).with_options(causal).with_layout(Layout::blhd(&shape));
        let inputs = Inputs { q: HostRef::F32(&q), k: HostRef::F32(&k), v: HostRef::F32(&v), key_mask: None };
        let start = Instant::now();
        backend.decode_slots(&p, &mut state, SlotChunks::new(&slots, &offsets), inputs, HostMut::F32(&mut out))?;
        let prefill_s = start.elapsed().as_secs_f64();
        let (shape, q, k, v, mut out, offsets) = packed(1, 7);
        let p = Problem::new(shape, &map).with_options(causal).with_layout(Layout::blhd(&shape));
        let inputs = Inputs { q: HostRef::F32(&q), k: HostRef::F32(&k), v: HostRef::F32(&v), key_mask: None };
        let (mut times, mut allocs, mut heap) = (Vec::new(), Vec::new(), 0usize);
        for step in 0..=cfg.steps {
            let live = alloc::reset_peak();
            let before = alloc::allocations();
            let start = Instant::now();
            backend.decode_slots(&p, &mut state, SlotChunks::new(&slots, &offsets), inputs, HostMut::F32(&mut out))?;
            let elapsed = start.elapsed().as_secs_f64();
            // Step 0 warms up.
            if step > 0 {
                times.push(elapsed);
                allocs.push((alloc::allocations() - before) as f64);
                heap = heap.max(alloc::peak().saturating_sub(live));
            }
        }
        let step_s = median(&times);
        points.push(ServePoint {
            slots: n,
            prefill_s,
            step_s,
            tokens_per_s: n as f64 / step_s,
            allocations: median(&allocs) as usize,
            step_heap_bytes: heap,
        });
    }
    Ok(points)
}
