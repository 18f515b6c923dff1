//! The reference backend's slot decoder: every slot equals full causal attention over the tokens
//! it consumed, through prefill chunks, one-token steps, resets, copies and byte round trips; every
//! misuse is a typed error.

use favor_core::ReferenceBackend;
use favor_core::testing::slots::{assert_slot_decoding, assert_slot_errors, slot_cases};

#[test]
fn slots_decode_like_full_causal_attention() {
    for case in slot_cases() {
        // Both sides are f64; only the f32 output rounding differs.
        assert_slot_decoding(&ReferenceBackend, &case, 1e-6);
    }
}

#[test]
fn slot_misuse_is_a_typed_error() {
    assert!(!assert_slot_errors(&ReferenceBackend).is_empty());
}
