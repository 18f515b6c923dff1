//! The SIMD backend checks decoding states with favor-core's one check: every mismatched state
//! is rejected with the same error as on the reference, and matching states decode.

mod common;
use common::backends;
use favor_core::ReferenceBackend;
use favor_core::testing::assert_states_checked;

#[test]
fn mismatched_states_are_rejected_like_on_the_reference() {
    let want = assert_states_checked(&ReferenceBackend);
    for backend in backends() {
        assert_eq!(assert_states_checked(&backend), want, "{}", favor_core::FavorBackend::name(&backend));
    }
}
