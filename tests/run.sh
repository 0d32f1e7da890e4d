#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine, then runs every
# check. Exit 0 means everything passed. Used by CI (.ci/run) on a clean clone.
#
#   tests/run.sh            everything (about 10 minutes on 2 cores, most of it compiling)
#   FUZZ_SECONDS=N          seconds per fuzz target (default 10)
#   SKIP_FUZZ=1 / SKIP_AUTOBAHN=1 / SKIP_LOAD=1   leave those steps out (local iteration only)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
fuzz_seconds=${FUZZ_SECONDS:-10}

step() { printf '\n== %s (%ss in)\n' "$*" "$SECONDS"; }

# Starts the release ringlink (`--io $2`, ports 0, data dir target/$1, log target/$1.log) with
# the caller's environment and waits for its start line; sets $server (pid), $ws and $api. On
# failure it prints the log, stops the server and returns 1.
start_ringlink() {
    local name=$1 io=$2 line=""
    local data="$root/target/$name" log="$root/target/$name.log"
    rm -rf "$data"
    target/release/ringlink serve --io "$io" --listen 127.0.0.1:0 --api 127.0.0.1:0 \
        --data-dir "$data" >"$log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
        line="$(grep -m1 'listening on' "$log" || true)"
        [ -n "$line" ] && break
        sleep 0.1
    done
    if [ -z "$line" ]; then
        echo "ringlink did not start:" >&2; cat "$log" >&2; kill "$server" 2>/dev/null || true
        return 1
    fi
    ws="$(echo "$line" | sed -n 's/.*listening on \(ws:\/\/[0-9.:]*\).*/\1/p')"
    api="$(echo "$line" | sed -n 's/.*api http:\/\/\([0-9.:]*\).*/\1/p')"
}

# Mosquitto: the MQTT integration tests and the MQTT load step run a broker.
step "mosquitto"
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto
fi
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
"$mosquitto_bin" -h 2>/dev/null | head -n 1 || true

# NATS: the NATS integration tests (tests/nats_cluster.rs) run a 3-server JetStream cluster.
step "nats-server"
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ] \
    && [ ! -x /usr/bin/nats-server ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nats-server
fi
nats_bin="$(command -v nats-server || true)"
[ -n "$nats_bin" ] || [ ! -x /usr/sbin/nats-server ] || nats_bin=/usr/sbin/nats-server
[ -n "$nats_bin" ] || nats_bin=/usr/bin/nats-server
"$nats_bin" --version

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
    # One release build for every step (bins and examples together, so that the features
    # cargo unifies are the same and nothing is compiled twice).
    cargo build --release --workspace --bins --examples
    for io in uring epoll; do
        step "loadgen profiles/smoke.toml against ringlink --io $io"
        start_ringlink "smoke-$io" "$io"
        status=0
        target/release/loadgen profiles/smoke.toml --target "$ws" --api "$api" \
            --json "$root/target/smoke-$io.json" || status=$?
        kill -TERM "$server"
        wait "$server" || { echo "ringlink --io $io did not exit cleanly" >&2; exit 1; }
        [ "$status" = 0 ] || { echo "smoke profile failed on --io $io (exit $status)" >&2; exit 1; }
    done

    # The MQTT sink end to end: every report answered 0 must reach the broker, in time.
    step "loadgen profiles/mqtt.toml against ringlink --io uring with uplink.sink = mqtt"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    conf="$root/target/mqtt-smoke-mosquitto.conf"
    printf 'listener %s 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 0\n' "$port" >"$conf"
    "$mosquitto_bin" -c "$conf" >"$root/target/mqtt-smoke-mosquitto.log" 2>&1 &
    broker=$!
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || {
        echo "mosquitto did not start:" >&2; cat "$root/target/mqtt-smoke-mosquitto.log" >&2
        kill "$broker" 2>/dev/null || true; exit 1
    }
    if ! RINGLINK_UPLINK_SINK=mqtt RINGLINK_UPLINK_MQTT_URL="mqtt://127.0.0.1:$port" \
        start_ringlink mqtt-smoke uring; then
        kill "$broker" 2>/dev/null || true; exit 1
    fi
    status=0
    target/release/loadgen profiles/mqtt.toml --target "$ws" --api "$api" \
        --mqtt "mqtt://127.0.0.1:$port" --json "$root/target/mqtt-smoke.json" || status=$?
    kill -TERM "$server"
    server_status=0
    wait "$server" || server_status=$?
    kill -TERM "$broker"
    wait "$broker" || true
    [ "$server_status" = 0 ] || { echo "ringlink with the mqtt sink did not exit cleanly" >&2; cat "$root/target/mqtt-smoke.log" >&2; exit 1; }
    [ "$status" = 0 ] || { echo "mqtt profile failed (exit $status)" >&2; exit 1; }

    # Regressions without trusting absolute numbers: ringlink against the conventional server
    # in the same job, ratios of CPU per report and p99 against benches/regress-baseline.json.
    # The table is printed; runs and an HTML report stay under target/regress/.
    step "regression check: ringlink / conventional server against the committed ratios"
    benches/regress.sh
fi

# The systemd unit: systemd's own verifier and its offline security score (skips, saying so,
# where systemd-analyze is absent). The debug binary from cargo test stands in for the
# installed one.
step "deploy/ringlink.service: systemd-analyze verify"
deploy/verify.sh target/debug/ringlink

step "all checks passed"
