//! Bad options and inputs that used to hang, panic, abort on allocation or give meaningless
//! results with exit code 0: each now stops at once with an error that says what is wrong, and a
//! failed `run` leaves its output folder exactly as it was.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use favor_bench::npy;
use favor_bench::runcmd::{self, Pending};
use favor_core::HostTensor;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_favor-bench"))
}

/// Runs the binary with a deadline (a hang fails the test instead of blocking it); returns
/// (success, stderr).
fn run_within(args: &[&str], dir: &Path, limit: Duration) -> (bool, String) {
    let mut child = bin()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn favor-bench");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("favor-bench {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The command must fail, without a panic, with a message containing every one of `want`.
fn expect_error(args: &[&str], dir: &Path, want: &[&str]) -> String {
    let (ok, err) = run_within(args, dir, Duration::from_secs(60));
    assert!(!ok, "favor-bench {args:?} succeeded");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{args:?} crashed: {err}");
    assert!(err.contains("error"), "{args:?}: no error message: {err}");
    for w in want {
        assert!(err.contains(w), "{args:?}: message lacks `{w}`: {err}");
    }
    err
}

fn write_f32(path: &Path, shape: &[usize], v: &[f32]) {
    npy::write(path, shape, &HostTensor::F32(v.to_vec())).unwrap();
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    favor_bench::workload::gaussian(n, seed, 0.7)
}

/// A float32 .npy header claiming `shape`, with no data after it.
fn header_only(path: &Path, shape: &str) {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let mut header = dict.into_bytes();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header);
    std::fs::write(path, bytes).unwrap();
}

/// Every entry of a folder (recursively) with its contents: the state a failed run must keep.
fn snapshot(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return out;
    }
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if p.is_dir() {
            out.insert(format!("{name}/"), None);
            for (k, v) in snapshot(&p) {
                out.insert(format!("{name}/{k}"), v);
            }
        } else {
            out.insert(name, Some(std::fs::read(&p).unwrap()));
        }
    }
    out
}

#[test]
fn thread_counts_beyond_the_cap_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["100000", "0"] {
        for cmd in [&["backends"][..], &["profile", "--len", "16", "--iters", "1"][..]] {
            let mut args = vec!["--threads", n];
            args.extend_from_slice(cmd);
            expect_error(&args, dir.path(), &["--threads", "1..="]);
        }
    }
    let (ok, _) = run_within(&["--threads", "2", "backends"], dir.path(), Duration::from_secs(60));
    assert!(ok);
}

#[test]
fn profile_with_zero_iterations_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    expect_error(&["profile", "--backend", "reference", "--iters", "0"], dir.path(), &["--iters", "at least 1"]);
    // The library refuses it too, and an empty median is NaN rather than an index panic.
    let cfg = favor_bench::profile::ProfileConfig {
        backend: favor_bench::backends::open("reference").unwrap(),
        direction: favor_core::Direction::Bidirectional,
        pass: favor_bench::profile::ProfilePass::Forward,
        shape: favor_core::AttentionShape::new(1, 1, 8, 4),
        dtype: favor_core::DType::F32,
        map: "positive".into(),
        m: 4,
        iters: 0,
        warmup: 0,
        verbose: false,
        phases: false,
    };
    let e = favor_bench::profile::run(&cfg).unwrap_err().to_string();
    assert!(e.contains("iters = 0"), "{e}");
    assert!(favor_bench::measure::median(&[]).is_nan());
}

#[test]
fn oversized_headers_and_shapes_fail_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 2^61 × 8 × 4 bytes wraps to 0 in usize arithmetic and used to pass the truncation check.
    let w = d.join("w_huge.npy");
    header_only(&w, "(2305843009213693952, 8)");
    let e = npy::read(&w).unwrap_err().to_string();
    assert!(e.contains("w_huge.npy") && e.contains("corrupt header"), "{e}");
    // A header within usize but beyond the file is reported as truncated.
    let t = d.join("w_trunc.npy");
    header_only(&t, "(1099511627776, 8)");
    let e = npy::read(&t).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    let (l, dd) = (5, 8);
    for (n, seed) in [("q.npy", 1), ("k.npy", 2), ("v.npy", 3)] {
        write_f32(&d.join(n), &[l, dd], &gaussian(l * dd, seed));
    }
    let run = |extra: &[&str], out: &str, want: &[&str]| {
        let mut args = vec!["run", "--backend", "reference", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out-dir", out]);
        expect_error(&args, d, want);
        assert!(!d.join(out).exists(), "{extra:?} left {out} behind");
    };
    run(&["--w", "w_huge.npy"], "out1", &["w_huge.npy", "corrupt header"]);
    // m = 2^62: the drawn W is refused before it is drawn, and no w.npy is written.
    run(&["--m", "4611686018427387904"], "out2", &["W [m = 4611686018427387904", "memory available"]);
    run(&["--m", "1099511627776"], "out3", &["needs", "memory available"]);

    expect_error(&["roofline", "--lens", "1073741824", "--out", "r"], d, &["L = 1073741824", "memory available"]);
    expect_error(&["roofline", "--stream-mib", "100000", "--out", "r"], d, &["copy probe", "memory available"]);
    expect_error(&["profile", "--backend", "reference", "--len", "1073741824"], d, &["needs", "memory available"]);
    assert!(!d.join("r").exists());
}

#[test]
fn meaningless_options_are_refused_at_parse_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let curves = |extra: &[&str]| {
        let mut a = vec!["curves", "--backends", "reference", "--settings", "small", "--passes", "forward"];
        a.extend_from_slice(&["--no-softmax", "--no-identity", "--m", "8", "--out", "c"]);
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (curves(&["--min-log2", "64", "--max-log2", "65"]), &["--min-log2", "0..=30"]),
        (curves(&["--min-log2", "6", "--max-log2", "5"]), &["range is empty"]),
        (curves(&["--lens", ""]), &["--lens"]),
        (curves(&["--lens", "0,16"]), &["--lens", "at least 1"]),
        (["curves", "--backends", "", "--lens", "16", "--out", "c"].map(String::from).to_vec(), &["names no backend"]),
        (curves(&["--lens", "16", "--memory-budget-gib", "nan"]), &["--memory-budget-gib", "finite number above 0"]),
        (curves(&["--lens", "16", "--memory-budget-gib", "-1"]), &["--memory-budget-gib", "finite number above 0"]),
        (curves(&["--lens", "16", "--repeats", "0"]), &["--repeats", "at least 1"]),
        (curves(&["--lens", "16", "--max-point-s", "inf"]), &["--max-point-s"]),
        (vec!["accuracy".into(), "--seeds".into(), "0".into()], &["--seeds", "at least 1"]),
        (vec!["accuracy".into(), "--draws".into(), "0".into()], &["--draws", "at least 1"]),
        (vec!["accuracy".into(), "--sigma".into(), "nan".into()], &["--sigma"]),
        (vec!["roofline".into(), "--gemm-size".into(), "0".into()], &["--gemm-size", "at least 1"]),
        (vec!["roofline".into(), "--stream-mib".into(), "0".into()], &["--stream-mib", "at least 1"]),
        (vec!["roofline".into(), "--repeats".into(), "0".into()], &["--repeats", "at least 1"]),
        (vec!["roofline".into(), "--backends".into(), ",".into()], &["names no backend"]),
        (vec!["profile".into(), "--len".into(), "0".into()], &["--len", "at least 1"]),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, d, want);
    }
    assert!(!d.join("c").exists(), "a refused curves run wrote its folder");
}

/// Inputs of a small run, and an output folder holding the files of an earlier run.
struct RunDir {
    dir: tempfile::TempDir,
}

impl RunDir {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (h, l, dd) = (2, 9, 8);
        for (n, seed) in [("q.npy", 1), ("k.npy", 2), ("v.npy", 3), ("g.npy", 4)] {
            write_f32(&d.join(n), &[h, l, dd], &gaussian(h * l * dd, seed));
        }
        let mut nan = gaussian(h * l * dd, 5);
        nan[7] = f32::NAN;
        write_f32(&d.join("g_nan.npy"), &[h, l, dd], &nan);
        write_f32(&d.join("mask_bad.npy"), &[3], &[1.0, 0.0, 1.0]);
        let r = Self { dir };
        let (ok, err) = r.run(&["--dout", "g.npy"], "out");
        assert!(ok, "{err}");
        r
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, extra: &[&str], out: &str) -> (bool, String) {
        let mut args = vec!["run", "--m", "8", "--q", "q.npy", "--k", "k.npy"];
        if !extra.contains(&"--backend") {
            args.extend_from_slice(&["--backend", "reference"]);
        }
        args.extend_from_slice(&["--v", "v.npy", "--out-dir", out]);
        args.extend_from_slice(extra);
        run_within(&args, self.path(), Duration::from_secs(60))
    }
}

#[test]
fn a_failed_run_leaves_the_output_folder_as_it_was() {
    let r = RunDir::new();
    let out = r.path().join("out");
    let before = snapshot(&out);
    for name in ["out.npy", "dq.npy", "dk.npy", "dv.npy", "w.npy"] {
        assert!(before.contains_key(name), "the first run did not write {name}: {before:?}");
    }
    for (extra, want) in [
        (&["--dout", "g_nan.npy"][..], "NaN"),
        (&["--mask", "mask_bad.npy"][..], "mask_bad.npy"),
        (&["--backend", "no-such-backend"][..], "no-such-backend"),
        (&["--map", "no-such-map"][..], "no-such-map"),
        (&["--dout", "missing.npy"][..], "missing.npy"),
        (&["--w", "g.npy"][..], "g.npy"),
    ] {
        let (ok, err) = r.run(extra, "out");
        assert!(!ok, "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert_eq!(snapshot(&out), before, "{extra:?} changed the output folder");
        // A folder that did not exist is not created by a failed run.
        let (ok, _) = r.run(extra, "new/nested");
        assert!(!ok);
        assert!(!r.path().join("new").exists(), "{extra:?} created the output folder");
    }
    // A target that is a folder is refused before anything is written.
    let blocked = r.path().join("blocked");
    std::fs::create_dir_all(blocked.join("dk.npy")).unwrap();
    let before_blocked = snapshot(&blocked);
    let (ok, err) = r.run(&["--dout", "g.npy"], "blocked");
    assert!(!ok && err.contains("is a folder"), "{err}");
    assert_eq!(snapshot(&blocked), before_blocked);
}

#[test]
fn a_run_without_backward_removes_stale_gradients_but_never_an_input() {
    let r = RunDir::new();
    let out = r.path().join("out");
    std::fs::copy(out.join("w.npy"), r.path().join("w_in.npy")).unwrap();
    // The drawn W is an input of the next run, inside the output folder.
    let (ok, err) = r.run(&["--w", "out/w.npy"], "out");
    assert!(ok, "{err}");
    let names: Vec<String> = snapshot(&out).into_keys().collect();
    assert_eq!(names, ["out.npy", "w.npy"], "stale gradients left, or the input W removed");
    assert_eq!(std::fs::read(out.join("w.npy")).unwrap(), std::fs::read(r.path().join("w_in.npy")).unwrap());
    // With W from elsewhere, an old drawn w.npy would read as this run's W: it goes.
    let (ok, err) = r.run(&["--w", "w_in.npy", "--dout", "g.npy"], "out");
    assert!(ok, "{err}");
    let names: Vec<String> = snapshot(&out).into_keys().collect();
    assert_eq!(names, ["dk.npy", "dq.npy", "dv.npy", "out.npy"]);
}

#[test]
fn a_write_failure_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("out.npy"), b"earlier out").unwrap();
    std::fs::write(d.join("dq.npy"), b"earlier dq").unwrap();
    std::fs::write(d.join("unrelated.txt"), b"keep").unwrap();
    let before = snapshot(d);
    let t = HostTensor::F32(vec![1.0, 2.0]);
    let good = |p: &Path| npy::write(p, &[2], &t);
    // The second file fails half-way, as on a full disk: the first is not placed either.
    let files = vec![
        Pending { name: "out.npy", write: Box::new(good) },
        Pending { name: "dq.npy", write: Box::new(runcmd::failing_writer) },
        Pending { name: "dk.npy", write: Box::new(good) },
    ];
    let e = runcmd::write_all_or_nothing(d, files, &["w.npy"], &[]).unwrap_err().to_string();
    assert!(e.contains("simulated"), "{e}");
    assert_eq!(snapshot(d), before);
    // And when every write works, all files are placed and the stale one removed.
    std::fs::write(d.join("w.npy"), b"stale").unwrap();
    let files =
        vec![Pending { name: "out.npy", write: Box::new(good) }, Pending { name: "dq.npy", write: Box::new(good) }];
    let written = runcmd::write_all_or_nothing(d, files, &["w.npy"], &[]).unwrap();
    assert_eq!(written.len(), 2);
    let names: Vec<String> = snapshot(d).into_keys().collect();
    assert_eq!(names, ["dq.npy", "out.npy", "unrelated.txt"]);
    assert_eq!(npy::read(&d.join("dq.npy")).unwrap().into_f32(&d.join("dq.npy")).unwrap(), vec![1.0, 2.0]);
}
