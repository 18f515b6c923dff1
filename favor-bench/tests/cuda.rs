//! The CUDA backend in favor-bench. Everywhere: without a GPU, asking for `cuda` is a clear error
//! that says why (never a panic) and "best" falls back to the CPU. With the `cuda-emulator`
//! feature: the CUDA kernel sources on the CPU emulator (hidden id "cuda-emulated") through the
//! device-resident timing path of `curves`, `roofline` and `profile` and through the host path of
//! `run`, checked against the f64 reference. Shapes are tiny: the emulator runs one OS thread
//! per CUDA thread.

use std::process::{Command, Output};

use favor_bench::backends;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_favor-bench"))
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let o: Output = cmd.output().expect("spawn favor-bench");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    let (ok, stdout, _) = output(bin().arg("backends"));
    assert!(ok && stdout.contains("GPU (cuda):"), "{stdout}");
    let bad = backends::open("cuda:x").unwrap_err().to_string();
    assert!(bad.contains("cuda:<device number>"), "{bad}");
    let absent = backends::open("cuda:10000").unwrap_err().to_string();
    assert!(absent.contains("not available"), "{absent}");
    match backends::cuda_status() {
        Ok(dev) => {
            // A GPU machine: cuda is listed first and is the best backend.
            eprintln!("GPU present: {dev}");
            assert_eq!(backends::available()[0], "cuda");
            assert_eq!(backends::best_id(), "cuda");
            assert!(stdout.contains(&dev.name), "{stdout}");
        }
        Err(why) => {
            assert!(!why.is_empty());
            assert!(stdout.contains(&why), "`backends` does not say why CUDA is unavailable: {stdout}");
            assert!(!backends::available().iter().any(|id| id.starts_with("cuda")));
            assert_ne!(backends::best_id(), "cuda");
            let e = backends::open("cuda").unwrap_err().to_string();
            assert!(e.contains("cuda") && e.contains(&why), "{e}");
            for args in [
                &["profile", "--backend", "cuda", "--len", "16", "--iters", "1"][..],
                &["curves", "--backends", "cuda", "--lens", "16", "--out", "/nonexistent/never-written"][..],
                &["roofline", "--backends", "cuda", "--lens", "16", "--out", "/nonexistent/never-written"][..],
            ] {
                let (ok, _, stderr) = output(bin().args(args));
                assert!(!ok, "{args:?} succeeded without a GPU");
                assert!(
                    stderr.contains("backend `cuda` is not available") && stderr.contains(&why),
                    "{args:?}: {stderr}"
                );
                assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            }
        }
    }
}

#[cfg(feature = "cuda-emulator")]
mod emulated {
    use super::*;
    use favor_bench::backends::{PointInputs, PointTensor};
    use favor_bench::curves::{self, CurvesConfig, Setting};
    use favor_bench::npy;
    use favor_bench::profile::{self, ProfileConfig, ProfilePass};
    use favor_bench::workload::{Pass, gaussian};
    use favor_core::{
        AttentionOptions, AttentionShape, DType, Direction, Grads, HostRef, HostTensor, Inputs, Problem, Projection,
        ProjectionConfig,
    };
    use npyz::WriterBuilder;
    use std::path::Path;

    /// favor_core::testing::rel_error on f32 results.
    fn rel(got: &[f32], want: &[f32]) -> f64 {
        let f = |x: &[f32]| x.iter().map(|&e| e as f64).collect::<Vec<f64>>();
        favor_core::testing::rel_error("favor-bench CUDA path", &f(got), &f(want))
    }

    #[test]
    fn resident_point_matches_the_reference() {
        let emu = backends::open("cuda-emulated").unwrap();
        let reference = backends::open("reference").unwrap();
        let dev = emu.imp.resident().expect("the CUDA backend has a resident path");
        assert!(reference.imp.resident().is_none());
        assert_eq!(dev.device().name, "cpu-emulator");
        let s = AttentionShape::new(1, 1, 37, 8).with_dv(5);
        let projection = Projection::draw(ProjectionConfig::new(12, 8, 3)).unwrap();
        let map = favor_core::FeatureMap::positive(projection);
        let (q, k, v, g) = (
            gaussian(s.qk_len(), 1, 0.7),
            gaussian(s.qk_len(), 2, 0.7),
            gaussian(s.v_len(), 3, 1.0),
            gaussian(s.v_len(), 4, 1.0),
        );
        for direction in [Direction::Bidirectional, Direction::Causal] {
            let p = Problem::new(s, &map).with_options(AttentionOptions { direction, ..AttentionOptions::default() });
            dev.reset_peak_memory();
            let before = dev.memory_in_use();
            let inputs = PointInputs {
                q: HostRef::from(&q),
                k: HostRef::from(&k),
                v: HostRef::from(&v),
                dout: Some(HostRef::from(&g)),
            };
            let mut point = dev.upload(inputs).unwrap();
            // q, k, v, out, dout, dq, dk, dv, all f32, are tracked as device memory.
            let tensors = 4 * (4 * s.qk_len() + 4 * s.v_len());
            assert_eq!(dev.memory_in_use() - before, tensors);
            point.forward(&p).unwrap();
            point.backward(&p).unwrap();
            assert!(dev.peak_memory() > before + tensors, "scratch is not tracked");
            let mut got = [vec![0.0f32; s.v_len()], vec![0.0; s.qk_len()], vec![0.0; s.qk_len()], vec![0.0; s.v_len()]];
            for (t, which) in got.iter_mut().zip([PointTensor::Out, PointTensor::Dq, PointTensor::Dk, PointTensor::Dv])
            {
                point.download(which, t.into()).unwrap();
            }
            drop(point);
            assert_eq!(dev.memory_in_use(), before, "a point's memory is freed with it");

            let mut want =
                [vec![0.0f32; s.v_len()], vec![0.0; s.qk_len()], vec![0.0; s.qk_len()], vec![0.0; s.v_len()]];
            let host = Inputs { q: HostRef::from(&q), k: HostRef::from(&k), v: HostRef::from(&v), key_mask: None };
            let [wo, wq, wk, wv] = &mut want;
            reference.imp.forward(&p, host, wo.into()).unwrap();
            let grads = Grads { dq: wq.into(), dk: wk.into(), dv: wv.into() };
            reference.imp.backward(&p, host, HostRef::from(&g), grads).unwrap();
            for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                let e = rel(&got[i], &want[i]);
                let tol = if i == 0 { 1e-5 } else { 1e-4 };
                assert!(e < tol, "{direction:?} {name}: relative error {e}");
            }
        }
    }

    #[test]
    fn curves_time_the_emulated_backend_with_device_memory() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CurvesConfig {
            backends: backends::open_list("cuda-emulated,reference").unwrap(),
            lens: vec![16, 48],
            settings: vec![Setting { name: "tiny", heads: 1, d: 8 }],
            passes: vec![Pass::Forward, Pass::ForwardBackward],
            batch: 1,
            m: 8,
            repeats: 1,
            max_point_s: 120.0,
            memory_budget: 1 << 30,
            reference_max_len: 64,
            softmax: false,
            identity: true,
            out_dir: dir.path().to_path_buf(),
            seed: 1,
        };
        let (points, files) = curves::run(&cfg).unwrap();
        assert_eq!(points.len(), 2 * 5 * 2);
        for p in &points {
            let s = p.result.as_ref().unwrap_or_else(|e| panic!("{} {:?} L={}: {e}", p.method, p.pass, p.len));
            if p.method.contains("cuda:cpu-emulator") {
                // The heap counter is not installed in this test binary: a non-zero peak can only
                // come from the backend's device-memory tracking, which holds every tensor.
                assert!(s.peak_bytes >= p.io_bytes, "{}: peak {} < io {}", p.method, s.peak_bytes, p.io_bytes);
            }
        }
        assert_eq!(
            curves::measured(&points, "tiny", "favor+ causal (cuda:cpu-emulator)", Pass::ForwardBackward).len(),
            2
        );
        let json = std::fs::read_to_string(dir.path().join("curves.json")).unwrap();
        assert!(json.contains("\"gpu\"") && json.contains("cpu-emulator, driver none"), "{json}");
        let csv = std::fs::read_to_string(dir.path().join("curves.csv")).unwrap();
        assert!(csv.contains("# gpu: cpu-emulator"), "{csv}");
        assert!(files.iter().any(|f| f.extension().is_some_and(|e| e == "png")));
    }

    #[test]
    fn profile_runs_every_pass_on_the_emulated_backend() {
        for pass in [ProfilePass::Forward, ProfilePass::Backward, ProfilePass::ForwardBackward, ProfilePass::FeatureMap]
        {
            for dtype in [DType::F32, DType::Bf16] {
                let cfg = ProfileConfig {
                    backend: backends::open("cuda-emulated").unwrap(),
                    direction: Direction::Causal,
                    pass,
                    shape: AttentionShape::new(1, 1, 24, 8),
                    dtype,
                    map: "positive".into(),
                    m: 8,
                    iters: 1,
                    warmup: 0,
                    verbose: false,
                    phases: true,
                };
                let report = profile::run(&cfg).unwrap_or_else(|e| panic!("{pass:?} {dtype}: {e}"));
                assert_eq!(report.times.len(), 1);
                assert!(report.phases.is_none(), "the CUDA backend has no phase timers");
            }
        }
    }

    #[test]
    fn roofline_reports_device_ceilings_as_not_measured_on_the_emulator() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("roof");
        let (ok, stdout, stderr) = output(
            bin()
                .args(["roofline", "--backends", "cuda-emulated", "--lens", "24", "--heads", "1", "--d", "8"])
                .args(["--m", "8", "--no-unfused", "--gemm-size", "64", "--stream-mib", "1", "--repeats", "1"])
                .arg("--out")
                .arg(&out),
        );
        assert!(ok, "{stdout}\n{stderr}");
        assert!(stdout.contains("device copy not measured: the CPU emulator"), "{stdout}");
        assert!(stdout.contains("bf16 matrix ceiling not measured"), "{stdout}");
        let csv = std::fs::read_to_string(out.join("roofline.csv")).unwrap();
        let rows: Vec<&str> = csv.lines().filter(|l| !l.starts_with('#')).collect();
        // Header + 2 directions × 2 passes; the fractions are empty (no device ceilings here).
        assert_eq!(rows.len(), 1 + 4, "{csv}");
        assert!(csv.contains("# device: cpu-emulator"), "{csv}");
    }

    fn write(path: &Path, shape: &[usize], v: &[f32]) {
        npy::write(path, shape, &HostTensor::F32(v.to_vec())).unwrap();
    }

    fn read(path: &Path) -> Vec<f32> {
        npy::read(path).unwrap().into_f32(path).unwrap()
    }

    #[test]
    fn run_subcommand_on_the_emulated_backend_matches_the_reference() {
        let dir = tempfile::tempdir().unwrap();
        let (b, l, d, dv) = (2, 21, 8, 6);
        let files = [
            ("q.npy", vec![b, 1, l, d], gaussian(b * l * d, 30, 0.7)),
            ("k.npy", vec![b, 1, l, d], gaussian(b * l * d, 31, 0.7)),
            ("v.npy", vec![b, 1, l, dv], gaussian(b * l * dv, 32, 1.0)),
            ("g.npy", vec![b, 1, l, dv], gaussian(b * l * dv, 33, 1.0)),
        ];
        for (name, shape, data) in &files {
            write(&dir.path().join(name), shape, data);
        }
        // A padding mask: the last 5 keys of the second batch are padding.
        let mask: Vec<bool> = (0..b * l).map(|i| i < l || i % l < l - 5).collect();
        let mut w = npyz::WriteOptions::<u8>::new()
            .dtype(npyz::DType::Plain("|u1".parse().unwrap()))
            .shape(&[b as u64, l as u64])
            .writer(std::fs::File::create(dir.path().join("mask.npy")).unwrap())
            .begin_nd()
            .unwrap();
        w.extend(mask.iter().map(|&x| u8::from(x))).unwrap();
        w.finish().unwrap();
        for direction in ["bidirectional", "causal"] {
            let run = |backend: &str| {
                let out = dir.path().join(format!("{backend}-{direction}"));
                let mut c = bin();
                c.args(["run", "--backend", backend, "--direction", direction, "--m", "12", "--map", "positive"]);
                for (flag, f) in [("--q", "q.npy"), ("--k", "k.npy"), ("--v", "v.npy"), ("--dout", "g.npy")] {
                    c.arg(flag).arg(dir.path().join(f));
                }
                c.arg("--mask").arg(dir.path().join("mask.npy")).arg("--out-dir").arg(&out);
                let (ok, stdout, stderr) = output(&mut c);
                assert!(ok, "{backend}: {stdout}\n{stderr}");
                ["out.npy", "dq.npy", "dk.npy", "dv.npy"].map(|n| read(&out.join(n)))
            };
            let want = run("reference");
            let got = run("cuda-emulated");
            for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                let e = rel(&got[i], &want[i]);
                assert!(e < 1e-4, "{direction} {name}: relative error {e}");
            }
        }
    }
}
