//! Backend selection: an enum over every backend compiled in, dispatching the trait by match,
//! so callers get the fastest one without generics or trait objects.
//!
//! Backend ids, as [`Backend::from_id`] takes them and [`Backend::id`] writes them:
//! `"cuda:N"` (CUDA device N; `"cuda"` is device 0), `"simd:<isa>"` (`avx512`, `avx2`,
//! `portable`; `"simd"` is the widest this CPU runs), `"reference"`, and `"best"`.

use favor_core::backend::{Grads, Host, Inputs, Problem};
use favor_core::{
    AttentionShape, FavorBackend, FavorError, FeatureMap, FeatureRole, HostMut, HostRef, ParamGrads, ReferenceBackend,
    ReferenceState, Result, SlotChunks, SlotState, StateSignature,
};
#[cfg(feature = "cuda")]
use favor_cuda::{CudaBackend, CudaHost, CudaState};
use favor_simd::{Isa, SimdBackend, SimdState};
#[cfg(feature = "cuda")]
use std::sync::Arc;

/// A backend chosen at run time.
///
/// Every variant takes host slices through [`FavorBackend`]. The CUDA variant does so by
/// copying (upload, run, download); an engine that owns device buffers and a stream calls the
/// device backend itself, [`Backend::cuda_device`], whose [`FavorBackend`] implementation takes
/// device tensors and enqueues on its stream without a host round trip.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The CUDA backend on one device, through its host adapter (shared: clones use the same
    /// context, stream and loaded kernels).
    #[cfg(feature = "cuda")]
    Cuda(Arc<CudaHost>),
    /// The CPU backend (AVX-512, AVX2 or portable/NEON SIMD, rayon threads).
    Simd(SimdBackend),
    /// The f64 reference backend (slow; the oracle).
    Reference(ReferenceBackend),
}

/// Decoding state of a [`Backend`]; it must be used with the backend that created it.
#[derive(Debug)]
pub enum BackendState {
    /// State of [`Backend::Cuda`] (device memory).
    #[cfg(feature = "cuda")]
    Cuda(CudaState),
    /// State of [`Backend::Simd`].
    Simd(SimdState),
    /// State of [`Backend::Reference`].
    Reference(ReferenceState),
}

/// CUDA device `ordinal`, opened (or refused) once per process.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Arc<CudaHost>> {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};
    static OPENED: OnceLock<Mutex<BTreeMap<usize, Result<Arc<CudaHost>>>>> = OnceLock::new();
    let mut opened = OPENED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    opened.entry(ordinal).or_insert_with(|| CudaBackend::new(ordinal).map(|b| Arc::new(CudaHost::new(b)))).clone()
}

fn bad_id(id: &str, why: impl std::fmt::Display) -> FavorError {
    FavorError::InvalidParameter { name: "backend", reason: format!("`{id}`: {why}") }
}

impl Backend {
    /// The fastest backend available on this machine: CUDA device 0 when a GPU, its driver
    /// and the kernels are present, otherwise the CPU SIMD backend on the widest ISA
    /// (`FAVOR_ISA` overrides that choice; see favor-simd).
    pub fn best() -> Self {
        Self::cuda(0).unwrap_or_else(|_| Self::simd())
    }

    /// The CPU SIMD backend on the widest ISA this CPU runs (or `FAVOR_ISA`).
    pub fn simd() -> Self {
        Backend::Simd(SimdBackend::new())
    }

    /// The CPU SIMD backend on one ISA; `NotAvailable` when this CPU lacks it.
    pub fn simd_with_isa(isa: Isa) -> Result<Self> {
        SimdBackend::with_isa(isa).map(Backend::Simd)
    }

    /// The f64 reference backend.
    pub fn reference() -> Self {
        Backend::Reference(ReferenceBackend)
    }

    /// CUDA device `ordinal`, or [`FavorError::NotAvailable`] with the reason (built without
    /// the `cuda` feature or without nvcc, no driver, driver older than CUDA 13.0, no such
    /// device). Never panics. Each device is opened once per process (context, stream and
    /// kernels), and every `cuda(ordinal)` shares it, so listing backends repeatedly costs
    /// nothing; an engine that wants its own stream calls `with_stream` on
    /// [`Backend::cuda_device`].
    pub fn cuda(ordinal: usize) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            open_cuda(ordinal).map(Backend::Cuda)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(FavorError::NotAvailable {
                backend: "cuda",
                reason: "favor was built without its `cuda` feature".into(),
            })
        }
    }

    /// The CUDA kernel sources run on the CPU by the test emulator (slow; for tests only).
    #[cfg(feature = "cuda-emulator")]
    #[doc(hidden)]
    pub fn cuda_emulated() -> Self {
        Backend::Cuda(Arc::new(CudaHost::new(CudaBackend::emulated())))
    }

    /// Every backend available here, fastest first: each CUDA device that opens, one CPU
    /// backend per ISA this machine runs (widest first), then the reference.
    pub fn available() -> Vec<Self> {
        let mut all = Vec::new();
        #[cfg(feature = "cuda")]
        all.extend((0..favor_cuda::device_count().unwrap_or(0)).filter_map(|n| Self::cuda(n).ok()));
        all.extend(Isa::available().into_iter().rev().filter_map(|isa| Self::simd_with_isa(isa).ok()));
        all.push(Self::reference());
        all
    }

    /// Opens a backend by id (see the module documentation): `"best"`, `"cuda"`, `"cuda:N"`,
    /// `"simd"`, `"simd:<isa>"` or `"reference"`. An unknown id is an
    /// [`FavorError::InvalidParameter`] naming the ids this build accepts; a backend this
    /// machine cannot run is [`FavorError::NotAvailable`] with the reason.
    pub fn from_id(id: &str) -> Result<Self> {
        match id.trim() {
            "best" => Ok(Self::best()),
            "reference" => Ok(Self::reference()),
            "simd" => Ok(Self::simd()),
            "cuda" => Self::cuda(0),
            #[cfg(feature = "cuda-emulator")]
            "cuda-emulated" => Ok(Self::cuda_emulated()),
            s => {
                if let Some(isa) = s.strip_prefix("simd:") {
                    let isa = Isa::from_name(isa)
                        .ok_or_else(|| bad_id(s, "unknown ISA (expected avx512, avx2 or portable)"))?;
                    Self::simd_with_isa(isa)
                } else if let Some(n) = s.strip_prefix("cuda:") {
                    let n = n.parse::<usize>().map_err(|_| bad_id(s, "expected \"cuda:<device number>\""))?;
                    Self::cuda(n)
                } else {
                    Err(FavorError::InvalidParameter {
                        name: "backend",
                        reason: format!(
                            "unknown backend `{s}`; expected best, cuda, cuda:N, simd, simd:<isa> or reference"
                        ),
                    })
                }
            }
        }
    }

    /// This backend's id, which [`Backend::from_id`] opens again: `"cuda:0"`, `"simd:avx512"`,
    /// `"reference"` (`"cuda-emulated"` for the test emulator).
    pub fn id(&self) -> String {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(h) => match h.device().context() {
                Some(ctx) => format!("cuda:{}", ctx.ordinal()),
                None => "cuda-emulated".into(),
            },
            Backend::Simd(b) => format!("simd:{}", b.isa().name()),
            Backend::Reference(_) => "reference".into(),
        }
    }

    /// Whether this is a GPU backend.
    pub fn is_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        if matches!(self, Backend::Cuda(_)) {
            return true;
        }
        false
    }

    /// The CUDA device backend, for calls on device tensors (an engine's own buffers through
    /// `favor::cuda::DeviceRef::from_raw` and friends, its own stream through
    /// [`CudaBackend::with_stream`]); `None` on CPU backends.
    #[cfg(feature = "cuda")]
    pub fn cuda_device(&self) -> Option<&CudaBackend> {
        match self {
            Backend::Cuda(h) => Some(h.device()),
            _ => None,
        }
    }

    /// The CUDA host adapter (its copy times), `None` on CPU backends.
    #[cfg(feature = "cuda")]
    pub fn cuda_host(&self) -> Option<&Arc<CudaHost>> {
        match self {
            Backend::Cuda(h) => Some(h),
            _ => None,
        }
    }
}

fn mismatched_state(backend: &Backend) -> FavorError {
    FavorError::InvalidParameter {
        name: "state",
        reason: format!("the state was created by another backend than `{}`", backend.name()),
    }
}

/// Calls the same method on whichever backend `$self` holds.
macro_rules! dispatch {
    ($self:expr, $b:ident => $call:expr) => {
        match $self {
            #[cfg(feature = "cuda")]
            Backend::Cuda($b) => $call,
            Backend::Simd($b) => $call,
            Backend::Reference($b) => $call,
        }
    };
}

/// Runs `$call` with the backend and its own kind of state, or fails when the state was made
/// by another kind of backend.
macro_rules! with_state {
    ($self:expr, $state:expr, ($b:ident, $s:ident) => $call:expr) => {
        match ($self, $state) {
            #[cfg(feature = "cuda")]
            (Backend::Cuda($b), BackendState::Cuda($s)) => $call,
            (Backend::Simd($b), BackendState::Simd($s)) => $call,
            (Backend::Reference($b), BackendState::Reference($s)) => $call,
            #[allow(unreachable_patterns)]
            _ => Err(mismatched_state($self)),
        }
    };
}

impl FavorBackend for Backend {
    type Mem = Host;
    type State = BackendState;

    fn name(&self) -> String {
        dispatch!(self, b => b.name())
    }

    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        phi: HostMut<'_>,
    ) -> Result<()> {
        dispatch!(self, b => b.feature_map(map, role, shape, x, phi))
    }

    fn feature_map_backward(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        dphi: HostRef<'_>,
        dx: HostMut<'_>,
    ) -> Result<Option<ParamGrads>> {
        dispatch!(self, b => b.feature_map_backward(map, role, shape, x, dphi, dx))
    }

    fn forward(&self, problem: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        dispatch!(self, b => b.forward(problem, inputs, out))
    }

    fn backward(
        &self,
        problem: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> Result<Option<ParamGrads>> {
        dispatch!(self, b => b.backward(problem, inputs, dout, grads))
    }

    fn new_state(&self, problem: &Problem<'_>) -> Result<BackendState> {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda(b) => b.new_state(problem).map(BackendState::Cuda),
            Backend::Simd(b) => b.new_state(problem).map(BackendState::Simd),
            Backend::Reference(b) => b.new_state(problem).map(BackendState::Reference),
        }
    }

    fn decode(
        &self,
        problem: &Problem<'_>,
        state: &mut BackendState,
        inputs: Inputs<'_, Host>,
        out: HostMut<'_>,
    ) -> Result<()> {
        with_state!(self, state, (b, s) => b.decode(problem, s, inputs, out))
    }

    fn state_signature<'s>(&self, state: &'s BackendState) -> &'s StateSignature {
        match state {
            #[cfg(feature = "cuda")]
            BackendState::Cuda(s) => s.signature(),
            BackendState::Simd(s) => s.signature(),
            BackendState::Reference(s) => s.signature(),
        }
    }

    fn decode_slots(
        &self,
        problem: &Problem<'_>,
        state: &mut BackendState,
        chunks: SlotChunks<'_>,
        inputs: Inputs<'_, Host>,
        out: HostMut<'_>,
    ) -> Result<()> {
        with_state!(self, state, (b, s) => b.decode_slots(problem, s, chunks, inputs, out))
    }

    fn read_slot(&self, state: &BackendState, slot: usize) -> Result<SlotState> {
        with_state!(self, state, (b, s) => b.read_slot(s, slot))
    }

    fn write_slot(&self, state: &mut BackendState, slot: usize, value: &SlotState) -> Result<()> {
        with_state!(self, state, (b, s) => b.write_slot(s, slot, value))
    }

    fn reset_slot(&self, state: &mut BackendState, slot: usize) -> Result<()> {
        with_state!(self, state, (b, s) => b.reset_slot(s, slot))
    }

    fn copy_slot(&self, state: &mut BackendState, from: usize, to: usize) -> Result<()> {
        with_state!(self, state, (b, s) => b.copy_slot(s, from, to))
    }

    fn synchronize(&self) -> Result<()> {
        dispatch!(self, b => b.synchronize())
    }
}
