//! Where the f32 kernels of every backend hand a row or a head to f64.
//!
//! The fast backends compute in f32. A row whose inputs or features leave the range in which f32
//! carries every intermediate (projections, sums over keys, products with queries, cotangents)
//! with a wide margin is *wide*, and is recomputed in f64 (favor-core's attention functions,
//! rounded once at the end), so finite inputs of any magnitude keep their accuracy. The bounds
//! are shared so that every backend draws the line in the same place.

/// Rows with a query or key entry beyond this magnitude (2^24) are wide: below it the
/// projection, its gradient and every product stay far from f32's range (map parameters are at
/// most [`crate::PARAM_LIMIT`]).
pub const WIDE_INPUT: f32 = 16_777_216.0;

/// The maps without a built-in stabiliser (ReLU, ELU+1, softplus, learned) keep a row in f32
/// while its largest feature is 0 or in [FEATURE_LO, FEATURE_HI] = [2^-24, 2^24]: sums over
/// keys, products with queries and their cotangents then stay inside f32's range with a wide
/// margin.
pub const FEATURE_LO: f32 = 1.0 / 16_777_216.0;

/// See [`FEATURE_LO`].
pub const FEATURE_HI: f32 = 16_777_216.0;

/// Values and output gradients beyond this magnitude (2^32) send their head to f64: the kernels
/// multiply them by sums of up to L·M features and by each other (⟨∂ℒ/∂out, v⟩), which stays
/// inside f32's range below it, for any length an f32 sum can carry.
pub const VALUE_LIMIT: f32 = 4_294_967_296.0;
