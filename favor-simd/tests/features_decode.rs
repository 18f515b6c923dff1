//! The standalone feature map (every role) and the recurrent decoder against the reference.

mod common;
use common::*;
use favor_core::testing::rel_error;
use favor_core::{
    AttentionOptions, AttentionShape, DType, FavorBackend, FeatureRole, HostTensor, Inputs, Problem, ReferenceBackend,
};

/// The standalone feature map in f32 against the reference rounded to f32 (its public output):
/// measured worst 8.6e-7 (features and dx), the f32 rounding of one projection and exp per feature.
const FEATURE_TOL: f64 = 1e-5;

#[test]
fn feature_map_and_backward_match_reference() {
    for backend in backends() {
        for (i, (l, d, m)) in [(1, 7, 9), (65, 16, 17), (130, 9, 64), (17, 64, 65)].into_iter().enumerate() {
            for map in all_maps(d, m, 40 + i as u64) {
                for role in [FeatureRole::Query, FeatureRole::Key, FeatureRole::CausalKey] {
                    let shape = AttentionShape::new(2, 1, l, d);
                    let mf = map.feature_dim(d);
                    let x = HostTensor::from_f32(DType::F32, &normal(shape.qk_len(), 0.5, i as u64));
                    let g = HostTensor::from_f32(DType::F32, &normal(2 * l * mf, 1.0, 9 + i as u64));
                    let mut ours = HostTensor::zeros(DType::F32, 2 * l * mf);
                    let mut reference = ours.clone();
                    backend.feature_map(&map, role, shape, x.view(), ours.view_mut()).unwrap();
                    ReferenceBackend.feature_map(&map, role, shape, x.view(), reference.view_mut()).unwrap();
                    let what = format!("{} {} {role:?} L={l} d={d} m={m}", backend.name(), map.name());
                    let e = rel_error(&what, &ours.to_f64_vec(), &reference.to_f64_vec());
                    assert!(e <= FEATURE_TOL, "feature_map {what}: {e:.2e}");
                    let mut dx = HostTensor::zeros(DType::F32, shape.qk_len());
                    let mut rdx = dx.clone();
                    let pg =
                        backend.feature_map_backward(&map, role, shape, x.view(), g.view(), dx.view_mut()).unwrap();
                    let rpg = ReferenceBackend
                        .feature_map_backward(&map, role, shape, x.view(), g.view(), rdx.view_mut())
                        .unwrap();
                    let ex = rel_error(&what, &dx.to_f64_vec(), &rdx.to_f64_vec());
                    assert!(ex <= FEATURE_TOL, "feature_map_backward {what}: {ex:.2e}");
                    let ep = rel_error(&what, &params_vec(&pg), &params_vec(&rpg));
                    assert!(ep <= FEATURE_TOL, "feature_map_backward params {what}: {ep:.2e}");
                    eprintln!("{what}: features {e:.1e} dx {ex:.1e} params {ep:.1e}");
                }
            }
        }
    }
}

/// Causal attention, chunked prefill and one-token decoding all give the same outputs.
#[test]
fn decode_chunked_and_stepwise_match_full_causal() {
    for backend in backends() {
        for (mi, masked) in [(0, false), (1, true), (2, false), (5, true), (8, false), (9, true)] {
            let (l, d, dv, m) = (150, 9, 17, 33);
            let map = all_maps(d, m, 77).swap_remove(mi);
            let shape = AttentionShape::new(2, 2, l, d).with_dv(dv);
            let case = Case::new(shape, DType::F32, masked, 3).conditioned_for(&map);
            let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
            let full = case.reference_forward(&p);
            for chunk in [1usize, 7, 64, 150] {
                let mut state = backend.new_state(&p).unwrap();
                let mut got = vec![0.0f64; shape.v_len()];
                let mut start = 0;
                while start < l {
                    let n = chunk.min(l - start);
                    let cs = AttentionShape { len: n, ..shape };
                    let slice = |t: &HostTensor, w: usize| {
                        let all = t.to_f32_vec();
                        let mut v = Vec::new();
                        for bh in 0..shape.problems() {
                            v.extend_from_slice(&all[(bh * l + start) * w..(bh * l + start + n) * w]);
                        }
                        HostTensor::from_f32(DType::F32, &v)
                    };
                    let (q, k, v) = (slice(&case.q, d), slice(&case.k, d), slice(&case.v, dv));
                    let mask: Option<Vec<bool>> = case
                        .mask
                        .as_ref()
                        .map(|m| (0..2).flat_map(|b| m[b * l + start..b * l + start + n].to_vec()).collect());
                    let mut out = HostTensor::zeros(DType::F32, cs.v_len());
                    let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: mask.as_deref() };
                    backend.decode(&Problem { shape: cs, ..p }, &mut state, inputs, out.view_mut()).unwrap();
                    let o = out.to_f64_vec();
                    for bh in 0..shape.problems() {
                        got[(bh * l + start) * dv..(bh * l + start + n) * dv]
                            .copy_from_slice(&o[bh * n * dv..(bh + 1) * n * dv]);
                    }
                    start += n;
                }
                let what = format!("{} {} decode chunk {chunk}", backend.name(), map.name());
                let e = rel_error(&what, &got, &full);
                eprintln!("{what}: {e:.1e}");
                // The decoder's f32 state sums against the f64 reference: measured worst 1.7e-7.
                assert!(e <= 2e-6, "{what}: {e:.2e}");
            }
        }
    }
}
