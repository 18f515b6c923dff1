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

/// States too large to allocate are typed errors on every ISA, never an abort (run under a
/// 4 GiB address-space cap, where such requests fail on any machine).
#[cfg(target_os = "linux")]
#[test]
fn states_too_large_to_allocate_are_errors() {
    favor_core::testing::with_capped_address_space("states_too_large_to_allocate_are_errors", || {
        for backend in backends() {
            favor_core::testing::assert_huge_states_are_errors(&backend);
        }
    });
}

/// Forward and backward whose per-head sums cannot be allocated are typed errors on every ISA
/// (under the same cap).
#[cfg(target_os = "linux")]
#[test]
fn sums_too_large_to_allocate_are_errors() {
    favor_core::testing::with_capped_address_space("sums_too_large_to_allocate_are_errors", || {
        for backend in backends() {
            favor_core::testing::assert_huge_sums_are_errors(&backend);
        }
    });
}
