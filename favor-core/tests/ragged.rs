//! Ragged batches on the reference backend: every sequence of a packed call equals attention
//! (forward and backward) over that sequence alone; every misuse of the offsets is a typed error.

use favor_core::ReferenceBackend;
use favor_core::testing::ragged::{assert_ragged_errors, assert_ragged_matches, ragged_cases};

#[test]
fn ragged_sequences_match_separate_calls() {
    for case in ragged_cases() {
        // Both sides are f64; only the f32 rounding of the stored results differs.
        assert_ragged_matches(&ReferenceBackend, &case, 1e-6, 1e-6);
    }
}

#[test]
fn ragged_misuse_is_a_typed_error() {
    assert!(!assert_ragged_errors(&ReferenceBackend).is_empty());
}
