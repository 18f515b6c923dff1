//! Backend selection: an enum over every backend compiled in, dispatching the trait by match,
//! so callers get the fastest one without generics or trait objects.

use favor_core::backend::{Grads, Host, Inputs, Problem};
use favor_core::{
    AttentionShape, FavorBackend, FeatureMap, FeatureRole, HostMut, HostRef, ParamGrads, ReferenceBackend,
    ReferenceState, Result,
};
use favor_simd::{Isa, SimdBackend, SimdState};

/// A backend chosen at run time.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The CPU backend (AVX-512, AVX2 or portable/NEON SIMD, rayon threads).
    Simd(SimdBackend),
    /// The f64 reference backend (slow; the oracle).
    Reference(ReferenceBackend),
}

/// Decoding state of a [`Backend`]; it must be used with the backend that created it.
#[derive(Debug, Clone)]
pub enum BackendState {
    /// State of [`Backend::Simd`].
    Simd(SimdState),
    /// State of [`Backend::Reference`].
    Reference(ReferenceState),
}

impl Backend {
    /// The fastest backend available on this machine: the CPU SIMD backend on the best ISA
    /// (`FAVOR_ISA` overrides the choice; see favor-simd).
    pub fn best() -> Self {
        Backend::Simd(SimdBackend::new())
    }

    /// The f64 reference backend.
    pub fn reference() -> Self {
        Backend::Reference(ReferenceBackend)
    }

    /// Every backend available here, fastest first: one CPU backend per ISA this machine
    /// runs, then the reference.
    pub fn available() -> Vec<Self> {
        let mut all: Vec<Self> = Isa::available()
            .into_iter()
            .rev()
            .filter_map(|isa| SimdBackend::with_isa(isa).ok())
            .map(Backend::Simd)
            .collect();
        all.push(Self::reference());
        all
    }
}

fn mismatched_state(backend: &Backend) -> favor_core::FavorError {
    favor_core::FavorError::InvalidParameter {
        name: "state",
        reason: format!("the state was created by another backend than `{}`", backend.name()),
    }
}

impl FavorBackend for Backend {
    type Mem = Host;
    type State = BackendState;

    fn name(&self) -> String {
        match self {
            Backend::Simd(b) => b.name(),
            Backend::Reference(b) => b.name(),
        }
    }

    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        phi: HostMut<'_>,
    ) -> Result<()> {
        match self {
            Backend::Simd(b) => b.feature_map(map, role, shape, x, phi),
            Backend::Reference(b) => b.feature_map(map, role, shape, x, phi),
        }
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
        match self {
            Backend::Simd(b) => b.feature_map_backward(map, role, shape, x, dphi, dx),
            Backend::Reference(b) => b.feature_map_backward(map, role, shape, x, dphi, dx),
        }
    }

    fn forward(&self, problem: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        match self {
            Backend::Simd(b) => b.forward(problem, inputs, out),
            Backend::Reference(b) => b.forward(problem, inputs, out),
        }
    }

    fn backward(
        &self,
        problem: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> Result<Option<ParamGrads>> {
        match self {
            Backend::Simd(b) => b.backward(problem, inputs, dout, grads),
            Backend::Reference(b) => b.backward(problem, inputs, dout, grads),
        }
    }

    fn new_state(&self, problem: &Problem<'_>) -> Result<BackendState> {
        match self {
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
        match (self, state) {
            (Backend::Simd(b), BackendState::Simd(s)) => b.decode(problem, s, inputs, out),
            (Backend::Reference(b), BackendState::Reference(s)) => b.decode(problem, s, inputs, out),
            _ => Err(mismatched_state(self)),
        }
    }

    fn synchronize(&self) -> Result<()> {
        match self {
            Backend::Simd(b) => b.synchronize(),
            Backend::Reference(b) => b.synchronize(),
        }
    }
}
