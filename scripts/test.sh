#!/usr/bin/env bash
# The test command. On a fresh machine it installs what the checks need, then runs:
#   1. cargo fmt --check and clippy (-D warnings) on the whole workspace;
#   2. every test of the workspace on x86_64 (favor-simd tests every ISA this CPU has), with the
#      CUDA kernels compiled by nvcc from PyPI so that a kernel compile error fails the run
#      (GPU tests skip with a printed reason where there is no GPU); this includes favor-capi's C
#      test program, compiled with cc against the shared library and, under AddressSanitizer,
#      the static one, and the check that the committed C header is current;
#   3. the CUDA kernels' own sources on a CPU emulator (no GPU needed) against the reference,
#      favor-bench's CUDA paths (curves, roofline, profile, run), the `favor` entry point's
#      CUDA backend and the C ABI's device-pointer path on that emulator;
#   4. favor-core and favor-simd on aarch64 under qemu (favor-simd's NEON and portable ISAs);
#   5. one pass of every criterion bench (`-- --test`) so benches cannot rot;
#   6. the Python package exactly as a user installs it (`pip install ./favor-py` in a virtual
#      environment) and its pytest suite (the torch tests run where torch is installed).
# Any failure exits non-zero. Each step's duration is printed as it ends, and a summary table
# (step, status, duration) at the end, also when a step fails.
#
# Where the aarch64 cross toolchain or qemu cannot be installed, the aarch64 step is skipped with
# a message locally, but fails the run under CI (CI=true or CI=1, which .ci/run sets), so a CI
# run can never pass without having run those tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

is_ci() {
    case "${CI:-}" in
    [Tt][Rr][Uu][Ee] | 1) return 0 ;;
    *) return 1 ;;
    esac
}

fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# Step bookkeeping: `step LABEL` ends the running step (status "ok" unless `skip_step` marked it)
# and starts the next one; the EXIT trap ends the last one, as FAILED if the script is exiting
# non-zero, and prints the table.
labels=()
statuses=()
durations=()
cur_label=""
cur_status=""
cur_start=0
run_start=$SECONDS

end_step() {
    [ -n "$cur_label" ] || return 0
    local d=$((SECONDS - cur_start))
    labels+=("$cur_label")
    statuses+=("$1")
    durations+=("$d")
    printf -- '--- %s: %s in %s\n' "$cur_label" "$1" "$(fmt_secs "$d")"
    cur_label=""
}

step() {
    end_step "${cur_status:-ok}"
    cur_label="$1"
    cur_status=""
    cur_start=$SECONDS
    printf '\n==> %s\n' "$1"
}

skip_step() {
    echo "SKIPPED $cur_label: $*"
    cur_status="SKIPPED"
}

summary() {
    local rc=$?
    if [ "$rc" -eq 0 ]; then end_step "${cur_status:-ok}"; else end_step "FAILED (exit $rc)"; fi
    printf '\n==> summary\n'
    printf '%-44s %-16s %9s\n' "step" "status" "duration"
    local i
    for i in "${!labels[@]}"; do
        printf '%-44s %-16s %9s\n' "${labels[$i]}" "${statuses[$i]}" "$(fmt_secs "${durations[$i]}")"
    done
    printf '%-44s %-16s %9s\n' "total" "" "$(fmt_secs $((SECONDS - run_start)))"
    if [ "$rc" -eq 0 ]; then
        echo "all checks passed"
    else
        echo "checks FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap summary EXIT

step "test script self-test"
bash scripts/test-script-selftest.sh

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

# One invocation, so favor-cuda is built once with the emulator for every test target (a second
# invocation with other packages rebuilds the workspace's crates with other features).
step "CUDA kernels on the CPU emulator"
echo "(the real .cu sources against the f64 reference, favor-bench's CUDA paths, the \`favor\`"
echo " entry point's CUDA backend and the C ABI's device-pointer path on them; favor's own"
echo " cross_backend and the C program's host checks ride along)"
cargo test -p favor-cuda -p favor-bench -p favor -p favor-capi \
    --features favor-cuda/emulator,favor-bench/cuda-emulator,favor/cuda-emulator,favor-capi/cuda-emulator \
    --lib --test cross_backend --test extremes --test cuda --test entry_point --test c_program

step "tests (aarch64, under qemu)"
if bash scripts/setup-aarch64.sh; then
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
    # Under qemu the f64 reference at L = 65536 would take many minutes; shorter lengths there.
    FAVOR_LONG_LENS=1024,4096 cargo test --target aarch64-unknown-linux-gnu -p favor-core -p favor-simd
elif is_ci; then
    echo "ERROR: the aarch64 target or qemu could not be installed (see above); under CI" \
        "(CI=$CI) the aarch64 tests may not be skipped" >&2
    exit 1
else
    skip_step "the aarch64 target or qemu could not be installed (see above); this fails under CI"
fi

step "criterion benches, one pass each"
cargo bench -p favor-bench -- --test

# Last, so that its release build reuses what the benches built.
step "Python package: pip install ./favor-py in a venv, pytest"
python3 -m venv "$root/.venv-py"
"$root/.venv-py/bin/python" -m pip install -q --upgrade pip
"$root/.venv-py/bin/python" -m pip install -q ./favor-py pytest
"$root/.venv-py/bin/python" -m pytest -q favor-py/tests
