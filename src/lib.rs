//! favor: FAVOR+ (Performer) attention. Placeholder entry point; see favor-core.
pub use favor_core::*;
