//! Compiles every `cuda/*.cu` with nvcc into one fatbin per file (SASS for each architecture in
//! `FAVOR_CUDA_ARCHS`, default `80,90`, plus PTX for the last one so newer GPUs can JIT it) and
//! concatenates nothing: each fatbin is embedded separately by `src/kernels.rs` through the
//! generated `OUT_DIR/fatbins.rs`.
//!
//! nvcc is looked up in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, then `PATH`. Without it the
//! crate still builds (cfg `favor_no_kernels`, empty fatbins) and the backend reports that it was
//! built without kernels. With `FAVOR_REQUIRE_NVCC=1` (CI) a missing nvcc or a compile error fails
//! the build instead.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(favor_no_kernels)");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "FAVOR_CUDA_ARCHS", "FAVOR_REQUIRE_NVCC"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let cuda_dir = manifest.join("../cuda");
    println!("cargo::rerun-if-changed={}", cuda_dir.display());
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = env::var("FAVOR_REQUIRE_NVCC").is_ok_and(|v| v == "1");

    let mut sources: Vec<PathBuf> =
        fs::read_dir(&cuda_dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"));
    sources.sort();
    for s in &sources {
        println!("cargo::rerun-if-changed={}", s.display());
    }
    let units: Vec<&PathBuf> = sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();

    let nvcc = find_nvcc();
    let built = match &nvcc {
        None => {
            let msg = "nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH): favor-cuda is built \
                       without kernels and CudaBackend::new will return NotAvailable";
            if require {
                panic!("FAVOR_REQUIRE_NVCC=1 but {msg}");
            }
            println!("cargo::warning={msg}");
            false
        }
        Some(nvcc) => {
            let archs = env::var("FAVOR_CUDA_ARCHS").unwrap_or_else(|_| "80,90".into());
            let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
            let mut ok = true;
            for unit in &units {
                if let Err(e) = compile(nvcc, unit, &cuda_dir, &out, &archs) {
                    if require {
                        panic!("FAVOR_REQUIRE_NVCC=1 and {e}");
                    }
                    for line in e.lines().take(40) {
                        println!("cargo::warning={line}");
                    }
                    ok = false;
                    break;
                }
            }
            ok
        }
    };
    if !built {
        println!("cargo::rustc-cfg=favor_no_kernels");
    }

    #[cfg(feature = "emulator")]
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .include(&cuda_dir)
        .file(cuda_dir.join("emu/emulator.cpp"))
        .compile("favor_emu");

    // The generated table: (unit name, fatbin bytes) for every .cu file.
    let mut table = String::from(
        "/// (kernel file, embedded fatbin) for every `cuda/*.cu`.\npub static FATBINS: &[(&str, &[u8])] = &[\n",
    );
    for unit in &units {
        let stem = unit.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name");
        let bin = out.join(format!("{stem}.fatbin"));
        if !built {
            fs::write(&bin, []).expect("write empty fatbin");
        }
        table.push_str(&format!("    (\"{stem}\", include_bytes!(r\"{}\")),\n", bin.display()));
    }
    table.push_str("];\n");
    fs::write(out.join("fatbins.rs"), table).expect("write fatbins.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = env::var_os(var).and_then(|h| exe(Path::new(&h).join("bin/nvcc"))) {
            return Some(p);
        }
    }
    env::var_os("PATH").and_then(|paths| env::split_paths(&paths).find_map(|d| exe(d.join("nvcc"))))
}

fn compile(nvcc: &Path, unit: &Path, include: &Path, out: &Path, archs: &[&str]) -> Result<(), String> {
    let stem = unit.file_stem().and_then(|s| s.to_str()).expect("utf-8 file name");
    let bin = out.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin").args(["-O3", "-std=c++17", "--Werror", "all-warnings"]).arg("-I").arg(include);
    for a in archs {
        cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    if let Some(last) = archs.last() {
        cmd.arg("-gencode").arg(format!("arch=compute_{last},code=compute_{last}"));
    }
    cmd.arg("-o").arg(&bin).arg(unit);
    let output = cmd.output().map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {}:\n{}{}",
            unit.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
