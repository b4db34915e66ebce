#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ with libFuzzer's coverage
# instrumentation (the same flags `cargo fuzz build` passes, on stable rustc,
# so CI needs no nightly toolchain and no cargo-fuzz install) and runs each
# for a short time. Any crash, panic, leak or timeout fails the run and
# leaves the reproducer in build/fuzz/artifacts/TARGET/.
#
#   scripts/fuzz-smoke.sh [SECONDS_PER_TARGET] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
shift || true
root="$PWD"
export CARGO_TARGET_DIR="$root/build/fuzz"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^mirrorpoint-fuzz$')
fi
# An explicit --target keeps RUSTFLAGS off build scripts, as cargo-fuzz does.
triple="$(rustc -vV | sed -n 's/^host: //p')"
(cd fuzz && cargo build --release --bins --target "$triple")
for t in "${targets[@]}"; do
    corpus="$root/build/fuzz/corpus/$t"
    artifacts="$root/build/fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "$root/fuzz/seeds/$t" ]; then
        cp -n "$root/fuzz/seeds/$t"/* "$corpus"/ 2>/dev/null || true
    fi
    echo "== fuzz $t for ${secs}s"
    "$CARGO_TARGET_DIR/$triple/release/$t" "$corpus" -max_total_time="$secs" -rss_limit_mb=2048 \
        -timeout=10 -artifact_prefix="$artifacts/" -print_final_stats=1 2>&1 \
        | grep -E '^(#[0-9]+ *DONE|Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY|thread .* panicked|INFO: Running)' || true
    if ls "$artifacts"/* >/dev/null 2>&1; then
        echo "fuzz target $t found a failure: $(ls "$artifacts")"
        exit 1
    fi
done
echo "fuzz smoke: ${#targets[@]} targets, ${secs}s each, no failures"
