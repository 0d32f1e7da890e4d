#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs every
# check. Exit 0 means everything passed. Used by CI (.ci/run) on a clean clone.
#
#   tests/run.sh            everything (about 10 minutes on 2 cores, most of it compiling)
#   FUZZ_SECONDS=N          seconds per fuzz target (default 20)
#   SKIP_FUZZ=1 / SKIP_AUTOBAHN=1 / SKIP_LOAD=1   leave those steps out (local iteration only)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
fuzz_seconds=${FUZZ_SECONDS:-20}

step() { printf '\n== %s\n' "$*"; }

step "toolchain"
cargo --version
rustc --version

step "rustfmt"
cargo fmt --all -- --check

step "clippy (-D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
    step "fuzz smoke: ${fuzz_seconds}s per target"
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
        cargo install cargo-fuzz --locked
    fi
    # The machine has only the stable toolchain; cargo-fuzz needs nightly flags.
    export RUSTC_BOOTSTRAP=1
    targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' tests/fuzz/Cargo.toml | grep -v '^ringlink-fuzz$')
    for t in $targets; do
        corpus="$root/target/fuzz-corpus/$t"
        mkdir -p "$corpus"
        echo "-- $t"
        log="$root/target/fuzz-$t.log"
        if ! cargo fuzz run --fuzz-dir tests/fuzz "$t" "$corpus" "tests/fuzz/seeds/$t" -- \
            -max_total_time="$fuzz_seconds" -print_final_stats=1 >"$log" 2>&1; then
            echo "fuzz target $t failed:" >&2
            tail -n 60 "$log" >&2
            exit 1
        fi
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done )' "$log" || true
    done
fi

if [ "${SKIP_AUTOBAHN:-0}" != 1 ]; then
    step "Autobahn|Testsuite fuzzingclient on the ws module (quick gate: no 9.*, 12.*, 13.*)"
    tests/autobahn/run.sh
    for io in uring epoll; do
        step "Autobahn|Testsuite fuzzingclient on ringlink serve --echo --io $io"
        tests/autobahn/run.sh --io "$io"
    done
fi

if [ "${SKIP_LOAD:-0}" != 1 ]; then
    # CI latency profiling: the smoke profile against the release server on each driver; the
    # tables are the CI's latency report. Thresholds are generous for a noisy 2-core machine
    # but a single error or lost report fails the run.
    cargo build --release --workspace --bins
    for io in uring epoll; do
        step "loadgen profiles/smoke.toml against ringlink --io $io"
        data="$root/target/smoke-$io"
        rm -rf "$data"
        log="$root/target/smoke-$io.log"
        target/release/ringlink serve --io "$io" --listen 127.0.0.1:0 --api 127.0.0.1:0 \
            --data-dir "$data" >"$log" 2>&1 &
        server=$!
        line=""
        for _ in $(seq 1 100); do
            line="$(grep -m1 'listening on' "$log" || true)"
            [ -n "$line" ] && break
            sleep 0.1
        done
        [ -n "$line" ] || { echo "ringlink did not start:" >&2; cat "$log" >&2; kill "$server"; exit 1; }
        ws="$(echo "$line" | sed -n 's/.*listening on \(ws:\/\/[0-9.:]*\).*/\1/p')"
        api="$(echo "$line" | sed -n 's/.*api http:\/\/\([0-9.:]*\).*/\1/p')"
        status=0
        target/release/loadgen profiles/smoke.toml --target "$ws" --api "$api" \
            --json "$root/target/smoke-$io.json" || status=$?
        kill -TERM "$server"
        wait "$server" || { echo "ringlink --io $io did not exit cleanly" >&2; exit 1; }
        [ "$status" = 0 ] || { echo "smoke profile failed on --io $io (exit $status)" >&2; exit 1; }
    done
fi

step "all checks passed"
