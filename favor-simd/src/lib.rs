//! # favor-simd
//!
//! The CPU backend of favor: FAVOR+ attention with hand-written SIMD kernels for AVX2+FMA and
//! AVX-512F (x86_64) and a portable `wide::f32x8` path (NEON on aarch64), selected at run time.
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
//! * `backend.rs`: the trait implementation, validation and threading.
//!
//! ## Memory and threads
//! φ(Q) and φ(K) exist only one tile (64 tokens) at a time. Extra memory is O(threads × tile +
//! batch × heads × segments × M × d_v) plus, for the causal backward, three floats per token.
//! Work is split across (batch, head) and across sequence segments: bidirectional attention
//! (forward and backward) uses at most 8 segments per head; the causal forward splits a head
//! into segments (summary pass, ordered combination, replay) when there are fewer than 8
//! (batch, head) problems; the causal backward runs one task per head. The split depends only on
//! the shape and partial sums are added in a fixed order, so the result is bitwise the same for
//! any number of threads.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod backend;
mod isa;
mod kernels;
mod math;

pub use backend::{SimdBackend, SimdState};
pub use isa::{ISA_ENV, Isa, best_isa};
pub use kernels::causal::HeadState;

#[doc(hidden)]
pub mod testing {
    //! Hooks for the integration tests (not a stable API).
    use crate::isa::{IsaToken, SimdF32, SimdTask};

    /// e^x of every element, on `isa`'s vector path (`None` if the CPU lacks it).
    pub fn exp_slice(isa: crate::Isa, xs: &mut [f32]) -> Option<()> {
        struct Exp<'a>(&'a mut [f32]);
        impl SimdTask for Exp<'_> {
            type Output = ();
            #[inline(always)]
            fn run<S: SimdF32>(self) {
                crate::math::exp::exp_slice::<S>(self.0)
            }
        }
        IsaToken::new(isa).map(|t| t.run(Exp(xs)))
    }
}
