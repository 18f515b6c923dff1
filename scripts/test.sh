#!/usr/bin/env bash
# The test command. On a fresh machine it installs what the checks need, then runs:
#   1. cargo fmt --check and clippy (-D warnings) on the whole workspace;
#   2. every test of the workspace on x86_64 (favor-simd tests every ISA this CPU has), with the
#      CUDA kernels compiled by nvcc from PyPI so that a kernel compile error fails the run
#      (GPU tests skip with a printed reason where there is no GPU);
#   3. the CUDA kernels' own sources on a CPU emulator (no GPU needed) against the reference, and
#      favor-bench's CUDA paths (curves, roofline, profile, run) on that emulator;
#   4. the NEON/portable path on aarch64 under qemu;
#   5. one pass of every criterion bench (`-- --test`) so benches cannot rot.
# Any failure exits non-zero.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\n==> %s\n' "$*"; }

step "toolchain components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "nvcc (CUDA 13.0, from PyPI)"
NVCC=$(bash cuda/install-nvcc.sh "$root/.venv-cuda")
export NVCC FAVOR_REQUIRE_NVCC=1
"$NVCC" --version | tail -n 2

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "tests (x86_64)"
cargo test --workspace

step "CUDA kernels on the CPU emulator (the real .cu sources, run against the f64 reference), and favor-bench's CUDA paths on it"
# One invocation, so favor-cuda is built once with the emulator for both test targets.
cargo test -p favor-cuda -p favor-bench --features favor-cuda/emulator,favor-bench/cuda-emulator \
    --test cross_backend --test cuda

step "tests (aarch64 NEON path, under qemu)"
if bash scripts/setup-aarch64.sh; then
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
    cargo test --target aarch64-unknown-linux-gnu -p favor-core -p favor-simd
else
    echo "SKIPPED aarch64 tests: the aarch64 target or qemu could not be installed (see above)"
fi

step "criterion benches, one pass each"
cargo bench -p favor-bench -- --test

step "all checks passed"
