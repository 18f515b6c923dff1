//! A decoding state continues only the problem it was made for: every mismatch (shape, feature
//! count, seed, map kind with the same feature count, W, ε, learned weights) is one typed error
//! naming the field, with distinct expected and actual values.

use favor_core::testing::{assert_states_checked, state_cases};
use favor_core::{AttentionShape, FavorError, FeatureMap, Problem, Projection, ProjectionConfig, ReferenceBackend};
use favor_core::{FavorBackend, StateSignature};

#[test]
fn reference_rejects_every_mismatched_state_and_accepts_matching_ones() {
    let errors = assert_states_checked(&ReferenceBackend);
    let mismatches = state_cases().iter().filter(|c| c.field.is_some()).count();
    assert_eq!(errors.len(), mismatches, "no case skipped on the reference");
}

#[test]
fn signature_check_names_the_field_with_distinct_values() {
    let d = 8;
    let shape = AttentionShape::new(2, 3, 1, d);
    let draw = |m, seed| Projection::draw(ProjectionConfig::new(m, d, seed)).unwrap();
    // The reported inputs: another m (16 for 12) and, with 16 features each, hyperbolic m = 8
    // for positive m = 16.
    let state = FeatureMap::positive(draw(16, 1));
    let sig = StateSignature::new(&Problem::new(shape, &state)).unwrap();
    let call = FeatureMap::positive(draw(12, 1));
    assert_eq!(
        sig.check(&Problem::new(shape, &call)),
        Err(FavorError::StateMismatch { field: "features", expected: "12".into(), actual: "16".into() })
    );
    let hyper = FeatureMap::hyperbolic(draw(8, 1));
    assert_eq!(
        sig.check(&Problem::new(shape, &hyper)),
        Err(FavorError::StateMismatch {
            field: "feature map",
            expected: "hyperbolic".into(),
            actual: "positive".into()
        })
    );
    let reseeded = FeatureMap::positive(draw(16, 2));
    let e = sig.check(&Problem::new(shape, &reseeded)).unwrap_err();
    assert_eq!(e, FavorError::StateMismatch { field: "projection seed", expected: "2".into(), actual: "1".into() });
    assert_eq!(
        e.to_string(),
        "decoding state made for another problem: projection seed is 2 in the problem but 1 in the state"
    );
    // Any chunk length continues the state.
    assert_eq!(sig.check(&Problem::new(AttentionShape { len: 7, ..shape }, &state)), Ok(()));
    assert_eq!(sig.shape(), shape);
}

#[test]
fn a_state_too_large_to_count_is_an_error() {
    // batch·heads·M·(d_v + 1) overflows although every input tensor's count fits.
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(64, 1, 1)).unwrap());
    let shape = AttentionShape::new(1 << 28, 1 << 28, 1, 1).with_dv(4);
    assert!(matches!(
        ReferenceBackend.new_state(&Problem::new(shape, &map)),
        Err(FavorError::SizeOverflow { arg: "state", .. })
    ));
}
