//! The `favor` entry point itself: backend ids, `best()` and `available()`, typed errors for
//! ids that name nothing, and the CUDA backend through the entry point, on host slices and on
//! device tensors. The CUDA test runs on a GPU when one works (`FAVOR_REQUIRE_GPU=1` makes a
//! missing one fail) and, with the `cuda-emulator` feature, on the CPU emulator of the kernels.

use favor::{Backend, FavorBackend, FavorError};

#[test]
fn every_listed_backend_reopens_from_its_id() {
    let all = Backend::available();
    let ids: Vec<String> = all.iter().map(Backend::id).collect();
    assert_eq!(ids.last().map(String::as_str), Some("reference"), "{ids:?}");
    for (i, id) in ids.iter().enumerate() {
        assert!(!ids[..i].contains(id), "{id} listed twice: {ids:?}");
        let again = Backend::from_id(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(&again.id(), id);
        assert_eq!(again.name(), all[i].name());
    }
    // GPUs first, then the CPU ISAs widest first.
    let gpus = all.iter().take_while(|b| b.is_gpu()).count();
    assert!(all[gpus..].iter().all(|b| !b.is_gpu()), "{ids:?}");
    let isas: Vec<favor::Isa> =
        all.iter().filter_map(|b| if let Backend::Simd(s) = b { Some(s.isa()) } else { None }).collect();
    let mut widest_first = favor::Isa::available();
    widest_first.reverse();
    assert_eq!(isas, widest_first);
}

#[test]
fn best_is_the_gpu_when_one_works_and_the_widest_cpu_isa_otherwise() {
    let best = Backend::best();
    match Backend::cuda(0) {
        Ok(gpu) => {
            assert!(best.is_gpu(), "best() = {} although {} opens", best.id(), gpu.id());
            assert_eq!(Backend::available()[0].id(), "cuda:0");
        }
        Err(FavorError::NotAvailable { backend: "cuda", reason }) => {
            assert!(!reason.is_empty());
            assert!(!best.is_gpu());
            assert_eq!(best.id(), Backend::simd().id());
            assert!(best.name().starts_with("cpu-"), "{}", best.name());
            assert!(!Backend::available().iter().any(Backend::is_gpu));
        }
        Err(e) => panic!("Backend::cuda(0) failed with an unexpected error: {e}"),
    }
    assert_eq!(Backend::from_id("best").unwrap().id(), best.id());
    assert_eq!(Backend::from_id(" simd ").unwrap().id(), Backend::simd().id());
    assert_eq!(Backend::from_id("simd:portable").unwrap().id(), "simd:portable");
}

#[test]
fn ids_that_name_no_backend_are_typed_errors() {
    for (id, says) in [
        ("gpu", "unknown backend"),
        ("simd:sse9", "unknown ISA"),
        ("cuda:x", "cuda:<device number>"),
        ("cuda:-1", "cuda:<device number>"),
        ("", "unknown backend"),
    ] {
        match Backend::from_id(id) {
            Err(FavorError::InvalidParameter { name: "backend", reason }) => {
                assert!(reason.contains(says), "{id:?}: {reason}")
            }
            other => panic!("{id:?}: expected an invalid-backend error, got {:?}", other.map(|b| b.id())),
        }
    }
    // A device that does not exist (or no CUDA at all): not available, with the reason.
    match Backend::from_id("cuda:100000") {
        Err(FavorError::NotAvailable { backend: "cuda", reason }) => assert!(!reason.is_empty()),
        other => panic!("cuda:100000: expected NotAvailable, got {:?}", other.map(|b| b.id())),
    }
    #[cfg(not(target_arch = "x86_64"))]
    assert!(matches!(Backend::from_id("simd:avx2"), Err(FavorError::NotAvailable { .. })));
}

#[cfg(feature = "cuda")]
mod cuda {
    use favor::{
        AttentionOptions, AttentionShape, Backend, DType, Direction, FavorBackend, FavorError, FeatureMap, Grads,
        HostTensor, Inputs, Linear, Problem, Projection, ProjectionConfig, ReferenceBackend,
    };
    use favor_core::testing::{decode_in_chunks, random_tensor, rel_error, storage_tolerance};

    /// The CUDA backends the entry point offers here: the GPU, and the emulator when built in.
    fn cuda_backends() -> Vec<Backend> {
        let mut found = Vec::new();
        match Backend::cuda(0) {
            Ok(b) => found.push(b),
            Err(e) => {
                assert!(
                    !std::env::var("FAVOR_REQUIRE_GPU").is_ok_and(|v| v == "1"),
                    "FAVOR_REQUIRE_GPU=1 but the CUDA backend is not available: {e}"
                );
                eprintln!("no GPU here ({e}); the entry point's CUDA path runs on the emulator only, if built in");
            }
        }
        #[cfg(feature = "cuda-emulator")]
        found.push(Backend::from_id("cuda-emulated").expect("the emulator is built in"));
        found
    }

    /// f32 kernels against the f64 reference, as in favor-cuda's own tests (measured worst
    /// there 6.9e-7 outputs, 9.6e-7 gradients); plus the storage rounding.
    const TOL_F32: f64 = 1e-5;

    #[test]
    fn cuda_through_the_entry_point_matches_the_reference() {
        let s = AttentionShape::new(2, 1, 37, 7).with_dv(5);
        let proj = Projection::draw(ProjectionConfig::new(9, s.d, 11)).unwrap();
        let maps = [FeatureMap::positive(proj.clone()), FeatureMap::relu(Some(proj))];
        for backend in cuda_backends() {
            assert!(backend.is_gpu() && backend.cuda_device().is_some() && backend.cuda_host().is_some());
            for map in &maps {
                for direction in [Direction::Bidirectional, Direction::Causal] {
                    for dtype in [DType::F32, DType::Bf16] {
                        let what = format!("{} {} {direction:?} {dtype}", backend.id(), map.name());
                        let p = Problem::new(s, map).with_options(AttentionOptions { direction, ..Default::default() });
                        let t = |seed, n, std| HostTensor::from_f32(dtype, &random_tensor(seed, n, std));
                        let (q, k, v, g) =
                            (t(1, s.qk_len(), 0.6), t(2, s.qk_len(), 0.6), t(3, s.v_len(), 1.0), t(4, s.v_len(), 1.0));
                        let mask: Vec<bool> = (0..s.mask_len()).map(|i| i % 7 != 3).collect();
                        let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: Some(&mask) };
                        let tol = storage_tolerance(dtype, TOL_F32);

                        let mut out = HostTensor::zeros(dtype, s.v_len());
                        backend.forward(&p, inputs, out.view_mut()).unwrap_or_else(|e| panic!("{what}: {e}"));
                        let want = ReferenceBackend.forward_f64(&p, inputs).unwrap();
                        let err = rel_error(&what, &out.to_f64_vec(), &want);
                        assert!(err <= tol, "{what}: forward error {err:.2e} > {tol:.1e}");

                        let (mut dq, mut dk, mut dv) = (
                            HostTensor::zeros(dtype, s.qk_len()),
                            HostTensor::zeros(dtype, s.qk_len()),
                            HostTensor::zeros(dtype, s.v_len()),
                        );
                        let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() };
                        backend.backward(&p, inputs, g.view(), grads).unwrap_or_else(|e| panic!("{what}: {e}"));
                        let want = ReferenceBackend.backward_f64(&p, inputs, g.view()).unwrap();
                        for (arg, got, want) in [("dq", &dq, &want.dq), ("dk", &dk, &want.dk), ("dv", &dv, &want.dv)] {
                            let err = rel_error(&what, &got.to_f64_vec(), want);
                            assert!(err <= tol, "{what}: {arg} error {err:.2e} > {tol:.1e}");
                        }

                        // The same call on device tensors through the device backend gives the
                        // same bits: the host path is upload + this + download.
                        let dev = backend.cuda_device().unwrap();
                        let (qd, kd, vd) = (
                            dev.upload(q.view()).unwrap(),
                            dev.upload(k.view()).unwrap(),
                            dev.upload(v.view()).unwrap(),
                        );
                        let mut od = dev.alloc(dtype, s.v_len()).unwrap();
                        let dinputs = Inputs { q: qd.as_ref(), k: kd.as_ref(), v: vd.as_ref(), key_mask: Some(&mask) };
                        dev.forward(&p, dinputs, od.as_mut()).unwrap_or_else(|e| panic!("{what} (device): {e}"));
                        let mut again = HostTensor::zeros(dtype, s.v_len());
                        dev.download(&od, again.view_mut()).unwrap();
                        assert_eq!(again.to_f64_vec(), out.to_f64_vec(), "{what}: device path differs from host path");
                    }
                }
            }
            // Decoding through the entry point: prefill 30 tokens, then one at a time.
            let map = &maps[0];
            let p = Problem::new(s, map).with_options(AttentionOptions::causal());
            let (q, k, v) = (
                random_tensor(5, s.qk_len(), 0.6),
                random_tensor(6, s.qk_len(), 0.6),
                random_tensor(7, s.v_len(), 1.0),
            );
            let inputs =
                Inputs { q: q.as_slice().into(), k: k.as_slice().into(), v: v.as_slice().into(), key_mask: None };
            let want = ReferenceBackend.forward_f64(&p, inputs).unwrap();
            let decoded = decode_in_chunks(&backend, &p, [&q, &k, &v], &[30, 1, 1, 5]).unwrap();
            let got: Vec<f64> = decoded.iter().map(|&x| x as f64).collect();
            let err = rel_error("decode through the entry point", &got, &want);
            assert!(err <= TOL_F32, "{}: decode error {err:.2e}", backend.id());

            // A state of another backend, and a map the kernels lack: typed errors.
            let mut cpu_state = Backend::simd().new_state(&p).unwrap();
            let x = vec![0.5f32; s.problems() * s.d];
            let xv = vec![0.5f32; s.problems() * s.dv];
            let mut o = vec![0f32; s.problems() * s.dv];
            let one = Problem::new(AttentionShape { len: 1, ..s }, map);
            let ci = Inputs { q: x.as_slice().into(), k: x.as_slice().into(), v: xv.as_slice().into(), key_mask: None };
            let r = backend.decode(&one, &mut cpu_state, ci, o.as_mut_slice().into());
            assert!(matches!(r, Err(FavorError::InvalidParameter { name: "state", .. })), "{r:?}");
            let learned = FeatureMap::Softplus(Linear::new(4, s.d, vec![0.1; 4 * s.d], None).unwrap());
            let r = backend.forward(&Problem::new(s, &learned), inputs, vec![0f32; s.v_len()].as_mut_slice().into());
            assert!(matches!(r, Err(FavorError::Unsupported(_))), "{r:?}");
        }
    }
}
