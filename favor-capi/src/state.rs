//! Decoding states for serving: many independent sequences ("slots") at their own positions.

use crate::calls::output_call;
use crate::calls::sizes;
use crate::handles::{EngineState, FavorBackend, FavorMap, FavorState, StateInner, emit, free, get, on_engine};
use crate::status::{CallResult, Failure, FavorStatus, guard};
use crate::tensor::{FavorInputs, FavorProblem, FavorTensor, Space, problem, read};
use favor::{Backend, FavorBackend as Calls, FeatureMap, SlotChunks, SlotState};
use std::sync::MutexGuard;

/// A backend whose states an [`EngineState`] holds.
trait Stateful: Calls {
    fn wrap(state: Self::State) -> EngineState;
    fn state(s: &EngineState) -> CallResult<&Self::State>;
    fn state_mut(s: &mut EngineState) -> CallResult<&mut Self::State>;
}

fn foreign_state() -> Failure {
    // A state keeps the engine that made it, so this is a favor bug.
    Failure::new(FavorStatus::Internal, "a state held by another kind of backend")
}

impl Stateful for Backend {
    fn wrap(state: Self::State) -> EngineState {
        EngineState::Host(state)
    }
    fn state(s: &EngineState) -> CallResult<&Self::State> {
        match s {
            EngineState::Host(s) => Ok(s),
            #[allow(unreachable_patterns)]
            _ => Err(foreign_state()),
        }
    }
    fn state_mut(s: &mut EngineState) -> CallResult<&mut Self::State> {
        match s {
            EngineState::Host(s) => Ok(s),
            #[allow(unreachable_patterns)]
            _ => Err(foreign_state()),
        }
    }
}

#[cfg(feature = "cuda")]
impl Stateful for favor::cuda::CudaBackend {
    fn wrap(state: Self::State) -> EngineState {
        EngineState::Device(state)
    }
    fn state(s: &EngineState) -> CallResult<&Self::State> {
        match s {
            EngineState::Device(s) => Ok(s),
            _ => Err(foreign_state()),
        }
    }
    fn state_mut(s: &mut EngineState) -> CallResult<&mut Self::State> {
        match s {
            EngineState::Device(s) => Ok(s),
            _ => Err(foreign_state()),
        }
    }
}

/// `b`'s own kind of state inside `s`.
fn state_of<'s, B: Stateful>(_: &B, s: &'s EngineState) -> CallResult<&'s B::State> {
    B::state(s)
}

fn state_mut_of<'s, B: Stateful>(_: &B, s: &'s mut EngineState) -> CallResult<&'s mut B::State> {
    B::state_mut(s)
}

fn new_state_on<B: Stateful>(b: &B, p: &favor::Problem<'_>) -> CallResult<EngineState> {
    Ok(B::wrap(b.new_state(p)?))
}

/// One decode or slot-decode call on one backend.
///
/// # Safety
/// As `favor_decode` / `favor_decode_slots`.
unsafe fn decode_on<B: Stateful>(
    b: &B,
    state: &mut EngineState,
    map: &FeatureMap,
    p: &FavorProblem,
    chunks: Option<SlotChunks<'_>>,
    x: &FavorInputs,
    o: &FavorTensor,
) -> CallResult
where
    B::Mem: Space,
{
    // SAFETY: forwarded contract.
    let (x, out, prob) = unsafe { output_call::<B::Mem>(map, p, x, o)? };
    let st = B::state_mut(state)?;
    match chunks {
        None => Ok(b.decode(&prob, st, x.inputs(), out)?),
        Some(c) => Ok(b.decode_slots(&prob, st, c, x.inputs(), out)?),
    }
}

/// Which tokens of a `favor_decode_slots` call continue which slot: sequence i is tokens
/// `offsets[i]..offsets[i + 1]` of the packed tensors (batch 1) and continues slot `slots[i]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FavorSlotChunks {
    /// The slot each sequence continues; no slot twice.
    pub slots: *const usize,
    /// Entries of `slots`.
    pub n_slots: usize,
    /// Cumulative token offsets, `n_slots + 1` entries from 0 to the problem's `len`.
    pub offsets: *const usize,
    /// Entries of `offsets`.
    pub n_offsets: usize,
}

/// The state behind a handle, locked.
///
/// # Safety
/// `p` null or a live handle.
unsafe fn lock<'a>(p: *const FavorState) -> CallResult<(&'a StateInner, MutexGuard<'a, EngineState>)> {
    // SAFETY: forwarded contract.
    let inner = unsafe { get(p, "state")? };
    let guard = inner.state.lock().map_err(|_| {
        Failure::new(FavorStatus::Internal, "the state was left inconsistent by an earlier internal error; free it")
    })?;
    Ok((inner, guard))
}

/// An empty decoding state of `problem.batch` slots for `problem`'s heads, sizes and `map`
/// (`problem.len` is ignored); it keeps its own reference to `backend` (and lives in device
/// memory on a device backend).
///
/// # Safety
/// Handles null or live; `problem_` null or readable; `out` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_new(
    backend: *const FavorBackend,
    map: *const FavorMap,
    problem_: *const FavorProblem,
    out: *mut *mut FavorState,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (e, map, p) = (get(backend, "backend")?, get(map, "map")?, read(problem_, "problem")?);
            let prob = problem(&p, map, |_| None)?;
            let state = on_engine!(e, b => new_state_on(b, &prob)?);
            emit(out, StateInner { engine: e.clone(), state: std::sync::Mutex::new(state) })
        }
    })
}

/// Causal attention continuing every slot by the same chunk of `problem.len` tokens
/// (`problem.batch` = the state's slots): prefill with a long chunk, decode with one token.
/// Equal to full causal attention over all the chunks each slot has consumed.
///
/// # Safety
/// As `favor_forward`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_decode(
    state: *const FavorState,
    map: *const FavorMap,
    problem_: *const FavorProblem,
    inputs: *const FavorInputs,
    out: *const FavorTensor,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (inner, mut st) = lock(state)?;
            let (map, p, x, o) =
                (get(map, "map")?, read(problem_, "problem")?, read(inputs, "inputs")?, read(out, "out")?);
            on_engine!(&inner.engine, b => decode_on(b, &mut st, map, &p, None, &x, &o))
        }
    })
}

/// Continues some slots, each by its own chunk, in one call: the tensors hold the chunks back to
/// back (`problem.batch` = 1, `problem.len` = their total tokens, any strides). Prefill for some
/// slots and one-token decoding for others mix freely.
///
/// # Safety
/// As `favor_forward`; `chunks` null or readable with its (host) arrays valid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_decode_slots(
    state: *const FavorState,
    map: *const FavorMap,
    problem_: *const FavorProblem,
    chunks: *const FavorSlotChunks,
    inputs: *const FavorInputs,
    out: *const FavorTensor,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        unsafe {
            let (inner, mut st) = lock(state)?;
            let (map, p, x, o) =
                (get(map, "map")?, read(problem_, "problem")?, read(inputs, "inputs")?, read(out, "out")?);
            let c = read(chunks, "chunks")?;
            let chunks = SlotChunks::new(
                sizes(c.slots, c.n_slots, "chunks.slots")?,
                sizes(c.offsets, c.n_offsets, "chunks.offsets")?,
            );
            on_engine!(&inner.engine, b => decode_on(b, &mut st, map, &p, Some(chunks), &x, &o))
        }
    })
}

/// Writes the state's number of slots.
///
/// # Safety
/// `state` null or live; `slots` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_slots(state: *const FavorState, slots: *mut usize) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let (inner, st) = unsafe { lock(state)? };
        if slots.is_null() {
            return Err(Failure::null("slots"));
        }
        // SAFETY: non-null, writable.
        unsafe { slots.write(on_engine!(&inner.engine, b => b.state_signature(state_of(b, &st)?).slots())) };
        Ok(())
    })
}

/// Writes how many tokens slot `slot` has consumed.
///
/// # Safety
/// `state` null or live; `tokens` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_tokens(state: *const FavorState, slot: usize, tokens: *mut u64) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let (inner, st) = unsafe { lock(state)? };
        if tokens.is_null() {
            return Err(Failure::null("tokens"));
        }
        let value = on_engine!(&inner.engine, b => b.read_slot(state_of(b, &st)?, slot)?);
        // SAFETY: non-null, writable.
        unsafe { tokens.write(value.tokens()) };
        Ok(())
    })
}

/// Empties slot `slot`, as if it had consumed nothing.
///
/// # Safety
/// `state` null or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_reset_slot(state: *const FavorState, slot: usize) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let (inner, mut st) = unsafe { lock(state)? };
        on_engine!(&inner.engine, b => Ok(b.reset_slot(state_mut_of(b, &mut st)?, slot)?))
    })
}

/// Copies slot `from` over slot `to` (beam search, a shared prompt prefix).
///
/// # Safety
/// `state` null or live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_copy_slot(state: *const FavorState, from: usize, to: usize) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let (inner, mut st) = unsafe { lock(state)? };
        on_engine!(&inner.engine, b => Ok(b.copy_slot(state_mut_of(b, &mut st)?, from, to)?))
    })
}

/// Exports slot `slot` as bytes (versioned, with a fingerprint of the map and sizes, and a
/// checksum) into `buf` (`cap` bytes); `*len` gets their number. `BUFFER_TOO_SMALL` when they do
/// not fit (call with a null `buf` to ask for the size).
///
/// # Safety
/// `state` null or live; `buf` null or valid for `cap` bytes; `len` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_export_slot(
    state: *const FavorState,
    slot: usize,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let (inner, st) = unsafe { lock(state)? };
        if len.is_null() {
            return Err(Failure::null("len"));
        }
        let bytes = on_engine!(&inner.engine, b => b.read_slot(state_of(b, &st)?, slot)?).to_bytes();
        // SAFETY: non-null, writable.
        unsafe { len.write(bytes.len()) };
        if buf.is_null() || cap < bytes.len() {
            return Err(Failure::new(
                FavorStatus::BufferTooSmall,
                format!("argument `buf`: the slot needs {} bytes, the buffer holds {cap}", bytes.len()),
            ));
        }
        // SAFETY: `buf` holds `cap ≥ bytes.len()` bytes of the caller's memory.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
        Ok(())
    })
}

/// Imports bytes from `favor_state_export_slot` into slot `slot`; `STATE_MISMATCH` when they
/// were made for another problem or map, `INVALID_PARAMETER` when they are not a slot (wrong
/// version, truncated, checksum mismatch).
///
/// # Safety
/// `state` null or live; `bytes` null or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_import_slot(
    state: *const FavorState,
    slot: usize,
    bytes: *const u8,
    len: usize,
) -> FavorStatus {
    guard(|| {
        // SAFETY: forwarded contract.
        let (inner, mut st) = unsafe { lock(state)? };
        if bytes.is_null() {
            return Err(Failure::null("bytes"));
        }
        // SAFETY: non-null, `len` bytes readable (the caller's contract).
        let value = SlotState::from_bytes(unsafe { std::slice::from_raw_parts(bytes, len) })?;
        on_engine!(&inner.engine, b => Ok(b.write_slot(state_mut_of(b, &mut st)?, slot, &value)?))
    })
}

/// Frees a state (null is a no-op).
///
/// # Safety
/// `state` null or live, and not used again (by any thread).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn favor_state_free(state: *mut FavorState) -> FavorStatus {
    // SAFETY: forwarded contract.
    guard(|| unsafe { free(state, "state") })
}
