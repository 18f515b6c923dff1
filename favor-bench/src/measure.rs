//! Timing of one point: warm-up, repeats under a time budget, median/min/max, memory peak.

use std::time::Instant;

use crate::alloc;
use crate::backends::ResidentAttention;
use crate::error::Result;

/// Timing and memory of one point.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Median seconds per call.
    pub median: f64,
    /// Fastest call.
    pub min: f64,
    /// Slowest call.
    pub max: f64,
    /// Number of timed calls.
    pub repeats: usize,
    /// Peak bytes (heap, or device memory for a resident backend) during setup and all calls,
    /// above what was live before the setup.
    pub peak_bytes: usize,
}

/// Median of a list (NaN for an empty one: there is no sample to report).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => s[n / 2],
        _ => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Where a point's peak memory is read: the heap (counting allocator) for CPU backends, the
/// backend's own allocation tracking for a device.
pub trait MemoryMeter {
    /// Restarts the peak; returns the bytes live now (the baseline of the point).
    fn start(&self) -> usize;
    /// The peak since [`MemoryMeter::start`].
    fn peak(&self) -> usize;
}

/// The process heap, through the counting allocator.
#[derive(Debug, Clone, Copy, Default)]
pub struct Heap;

impl MemoryMeter for Heap {
    /// Also frees the CPU backend's kept scratch, so that a point's peak counts the scratch its
    /// calls make (it would otherwise be live already, left by the previous point).
    fn start(&self) -> usize {
        favor::release_scratch();
        alloc::reset_peak()
    }
    fn peak(&self) -> usize {
        alloc::peak()
    }
}

/// A device's memory, through its backend's allocation tracking.
#[derive(Clone, Copy)]
pub struct DeviceMemory<'a>(pub &'a dyn ResidentAttention);

impl MemoryMeter for DeviceMemory<'_> {
    fn start(&self) -> usize {
        self.0.reset_peak_memory();
        self.0.memory_in_use()
    }
    fn peak(&self) -> usize {
        self.0.peak_memory()
    }
}

/// [`time_point_in`] on the heap.
pub fn time_point<S>(
    setup: impl FnOnce() -> Result<S>,
    call: impl FnMut(&mut S) -> Result<()>,
    repeats: usize,
    budget_s: f64,
) -> Result<Sample> {
    time_point_in(&Heap, setup, call, repeats, budget_s)
}

/// Sets up state with `setup`, then calls `call` on it: once as a warm-up (kept as a sample when
/// it took longer than `budget_s / 4`, so slow points are not run twice for nothing), then until
/// `repeats` samples or `budget_s` seconds of samples, whichever comes first (at least one).
/// The peak memory is read from `meter`, above what was live before the setup.
pub fn time_point_in<S>(
    meter: &dyn MemoryMeter,
    setup: impl FnOnce() -> Result<S>,
    mut call: impl FnMut(&mut S) -> Result<()>,
    repeats: usize,
    budget_s: f64,
) -> Result<Sample> {
    let base = meter.start();
    let mut state = setup()?;
    let mut times = Vec::with_capacity(repeats);
    let t = Instant::now();
    crate::meta::timed(|| call(&mut state))?;
    let first = t.elapsed().as_secs_f64();
    if first > budget_s / 4.0 {
        times.push(first);
    }
    let mut spent = first;
    while times.len() < repeats.max(1) && (times.is_empty() || spent < budget_s) {
        let t = Instant::now();
        crate::meta::timed(|| call(&mut state))?;
        let dt = t.elapsed().as_secs_f64();
        spent += dt;
        times.push(dt);
    }
    let peak_bytes = meter.peak().saturating_sub(base);
    drop(state);
    Ok(Sample {
        median: median(&times),
        min: times.iter().copied().fold(f64::INFINITY, f64::min),
        max: times.iter().copied().fold(0.0, f64::max),
        repeats: times.len(),
        peak_bytes,
    })
}

/// Bytes as a short human string (MiB/GiB).
pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Seconds as a short human string.
pub fn human_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

/// Heap memory budget default: 16 GiB (the paper's V100) or 60 % of the memory available now,
/// whichever is smaller.
pub fn default_memory_budget() -> usize {
    let avail_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<usize>().ok())
    });
    let sixteen = 16usize << 30;
    avail_kib.map_or(sixteen / 2, |k| (k * 1024 / 10 * 6).min(sixteen))
}
