#!/usr/bin/env bash
# Side-by-side comparison in one run: the server pinned to core 0, the client to core 1,
# interleaved A B C A B C so drift in the machine hits every contender alike.
#
#   A  ringlink serve --io uring --threads 1    (loadgen: profiles/compare-*.toml)
#   B  ringlink serve --io epoll --threads 1    (loadgen: the same profiles)
#   C  examples/raw_echo (io_uring echo of the same bytes; client: raw_client) - the ceiling:
#      what the kernel and loopback allow with no WebSocket or JSON work on either side.
#
# Prints msgs/s at saturation and p50/p99 at 10,000 msgs/s for each, and the ratios.
#   benches/compare.sh [ROUNDS]     (default 2)
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

run() { # $1 = contender, $2 = saturate|moderate, $3 = round
    start_server "$1"
    local json="$out/$1-$2-$3.json"
    if [ "$1" = raw ]; then
        local rate=3000 conns=64
        [ "$2" = moderate ] && rate=100 conns=100
        taskset -c 1 target/release/raw_client --target "$ws" --connections "$conns" \
            --rate "$rate" --duration 10 >"$json"
    else
        taskset -c 1 target/release/loadgen "profiles/compare-$2.toml" --target "ws://$ws" \
            --api "$api" --json "$json" >"$out/$1-$2-$3.log" 2>&1 ||
            { echo "loadgen failed ($1 $2):" >&2; tail -20 "$out/$1-$2-$3.log" >&2; }
    fi
    kill -TERM "$server"; wait "$server" 2>/dev/null || true
}

for r in $(seq 1 "$rounds"); do
    for kind in saturate moderate; do
        for c in uring epoll raw; do
            echo "round $r: $c $kind"
            run "$c" "$kind" "$r"
        done
    done
done

python3 - "$out" "$rounds" <<'PY'
import json, sys, glob, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def load(c, kind):
    vals = []
    for r in range(1, rounds + 1):
        d = json.load(open(f"{out}/{c}-{kind}-{r}.json"))
        if c == "raw":
            vals.append((d["msgs_per_s"], d["p50_ms"], d["p99_ms"], 0))
        else:
            lat = d["latency_ms"]["report"]
            vals.append((d["throughput_msgs_per_s"], lat["p50"], lat["p99"], d["error_total"]))
    return vals
rows = {}
for c in ["uring", "epoll", "raw"]:
    sat, mod = load(c, "saturate"), load(c, "moderate")
    rows[c] = (statistics.median(v[0] for v in sat), statistics.median(v[1] for v in mod),
               statistics.median(v[2] for v in mod), sum(v[3] for v in sat + mod))
print("\n| contender | msgs/s at saturation (1 server core) | vs epoll | vs raw echo | p50 / p99 ms at 10,000 msgs/s | errors |")
print("| --- | --- | --- | --- | --- | --- |")
names = {"uring": "ringlink --io uring", "epoll": "ringlink --io epoll", "raw": "raw io_uring echo (ceiling)"}
for c in ["uring", "epoll", "raw"]:
    t, p50, p99, e = rows[c]
    print(f"| {names[c]} | {t:,.0f} | {t / rows['epoll'][0]:.2f}x | {t / rows['raw'][0]:.2f}x | {p50:.2f} / {p99:.2f} | {e} |")
PY
