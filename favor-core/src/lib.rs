//! # favor-core
//!
//! The backend-agnostic foundation of favor, a FAVOR+ (Performer) attention library:
//!
//! * [`FavorBackend`]: the trait every backend implements (feature map, attention forward and
//!   backward in both directions, recurrent decoding of many independent sequences ([`slots`]),
//!   synchronize), with tensors in the
//!   backend's [`MemorySpace`];
//! * tensor views ([`HostRef`], [`HostMut`]) over f32, f16 and bf16 storage, in the caller's
//!   layout ([`Layout`]: per-tensor batch/head/token strides, checked for overlapping rows);
//! * every feature map ([`FeatureMap`]) with forward and backward;
//! * random projections ([`Projection`]): iid and block-orthogonal, seeded and reproducible;
//! * [`ReferenceBackend`]: the f64 oracle, and exact softmax attention
//!   ([`reference::softmax_attention`]) for accuracy comparisons;
//! * one error type, [`FavorError`].
//!
//! Non-finite inputs (NaN, ±∞) are rejected with [`FavorError::NonFinite`]; finite inputs of any
//! magnitude give finite outputs.

pub mod attention;
pub mod backend;
mod decode_state;
mod dtype;
mod error;
pub mod features;
pub mod layout;
pub mod limits;
mod projection;
pub mod ragged;
pub mod reference;
mod shape;
pub mod slots;
/// Test utilities shared with other crates' tests (the `testing` feature).
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod validate;

pub use backend::{FavorBackend, Grads, Host, Inputs, MemorySpace, Problem};
pub use decode_state::{SlotSignature, StateSignature};
pub use dtype::{DType, Element, HostMut, HostRef, HostTensor, TensorHandle, saturate_f32};
pub use error::{FavorError, Result};
pub use features::{Elementwise, FeatureMap, FeatureRole, GatedSoftplusParams, Linear, PARAM_LIMIT, ParamGrads};
pub use layout::{Layout, Strides, TensorArg};
pub use projection::{Projection, ProjectionConfig, ProjectionKind, RowNorms};
pub use ragged::Ragged;
pub use reference::{ReferenceBackend, ReferenceState};
pub use shape::{AttentionOptions, AttentionShape, Direction};
pub use slots::{SlotChunks, SlotHead, SlotState};
