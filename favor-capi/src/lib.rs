//! The C ABI of favor: FAVOR+ attention for C and C++ engines.
//!
//! `include/favor.h` is generated from this crate by cbindgen and committed; the crate builds a
//! shared (`libfavor_capi.so`) and a static (`libfavor_capi.a`) library.
//!
//! Conventions:
//! - Every function returns a [`FavorStatus`]; on failure `favor_last_error()` (thread-local)
//!   names the argument and the problem. No panic crosses the boundary: one is caught and
//!   returned as `FAVOR_STATUS_INTERNAL`.
//! - Handles (`FavorBackend`, `FavorMap`, `FavorState`) are opaque, created by `*_open`,
//!   `*_draw`/`*_from_matrix`/..., `*_new`, and freed by `*_free`. A handle of the wrong kind is
//!   detected (`FAVOR_STATUS_WRONG_HANDLE`); using a freed handle is the caller's bug.
//! - Thread safety: backends and maps may be used by any number of threads at once; calls on
//!   one state are serialised by a lock inside it; the last-error message is per thread.
//! - Tensors (`FavorTensor`) are host memory with their own strides and element type (f32, f16,
//!   bf16); outputs may not overlap any other buffer of the call. The CUDA backend takes host
//!   tensors too (copied to the device and back).

mod backend;
mod calls;
mod handles;
mod map;
mod state;
mod status;
mod tensor;

pub use backend::*;
pub use calls::*;
pub use handles::{FavorBackend, FavorMap, FavorState};
pub use map::*;
pub use state::*;
pub use status::{FavorStatus, favor_last_error, favor_status_name};
pub use tensor::{FavorDType, FavorGrads, FavorInputs, FavorProblem, FavorTensor};

/// The version of this ABI: bumped whenever a signature or a struct changes.
pub const FAVOR_ABI_VERSION: u32 = 1;

/// The ABI version the library was built with (compare with `FAVOR_ABI_VERSION` from the
/// header the program was compiled against).
#[unsafe(no_mangle)]
pub extern "C" fn favor_abi_version() -> u32 {
    FAVOR_ABI_VERSION
}
