//! Repeated decoding steps allocate nothing on the CPU backend after the first: counted by a
//! global allocator, for one-token and multi-token steps of some and of all slots, on every ISA
//! this CPU runs. The calls run inside a rayon pool's `install` (what the count covers: favor's
//! work; rayon's own injection of a call from outside its pool is not favor's).

use favor_core::{
    AttentionOptions, AttentionShape, FavorBackend, FeatureMap, Inputs, Problem, Projection, ProjectionConfig,
    SlotChunks,
};
use favor_simd::{Isa, SimdBackend};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards every call to `System` unchanged; the counter is bookkeeping only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// Allocations made by `steps` runs of `step` after `warm` runs.
fn allocations_after_warm_up(warm: usize, steps: usize, mut step: impl FnMut()) -> usize {
    for _ in 0..warm {
        step();
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..steps {
        step();
    }
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn decoding_steps_allocate_nothing_after_the_first() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    // Grouped heads, odd sizes; d_v and d not multiples of the vector width.
    let (slots, heads, kv_heads, d, dv, m) = (5, 6, 2, 13, 7, 19);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(m, d, 3)).unwrap());
    let state_shape = AttentionShape::new(slots, heads, 1, d).with_dv(dv).with_kv_heads(kv_heads);
    for isa in Isa::available() {
        let backend = SimdBackend::with_isa(isa).unwrap();
        let what = backend.name();
        let mut state =
            backend.new_state(&Problem::new(state_shape, &map).with_options(AttentionOptions::causal())).unwrap();
        pool.install(|| {
            // Every slot by one token (`decode`), then by three.
            for len in [1, 3] {
                let shape = AttentionShape { len, ..state_shape };
                let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
                let (q, k, v) = (values(shape.qk_len(), 1), values(shape.k_len(), 2), values(shape.v_len(), 3));
                let mut out = vec![0.0f32; shape.out_len()];
                let n = allocations_after_warm_up(20, 10, || {
                    let x = Inputs { q: (&q).into(), k: (&k).into(), v: (&v).into(), key_mask: None };
                    backend.decode(&p, &mut state, x, (&mut out).into()).unwrap();
                });
                assert_eq!(n, 0, "{what}: {n} allocations in 10 decode steps of {len} token(s)");
            }
            // Some slots, packed: slot 3 one token, slot 0 two, slot 4 one (`decode_slots`).
            let (ids, offsets) = ([3usize, 0, 4], [0usize, 1, 3, 4]);
            let shape = AttentionShape { batch: 1, len: 4, ..state_shape };
            let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
            let (q, k, v) = (values(shape.qk_len(), 4), values(shape.k_len(), 5), values(shape.v_len(), 6));
            let mut out = vec![0.0f32; shape.out_len()];
            let n = allocations_after_warm_up(20, 10, || {
                let x = Inputs { q: (&q).into(), k: (&k).into(), v: (&v).into(), key_mask: None };
                backend.decode_slots(&p, &mut state, SlotChunks::new(&ids, &offsets), x, (&mut out).into()).unwrap();
            });
            assert_eq!(n, 0, "{what}: {n} allocations in 10 slot-decoding steps");
            assert!(out.iter().all(|x| x.is_finite()));
        });
    }
}
