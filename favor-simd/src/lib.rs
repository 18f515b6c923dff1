//! # favor-simd
//!
//! The CPU backend of favor: FAVOR+ attention with hand-written SIMD kernels for AVX2+FMA and
//! AVX-512F (x86_64) and a portable `wide::f32x8` path (what aarch64 runs today: `wide` lowers it
//! to NEON instructions, but there are no hand-written NEON kernels), selected at run time.
//!
//! * [`SimdBackend`] implements [`favor_core::FavorBackend`] for every feature map, both
//!   directions, forward and backward, the recurrent decoder, and f32/f16/bf16 storage with f32
//!   arithmetic. It computes the same function as [`favor_core::ReferenceBackend`].
//! * [`best_isa`] picks the widest ISA the CPU supports, once. The environment variable
//!   **`FAVOR_ISA=portable|avx2|avx512`** forces one (for tests and benchmarks); an ISA the CPU
//!   lacks is never executed: the override is ignored with a warning. [`SimdBackend::with_isa`]
//!   instead returns `Err(NotAvailable)`.
//!
//! ## Layout of the crate
//! * `isa/`: the internal `SimdF32` trait and its implementations (`portable.rs`, `avx2.rs`,
//!   `avx512.rs`), detection, and the dispatcher that compiles each kernel per ISA inside a
//!   `#[target_feature]` entry point;
//! * `math/exp.rs`: the one vectorised exp;
//! * `kernels/`: the register-blocked product (`gemm.rs`), feature-map tiles (`features.rs`),
//!   bidirectional and causal attention (`bidirectional.rs`, `causal.rs`) and the standalone
//!   feature map (`standalone.rs`);
//! * `backend.rs`: the trait implementation, validation and threading;
//! * `phases.rs`: opt-in per-phase CPU-time counters (feature map, state build, apply, backward
//!   sweeps, feature backward, I/O) for profiling.
//!
//! ## Memory and threads
//! φ(Q) and φ(K) exist only one tile (64 tokens) at a time. Extra memory is O(threads × tile +
//! batch × heads × segments × M × d_v): the causal backward's per-token R, ḡ and c (16 bytes per
//! query head of a key/value head's group) are kept in rows of the caller's dv or dk outputs that
//! are written only later, with a side buffer only for rows too narrow to hold the group's
//! entries (ungrouped: d_v and d ≤ 3 in f32, ≤ 7 in 16-bit types). Work is
//! split across (batch, head) and across sequence segments: bidirectional attention (forward and backward) uses at most
//! 8 segments per head; the causal forward and backward split a head into segments (a summary
//! pass and an ordered combination give each segment its incoming state, and the backward chains
//! the segments' suffix sums from the last back) when there are fewer than 8 (batch, head)
//! problems. The split depends only on the shape and partial sums are added in a fixed order, so
//! the result is bitwise the same for any number of threads.
//!
//! **Scratch is kept between calls.** The thread that calls a forward or a backward keeps that
//! call's per-segment sums (key-segment summaries and gradient partials, key states, causal
//! segment states and suffix sums: a few times kv heads × 8 segments × M × d_v floats of the
//! largest call, plus a narrow head's stash) and every worker thread keeps a few tiles' scratch
//! per map size, so that repeated forwards, backwards and decoding steps of one shape allocate
//! nothing after the first (a counting-allocator test checks it on every ISA; the learned maps'
//! parameter gradients are returned in new vectors). The memory is freed when the thread exits.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod backend;
mod isa;
mod kernels;
mod math;
pub mod phases;
mod scan;

pub use backend::{SimdBackend, SimdState};

/// Frees the scratch the CPU backend keeps between calls (see "Scratch is kept between calls"):
/// the calling thread's per-call sums and the kernel scratch of every thread of the current
/// rayon pool (the global pool outside `ThreadPool::install`). The next call makes them again.
/// For an engine that wants the memory back after a large call, and for benchmarks that
/// measure what a call needs.
pub fn release_scratch() {
    backend::release_call_scratch();
    rayon::broadcast(|_| kernels::release_kept_scratch());
}
pub use isa::{ISA_ENV, Isa, best_isa};
pub use kernels::causal::HeadState;

#[doc(hidden)]
pub mod testing {
    //! Hooks for the integration tests (not a stable API).
    use crate::isa::{IsaToken, SimdF32, SimdTask};

    /// e^x of every element, on `isa`'s vector path (`None` if the CPU lacks it).
    pub fn exp_slice(isa: crate::Isa, xs: &mut [f32]) -> Option<()> {
        exp_task(isa, xs, false)
    }

    /// The exp variant for arguments ≤ 0 (stabilised feature maps), same contract.
    pub fn exp_nonpositive_slice(isa: crate::Isa, xs: &mut [f32]) -> Option<()> {
        exp_task(isa, xs, true)
    }

    fn exp_task(isa: crate::Isa, xs: &mut [f32], nonpositive: bool) -> Option<()> {
        struct Exp<'a>(&'a mut [f32], bool);
        impl SimdTask for Exp<'_> {
            type Output = ();
            #[inline(always)]
            fn run<S: SimdF32>(self) {
                crate::math::exp::exp_slice::<S>(self.0, self.1)
            }
        }
        IsaToken::new(isa).map(|t| t.run(Exp(xs, nonpositive)))
    }

    /// GFLOP/s of the internal product C (rows × n) += A (rows × k) · B (k × n) on one thread,
    /// A read transposed when `a_transposed` (tuning aid for the examples).
    pub fn gemm_gflops(
        isa: crate::Isa,
        rows: usize,
        k: usize,
        n: usize,
        a_transposed: bool,
        reps: usize,
    ) -> Option<f64> {
        struct G(usize, usize, usize, bool, usize);
        impl SimdTask for G {
            type Output = f64;
            #[inline(always)]
            fn run<S: SimdF32>(self) -> f64 {
                let G(rows, k, n, at, reps) = self;
                let a = vec![0.5f32; rows * k];
                let b = vec![0.25f32; k * n];
                let mut c = vec![0.0f32; rows * n];
                let (ars, acs) = if at { (1, rows) } else { (k, 1) };
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    crate::kernels::gemm::gemm::<S>(rows, k, n, &a, ars, acs, &b, n, &mut c, n, false);
                }
                std::hint::black_box(&c);
                2.0 * (rows * k * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
            }
        }
        IsaToken::new(isa).map(|t| t.run(G(rows, k, n, a_transposed, reps)))
    }
}
