//! Backends: open one by id, list what runs here, ask what it is.

use crate::handles::{FavorBackend, emit, free, get};
use crate::status::{Failure, FavorStatus, guard, write_string};
use favor::{Backend, FavorBackend as _};
use std::ffi::{CStr, c_char};

/// Opens a backend by id: "best" (the GPU when one works, else the widest SIMD ISA), "cuda",
/// "cuda:N", "simd", "simd:avx512", "simd:avx2", "simd:portable" or "reference" (the f64
/// oracle). `NOT_AVAILABLE` when this machine cannot run it, with the reason.
///
/// # Safety
/// `id` null or a NUL-terminated string; `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_open(id: *const c_char, out: *mut *mut FavorBackend) -> FavorStatus {
    guard(|| {
        if id.is_null() {
            return Err(Failure::null("id"));
        }
        // SAFETY: non-null and NUL-terminated (the caller's contract).
        let id = unsafe { CStr::from_ptr(id) }.to_str().map_err(|_| Failure::param("id", "not UTF-8"))?;
        let backend = Backend::from_id(id)?;
        // SAFETY: forwarded contract.
        unsafe { emit(out, backend) }
    })
}

/// The ids of every backend available here, fastest first, separated by commas
/// ("simd:avx512,simd:avx2,simd:portable,reference"), NUL-terminated into `buf` (`cap` bytes).
/// `*needed` gets the size with the NUL; `BUFFER_TOO_SMALL` when it does not fit (call with a
/// null `buf` to ask for the size).
///
/// # Safety
/// `buf` null or valid for `cap` bytes; `needed` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backends_available(buf: *mut c_char, cap: usize, needed: *mut usize) -> FavorStatus {
    guard(|| {
        let ids: Vec<String> = Backend::available().iter().map(Backend::id).collect();
        // SAFETY: forwarded contract.
        unsafe { write_string(&ids.join(","), buf, cap, needed) }
    })
}

/// The backend's id, which `favor_backend_open` opens again ("simd:avx512", "cuda:0", ...);
/// written like `favor_backends_available`.
///
/// # Safety
/// `backend` null or live; `buf` null or valid for `cap` bytes; `needed` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_id(
    backend: *const FavorBackend,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let b = unsafe { get(backend, "backend")? };
        // SAFETY: forwarded contract.
        unsafe { write_string(&b.id(), buf, cap, needed) }
    })
}

/// The backend's descriptive name ("cpu-avx512", "reference", the GPU's name), written like
/// `favor_backends_available`.
///
/// # Safety
/// As `favor_backend_id`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_name(
    backend: *const FavorBackend,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let b = unsafe { get(backend, "backend")? };
        // SAFETY: forwarded contract.
        unsafe { write_string(&b.name(), buf, cap, needed) }
    })
}

/// Writes whether the backend runs on a GPU.
///
/// # Safety
/// `backend` null or live; `is_gpu` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_is_gpu(backend: *const FavorBackend, is_gpu: *mut bool) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let b = unsafe { get(backend, "backend")? };
        if is_gpu.is_null() {
            return Err(Failure::null("is_gpu"));
        }
        // SAFETY: non-null, writable.
        unsafe { is_gpu.write(b.is_gpu()) };
        Ok(())
    })
}

/// Waits for the backend's queued work (a no-op on CPU backends, whose calls return when done).
///
/// # Safety
/// `backend` null or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_synchronize(backend: *const FavorBackend) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let b = unsafe { get(backend, "backend")? };
        Ok(b.synchronize()?)
    })
}

/// Frees a backend handle (null is a no-op). States made from it keep their own reference.
///
/// # Safety
/// `backend` null or live, and not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_free(backend: *mut FavorBackend) -> FavorStatus {
    // SAFETY: forwarded contract.
    guard(|| unsafe { free(backend, "backend") })
}
