//! A counting global allocator with a resettable peak: the exact heap high-water mark of a
//! measurement, the CPU "peak memory" of every result file.
//!
//! The binary, the benches and the tests install it with
//! `#[global_allocator] static ALLOC: favor_bench::alloc::CountingAlloc = favor_bench::alloc::CountingAlloc;`.
//! It counts Rust heap memory only, which is everything favor and this tool allocate.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

/// The system allocator plus counters: bytes live now, most bytes live since the last reset, and
/// allocations (including reallocations) made.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAlloc;

fn grow(bytes: usize) {
    CALLS.fetch_add(1, Ordering::Relaxed);
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrink(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// GlobalAlloc contract holds exactly as it does for `System`; the counters are only bookkeeping.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours (non-zero-size layout), forwarded.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (i.e. by System) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged; `ptr`/`layout` come from this allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Count the new block before releasing the old one: a moving realloc briefly holds both.
            grow(new_size);
            shrink(layout.size());
        }
        p
    }
}

/// Allocations and reallocations made since program start (subtract two readings to count a
/// call's).
pub fn allocations() -> usize {
    CALLS.load(Ordering::Relaxed)
}

/// Bytes live on the heap now.
pub fn current() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Most bytes live at once since the last [`reset_peak`] (or program start).
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new measurement: the peak becomes the current live size, which is returned (the
/// baseline to subtract from the next [`peak`]).
pub fn reset_peak() -> usize {
    let now = CURRENT.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

/// True when [`CountingAlloc`] is the global allocator of this process (the counters move).
pub fn is_installed() -> bool {
    let before = current();
    let probe = std::hint::black_box(vec![0u8; 1 << 16]);
    let during = current();
    drop(probe);
    during >= before + (1 << 16)
}

/// Peak heap use of `f` above what was live when it started, with `f`'s result.
pub fn measure_peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = reset_peak();
    let out = f();
    (out, peak().saturating_sub(base))
}
