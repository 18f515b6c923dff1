#!/usr/bin/env bash
# Validates the CUDA backend on a GPU machine from prebuilt test binaries (no Rust needed there).
#
# Here (with nvcc):
#   export NVCC="$(cuda/install-nvcc.sh | tail -n1)" FAVOR_REQUIRE_NVCC=1
#   cargo test -p favor-cuda --release --no-run     # prints the paths of the test executables
# There:
#   cuda/gpu-validate.sh <test binary>...           # e.g. .../deps/cross_backend-<hash> .../deps/availability-<hash>
#
# For each binary: the tests with FAVOR_REQUIRE_GPU=1 (a missing GPU fails instead of skipping),
# then compute-sanitizer memcheck and racecheck on the same binary. Exits non-zero on any failure.
# Sanitizer runs are slow: set SANITIZE_FILTER to a test-name filter to narrow them
# (default: all tests).
set -uo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 <test binary>..." >&2
    exit 2
fi

sanitizer=""
for cand in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-}/bin/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-13.0/bin/compute-sanitizer; do
    if [[ -n "$cand" && -x "$cand" ]]; then sanitizer="$cand"; break; fi
done

echo "== $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"

status=0
run() {
    echo "== $*"
    "$@"
    local rc=$?
    if [[ $rc -ne 0 ]]; then echo "!! FAILED ($rc): $*"; status=1; fi
}

export FAVOR_REQUIRE_GPU=1
for bin in "$@"; do
    run "$bin" --test-threads=1 --nocapture
    if [[ -z "$sanitizer" ]]; then
        echo "!! compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): sanitizer runs skipped"
        status=1
        continue
    fi
    for tool in memcheck racecheck; do
        run "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
            "$bin" --test-threads=1 ${SANITIZE_FILTER:-}
    done
done

if [[ $status -eq 0 ]]; then echo "== all GPU validation passed"; else echo "== GPU validation FAILED"; fi
exit $status
