//! # favor-cuda
//!
//! The CUDA backend of favor: hand-written kernels in the repository's `cuda/` folder, compiled
//! by nvcc at build time into fatbins (SASS for sm_80 and sm_90, PTX for sm_90) that are
//! embedded in the crate and loaded at run time through `cudarc` with dynamic loading, so a
//! program needs only the NVIDIA driver (r580+, CUDA 13.0), no toolkit.
//!
//! * [`CudaBackend`] implements [`favor_core::FavorBackend`] on device memory ([`CudaMem`]):
//!   tensors allocated by a backend ([`DeviceTensor`], safe on any backend of the same context:
//!   a call on another stream joins the tensor's stream before and after its work), your own
//!   buffers (`unsafe` [`DeviceRef::from_slice`], [`DeviceRef::from_raw`], ...: the backend
//!   enqueues asynchronously and does not update cudarc's per-buffer events, so ordering other
//!   streams and keeping the memory alive is the caller's contract) and your own stream
//!   ([`CudaBackend::with_stream`]); calls enqueue work and do not synchronise.
//! * [`CudaHost`] is the same backend on host tensors (copies in and out, timed separately).
//! * [`CudaBackend::new`] returns [`favor_core::FavorError::NotAvailable`], never panics, when
//!   the crate was built without nvcc, when there is no driver (checked before cudarc is asked
//!   for anything), when the driver is older than CUDA 13.0, or when the device does not exist.
//!
//! ## Kernels (status)
//! The current kernels put correctness first: fp32 SIMT code with every tail bounds-checked,
//! no tensor cores yet (see `cuda/*.cu` for the data flow of each). f16/bf16 tensors are widened
//! to fp32 on entry and rounded once on exit; all state and accumulation is fp32. Supported
//! maps: positive, hyperbolic, trigonometric and the generalized (ReLU, ELU+1, softplus) maps;
//! the learned maps return [`favor_core::FavorError::Unsupported`]. Limits: d ≤ 256 (with
//! m ≤ 1024 projections), batch × heads ≤ 65535. φ(Q), φ(K) and the other intermediates live in
//! fp32 scratch for the duration of a call (counted by [`CudaBackend::memory_usage`]).
//!
//! Device inputs are not scanned for NaN/∞ (that would need a reduction and a host
//! synchronisation); [`CudaHost`] checks host inputs like every CPU backend. Where the f64
//! reference keeps a denominator that underflows fp32 (inputs of extreme magnitude), the kernels
//! return the zero row of a zero denominator.
//!
//! ## Building
//! `build.rs` finds nvcc in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin` or `PATH`; without it
//! the crate builds with empty fatbins (cfg `favor_no_kernels`) and prints a warning. The
//! architectures come from `FAVOR_CUDA_ARCHS` (default `80,90`). CI installs nvcc from PyPI and
//! makes a missing nvcc or a kernel compile error fail the build:
//!
//! ```text
//! export NVCC="$(cuda/install-nvcc.sh | tail -n1)" FAVOR_REQUIRE_NVCC=1
//! cargo test -p favor-cuda
//! ```
//!
//! ## Testing without a GPU
//! `cargo test -p favor-cuda --features emulator` also runs the cross-backend tests on a CPU
//! emulator of the same kernel sources (`cuda/emu`: one OS thread per CUDA thread, barriers for
//! `__syncthreads`, blocks in a seeded random order (`FAVOR_EMU_SEED`), dynamic and static
//! shared memory filled with NaN before every block, a check that every thread of a block passes
//! the same barriers and that warp shuffles read only lanes that exist, launches rejected above a
//! kernel's `__launch_bounds__` or the 48 KB of shared memory, and NaN guard zones around every
//! buffer, so a read past a tail poisons the results and a write past it fails the test). It
//! validates the kernels' arithmetic, indexing, tails, argument lists and barrier placement
//! against the f64 reference, up to L = 2100 (three reduction segments) at d = 64, m = 256. It cannot see GPU-only faults (races that happen to serialise, accesses far beyond
//! a buffer, driver behaviour): that is what the GPU run below is for.
//!
//! ## Validating on a GPU machine without Rust
//! Build the test binaries here, then carry them over and run `cuda/gpu-validate.sh`:
//!
//! ```text
//! FAVOR_REQUIRE_NVCC=1 NVCC=... cargo test -p favor-cuda --release --no-run   # no emulator feature
//! #   prints e.g. "Executable tests/cross_backend.rs (target/release/deps/cross_backend-0123abcd)"
//! cuda/gpu-validate.sh target/release/deps/cross_backend-0123abcd target/release/deps/favor_cuda-...
//! ```
//! The script runs each binary with `FAVOR_REQUIRE_GPU=1` (a missing GPU fails instead of
//! skipping), then under `compute-sanitizer --tool memcheck` and `--tool racecheck`.

mod backend;
#[cfg(feature = "emulator")]
mod emulator;
mod host;
mod kernels;
mod memory;
mod ops;

pub use backend::{CudaBackend, CudaState, REQUIRED_DRIVER_VERSION, device_count, driver_version};
pub use host::{CopyTimes, CudaHost};
pub use kernels::{FATBINS, KERNEL_NAMES, kernels_built};
pub use memory::{CudaElement, CudaMem, DeviceMut, DeviceRef, DeviceTensor, MemoryUsage};
