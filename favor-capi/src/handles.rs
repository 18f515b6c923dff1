//! Opaque handles. Each is a boxed `Handle<T>` whose first field is a tag naming its kind, so a
//! handle passed where another kind belongs is an error, not undefined behaviour; freeing
//! overwrites the tag before the memory goes back.

use crate::status::{CallResult, Failure, FavorStatus};
use favor::{Backend, BackendState, FeatureMap};
use std::sync::{Arc, Mutex};

/// A backend (C: `FavorBackend *`). Thread-safe: any number of threads may call through one
/// backend handle at once.
pub struct FavorBackend {
    _opaque: [u8; 0],
}

/// A prepared feature map (C: `FavorMap *`): its projection or parameters, immutable after
/// creation, so it may be shared by any number of threads. Backends keep W in their own prepared
/// form (scales folded in, padded) across calls, keyed by the map.
pub struct FavorMap {
    _opaque: [u8; 0],
}

/// A decoding state of many slots (C: `FavorState *`), tied to the backend that created it.
/// Calls on one state from several threads are serialised by a lock inside it.
pub struct FavorState {
    _opaque: [u8; 0],
}

/// What a `FavorBackend` holds: a backend on host tensors (any backend, the CUDA one through
/// host copies), or the CUDA backend on device tensors.
pub(crate) enum Engine {
    Host(Backend),
    #[cfg(feature = "cuda")]
    Device(favor::cuda::CudaBackend),
}

/// Runs `$body` with `$b` bound to the engine's backend (each arm its own type).
macro_rules! on_engine {
    ($engine:expr, $b:ident => $body:expr) => {
        match &**$engine {
            crate::handles::Engine::Host($b) => $body,
            #[cfg(feature = "cuda")]
            crate::handles::Engine::Device($b) => $body,
        }
    };
}
pub(crate) use on_engine;

/// A decoding state of either kind of engine.
pub(crate) enum EngineState {
    Host(BackendState),
    #[cfg(feature = "cuda")]
    Device(favor::cuda::CudaState),
}

/// What a `FavorState` holds: the state and the backend it belongs to.
pub(crate) struct StateInner {
    pub engine: Arc<Engine>,
    pub state: Mutex<EngineState>,
}

/// The tag, then the value; `repr(C)` keeps the tag at offset 0 for every `T`.
#[repr(C)]
struct Handle<T> {
    tag: u64,
    value: T,
}

/// A kind of handle: its tag, its C type name, and the Rust value behind it.
pub(crate) trait Kind {
    type Value;
    const TAG: u64;
    const NAME: &'static str;
}

impl Kind for FavorBackend {
    type Value = Arc<Engine>;
    const TAG: u64 = u64::from_le_bytes(*b"favorBK\x01");
    const NAME: &'static str = "FavorBackend";
}

impl Kind for FavorMap {
    type Value = FeatureMap;
    const TAG: u64 = u64::from_le_bytes(*b"favorMP\x01");
    const NAME: &'static str = "FavorMap";
}

impl Kind for FavorState {
    type Value = StateInner;
    const TAG: u64 = u64::from_le_bytes(*b"favorST\x01");
    const NAME: &'static str = "FavorState";
}

/// The tag a freed handle carries until its memory is reused.
const FREED: u64 = u64::from_le_bytes(*b"favorFRE");

fn kind_of(tag: u64) -> &'static str {
    match tag {
        t if t == FavorBackend::TAG => "a FavorBackend",
        t if t == FavorMap::TAG => "a FavorMap",
        t if t == FavorState::TAG => "a FavorState",
        FREED => "a freed handle",
        _ => "not a favor handle",
    }
}

/// Boxes `value` as a new handle and stores it in `*out`.
///
/// # Safety
/// `out` is null or valid for one pointer write.
pub(crate) unsafe fn emit<K: Kind>(out: *mut *mut K, value: K::Value) -> CallResult {
    if out.is_null() {
        return Err(Failure::null("out"));
    }
    let h = Box::into_raw(Box::new(Handle { tag: K::TAG, value })).cast::<K>();
    // SAFETY: `out` is non-null and valid for one write (the caller's contract).
    unsafe { out.write(h) };
    Ok(())
}

/// Checks that `p` is a live handle of kind `K` and borrows its value.
///
/// # Safety
/// `p` is null or a pointer this library returned (of any kind) and has not freed: every such
/// allocation starts with a `u64` tag.
pub(crate) unsafe fn get<'a, K: Kind>(p: *const K, arg: &str) -> CallResult<&'a K::Value> {
    if p.is_null() {
        return Err(Failure::null(arg));
    }
    // SAFETY: a live handle of any kind starts with its tag (repr(C) Handle).
    let tag = unsafe { p.cast::<u64>().read() };
    if tag != K::TAG {
        return Err(Failure::new(
            FavorStatus::WrongHandle,
            format!("argument `{arg}` must be a {}, got {}", K::NAME, kind_of(tag)),
        ));
    }
    // SAFETY: the tag says `p` is a live `Handle<K::Value>`; shared access only.
    Ok(unsafe { &(*p.cast::<Handle<K::Value>>()).value })
}

/// Frees a handle of kind `K` (null is a no-op).
///
/// # Safety
/// As [`get`]; `p` is not used again (by any thread) after this call.
pub(crate) unsafe fn free<K: Kind>(p: *mut K, arg: &str) -> CallResult {
    if p.is_null() {
        return Ok(());
    }
    // SAFETY: as `get`, which checks the kind.
    unsafe { get::<K>(p, arg)? };
    let h = p.cast::<Handle<K::Value>>();
    // SAFETY: `h` came from `Box::into_raw` in `emit` (the tag says so) and is freed once.
    let mut b = unsafe { Box::from_raw(h) };
    // Volatile: a plain store right before the free could be optimised away.
    // SAFETY: `b.tag` is a valid, aligned u64 of the live box.
    unsafe { std::ptr::write_volatile(&mut b.tag, FREED) };
    drop(b);
    Ok(())
}
