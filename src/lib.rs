#![doc = include_str!("../README.md")]

pub use favor_core::*;

mod select;

pub use favor_simd::{Isa, release_scratch};
pub use select::{Backend, BackendState};

/// The CUDA backend crate (device tensors, streams, memory usage), for engines that call
/// [`Backend::cuda_device`] on their own device buffers.
#[cfg(feature = "cuda")]
pub use favor_cuda as cuda;
