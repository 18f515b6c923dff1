#!/usr/bin/env bash
# Installs what running aarch64 tests under emulation needs: the Rust target, a cross linker
# and libc, and qemu-user. Idempotent; exits non-zero if anything cannot be installed.
set -euo pipefail
rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
    || rustup target add aarch64-unknown-linux-gnu
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null \
    || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-gcc >/dev/null
