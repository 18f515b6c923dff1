//! Repeated decoding steps, forward and backward calls allocate nothing on the CPU backend after
//! the first: counted by a global allocator, for one-token and multi-token steps of some and of
//! all slots, and for forwards and backwards in both directions (long and short, grouped,
//! cross-attention, masked), on every ISA this CPU runs. The calls run inside a rayon pool's `install` (what the
//! count covers: favor's work; rayon's own injection of a call from outside its pool is not
//! favor's).

use favor_core::{
    AttentionOptions, AttentionShape, FavorBackend, FeatureMap, Grads, Inputs, Problem, Projection, ProjectionConfig,
    SlotChunks,
};
use favor_simd::{Isa, SimdBackend};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// The count is process-wide: the tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// With `TRACE_ALLOC=1`, every counted allocation prints its backtrace (to find it).
static TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    static TRACING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set on the threads of the tests' pools: only their allocations count (not those of other
    /// tests' threads still winding down).
    static COUNTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A two-thread pool whose threads' allocations count.
fn counted_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(2).start_handler(|_| COUNTED.with(|c| c.set(true))).build().unwrap()
}

fn count() {
    if COUNTED.with(|c| c.get()) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        trace();
    }
}

fn trace() {
    // The backtrace allocates too: not traced again.
    if TRACE.load(Ordering::Relaxed) && !TRACING.with(|c| c.replace(true)) {
        eprintln!("counted allocation at:\n{}", std::backtrace::Backtrace::force_capture());
        TRACING.with(|c| c.set(false));
    }
}

struct Counting;

// SAFETY: forwards every call to `System` unchanged; the counter is bookkeeping only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
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
    TRACE.store(std::env::var("TRACE_ALLOC").is_ok(), Ordering::Relaxed);
    for _ in 0..steps {
        step();
    }
    TRACE.store(false, Ordering::Relaxed);
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

#[test]
fn decoding_steps_allocate_nothing_after_the_first() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pool = counted_pool();
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

#[test]
fn forward_and_backward_calls_allocate_nothing_after_the_first() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pool = counted_pool();
    let (heads, kv_heads, d, dv, m) = (6, 2, 13, 7, 19);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(m, d, 3)).unwrap());
    // Short and long sequences (several key segments, several causal segments), grouped heads,
    // cross-attention, a key mask.
    let cases = [
        (AttentionShape::new(2, heads, 5, d), AttentionOptions::default(), false),
        (AttentionShape::new(1, heads, 2100, d), AttentionOptions::default(), true),
        (AttentionShape::new(2, heads, 37, d).with_kv_len(300), AttentionOptions::default(), true),
        (AttentionShape::new(1, heads, 3000, d), AttentionOptions::causal(), false),
        (AttentionShape::new(3, heads, 70, d), AttentionOptions::causal(), true),
    ];
    for isa in Isa::available() {
        let backend = SimdBackend::with_isa(isa).unwrap();
        for (shape, options, masked) in cases {
            let shape = shape.with_dv(dv).with_kv_heads(kv_heads);
            let p = Problem::new(shape, &map).with_options(options);
            let (q, k, v) = (values(shape.qk_len(), 1), values(shape.k_len(), 2), values(shape.v_len(), 3));
            let mask: Vec<bool> = (0..shape.mask_len()).map(|j| j % 3 != 1).collect();
            let key_mask = masked.then_some(mask.as_slice());
            let mut out = vec![0.0f32; shape.out_len()];
            let n = pool.install(|| {
                allocations_after_warm_up(3, 5, || {
                    let x = Inputs { q: (&q).into(), k: (&k).into(), v: (&v).into(), key_mask };
                    backend.forward(&p, x, (&mut out).into()).unwrap();
                })
            });
            let what = format!("{} {shape:?} {:?} masked {masked}", backend.name(), options.direction);
            assert_eq!(n, 0, "{what}: {n} allocations in 5 forward calls");
            assert!(out.iter().all(|x| x.is_finite()), "{what}");
            let g = values(shape.out_len(), 4);
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
            let n = pool.install(|| {
                allocations_after_warm_up(3, 5, || {
                    let x = Inputs { q: (&q).into(), k: (&k).into(), v: (&v).into(), key_mask };
                    let grads = Grads { dq: (&mut dq).into(), dk: (&mut dk).into(), dv: (&mut dv).into() };
                    backend.backward(&p, x, (&g).into(), grads).unwrap();
                })
            });
            assert_eq!(n, 0, "{what}: {n} allocations in 5 backward calls");
            assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_finite()), "{what}");
        }
    }
}

/// The count can fail the tests above: it sees a first call's scratch being made on the pool's
/// threads.
#[test]
fn the_count_sees_allocations_on_the_pools_threads() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pool = counted_pool();
    let n = pool.install(|| allocations_after_warm_up(0, 1, || drop(std::hint::black_box(vec![1u8; 100]))));
    assert_eq!(n, 1);
    // A shape no other test uses: its first forward makes the call's and the kernels' scratch.
    let shape = AttentionShape::new(1, 3, 333, 11);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(23, 11, 5)).unwrap());
    let p = Problem::new(shape, &map);
    let (q, v) = (values(shape.qk_len(), 1), values(shape.v_len(), 3));
    let mut out = vec![0.0f32; shape.out_len()];
    let backend = SimdBackend::new();
    let n = pool.install(|| {
        allocations_after_warm_up(0, 1, || {
            let x = Inputs { q: (&q).into(), k: (&q).into(), v: (&v).into(), key_mask: None };
            backend.forward(&p, x, (&mut out).into()).unwrap();
        })
    });
    assert!(n > 0, "a first forward allocates its scratch");
}

/// `release_scratch` frees what the calls keep: the next call makes it again.
#[test]
fn released_scratch_is_made_again() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pool = counted_pool();
    let shape = AttentionShape::new(1, 2, 300, 8);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(16, 8, 5)).unwrap());
    let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
    let (q, v) = (values(shape.qk_len(), 1), values(shape.v_len(), 3));
    let mut out = vec![0.0f32; shape.out_len()];
    let backend = SimdBackend::new();
    let mut call = || {
        let x = Inputs { q: (&q).into(), k: (&q).into(), v: (&v).into(), key_mask: None };
        backend.forward(&p, x, (&mut out).into()).unwrap();
    };
    let (warm, released) = pool.install(|| {
        let warm = allocations_after_warm_up(2, 1, &mut call);
        favor_simd::release_scratch();
        (warm, allocations_after_warm_up(0, 1, &mut call))
    });
    assert_eq!(warm, 0);
    assert!(released > 0, "the scratch was released");
}
