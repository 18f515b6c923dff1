//! Sizes whose element count fits but whose buffers cannot be allocated are typed errors
//! ([`FavorError::OutOfMemory`] naming the size), never an allocation abort.
//!
//! Whether a huge allocation fails depends on the machine's memory and overcommit policy, so
//! each case runs in a child copy of this test binary whose address space is capped at 4 GiB
//! ([`with_capped_address_space`]): there a request of 16 GiB or more fails at once, on any
//! machine, and nothing is ever touched.

#![cfg(target_os = "linux")]

use favor_core::attention::CausalState;
use favor_core::testing::{assert_huge_states_are_errors, assert_huge_sums_are_errors, with_capped_address_space};
use favor_core::{
    AttentionShape, DType, FavorBackend, FavorError, FeatureMap, HostTensor, Inputs, Problem, Projection,
    ProjectionConfig, ReferenceBackend,
};

fn out_of_memory(config: ProjectionConfig, want_elements: usize) {
    match Projection::draw(config) {
        Err(FavorError::OutOfMemory { arg: "w", elements, bytes }) => {
            assert_eq!(elements, want_elements, "{config:?}");
            assert!(bytes >= 4 * elements);
        }
        other => panic!("{config:?}: expected OutOfMemory, got {other:?}"),
    }
}

#[test]
fn projections_too_large_to_allocate_are_errors() {
    with_capped_address_space("projections_too_large_to_allocate_are_errors", || {
        // m = 2^40, d = 64: 2^46 entries (512 TiB as f64).
        out_of_memory(ProjectionConfig::new(1 << 40, 64, 1), 1 << 46);
        out_of_memory(ProjectionConfig::new(1 << 40, 64, 1).iid(), 1 << 46);
        // m = 2^26, d = 64, iid: 16 GiB of f32.
        out_of_memory(ProjectionConfig::new(1 << 26, 64, 1).iid(), 1 << 32);
        // m = 1, d = 2^40 (iid; an orthogonal draw needs a d×d block, whose count overflows).
        out_of_memory(ProjectionConfig::new(1, 1 << 40, 1).iid(), 1 << 40);
        // The process is intact: a small draw still works.
        assert!(Projection::draw(ProjectionConfig::new(8, 4, 1)).is_ok());
    });
}

#[test]
fn reference_states_too_large_to_allocate_are_errors() {
    with_capped_address_space("reference_states_too_large_to_allocate_are_errors", || {
        assert_huge_states_are_errors(&ReferenceBackend);
        // One head's state on its own: M = 4, d_v = 2^40 (32 TiB of f64).
        assert_eq!(
            CausalState::new(4, 1 << 40),
            Err(FavorError::OutOfMemory { arg: "state", elements: 1 << 42, bytes: 1 << 45 })
        );
        assert!(CausalState::new(4, 4).is_ok());
    });
}

#[test]
fn host_tensors_too_large_to_allocate_are_errors() {
    with_capped_address_space("host_tensors_too_large_to_allocate_are_errors", || {
        // 2^40 elements: 2 TiB of 16-bit storage, 4 TiB of f32.
        for dtype in DType::ALL {
            assert_eq!(
                HostTensor::try_zeros(dtype, 1 << 40),
                Err(FavorError::OutOfMemory { arg: "tensor", elements: 1 << 40, bytes: dtype.size() << 40 }),
                "{dtype}"
            );
        }
        assert_eq!(HostTensor::try_zeros(DType::Bf16, 3).map(|t| t.to_f32_vec()), Ok(vec![0.0; 3]));
    });
}

#[test]
fn reference_attention_too_large_to_allocate_is_an_error() {
    with_capped_address_space("reference_attention_too_large_to_allocate_is_an_error", || {
        assert_huge_sums_are_errors(&ReferenceBackend);
        // L = 2^20 tokens of d = 1 and M = 2^20 features (4 MiB each): the reference keeps each
        // head's L×M features, 8 TiB of f64.
        let n = 1 << 20;
        let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(n, 1, 1)).unwrap());
        let x = vec![0.5f32; n];
        let mut out = vec![0.0f32; n];
        let inputs = Inputs { q: (&x).into(), k: (&x).into(), v: (&x).into(), key_mask: None };
        let p = Problem::new(AttentionShape::new(1, 1, n, 1), &map);
        assert_eq!(
            ReferenceBackend.forward(&p, inputs, (&mut out).into()),
            Err(FavorError::OutOfMemory { arg: "phi", elements: 1 << 40, bytes: 1 << 43 })
        );
    });
}
