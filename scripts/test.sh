#!/usr/bin/env bash
# The project's test command: formatting, lints, the loom models, and every
# test of the workspace. CI runs exactly this (through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== loom models (lock-free code, every interleaving)"
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=build/loom \
    cargo test -p mirrorpoint-poller --lib wake::loom_tests
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=build/loom \
    cargo test -p mirrorpoint-target --lib -- mirror::sequencer::loom_tests mirror::split::loom_tests slots::loom_tests

echo "== fuzz smoke (every cargo-fuzz target, briefly)"
./scripts/fuzz-smoke.sh "${MP_FUZZ_SECONDS:-15}"

echo "== Linux kernel NVMe/TCP host against the target (QEMU guest)"
cargo build -p mirrorpoint-target --bin mirrorpoint
MIRRORPOINT="$PWD/build/debug/mirrorpoint" ./scripts/interop/nvmf-target.sh
echo "== the same host, digests case, with the volume's file on tmpfs (mapped, copied on two reactors)"
VOLUME_DIR=/dev/shm MIRRORPOINT="$PWD/build/debug/mirrorpoint" ./scripts/interop/nvmf-target.sh digests

echo "== split mirror under the Linux kernel NVMe/TCP host: ext4 written, split, the image fsck'ed (QEMU guest)"
MIRRORPOINT="$PWD/build/debug/mirrorpoint" ./scripts/interop/nvmf-split.sh

echo "== Linux kernel iSCSI initiator against the target (QEMU guest, with and without digests)"
MIRRORPOINT="$PWD/build/debug/mirrorpoint" ./scripts/interop/iscsi-mirrorpoint.sh

echo "== our NVMe/TCP initiator against the Linux kernel's nvmet-tcp target (QEMU guest)"
./scripts/interop/nvmet-host-check.sh

echo "== iSCSI conformance (libiscsi iscsi-test-cu -t ALL, floor in scripts/iscsi-conformance.floor)"
if ! command -v iscsi-test-cu >/dev/null 2>&1; then
    echo "iscsi-test-cu is missing: install libiscsi-bin (apt-get install libiscsi-bin; .ci/run does)" >&2
    exit 1
fi
./scripts/iscsi-conformance.sh

echo "== workspace tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi

