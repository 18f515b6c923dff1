#!/usr/bin/env bash
# Checks scripts/test.sh's own logic in a few seconds, without building anything: it runs copies
# of scripts/test.sh and .ci/run in a scratch tree where cargo, rustup, nvcc's installer and the
# aarch64 setup are stubs, and checks the exit status and output of each case:
#   - aarch64 setup fails, not under CI: skipped with a message, run passes;
#   - aarch64 setup fails, CI=true: run fails, later steps do not run;
#   - aarch64 setup fails, via .ci/run: run fails (so .ci/run sets CI);
#   - aarch64 setup succeeds, CI=true: the aarch64 tests and the Python package's tests run,
#     run passes;
#   - a cargo step fails: run fails and the summary names that step.
# Every case must print a per-step duration and the summary table.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src_root=$(cd "$here/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

mkdir -p "$scratch/repo/scripts" "$scratch/repo/cuda" "$scratch/repo/.ci" "$scratch/bin"
cp "$src_root/scripts/test.sh" "$scratch/repo/scripts/test.sh"
cp "$src_root/.ci/run" "$scratch/repo/.ci/run"
# The copy must not run this self-test again.
printf '#!/usr/bin/env bash\nexit 0\n' >"$scratch/repo/scripts/test-script-selftest.sh"
# The aarch64 setup succeeds or fails as FAKE_AARCH64_SETUP says.
cat >"$scratch/repo/scripts/setup-aarch64.sh" <<'EOF'
#!/usr/bin/env bash
echo "fake setup-aarch64: ${FAKE_AARCH64_SETUP}"
[ "$FAKE_AARCH64_SETUP" = ok ]
EOF
cat >"$scratch/repo/cuda/install-nvcc.sh" <<EOF
#!/usr/bin/env bash
echo "$scratch/bin/nvcc"
EOF
printf '#!/usr/bin/env bash\necho "nvcc stub"; echo "release 13.0"\n' >"$scratch/bin/nvcc"
printf '#!/usr/bin/env bash\nexit 0\n' >"$scratch/bin/rustup"
# cargo logs its arguments and fails when they contain FAKE_CARGO_FAIL_ON.
cat >"$scratch/bin/cargo" <<'EOF'
#!/usr/bin/env bash
echo "cargo $*" >>"$FAKE_CARGO_LOG"
if [ -n "${FAKE_CARGO_FAIL_ON:-}" ] && [[ " $* " == *" $FAKE_CARGO_FAIL_ON "* ]]; then
    echo "fake cargo: failing on $FAKE_CARGO_FAIL_ON" >&2
    exit 101
fi
EOF
# python3 -m venv DIR makes DIR/bin/python, a stub; both log their arguments with cargo's.
cat >"$scratch/bin/python3" <<'EOF'
#!/usr/bin/env bash
echo "python3 $*" >>"$FAKE_CARGO_LOG"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    printf '#!/usr/bin/env bash\necho "python $*" >>"$FAKE_CARGO_LOG"\n' >"$3/bin/python"
    chmod +x "$3/bin/python"
fi
EOF
chmod +x "$scratch"/bin/* "$scratch"/repo/scripts/*.sh "$scratch"/repo/cuda/*.sh "$scratch/repo/.ci/run"

failures=0
fail() {
    echo "FAIL [$case_name]: $*" >&2
    failures=$((failures + 1))
}

# run_case NAME EXPECTED_RC ENTRY [VAR=VALUE...]: runs ENTRY (a path inside the scratch repo)
# with a clean CI variable plus the given variables; leaves the output in $out and the cargo
# calls in $log.
run_case() {
    case_name=$1
    local want_rc=$2 entry=$3
    shift 3
    log="$scratch/cargo-$case_name.log"
    : >"$log"
    local rc=0
    out=$(env -u CI PATH="$scratch/bin:$PATH" FAKE_CARGO_LOG="$log" FAKE_AARCH64_SETUP=fail \
        "$@" bash "$scratch/repo/$entry" 2>&1) || rc=$?
    if [ "$rc" -ne "$want_rc" ]; then fail "exit status $rc, expected $want_rc"; fi
    grep -q '^==> summary$' <<<"$out" || fail "no summary table"
    grep -Eq '^--- cargo fmt --check: ok in [0-9]+m[0-9]{2}s$' <<<"$out" || fail "no step duration"
    grep -Eq '^total +[0-9]+m[0-9]{2}s$' <<<"$out" || fail "no total in the summary"
}
has() { grep -Eq -- "$1" <<<"$out" || fail "output lacks /$1/"; }
lacks() { if grep -Eq -- "$1" <<<"$out"; then fail "output has /$1/"; fi; }
called() { grep -Eq -- "$1" "$log" || fail "cargo was not called with /$1/"; }
not_called() { if grep -Eq -- "$1" "$log"; then fail "cargo was called with /$1/"; fi; }

run_case local-skip 0 scripts/test.sh
has '^SKIPPED tests \(aarch64, under qemu\): '
has '^tests \(aarch64, under qemu\) +SKIPPED '
has '^all checks passed$'
called '^cargo bench -p favor-bench'
not_called 'aarch64'

run_case ci-false-skips 0 scripts/test.sh CI=false
has '^all checks passed$'

run_case ci-fails 1 scripts/test.sh CI=true
has 'under CI \(CI=true\) the aarch64 tests may not be skipped'
has '^tests \(aarch64, under qemu\) +FAILED \(exit 1\) '
has '^checks FAILED \(exit 1\)$'
lacks 'all checks passed'
not_called '^cargo bench'

run_case ci-1-fails 1 scripts/test.sh CI=1
lacks 'all checks passed'

run_case ci-entry-fails 1 .ci/run
has 'under CI \(CI=true\)'
lacks 'all checks passed'

run_case ci-aarch64-ok 0 scripts/test.sh CI=true FAKE_AARCH64_SETUP=ok
called 'test --target aarch64-unknown-linux-gnu -p favor-core -p favor-simd'
called '^python -m pip install -q \./favor-py pytest$'
called '^python -m pytest -q favor-py/tests$'
has '^tests \(aarch64, under qemu\) +ok '
has '^all checks passed$'

run_case clippy-fails 101 scripts/test.sh FAKE_CARGO_FAIL_ON=clippy
has '^cargo clippy +FAILED \(exit 101\) '
has '^checks FAILED \(exit 101\)$'
lacks 'all checks passed'
not_called 'test --workspace'

if [ "$failures" -ne 0 ]; then
    echo "test-script-selftest: $failures check(s) failed" >&2
    exit 1
fi
echo "test-script-selftest: all cases passed"
