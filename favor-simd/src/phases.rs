//! Opt-in per-phase CPU-time counters, for `favor-bench profile` and anyone tuning a kernel.
//!
//! Off by default: a disabled span costs one relaxed atomic load. When enabled with
//! [`set_enabled`], every kernel adds the wall time of its phases (measured per thread, so the
//! sums are CPU time across all threads) to process-wide counters, read with [`snapshot`].
//! The counters are global: profile one call site at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A phase of the attention kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Projection, stabiliser and φ of query and key tiles (recomputations included).
    FeatureMap,
    /// Building states: K'ᵀV summaries, causal state updates, segment summaries, and the
    /// backward's suffix sums.
    StateBuild,
    /// Using states: Q'·state, the causal intra-chunk products, normalisation.
    Apply,
    /// The backward's gradient products (dφ of queries and keys, dV, the intra-chunk cotangents).
    BackwardSweep,
    /// dφ → dx through the feature map (and learned-parameter gradients).
    FeatureBackward,
    /// Reading and writing rows of the caller's tensors (dtype conversion included).
    Io,
}

impl Phase {
    /// Every phase, in pipeline order.
    pub const ALL: [Phase; 6] =
        [Phase::Io, Phase::FeatureMap, Phase::StateBuild, Phase::Apply, Phase::BackwardSweep, Phase::FeatureBackward];

    /// A short stable name ("feature-map", "state-build", ...).
    pub fn name(self) -> &'static str {
        match self {
            Phase::FeatureMap => "feature-map",
            Phase::StateBuild => "state-build",
            Phase::Apply => "apply",
            Phase::BackwardSweep => "backward-sweep",
            Phase::FeatureBackward => "feature-backward",
            Phase::Io => "io",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Accumulated time of one phase since the last [`reset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseTime {
    /// The phase.
    pub phase: Phase,
    /// Sum over all threads of the time spent in it.
    pub total: Duration,
    /// Number of spans (tile-sized pieces of work) counted.
    pub spans: u64,
}

const N: usize = Phase::ALL.len();
static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static SPANS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

/// Turns the counters on or off (process-wide).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the counters are on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Zeroes every counter.
pub fn reset() {
    for (n, s) in NANOS.iter().zip(&SPANS) {
        n.store(0, Ordering::Relaxed);
        s.store(0, Ordering::Relaxed);
    }
}

/// The counters now, in [`Phase::ALL`] order.
pub fn snapshot() -> Vec<PhaseTime> {
    Phase::ALL
        .iter()
        .map(|&phase| PhaseTime {
            phase,
            total: Duration::from_nanos(NANOS[phase.index()].load(Ordering::Relaxed)),
            spans: SPANS[phase.index()].load(Ordering::Relaxed),
        })
        .collect()
}

/// A running measurement of one phase; ends at [`Span::end`] or when dropped.
pub(crate) struct Span {
    phase: Phase,
    start: Option<Instant>,
}

impl Span {
    /// Starts timing `phase` (a no-op unless enabled).
    #[inline(always)]
    pub(crate) fn start(phase: Phase) -> Span {
        Span { phase, start: if enabled() { Some(Instant::now()) } else { None } }
    }

    /// Ends this span and starts the next phase (one clock read for both).
    #[inline(always)]
    pub(crate) fn next(mut self, phase: Phase) -> Span {
        let now = self.record();
        self.start = None;
        Span { phase, start: now }
    }

    /// Ends the span.
    #[inline(always)]
    pub(crate) fn end(self) {}

    #[inline(always)]
    fn record(&self) -> Option<Instant> {
        let start = self.start?;
        let now = Instant::now();
        let ns = u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
        NANOS[self.phase.index()].fetch_add(ns, Ordering::Relaxed);
        SPANS[self.phase.index()].fetch_add(1, Ordering::Relaxed);
        Some(now)
    }
}

impl Drop for Span {
    #[inline(always)]
    fn drop(&mut self) {
        self.record();
    }
}
