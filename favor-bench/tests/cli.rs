//! End-to-end tests of the favor-bench binary and its npy front end: round trips, bad files
//! (each error names the file), `run` against the reference backend, and smoke runs of
//! `curves`, `accuracy`, `roofline` and `profile` at tiny settings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use favor_bench::npy;
use favor_core::{
    AttentionOptions, AttentionShape, FavorBackend, FeatureMap, Grads, HostRef, HostTensor, Inputs, Problem,
    Projection, ReferenceBackend,
};
use half::f16;
use npyz::WriterBuilder;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_favor-bench"))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn favor-bench");
    assert!(
        out.status.success(),
        "favor-bench failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn favor-bench");
    assert!(!out.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn gaussian(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    favor_bench::workload::gaussian(n, seed, scale)
}

fn write_f32(path: &Path, shape: &[usize], v: &[f32]) {
    npy::write(path, shape, &HostTensor::F32(v.to_vec())).unwrap();
}

fn write_bool(path: &Path, shape: &[u64], v: &[bool]) {
    // npyz has no bool element type: write uint8 data under a '|b1' header by hand.
    let mut w = npyz::WriteOptions::<u8>::new()
        .dtype(npyz::DType::Plain("|u1".parse().unwrap()))
        .shape(shape)
        .writer(std::fs::File::create(path).unwrap())
        .begin_nd()
        .unwrap();
    w.extend(v.iter().map(|&b| b as u8)).unwrap();
    w.finish().unwrap();
}

#[test]
fn npy_round_trip_f32_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    let v = gaussian(2 * 3 * 5, 1, 1.0);
    write_f32(&p, &[2, 3, 5], &v);
    let a = npy::read(&p).unwrap();
    assert_eq!(a.shape, vec![2, 3, 5]);
    assert_eq!(a.descr, "<f4");
    assert_eq!(a.into_tensor(&p).unwrap(), HostTensor::F32(v.clone()));

    let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let p16 = dir.path().join("h.npy");
    npy::write(&p16, &[30], &HostTensor::F16(h.clone())).unwrap();
    let b = npy::read(&p16).unwrap();
    assert_eq!(b.descr, "<f2");
    assert_eq!(b.into_tensor(&p16).unwrap(), HostTensor::F16(h));

    let pm = dir.path().join("m.npy");
    write_bool(&pm, &[2, 2], &[true, false, false, true]);
    assert_eq!(npy::read(&pm).unwrap().into_bool(&pm).unwrap(), vec![true, false, false, true]);
}

#[test]
fn bad_files_give_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.npy");
    write_f32(&good, &[4, 8], &gaussian(32, 1, 1.0));

    // Truncated: the header promises more data than the file holds.
    let trunc = dir.path().join("truncated.npy");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() - 7]).unwrap();
    let e = npy::read(&trunc).unwrap_err().to_string();
    assert!(e.contains("truncated.npy") && e.contains("truncated"), "{e}");

    // Not an npy file at all.
    let text = dir.path().join("notes.npy");
    std::fs::write(&text, "this is not numpy").unwrap();
    let e = npy::read(&text).unwrap_err().to_string();
    assert!(e.contains("notes.npy") && e.contains("not a .npy file"), "{e}");

    // Wrong dtype: int32 and float64.
    let ints = dir.path().join("ints.npy");
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[4, 8])
        .writer(std::fs::File::create(&ints).unwrap())
        .begin_nd()
        .unwrap();
    w.extend(0..32i32).unwrap();
    w.finish().unwrap();
    let e = npy::read(&ints).unwrap_err().to_string();
    assert!(e.contains("ints.npy") && e.contains("unsupported dtype '<i4'"), "{e}");
    let f64s = dir.path().join("doubles.npy");
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[4, 8])
        .writer(std::fs::File::create(&f64s).unwrap())
        .begin_nd()
        .unwrap();
    w.extend((0..32).map(|i| i as f64)).unwrap();
    w.finish().unwrap();
    let e = npy::read(&f64s).unwrap().into_tensor(&f64s).unwrap_err().to_string();
    assert!(e.contains("doubles.npy") && e.contains("float64"), "{e}");

    // Missing file.
    let e = npy::read(&dir.path().join("missing.npy")).unwrap_err().to_string();
    assert!(e.contains("missing.npy"), "{e}");

    // Through the `run` subcommand: each bad input is named, and a wrong shape too.
    let q = dir.path().join("q.npy");
    let v = dir.path().join("v.npy");
    write_f32(&q, &[4, 8], &gaussian(32, 2, 1.0));
    write_f32(&v, &[4, 3], &gaussian(12, 3, 1.0));
    let wrong_shape = dir.path().join("k_wrong_shape.npy");
    write_f32(&wrong_shape, &[5, 8], &gaussian(40, 4, 1.0));
    let base = |k: &Path, v: &Path| {
        let mut c = bin();
        c.args(["run", "--backend", "reference", "--m", "8"]).arg("--q").arg(&q).arg("--k").arg(k).arg("--v").arg(v);
        c.arg("--out-dir").arg(dir.path().join("out"));
        c
    };
    for (k, v, name) in [
        (&wrong_shape, &v, "k_wrong_shape.npy"),
        (&trunc, &v, "truncated.npy"),
        (&q, &text, "notes.npy"),
        (&q, &ints, "ints.npy"),
        (&q, &f64s, "doubles.npy"),
    ] {
        let e = run_err(&mut base(k, v));
        assert!(e.contains(name), "error for {name} does not name it: {e}");
    }
    // V with a different length than Q.
    let v_len = dir.path().join("v_wrong_len.npy");
    write_f32(&v_len, &[3, 3], &gaussian(9, 5, 1.0));
    let e = run_err(&mut base(&q, &v_len));
    assert!(e.contains("v_wrong_len.npy"), "{e}");
}

#[allow(clippy::too_many_arguments)]
fn reference_outputs(
    shape: AttentionShape,
    map: &FeatureMap,
    causal: bool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[bool],
    g: &[f32],
) -> [Vec<f32>; 4] {
    let options = if causal { AttentionOptions::causal() } else { AttentionOptions::bidirectional() };
    let p = Problem::new(shape, map).with_options(options);
    let inputs = Inputs { q: HostRef::from(q), k: HostRef::from(k), v: HostRef::from(v), key_mask: Some(mask) };
    let mut out = vec![0.0f32; shape.v_len()];
    ReferenceBackend.forward(&p, inputs, (&mut out).into()).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0.0; shape.qk_len()], vec![0.0; shape.qk_len()], vec![0.0; shape.v_len()]);
    let grads = Grads { dq: (&mut dq).into(), dk: (&mut dk).into(), dv: (&mut dv).into() };
    ReferenceBackend.backward(&p, inputs, HostRef::from(g), grads).unwrap();
    [out, dq, dk, dv]
}

fn read_f32(p: &Path) -> Vec<f32> {
    npy::read(p).unwrap().into_f32(p).unwrap()
}

#[test]
fn run_matches_the_reference_backend_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let (b, h, l, d, dv, m) = (2, 3, 17, 8, 5, 12);
    let shape = AttentionShape::new(b, h, l, d).with_dv(dv);
    let q = gaussian(shape.qk_len(), 10, 0.8);
    let k = gaussian(shape.qk_len(), 11, 0.8);
    let v = gaussian(shape.v_len(), 12, 1.0);
    let g = gaussian(shape.v_len(), 13, 1.0);
    let w = gaussian(m * d, 14, 1.0);
    let mask: Vec<bool> = (0..b * l).map(|i| i % 5 != 3).collect();
    let path = |n: &str| dir.path().join(n);
    write_f32(&path("q.npy"), &[b, h, l, d], &q);
    write_f32(&path("k.npy"), &[b, h, l, d], &k);
    write_f32(&path("v.npy"), &[b, h, l, dv], &v);
    write_f32(&path("g.npy"), &[b, h, l, dv], &g);
    write_f32(&path("w.npy"), &[m, d], &w);
    write_bool(&path("mask.npy"), &[b as u64, l as u64], &mask);
    for (map_name, causal) in [("positive", false), ("trigonometric", true), ("hyperbolic", true)] {
        let out_dir = path(&format!("out-{map_name}"));
        let mut c = bin();
        c.args(["run", "--backend", "reference", "--map", map_name, "--direction"]);
        c.arg(if causal { "causal" } else { "bidirectional" });
        for (flag, f) in [
            ("--q", "q.npy"),
            ("--k", "k.npy"),
            ("--v", "v.npy"),
            ("--w", "w.npy"),
            ("--mask", "mask.npy"),
            ("--dout", "g.npy"),
        ] {
            c.arg(flag).arg(path(f));
        }
        c.arg("--out-dir").arg(&out_dir);
        run_ok(&mut c);
        let proj = Projection::from_matrix(m, d, w.clone()).unwrap();
        let map = favor_bench::workload::make_map(map_name, proj).unwrap();
        let want = reference_outputs(shape, &map, causal, &q, &k, &v, &mask, &g);
        for (name, want) in ["out.npy", "dq.npy", "dk.npy", "dv.npy"].iter().zip(want) {
            let got = read_f32(&out_dir.join(name));
            assert_eq!(got, want, "{map_name}: {name} differs from the reference backend");
        }
        let shape_of = |n: &str| npy::read(&out_dir.join(n)).unwrap().shape;
        assert_eq!(shape_of("out.npy"), vec![b, h, l, dv]);
        assert_eq!(shape_of("dq.npy"), vec![b, h, l, d]);
    }
    // Without W the drawn projection is written next to the output, and 2-D inputs work.
    write_f32(&path("q2.npy"), &[l, d], &q[..l * d]);
    write_f32(&path("k2.npy"), &[l, d], &k[..l * d]);
    write_f32(&path("v2.npy"), &[l, dv], &v[..l * dv]);
    let out_dir = path("out-drawn");
    let mut c = bin();
    c.args(["run", "--backend", "reference", "--m", "6", "--seed", "3"]);
    c.arg("--q")
        .arg(path("q2.npy"))
        .arg("--k")
        .arg(path("k2.npy"))
        .arg("--v")
        .arg(path("v2.npy"))
        .arg("--out-dir")
        .arg(&out_dir);
    run_ok(&mut c);
    assert_eq!(npy::read(&out_dir.join("w.npy")).unwrap().shape, vec![6, d]);
    assert_eq!(npy::read(&out_dir.join("out.npy")).unwrap().shape, vec![l, dv]);
}

fn assert_image_files(dir: &Path, stems: &[&str]) {
    for stem in stems {
        let png = std::fs::read(dir.join(format!("{stem}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png is not a PNG");
        let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<text"), "{stem}.svg has no text");
    }
}

fn csv_rows(p: &PathBuf) -> Vec<String> {
    std::fs::read_to_string(p).unwrap().lines().filter(|l| !l.starts_with('#')).map(String::from).collect()
}

#[test]
fn curves_smoke_run_writes_csv_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("res");
    let o = run_ok(
        bin()
            .args([
                "curves",
                "--backends",
                "reference",
                "--lens",
                "32,64,128",
                "--settings",
                "small,regular",
                "--repeats",
                "1",
            ])
            .args(["--m", "16", "--reference-max-len", "64", "--out"])
            .arg(&out),
    );
    let rows = csv_rows(&out.join("curves.csv"));
    // 2 settings × 2 passes × 4 methods × 3 lengths.
    assert_eq!(rows.len(), 1 + 2 * 2 * 4 * 3, "{rows:?}");
    assert!(rows.iter().any(|r| r.contains("reference backend timed only at L ≤ 64")));
    assert!(rows.iter().filter(|r| r.contains(",ok,")).count() >= 2 * 2 * 3 * 3);
    let json = std::fs::read_to_string(out.join("curves.json")).unwrap();
    for key in ["\"machine\"", "\"commit\"", "\"date\"", "\"command\"", "\"points\""] {
        assert!(json.contains(key), "curves.json lacks {key}");
    }
    let csv = std::fs::read_to_string(out.join("curves.csv")).unwrap();
    assert!(csv.contains("# command: ") && csv.contains("curves --backends reference"));
    assert_image_files(
        &out,
        &["curves-small-time", "curves-small-memory", "curves-regular-time", "curves-regular-memory"],
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("curves-small-time.png"));
}

#[test]
fn curves_refuses_points_over_the_memory_and_time_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("res");
    run_ok(
        bin()
            .args([
                "curves",
                "--backends",
                "reference",
                "--lens",
                "64,4096,8192",
                "--settings",
                "small",
                "--passes",
                "forward",
            ])
            .args([
                "--no-identity",
                "--m",
                "16",
                "--repeats",
                "1",
                "--reference-max-len",
                "64",
                "--memory-budget-gib",
                "0.06",
                "--out",
            ])
            .arg(&out),
    );
    let rows = csv_rows(&out.join("curves.csv"));
    // Softmax at 4096 needs 64 MiB of scores: refused before allocating, and 8192 after it.
    let softmax: Vec<&String> = rows.iter().filter(|r| r.contains("softmax")).collect();
    assert!(softmax[0].contains(",ok,"), "{softmax:?}");
    assert!(softmax[1].contains("skipped: predicted memory"), "{softmax:?}");
    assert!(softmax[2].contains("skipped: predicted memory"), "{softmax:?}");

    let out2 = dir.path().join("res2");
    run_ok(
        bin()
            .args([
                "curves",
                "--backends",
                "reference",
                "--lens",
                "64,128,256",
                "--settings",
                "small",
                "--passes",
                "forward",
            ])
            .args([
                "--no-softmax",
                "--no-identity",
                "--m",
                "16",
                "--repeats",
                "1",
                "--max-point-s",
                "0.000001",
                "--out",
            ])
            .arg(&out2),
    );
    let rows = csv_rows(&out2.join("curves.csv"));
    assert!(rows.iter().any(|r| r.contains("skipped: predicted")), "{rows:?}");
}

#[test]
fn accuracy_smoke_run_writes_csv_json_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("acc");
    run_ok(
        bin()
            .args([
                "accuracy", "--len", "64", "--seeds", "2", "--ms", "8,16", "--angles", "6", "--draws", "50", "--out",
            ])
            .arg(&out),
    );
    let rows = csv_rows(&out.join("accuracy-mse.csv"));
    assert_eq!(rows.len(), 1 + 3 * 2 * 2);
    let angle = csv_rows(&out.join("accuracy-angle.csv"));
    assert_eq!(angle.len(), 1 + 6);
    assert!(std::fs::read_to_string(out.join("accuracy.json")).unwrap().contains("\"mse\""));
    assert_image_files(&out, &["accuracy-mse", "accuracy-angle"]);
}

#[test]
fn roofline_and_profile_smoke_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("roof");
    let o = run_ok(
        bin()
            .args(["roofline", "--backends", "reference", "--lens", "32", "--heads", "2", "--d", "8", "--m", "16"])
            .args(["--gemm-size", "64", "--stream-mib", "1", "--repeats", "1", "--out"])
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("ceilings: f32 GEMM") && stdout.contains("favor+ unfused (gemm)"), "{stdout}");
    // 2 directions × 2 passes + the unfused forward.
    assert_eq!(csv_rows(&out.join("roofline.csv")).len(), 1 + 5);
    for pass in ["forward", "backward", "forward-backward", "feature-map"] {
        for dtype in ["f32", "bf16"] {
            let o = run_ok(
                bin()
                    .args(["profile", "--backend", "reference", "--len", "16", "--heads", "1", "--d", "8", "--m", "8"])
                    .args(["--iters", "2", "--warmup", "0", "--direction", "causal", "--pass", pass, "--dtype", dtype]),
            );
            assert!(String::from_utf8_lossy(&o.stdout).contains("per iteration: median"));
        }
    }
    let e = run_err(bin().args(["profile", "--backend", "no-such-backend"]));
    assert!(e.contains("unknown backend `no-such-backend`"), "{e}");
}

#[test]
fn serve_smoke_run_prints_one_row_per_slot_count() {
    let o = run_ok(
        bin()
            .args(["serve", "--heads", "4", "--kv-heads", "2", "--d", "8", "--m", "16"])
            .args(["--slots", "1,3", "--prompt", "5", "--steps", "2"]),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = stdout.lines().skip(2).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[1].trim_start().starts_with('3'), "{stdout}");
    let e = run_err(bin().args(["serve", "--heads", "4", "--kv-heads", "3"]));
    assert!(e.contains("kv_heads"), "{e}");
}

#[test]
fn run_with_every_backend_present_is_close_to_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (h, l, d, m) = (2, 33, 16, 20);
    let q = gaussian(h * l * d, 20, 0.7);
    let k = gaussian(h * l * d, 21, 0.7);
    let v = gaussian(h * l * d, 22, 1.0);
    let g = gaussian(h * l * d, 23, 1.0);
    for (n, x) in [("q.npy", &q), ("k.npy", &k), ("v.npy", &v), ("g.npy", &g)] {
        write_f32(&dir.path().join(n), &[h, l, d], x);
    }
    let run = |backend: &str, direction: &str| {
        let out = dir.path().join(format!("out-{}-{direction}", backend.replace(':', "_")));
        let mut c = bin();
        c.args(["run", "--backend", backend, "--direction", direction, "--m", &m.to_string()]);
        for (flag, f) in [("--q", "q.npy"), ("--k", "k.npy"), ("--v", "v.npy"), ("--dout", "g.npy")] {
            c.arg(flag).arg(dir.path().join(f));
        }
        c.arg("--out-dir").arg(&out);
        run_ok(&mut c);
        ["out.npy", "dq.npy", "dk.npy", "dv.npy"].map(|n| read_f32(&out.join(n)))
    };
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    for direction in ["bidirectional", "causal"] {
        let want = run("reference", direction);
        for id in favor_bench::backends::available().into_iter().filter(|id| id != "reference") {
            let got = run(&id, direction);
            for (i, name) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                let e = rel(&got[i], &want[i]);
                assert!(e < 1e-4, "{id} {direction} {name}: relative error {e}");
            }
        }
    }
}
