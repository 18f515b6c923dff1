//! The backends this build can run, behind one object-safe interface.
//!
//! Every favor backend with host memory (`FavorBackend<Mem = Host>`) gets [`HostAttention`] by a
//! blanket impl, so the subcommands are written once. Backends are selected through the
//! `favor` entry point ([`favor::Backend`]): a backend it gains appears here with no change.
//!
//! A backend with its own memory (the GPU) also answers [`HostAttention::resident`]: the timing
//! subcommands then upload each point's inputs once and time the calls on device-resident
//! tensors ([`ResidentAttention`]), so host↔device copies are not in the figures, and read the
//! peak memory from the backend's own allocation tracking. `run` and `accuracy` use the host path
//! (copies included), which every backend has.

use favor_core::{
    AttentionShape, FavorBackend, FeatureMap, FeatureRole, Grads, Host, HostMut, HostRef, Inputs, ParamGrads, Problem,
};

#[cfg(feature = "cuda")]
mod cuda;

use crate::error::{BenchError, Result};

/// The host-memory subset of [`FavorBackend`] the tool needs, as a trait object.
pub trait HostAttention: Send + Sync {
    /// The backend's own name (with its ISA), e.g. "reference", "cpu-avx2".
    fn name(&self) -> String;
    /// [`FavorBackend::forward`].
    fn forward(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> favor_core::Result<()>;
    /// [`FavorBackend::backward`].
    fn backward(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> favor_core::Result<Option<ParamGrads>>;
    /// [`FavorBackend::feature_map`].
    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        phi: HostMut<'_>,
    ) -> favor_core::Result<()>;
    /// The device-resident interface of a backend with its own memory (None for CPU backends).
    fn resident(&self) -> Option<&dyn ResidentAttention> {
        None
    }
}

/// The device a resident backend runs on, for result files and `favor-bench backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Driver release and the CUDA version it supports, e.g. "580.65.06 (CUDA 13.0)".
    pub driver: String,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, driver {}", self.name, self.driver)
    }
}

/// One point's host inputs, copied to the device once by [`ResidentAttention::upload`].
#[derive(Debug, Clone, Copy)]
pub struct PointInputs<'a> {
    /// Queries `[B, H, L, d]`.
    pub q: HostRef<'a>,
    /// Keys `[B, H, L, d]`.
    pub k: HostRef<'a>,
    /// Values `[B, H, L, d_v]`.
    pub v: HostRef<'a>,
    /// Output gradient `[B, H, L, d_v]`, for points that run the backward.
    pub dout: Option<HostRef<'a>>,
}

/// A tensor of a resident point that can be copied back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointTensor {
    /// The attention output.
    Out,
    /// ∂ℒ/∂Q.
    Dq,
    /// ∂ℒ/∂K.
    Dk,
    /// ∂ℒ/∂V.
    Dv,
}

/// A backend with device memory, timed without host↔device copies.
pub trait ResidentAttention: Send + Sync {
    /// The device and its driver.
    fn device(&self) -> DeviceInfo;
    /// Copies one point's inputs to the device and allocates its outputs (and gradients when
    /// `dout` is given).
    fn upload<'a>(&'a self, inputs: PointInputs<'_>) -> favor_core::Result<Box<dyn ResidentPoint + 'a>>;
    /// Bytes the backend has allocated now.
    fn memory_in_use(&self) -> usize;
    /// Highest allocation since the last [`ResidentAttention::reset_peak_memory`].
    fn peak_memory(&self) -> usize;
    /// Restarts the peak at the current allocation.
    fn reset_peak_memory(&self);
    /// Device-to-device copy bandwidth over `bytes` (GB/s counting bytes read + written).
    fn copy_gbs(&self, bytes: usize) -> std::result::Result<f64, String>;
    /// The dense bf16 matrix-multiply rate (GFLOP/s) of an `n`×`n`×`n` product with fp32
    /// accumulation from a vendor library, or why it was not measured.
    fn matrix_gflops(&self, n: usize) -> std::result::Result<f64, String>;
}

/// One point's tensors on the device; every call waits for the device before returning, so a
/// wall-clock timer around it measures the device work (and the launch overhead), no copies.
pub trait ResidentPoint {
    /// Attention forward into the point's output.
    fn forward(&mut self, p: &Problem<'_>) -> favor_core::Result<()>;
    /// Attention backward into the point's gradients (needs `dout` at upload).
    fn backward(&mut self, p: &Problem<'_>) -> favor_core::Result<Option<ParamGrads>>;
    /// The feature maps of Q (as queries) and K (in `key_role`), into a device scratch φ.
    fn feature_maps(
        &mut self,
        map: &FeatureMap,
        key_role: FeatureRole,
        shape: AttentionShape,
    ) -> favor_core::Result<()>;
    /// Copies a result to the host.
    fn download(&self, which: PointTensor, dst: HostMut<'_>) -> favor_core::Result<()>;
}

impl<B: FavorBackend<Mem = Host>> HostAttention for B {
    fn name(&self) -> String {
        FavorBackend::name(self)
    }
    fn forward(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> favor_core::Result<()> {
        FavorBackend::forward(self, p, inputs, out)?;
        self.synchronize()
    }
    fn backward(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> favor_core::Result<Option<ParamGrads>> {
        let g = FavorBackend::backward(self, p, inputs, dout, grads)?;
        self.synchronize()?;
        Ok(g)
    }
    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        phi: HostMut<'_>,
    ) -> favor_core::Result<()> {
        FavorBackend::feature_map(self, map, role, shape, x, phi)?;
        self.synchronize()
    }
}

/// An opened backend with the id it was opened by.
pub struct Backend {
    /// The id given to [`open`] ("reference", "simd", "simd:avx2", ...).
    pub id: String,
    /// The backend.
    pub imp: Box<dyn HostAttention>,
}

impl Backend {
    /// True for the f64 oracle, which is only timed at small L.
    pub fn is_reference(&self) -> bool {
        self.id == "reference"
    }

    /// The backend's own name (with the ISA in use).
    pub fn name(&self) -> String {
        self.imp.name()
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({})", self.id)
    }
}

/// Ids of every backend this build can open on this machine, fastest first, from
/// [`favor::Backend::available`]: "cuda" (device 0, when a GPU, its driver and the kernels are
/// present; "cuda:<n>" for the others), "simd" (the SIMD backend at its best ISA), "simd:<isa>"
/// (one ISA forced, widest first), "reference".
pub fn available() -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for b in favor::Backend::available() {
        let id = b.id();
        if id == "cuda:0" {
            ids.push("cuda".into());
            continue;
        }
        if id.starts_with("simd:") && !ids.iter().any(|i| i == "simd") {
            ids.push("simd".into());
        }
        ids.push(id);
    }
    ids
}

/// The fastest backend present.
pub fn best_id() -> String {
    available().into_iter().next().unwrap_or_else(|| "reference".into())
}

/// Opens a backend by id through [`favor::Backend::from_id`] ("best" picks [`best_id`]).
pub fn open(id: &str) -> Result<Backend> {
    let id = if id == "best" { best_id() } else { id.to_string() };
    let backend = favor::Backend::from_id(&id).map_err(|e| match e {
        favor_core::FavorError::InvalidParameter { name: "backend", reason } => {
            BenchError(format!("{reason}; available here: {} (and \"best\")", available().join(", ")))
        }
        e => e.into(),
    })?;
    let imp: Box<dyn HostAttention> = match backend {
        #[cfg(feature = "cuda")]
        favor::Backend::Cuda(host) => Box::new(cuda::CudaBench::new(host)),
        other => Box::new(other),
    };
    Ok(Backend { id, imp })
}

/// Whether the CUDA backend opens on device 0 here: the device and driver, or why not. Probed
/// once per process.
pub fn cuda_status() -> std::result::Result<DeviceInfo, String> {
    static PROBE: std::sync::OnceLock<std::result::Result<DeviceInfo, String>> = std::sync::OnceLock::new();
    PROBE.get_or_init(probe_cuda).clone()
}

fn probe_cuda() -> std::result::Result<DeviceInfo, String> {
    match favor::Backend::cuda(0) {
        #[cfg(feature = "cuda")]
        Ok(favor::Backend::Cuda(host)) => Ok(cuda::CudaBench::new(host).device()),
        Ok(other) => Err(format!("device 0 opened as `{}`, not a CUDA backend", other.id())),
        Err(favor_core::FavorError::NotAvailable { reason, .. }) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

/// Opens a comma-separated list of backend ids.
pub fn open_list(ids: &str) -> Result<Vec<Backend>> {
    ids.split(',').map(str::trim).filter(|s| !s.is_empty()).map(open).collect()
}
