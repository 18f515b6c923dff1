#!/usr/bin/env bash
# Installs the CUDA 13.0 compiler (nvcc) from PyPI into a Python venv, the way CI does, and
# prints the path of nvcc on the last line of stdout. Idempotent: an existing install is reused.
#
#   usage: cuda/install-nvcc.sh [VENV_DIR]      (default: <repo>/.venv-cuda)
#   CI:    export NVCC="$(cuda/install-nvcc.sh | tail -n1)" FAVOR_REQUIRE_NVCC=1
#
# The wheels match the GPU machines' driver 580 (CUDA 13.0); see favor-cuda's crate docs.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo/.venv-cuda}"

find_nvcc() {
    find "$venv/lib" -path '*/site-packages/nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -n1
}

nvcc="$(find_nvcc || true)"
if [[ -z "$nvcc" ]]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.88" \
        "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-crt==13.0.*" \
        "nvidia-nvvm==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" >&2
    nvcc="$(find_nvcc)"
fi
if [[ -z "$nvcc" ]]; then
    echo "install-nvcc.sh: nvcc not found under $venv after installation" >&2
    exit 1
fi
"$nvcc" --version >&2
echo "$nvcc"
