//! The backends this build can run, behind one object-safe interface.
//!
//! Every favor backend with host memory (`FavorBackend<Mem = Host>`) gets [`HostAttention`] by a
//! blanket impl, so the subcommands are written once. To add a backend (e.g. CUDA through its host
//! adapter), add its ids to [`available`] and a match arm to [`open`]: nothing else changes.

use favor_core::{
    AttentionShape, FavorBackend, FeatureMap, FeatureRole, Grads, Host, HostMut, HostRef, Inputs, ParamGrads, Problem,
    ReferenceBackend,
};

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

/// Ids of every backend this build can open on this machine, fastest first. "simd" is the SIMD
/// backend at its best ISA; "simd:<isa>" forces one ISA.
pub fn available() -> Vec<String> {
    let mut ids = Vec::new();
    ids.extend(simd::ids());
    ids.push("reference".to_string());
    ids
}

/// The fastest backend present.
pub fn best_id() -> String {
    available().into_iter().next().unwrap_or_else(|| "reference".into())
}

/// Opens a backend by id ("best" picks [`best_id`]).
pub fn open(id: &str) -> Result<Backend> {
    let id = if id == "best" { best_id() } else { id.to_string() };
    let imp: Box<dyn HostAttention> = match id.as_str() {
        "reference" => Box::new(ReferenceBackend),
        s if s == "simd" || s.starts_with("simd:") => simd::open(s.strip_prefix("simd:"))?,
        other => {
            return Err(BenchError(format!(
                "unknown backend `{other}`; available here: {} (and \"best\")",
                available().join(", ")
            )));
        }
    };
    Ok(Backend { id, imp })
}

/// Opens a comma-separated list of backend ids.
pub fn open_list(ids: &str) -> Result<Vec<Backend>> {
    ids.split(',').map(str::trim).filter(|s| !s.is_empty()).map(open).collect()
}

#[cfg(feature = "simd")]
mod simd {
    use super::HostAttention;
    use crate::error::{BenchError, Result};

    pub fn ids() -> Vec<String> {
        let mut ids = vec!["simd".to_string()];
        ids.extend(favor_simd::Isa::available().into_iter().map(|isa| format!("simd:{}", isa.name())));
        ids
    }

    pub fn open(isa: Option<&str>) -> Result<Box<dyn HostAttention>> {
        let Some(want) = isa else { return Ok(Box::new(favor_simd::SimdBackend::new())) };
        let found = favor_simd::Isa::available().into_iter().find(|i| i.name() == want);
        let Some(isa) = found else {
            let names: Vec<String> = favor_simd::Isa::available().into_iter().map(|i| i.name().to_string()).collect();
            return Err(BenchError(format!("ISA `{want}` is not available here; available: {}", names.join(", "))));
        };
        Ok(Box::new(favor_simd::SimdBackend::with_isa(isa)?))
    }
}

#[cfg(not(feature = "simd"))]
mod simd {
    use super::HostAttention;
    use crate::error::{BenchError, Result};

    pub fn ids() -> Vec<String> {
        Vec::new()
    }

    pub fn open(_isa: Option<&str>) -> Result<Box<dyn HostAttention>> {
        Err(BenchError("the SIMD backend is not built in: rebuild favor-bench with `--features simd`".into()))
    }
}
