//! Backend selection: an enum over every backend compiled in, dispatching the trait by match,
//! so callers get the fastest one without generics or trait objects.

use favor_core::backend::{Grads, Host, Inputs, Problem};
use favor_core::{
    AttentionShape, FavorBackend, FeatureMap, FeatureRole, HostMut, HostRef, ParamGrads, ReferenceBackend,
    ReferenceState, Result,
};

/// A backend chosen at run time.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The f64 reference backend (slow; the oracle).
    Reference(ReferenceBackend),
}

/// Decoding state of a [`Backend`]; it must be used with the backend that created it.
#[derive(Debug, Clone)]
pub enum BackendState {
    /// State of [`Backend::Reference`].
    Reference(ReferenceState),
}

impl Backend {
    /// The fastest backend available on this machine.
    pub fn best() -> Self {
        Backend::Reference(ReferenceBackend)
    }

    /// The f64 reference backend.
    pub fn reference() -> Self {
        Backend::Reference(ReferenceBackend)
    }

    /// Every backend available here, fastest first.
    pub fn available() -> Vec<Self> {
        vec![Self::reference()]
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
            Backend::Reference(b) => b.feature_map_backward(map, role, shape, x, dphi, dx),
        }
    }

    fn forward(&self, problem: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        match self {
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
            Backend::Reference(b) => b.backward(problem, inputs, dout, grads),
        }
    }

    fn new_state(&self, problem: &Problem<'_>) -> Result<BackendState> {
        match self {
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
            (Backend::Reference(b), BackendState::Reference(s)) => b.decode(problem, s, inputs, out),
            #[allow(unreachable_patterns)]
            _ => Err(mismatched_state(self)),
        }
    }

    fn synchronize(&self) -> Result<()> {
        match self {
            Backend::Reference(b) => b.synchronize(),
        }
    }
}
