#!/usr/bin/env bash
# Side-by-side comparison in one run: the server pinned to core 0, the client to core 1,
# contenders interleaved A B C A B C so that drift in the machine hits each alike.
#
#   A  ringlink serve --io uring --threads 1      (client: loadgen, profiles/compare-*.toml)
#   B  ringlink serve --io epoll --threads 1      (client: loadgen, the same profiles)
#   C  examples/raw_echo: an io_uring TCP echo of the same bytes (client: raw_client), the
#      ceiling: what the kernel and loopback allow with no WebSocket or JSON work.
#
# Shapes:
#   saturate   64 connections offering 768,000 reports/s: many frames per read
#   10k-sat    10,000 connections offering 60,000/s: one frame per read
#   moderate   100 connections, 10,000 reports/s, precise pacing: latency
#   10k-half   10,000 connections at half of the 10k-sat rate ringlink reached in this run
#   idle       10,000 connections, no reports: server memory per connection
# For every run the server's CPU time (utime + stime of all its threads, from /proc) is read
# before and after: "per server core" = reports answered / server CPU seconds, which holds
# whether or not the client kept the server busy all the time.
#
#   benches/compare.sh [ROUNDS]     (default 2; medians over rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
out=target/compare
rm -rf "$out"; mkdir -p "$out"
cargo build --release --workspace --bins
cargo build --release --example raw_echo

start_server() { # $1 = uring|epoll|raw ; sets server, ws, api
    local log="$out/server.log"
    if [ "$1" = raw ]; then
        taskset -c 0 target/release/examples/raw_echo 127.0.0.1:0 >"$log" 2>&1 &
    else
        rm -rf "$out/data"
        taskset -c 0 target/release/ringlink serve --io "$1" --threads 1 --listen 127.0.0.1:0 \
            --api 127.0.0.1:0 --data-dir "$out/data" >"$log" 2>&1 &
    fi
    server=$!
    local line=""
    for _ in $(seq 1 100); do
        line="$(grep -m1 'listening on' "$log" || true)"; [ -n "$line" ] && break; sleep 0.1
    done
    [ -n "$line" ] || { cat "$log" >&2; exit 1; }
    ws="$(echo "$line" | grep -oE '[0-9]+(\.[0-9]+){3}:[0-9]+' | head -n 1)"
    api="$(echo "$line" | sed -n 's/.*api http:\/\/\([0-9.:]*\).*/\1/p')"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# $1 = contender, $2 = shape, $3 = round, $4 = reports/s per connection (10k shapes)
run() {
    start_server "$1"
    local base="$out/$1-$2-$3" t0 t1 w0 w1
    t0=$(cpu_ticks "$server"); w0=$(date +%s.%N)
    if [ "$1" = raw ]; then
        local args
        case "$2" in
            saturate) args="--connections 64 --rate 12000" ;;
            moderate) args="--connections 100 --rate 100 --spin" ;;
            10k-*) args="--connections 10000 --rate $4 --spin --duration 15" ;;
            idle) args="" ;;
        esac
        if [ -n "$args" ]; then
            # shellcheck disable=SC2086
            taskset -c 1 target/release/raw_client --target "$ws" $args >"$base.json"
        fi
    else
        local profile="profiles/compare-$2.toml" extra=()
        case "$2" in
            10k-*) profile="$base.toml"
                sed "s/^report_rate_per_device = .*/report_rate_per_device = $4/" \
                    profiles/compare-10k.toml >"$profile" ;;
            idle) profile="$base.toml"
                sed -e "s/^report_rate_per_device = .*/report_rate_per_device = 0/" \
                    -e "s/^duration_s = .*/duration_s = 8/" -e "s/^warmup_s = .*//" \
                    profiles/compare-10k.toml >"$profile"
                extra=(--server-pid "$server") ;;
        esac
        taskset -c 1 target/release/loadgen "$profile" --target "ws://$ws" --api "$api" \
            --json "$base.json" "${extra[@]}" >"$base.log" 2>&1 ||
            { echo "loadgen failed ($1 $2):" >&2; tail -20 "$base.log" >&2; }
    fi
    t1=$(cpu_ticks "$server"); w1=$(date +%s.%N)
    echo "$t0 $t1 $(getconf CLK_TCK) $w0 $w1" >"$base.cpu"
    kill -TERM "$server"; wait "$server" 2>/dev/null || true
}

for r in $(seq 1 "$rounds"); do
    for shape in saturate 10k-sat; do
        for c in uring epoll raw; do
            echo "round $r: $c $shape"
            run "$c" "$shape" "$r" 6
        done
    done
done
# Half of what the slower ringlink driver answered per second with 10,000 connections.
half=$(python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
sat = [statistics.median(json.load(open(f"{out}/{c}-10k-sat-{r}.json"))["throughput_msgs_per_s"]
                         for r in range(1, rounds + 1)) for c in ("uring", "epoll")]
print(f"{min(sat) / 2 / 10000:.3f}")
PY
)
echo "10k-half: $half reports/s per connection"
for r in $(seq 1 "$rounds"); do
    for shape in moderate 10k-half idle; do
        for c in uring epoll raw; do
            [ "$c" = raw ] && [ "$shape" = idle ] && continue
            echo "round $r: $c $shape"
            run "$c" "$shape" "$r" "$half"
        done
    done
done

python3 benches/compare_table.py "$out" "$rounds"
