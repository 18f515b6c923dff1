//! Vectorised math written once over [`crate::isa::SimdF32`].

pub(crate) mod exp;
