//! Sizes from the public API whose element counts overflow `usize` are typed errors, never a
//! wrapped length (an "Ok" with an empty matrix in release builds) or an overflow panic.

use favor_core::{
    AttentionShape, FavorBackend, FavorError, FeatureMap, FeatureRole, HostMut, HostRef, Linear, Projection,
    ProjectionConfig, ReferenceBackend,
};

fn is_overflow(r: Result<impl std::fmt::Debug, FavorError>, want_arg: &str) {
    match r {
        Err(FavorError::SizeOverflow { arg, dims }) => {
            assert_eq!(arg, want_arg);
            assert!(!dims.is_empty());
        }
        other => panic!("expected a size overflow of `{want_arg}`, got {other:?}"),
    }
}

#[test]
fn projection_sizes_whose_product_wraps_are_errors() {
    // m·d = 2^64 wraps to 0: the matrix used to be accepted as empty.
    is_overflow(Projection::draw(ProjectionConfig::new(1 << 62, 4, 1)), "w");
    is_overflow(Projection::draw(ProjectionConfig::new(1 << 62, 4, 1).iid()), "w");
    is_overflow(Projection::from_matrix(1 << 62, 4, vec![]), "w");
    // Used to panic with "capacity overflow".
    is_overflow(Projection::draw(ProjectionConfig::new(usize::MAX / 2, 4, 1)), "w");
    is_overflow(Projection::draw(ProjectionConfig::new(usize::MAX / 2, 4, 1).iid()), "w");
    // m·d fits, but the d×d block an orthogonal draw needs does not.
    is_overflow(Projection::draw(ProjectionConfig::new(1, 1 << 40, 1)), "w");
}

#[test]
fn linear_sizes_whose_product_wraps_are_errors() {
    is_overflow(Linear::new(1 << 62, 4, vec![], None), "w");
    let gate = Linear::new(1, 1, vec![1.0], None).unwrap();
    let bad = Linear { m: 1 << 62, d: 4, w: vec![], bias: None };
    let map = FeatureMap::GatedSoftplus(favor_core::GatedSoftplusParams { filter: bad, gate });
    is_overflow(map.validate(4), "w");
}

#[test]
fn shape_element_counts_are_checked() {
    let s = AttentionShape::new(1 << 62, 4, 1, 1);
    is_overflow(s.checked_qk_len(), "q");
    is_overflow(s.validate(), "q");
    assert_eq!(s.qk_len(), usize::MAX, "saturates, never wraps");
    let s = AttentionShape::new(1, 1, 1 << 62, 1).with_dv(8);
    is_overflow(s.checked_v_len(), "v");
    assert_eq!(s.v_len(), usize::MAX);
    let s = AttentionShape::new(1 << 32, 1, 1 << 32, 1);
    is_overflow(s.checked_mask_len(), "key_mask");
    assert_eq!(s.mask_len(), usize::MAX);
    assert_eq!(AttentionShape::new(1 << 40, 1 << 40, 1, 1).problems(), usize::MAX);
    assert_eq!(AttentionShape::new(2, 3, 5, 7).with_dv(11).checked_v_len(), Ok(330));
}

#[test]
fn feature_call_whose_feature_count_wraps_is_an_error() {
    // B·H·L·d = 2^57 fits, B·H·L·M = 2^64 does not (M = 128).
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(128, 1, 3)).unwrap());
    let shape = AttentionShape::new(1 << 19, 1 << 19, 1 << 19, 1);
    let (x, mut phi) = (Vec::<f32>::new(), Vec::<f32>::new());
    let r = ReferenceBackend.feature_map(&map, FeatureRole::Query, shape, HostRef::from(&x), HostMut::from(&mut phi));
    is_overflow(r, "phi");
    let r = ReferenceBackend.feature_map_backward(
        &map,
        FeatureRole::Key,
        shape,
        HostRef::from(&x),
        HostRef::from(&phi),
        HostMut::from(&mut phi.clone()),
    );
    is_overflow(r, "dphi");
}

#[test]
fn host_tensors_beyond_the_address_space_are_errors() {
    // More bytes than isize::MAX: refused before the allocator is asked, on any machine.
    for dtype in favor_core::DType::ALL {
        match favor_core::HostTensor::try_zeros(dtype, usize::MAX / 2) {
            Err(FavorError::OutOfMemory { arg: "tensor", elements, bytes }) => {
                assert_eq!(
                    (elements, bytes),
                    (usize::MAX / 2, (usize::MAX / 2).saturating_mul(dtype.size())),
                    "{dtype}"
                );
            }
            other => panic!("{dtype}: expected OutOfMemory, got {other:?}"),
        }
    }
}

#[test]
#[should_panic(expected = "HostTensor::zeros: argument `tensor`: cannot allocate")]
fn host_tensor_zeros_panics_instead_of_aborting() {
    let _ = favor_core::HostTensor::zeros(favor_core::DType::F32, usize::MAX / 2);
}

#[test]
fn causal_states_whose_size_wraps_are_errors() {
    is_overflow(favor_core::attention::CausalState::new(1 << 40, 1 << 40), "state");
}

#[test]
fn projection_rows_out_of_range_are_none() {
    let p = Projection::draw(ProjectionConfig::new(3, 2, 1)).unwrap();
    assert_eq!(p.row(2), Some(&p.matrix()[4..6]));
    assert_eq!(p.row(3), None);
    // j·d wraps: still no row, no overflow.
    assert_eq!(p.row(usize::MAX / 2 + 1), None);
    assert_eq!(p.row(usize::MAX), None);
    assert_eq!(p.rows().len(), 3);
}
