//! The SIMD slot decoder on every ISA this CPU runs: every slot equals full causal attention
//! (f64 reference) over the tokens it consumed, through prefill chunks longer than the kernels'
//! chunk, one-token steps, resets, copies and byte round trips (also into the reference); every
//! misuse is the reference's typed error.

mod common;
use common::backends;
use favor_core::testing::slots::{assert_slot_decoding, assert_slot_errors, slot_cases};
use favor_core::{FavorBackend, ReferenceBackend};

#[test]
fn slots_decode_like_full_causal_attention() {
    for backend in backends() {
        for case in slot_cases() {
            // f32 kernels against the f64 reference.
            assert_slot_decoding(&backend, &case, 2e-5);
        }
    }
}

#[test]
fn slot_misuse_is_the_references_typed_error() {
    let want = assert_slot_errors(&ReferenceBackend);
    for backend in backends() {
        assert_eq!(assert_slot_errors(&backend), want, "{}", backend.name());
    }
}
