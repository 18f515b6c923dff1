//! Ragged batches on every ISA this CPU runs: every sequence of a packed call equals the f64
//! reference over that sequence alone, forward and backward; misuse gives the reference's
//! typed errors.

mod common;
use common::backends;
use favor_core::testing::ragged::{assert_ragged_errors, assert_ragged_matches, ragged_cases};
use favor_core::{FavorBackend, ReferenceBackend};

#[test]
fn ragged_sequences_match_the_reference() {
    for backend in backends() {
        for case in ragged_cases() {
            assert_ragged_matches(&backend, &case, 2e-5, 1e-4);
        }
    }
}

#[test]
fn ragged_misuse_is_the_references_typed_error() {
    let want = assert_ragged_errors(&ReferenceBackend);
    for backend in backends() {
        assert_eq!(assert_ragged_errors(&backend), want, "{}", backend.name());
    }
}
