//! The one error type of favor. Every backend converts its failures into it at its edge.

use crate::DType;

/// Result alias used across favor.
pub type Result<T, E = FavorError> = std::result::Result<T, E>;

/// Everything that can go wrong in a favor call. User input never panics: it lands here, with
/// the argument named and the expected vs actual value spelled out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FavorError {
    /// A tensor has the wrong number of elements for the shape it was declared with.
    #[error("argument `{arg}`: expected {expected}, got {actual}")]
    Shape {
        /// Name of the offending argument.
        arg: &'static str,
        /// What the call required.
        expected: String,
        /// What it received.
        actual: String,
    },
    /// A tensor's strides address rows that overlap (see [`crate::layout`]).
    #[error("argument `{arg}`: {reason}")]
    Strides {
        /// Name of the tensor.
        arg: &'static str,
        /// What is wrong with its strides.
        reason: String,
    },
    /// A tensor's element type differs from the others in the same call.
    #[error("argument `{arg}`: expected dtype {expected}, got {actual}")]
    DType {
        /// Name of the offending argument.
        arg: &'static str,
        /// The dtype of the call (taken from `q`).
        expected: DType,
        /// The dtype of this argument.
        actual: DType,
    },
    /// A size that must be positive is zero.
    #[error("argument `{arg}` must be positive, got 0")]
    ZeroSize {
        /// Name of the size.
        arg: &'static str,
    },
    /// An element count formed from the caller's sizes overflows `usize` (or exceeds what one
    /// allocation may request).
    #[error("argument `{arg}`: {dims} elements overflow the address space")]
    SizeOverflow {
        /// Name of the tensor or buffer.
        arg: &'static str,
        /// The sizes whose product overflows, as `a×b×…`.
        dims: String,
    },
    /// A buffer of a caller-chosen size could not be allocated.
    #[error("argument `{arg}`: cannot allocate {elements} elements ({bytes} bytes)")]
    OutOfMemory {
        /// Name of the tensor or buffer.
        arg: &'static str,
        /// Elements requested.
        elements: usize,
        /// Bytes requested (saturated at `usize::MAX`).
        bytes: usize,
    },
    /// An element range past the end of a tensor view.
    #[error("elements {start}..{start}+{count} are out of range of a tensor of {len} elements")]
    OutOfRange {
        /// First element of the range.
        start: usize,
        /// Elements in the range.
        count: usize,
        /// Elements of the tensor.
        len: usize,
    },
    /// A decoding state made for another problem (other shape, feature map or parameters).
    #[error("decoding state made for another problem: {field} is {expected} in the problem but {actual} in the state")]
    StateMismatch {
        /// What differs: "batch", "heads", "d", "d_v", "feature map", "features",
        /// "projection seed", "projection W (fingerprint)" or "map parameters (fingerprint)".
        field: &'static str,
        /// The problem's value.
        expected: String,
        /// The state's value.
        actual: String,
    },
    /// A parameter value outside its valid range (negative ε, non-finite scale, ...).
    #[error("parameter `{name}`: {reason}")]
    InvalidParameter {
        /// Name of the parameter.
        name: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// An input holds a NaN or an infinity. favor reports these instead of propagating them.
    #[error("argument `{arg}` holds a non-finite value ({value}) at flat index {index}")]
    NonFinite {
        /// Name of the argument.
        arg: &'static str,
        /// Flat (row-major) index of the first non-finite element.
        index: usize,
        /// The value found, as f32.
        value: f32,
    },
    /// A valid request this backend does not support (e.g. a feature map without a kernel).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The backend cannot run here (no driver, no device, built without kernels).
    #[error("backend `{backend}` is not available: {reason}")]
    NotAvailable {
        /// Backend name.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// A failure inside a backend (driver error, launch failure, out of memory).
    #[error("backend `{backend}` failed: {reason}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// The backend's own message.
        reason: String,
    },
}

impl FavorError {
    pub(crate) fn shape(arg: &'static str, expected: impl ToString, actual: impl ToString) -> Self {
        Self::Shape { arg, expected: expected.to_string(), actual: actual.to_string() }
    }

    pub(crate) fn param(name: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidParameter { name, reason: reason.into() }
    }
}
