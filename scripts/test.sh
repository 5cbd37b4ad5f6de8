#!/usr/bin/env bash
# The whole test suite, set-up included: installs every system package the
# tests use (quietly, skipping what is there), builds, and runs the suite.
# `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive: NBD clients (qemu-img/qemu-io, nbdinfo,
# nbdcopy, fio; python3-libnbd for the backup recipe and bench/soak.py), FUSE, filesystems and
# loop devices, zstd for fixtures, gdb for the test watchdog (thread stacks
# of a hung test), systemd for systemd-socket-activate.
PKGS=(qemu-utils libnbd-bin python3-libnbd fio fuse3 e2fsprogs util-linux zstd gdb systemd)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing: ${missing[*]}" >&2
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export CARGO_TERM_COLOR=never
cargo build --release --all-targets --locked 2>&1 | tail -3
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --release --locked --no-fail-fast "$@"
else
    cargo test --release --locked --no-fail-fast "$@"
fi
