#![doc = include_str!("../README.md")]

pub use favor_core::*;

mod select;

pub use select::{Backend, BackendState};
