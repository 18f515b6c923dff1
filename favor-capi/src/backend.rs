//! Backends: open one by id, list what runs here, ask what it is.

use crate::handles::{Engine, FavorBackend, emit, free, get, on_engine};
use crate::status::{CallResult, Failure, FavorStatus, guard, write_string};
use favor::{Backend, FavorBackend as _};
use std::ffi::{CStr, c_char, c_void};
use std::sync::Arc;

/// # Safety
/// `id` null or NUL-terminated.
unsafe fn id_str<'a>(id: *const c_char) -> CallResult<&'a str> {
    if id.is_null() {
        return Err(Failure::null("id"));
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    unsafe { CStr::from_ptr(id) }.to_str().map_err(|_| Failure::param("id", "not UTF-8"))
}

/// Opens a backend by id: "best" (the GPU when one works, else the widest SIMD ISA), "cuda",
/// "cuda:N", "simd", "simd:avx512", "simd:avx2", "simd:portable" or "reference" (the f64
/// oracle). `NOT_AVAILABLE` when this machine cannot run it, with the reason.
///
/// # Safety
/// `id` null or a NUL-terminated string; `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_open(id: *const c_char, out: *mut *mut FavorBackend) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let backend = Backend::from_id(unsafe { id_str(id)? })?;
        // SAFETY: forwarded contract.
        unsafe { emit(out, Arc::new(Engine::Host(backend))) }
    })
}

/// Opens the CUDA backend for **device** tensors: every call through the handle takes device
/// pointers of this device (in `FavorTensor::data`; key masks, offsets and parameter gradients
/// stay in host memory) and enqueues its work on `stream` without a host round trip or a host
/// synchronisation of the call's work (`favor_backend_synchronize` waits for it). `id` is
/// "cuda" or "cuda:N"; `stream` is the caller's `CUstream` / `cudaStream_t` on the device's
/// primary context (the runtime API's context), or null for favor's own stream of the device.
/// Decoding states made with the handle live in device memory. `NOT_AVAILABLE` without a GPU.
///
/// # Safety
/// `id` null or NUL-terminated; `stream` null or a live stream of that device's primary context
/// that outlives the handle and its calls' work; `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_open_device(
    id: *const c_char,
    stream: *mut c_void,
    out: *mut *mut FavorBackend,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let id = unsafe { id_str(id)? };
        // SAFETY: forwarded contract.
        let engine = unsafe { device_engine(id, stream)? };
        // SAFETY: forwarded contract.
        unsafe { emit(out, Arc::new(engine)) }
    })
}

/// # Safety
/// As `favor_backend_open_device`.
#[cfg(feature = "cuda")]
unsafe fn device_engine(id: &str, stream: *mut c_void) -> CallResult<Engine> {
    #[cfg(feature = "cuda-emulator")]
    if id == "cuda-emulated" {
        if !stream.is_null() {
            return Err(Failure::param("stream", "the emulator has no streams; pass null"));
        }
        return Ok(Engine::Device(favor::cuda::CudaBackend::emulated()));
    }
    let host = Backend::from_id(id)?;
    let Some(device) = host.cuda_device() else {
        return Err(Failure::param("id", format!("`{id}` is not a CUDA backend (expected cuda or cuda:N)")));
    };
    let device = if stream.is_null() {
        device.with_stream(device.stream().expect("a device backend has a stream").clone())?
    } else {
        // SAFETY: forwarded contract: a live stream of this device's primary context.
        unsafe { device.with_borrowed_stream(stream)? }
    };
    Ok(Engine::Device(device))
}

/// # Safety
/// Nothing is dereferenced.
#[cfg(not(feature = "cuda"))]
unsafe fn device_engine(_id: &str, _stream: *mut c_void) -> CallResult<Engine> {
    Err(favor::FavorError::NotAvailable {
        backend: "cuda",
        reason: "favor-capi was built without its `cuda` feature".into(),
    }
    .into())
}

/// Writes whether the backend takes device pointers (opened with `favor_backend_open_device`).
///
/// # Safety
/// `backend` null or live; `device` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_backend_takes_device_pointers(
    backend: *const FavorBackend,
    device: *mut bool,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let e = unsafe { get(backend, "backend")? };
        if device.is_null() {
            return Err(Failure::null("device"));
        }
        let on_device = !matches!(**e, Engine::Host(_));
        // SAFETY: non-null, writable.
        unsafe { device.write(on_device) };
        Ok(())
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
        let e = unsafe { get(backend, "backend")? };
        let id = match &**e {
            Engine::Host(b) => b.id(),
            #[cfg(feature = "cuda")]
            Engine::Device(b) => {
                b.context().map_or_else(|| "cuda-emulated".into(), |c| format!("cuda:{}", c.ordinal()))
            }
        };
        // SAFETY: forwarded contract.
        unsafe { write_string(&id, buf, cap, needed) }
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
        let e = unsafe { get(backend, "backend")? };
        let name = on_engine!(e, b => b.name());
        // SAFETY: forwarded contract.
        unsafe { write_string(&name, buf, cap, needed) }
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
        let e = unsafe { get(backend, "backend")? };
        if is_gpu.is_null() {
            return Err(Failure::null("is_gpu"));
        }
        let gpu = match &**e {
            Engine::Host(b) => b.is_gpu(),
            #[cfg(feature = "cuda")]
            Engine::Device(_) => true,
        };
        // SAFETY: non-null, writable.
        unsafe { is_gpu.write(gpu) };
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
        let e = unsafe { get(backend, "backend")? };
        Ok(on_engine!(e, b => b.synchronize())?)
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
