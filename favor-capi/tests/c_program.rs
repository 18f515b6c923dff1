//! Builds the C test program (tests/c/favor_test.c) against the shared library and against the
//! static library with AddressSanitizer, runs both, and compares the forwards and gradients it
//! computed through the C ABI with the same calls made from Rust.

use favor::{
    AttentionOptions, AttentionShape, Backend, FavorBackend, FeatureMap, Grads, Inputs, Problem, Projection,
    ProjectionConfig,
};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The inputs the C program fills, computed alike.
fn fill(n: usize, salt: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let k = (i as u32).wrapping_mul(7919).wrapping_add(salt.wrapping_mul(104729)) % 1000;
            k as f32 / 1000.0 - 0.5
        })
        .collect()
}

/// Where cargo put this test's libfavor_capi.{a,so}: the deps folder of the test binary.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().expect("deps folder").to_path_buf()
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// Compiles a C program of this crate (`source`, relative to it); `static_asan` links
/// libfavor_capi.a with AddressSanitizer instead of libfavor_capi.so.
fn build(source: &str, static_asan: bool, exe: &Path) {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let libs = lib_dir();
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join(source))
        .arg("-o")
        .arg(exe);
    if static_asan {
        cc.args(["-fsanitize=address", "-fno-omit-frame-pointer"]).arg(libs.join("libfavor_capi.a"));
        // What rustc reports for this staticlib (`--print native-static-libs`), and the C++
        // runtime of the CUDA emulator when it is built in.
        cc.args(["-ldl", "-lm", "-lrt", "-lpthread", "-lgcc_s", "-lutil", "-lc"]);
        if cfg!(feature = "cuda-emulator") {
            cc.arg("-lstdc++");
        }
    } else {
        cc.arg("-L").arg(&libs).arg("-lfavor_capi").arg(format!("-Wl,-rpath,{}", libs.display())).arg("-lm");
    }
    run(&mut cc, &format!("compiling {source}"));
}

fn read_f32(bytes: &[u8], at: &mut usize, n: usize) -> Vec<f32> {
    let v = bytes[*at..*at + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    *at += 4 * n;
    v
}

/// The fixed problem of the C program, computed from Rust: forwards (bidirectional, causal) and
/// the causal backward's dq, dk, dv, in the order the program writes them.
fn rust_results() -> Vec<Vec<f32>> {
    let (b, h, kvh, l, d, dv, m) = (2, 4, 2, 37, 16, 12, 32);
    let backend = Backend::from_id("simd").unwrap();
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(m, d, 7)).unwrap());
    let shape = AttentionShape::new(b, h, l, d).with_dv(dv).with_kv_heads(kvh);
    let (q, k, v) = (fill(b * h * l * d, 1), fill(b * kvh * l * d, 2), fill(b * kvh * l * dv, 3));
    let inputs = Inputs { q: (&q).into(), k: (&k).into(), v: (&v).into(), key_mask: None };
    let mut results = Vec::new();
    for options in [AttentionOptions::bidirectional(), AttentionOptions::causal()] {
        let mut out = vec![0.0f32; b * h * l * dv];
        backend.forward(&Problem::new(shape, &map).with_options(options), inputs, (&mut out).into()).unwrap();
        results.push(out);
    }
    let dout = fill(b * h * l * dv, 4);
    let (mut dq, mut dk, mut dvv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    let grads = Grads { dq: (&mut dq).into(), dk: (&mut dk).into(), dv: (&mut dvv).into() };
    let p = Problem::new(shape, &map).with_options(AttentionOptions::causal());
    backend.backward(&p, inputs, (&dout).into(), grads).unwrap();
    results.extend([dq, dk, dvv]);
    results
}

fn check_against_rust(file: &Path) {
    let bytes = std::fs::read(file).expect("the C program's results");
    let mut at = 0;
    for (i, want) in rust_results().into_iter().enumerate() {
        let got = read_f32(&bytes, &mut at, want.len());
        // The same backend on the same inputs: bitwise equal.
        assert_eq!(got, want, "result {i} (forward, causal forward, dq, dk, dv) differs between C and Rust");
    }
    assert_eq!(at, bytes.len(), "the C program wrote more than expected");
}

#[test]
fn c_program_through_the_shared_library_matches_rust() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let exe = dir.join("favor_test_shared");
    build("tests/c/favor_test.c", false, &exe);
    let results = dir.join("favor_test_shared.bin");
    // cargo's LD_LIBRARY_PATH would find an older libfavor_capi.so in target/debug first.
    let mut cmd = Command::new(&exe);
    cmd.arg(&results).env_remove("LD_LIBRARY_PATH");
    if cfg!(feature = "cuda-emulator") {
        // The device path, on the CUDA emulator ("device" memory is host memory there).
        cmd.arg("device");
    }
    let text = run(&mut cmd, "the C test program (shared library)");
    if cfg!(feature = "cuda-emulator") {
        assert!(text.contains("device path (CUDA emulator): checked"), "{text}");
    }
    println!("{text}");
    check_against_rust(&results);
}

#[test]
fn c_program_under_address_sanitizer() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let exe = dir.join("favor_test_asan");
    build("tests/c/favor_test.c", true, &exe);
    let results = dir.join("favor_test_asan.bin");
    let text = run(
        Command::new(&exe).arg(&results).env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1"),
        "the C test program under AddressSanitizer (static library)",
    );
    println!("{text}");
    check_against_rust(&results);
}

/// README's C example is examples/attention.c, word for word, and it runs.
#[test]
fn readme_c_example_is_the_tested_one_and_runs() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = std::fs::read_to_string(crate_dir.join("examples/attention.c")).unwrap();
    let readme = std::fs::read_to_string(crate_dir.join("../README.md")).unwrap();
    assert!(
        readme.contains(&format!("```c\n{example}```")),
        "README.md's C example differs from favor-capi/examples/attention.c"
    );
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("favor_example");
    build("examples/attention.c", false, &exe);
    let text = run(Command::new(&exe).env_remove("LD_LIBRARY_PATH"), "examples/attention.c");
    assert!(text.starts_with("out[0] = "), "{text}");
}
