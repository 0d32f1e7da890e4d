#!/usr/bin/env bash
# Side-by-side comparison in one run: the server pinned to core 0, the client to core 1,
# contenders interleaved A B C A B C so that drift in the machine hits each alike.
#
#   uring  ringlink serve --io uring --threads 1   (client: loadgen, profiles/compare-*.toml)
#   epoll  ringlink serve --io epoll --threads 1   (client: loadgen, the same profiles)
#   conv   examples/conventional.rs: the same protocol the usual way (tokio multi-thread
#          runtime with one worker, tokio-tungstenite, serde_json into borrowed structs; no
#          registry, model checks, log or metrics: the conventional stack's cost floor), only
#          in the closed-/open-loop shapes below (client: loadgen, without --api)
#   raw    examples/raw_echo: an io_uring TCP echo of the same bytes (client: raw_client), the
#          ceiling: what the kernel and loopback allow with no WebSocket or JSON work.
#
# Shapes (first table):
#   saturate     64 connections offering 768,000 reports/s: many frames per read
#   10k-sat      10,000 connections offering 60,000/s: one frame per read
#   moderate     100 connections, 10,000 reports/s, precise pacing: latency
#   10k-half     10,000 connections at half of the 10k-sat rate ringlink reached in this run
#   idle         10,000 connections, no reports: server memory per connection, and the shard's
#                CPU per upgrade + online while they connect (not raw)
# Shapes (second table; uring, epoll, conv and raw):
#   closed-100   100 connections, closed loop: one report in flight on each (15 s)
#   closed-1000  1,000 connections, closed loop (15 s)
#   open-20k     5,000 connections x 4 reports/s = 20,000/s open loop, precise pacing (18 s)
#
# For every run the server's CPU time (utime + stime of all its threads, exited ones included,
# from /proc/PID/stat) is read before and after: "per server core" = reports answered / server
# CPU seconds, which holds whether or not the client kept the server busy all the time.
# Context switches: voluntary + nonvoluntary of every thread, from /proc/PID/task/TID/status,
# before and after (target/compare/*.ctx0, *.ctx1, with each thread's CPU ticks), kept per
# thread id: a thread's share is after - before (all of it for a thread born during the run);
# the table also splits switches and CPU by thread name. A thread that exits during the run loses its switches
# (Linux keeps them only for getrusage of the whole process); the table counts such threads.
# The process's own /proc/PID/status is also recorded but counts the main thread alone.
#
#   benches/compare.sh [ROUNDS]      (default 1; medians over rounds)
#
# One round takes about 7 minutes on the project machine plus the builds (a release build
# after a change: 3-4 minutes): 26 client runs of 6.3 minutes together, plus starting and
# stopping servers (0.2 s a run in the quick mode). An estimate from the run lengths, not
# timed in full; each further round adds as much. Environment:
#   COMPARE_QUICK=1        a smoke check, not figures: every shape 3 s (no warm-up); about
#                          1.5 minutes plus the builds
#   COMPARE_SHAPES="..."   only these shapes, e.g. "closed-100 open-20k" (10k-half needs 10k-sat)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-1}
quick=${COMPARE_QUICK:-0}
shapes=" ${COMPARE_SHAPES:-saturate 10k-sat moderate 10k-half idle closed-100 closed-1000 open-20k} "
out=target/compare
rm -rf "$out"; mkdir -p "$out"
cargo build --release --workspace --bins --examples

wanted() { [[ "$shapes" == *" $1 "* ]]; }

start_server() { # $1 = uring|epoll|conv|raw, $2 = run base ; sets server, ws, api
    # A log of its own per run: with one shared log, the wait below could read the previous
    # server's address before the new server's redirection had emptied the file.
    local log="$2.server.log"
    api=""
    case "$1" in
        raw) taskset -c 0 target/release/examples/raw_echo 127.0.0.1:0 >"$log" 2>&1 & ;;
        conv) taskset -c 0 target/release/examples/conventional 127.0.0.1:0 >"$log" 2>&1 & ;;
        *) rm -rf "$out/data"
            # The comparison measures raw capacity against servers with no limits:
            # compare-saturate sends 12000 reports/s on one connection (over the default
            # max_messages_per_s) and compare-10k opens 10000 connections at once.
            RINGLINK_LIMITS_MAX_MESSAGES_PER_S=0 RINGLINK_LIMITS_MAX_NEW_CONNECTIONS_PER_S=0 \
            taskset -c 0 target/release/ringlink serve --io "$1" --threads 1 --listen 127.0.0.1:0 \
                --api 127.0.0.1:0 --data-dir "$out/data" >"$log" 2>&1 & ;;
    esac
    server=$!
    local line=""
    for _ in $(seq 1 100); do
        line="$(grep -m1 'listening on' "$log" || true)"; [ -n "$line" ] && break; sleep 0.1
    done
    [ -n "$line" ] || { cat "$log" >&2; exit 1; }
    ws="$(echo "$line" | grep -oE '[0-9]+(\.[0-9]+){3}:[0-9]+' | head -n 1)"
    case "$1" in
        uring|epoll) api="$(echo "$line" | sed -n 's/.*api http:\/\/\([0-9.:]*\).*/\1/p')" ;;
    esac
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Every thread of $1: "TID SWITCHES CPU_TICKS NAME" (voluntary + nonvoluntary context switches
# from its status, utime + stime from its stat), then "process SWITCHES - -" from
# /proc/PID/status (the main thread only).
ctx_switches() {
    local d tid sw ticks name
    for d in /proc/"$1"/task/*; do
        tid=${d##*/}
        # A thread that exits between the glob and the read is skipped.
        sw=$(awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s}' "$d/status" \
            2>/dev/null) || continue
        ticks=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "$d/stat" 2>/dev/null) || continue
        name=$(cat "$d/comm" 2>/dev/null) || continue
        echo "$tid $sw $ticks $name"
    done
    awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print "process", s, "-", "-"}' \
        "/proc/$1/status"
}

# A copy of profile $1 for run base $2, shortened in quick mode (3 s, no warm-up); prints its
# path.
profile_for() {
    local src=$1 dst="$2.toml"
    if [ "$quick" = 1 ]; then
        sed -e "s/^duration_s = .*/duration_s = 3/" -e "s/^warmup_s = .*//" "$src" >"$dst"
    else
        cp "$src" "$dst"
    fi
    echo "$dst"
}

# $1 = contender, $2 = shape, $3 = round, $4 = reports/s per connection (10k shapes)
run() {
    local base="$out/$1-$2-$3" t0 t1 w0 w1
    start_server "$1" "$base"
    ctx_switches "$server" >"$base.ctx0"
    t0=$(cpu_ticks "$server"); w0=$(date +%s.%N)
    if [ "$1" = raw ]; then
        local args secs=10
        case "$2" in
            saturate) args="--connections 64 --rate 12000" ;;
            moderate) args="--connections 100 --rate 100 --spin" ;;
            10k-*) args="--connections 10000 --rate $4 --spin"; secs=15 ;;
            closed-100) args="--connections 100 --closed"; secs=15 ;;
            closed-1000) args="--connections 1000 --closed"; secs=15 ;;
            open-20k) args="--connections 5000 --rate 4 --spin"; secs=18 ;;
            idle) args="" ;;
        esac
        [ "$quick" = 1 ] && secs=3
        if [ -n "$args" ]; then
            # shellcheck disable=SC2086
            taskset -c 1 target/release/raw_client --target "$ws" $args --duration "$secs" \
                >"$base.json" 2>"$base.log" ||
                { echo "raw_client failed ($1 $2):" >&2; tail -5 "$base.log" >&2; }
        fi
    else
        local profile extra=()
        case "$2" in
            10k-*) profile="$(profile_for profiles/compare-10k.toml "$base")"
                sed -i "s/^report_rate_per_device = .*/report_rate_per_device = $4/" "$profile" ;;
            idle) profile="$base.toml"
                sed -e "s/^report_rate_per_device = .*/report_rate_per_device = 0/" \
                    -e "s/^duration_s = .*/duration_s = $([ "$quick" = 1 ] && echo 3 || echo 8)/" \
                    -e "s/^warmup_s = .*//" profiles/compare-10k.toml >"$profile"
                extra=(--server-pid "$server") ;;
            *) profile="$(profile_for "profiles/compare-$2.toml" "$base")" ;;
        esac
        [ -n "$api" ] && extra+=(--api "$api")
        # The shard's CPU per upgrade + online while the 10,000 connect (benches/connect_cost.py).
        local cost=""
        if [ "$2" = idle ]; then
            python3 benches/connect_cost.py "$server" "$api" 10000 "$base.connect" \
                >"$base.connect.log" 2>&1 &
            cost=$!
        fi
        taskset -c 1 target/release/loadgen "$profile" --target "ws://$ws" \
            --json "$base.json" "${extra[@]}" >"$base.log" 2>&1 ||
            { echo "loadgen failed ($1 $2):" >&2; tail -20 "$base.log" >&2; }
        if [ -n "$cost" ]; then
            wait "$cost" || { echo "connect_cost failed ($1):" >&2; cat "$base.connect.log" >&2; }
        fi
    fi
    t1=$(cpu_ticks "$server"); w1=$(date +%s.%N)
    ctx_switches "$server" >"$base.ctx1"
    echo "$t0 $t1 $(getconf CLK_TCK) $w0 $w1" >"$base.cpu"
    kill -TERM "$server"; wait "$server" 2>/dev/null || true
}

for r in $(seq 1 "$rounds"); do
    for shape in saturate 10k-sat; do
        wanted "$shape" || continue
        for c in uring epoll raw; do
            echo "round $r: $c $shape"
            run "$c" "$shape" "$r" 6
        done
    done
done
# Half of what the slower ringlink driver answered per second with 10,000 connections.
if wanted 10k-half && ! wanted 10k-sat; then
    echo "10k-half needs 10k-sat: skipped" >&2
    shapes=${shapes/ 10k-half / }
fi
half=0
if wanted 10k-half; then
    half=$(python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
sat = [statistics.median(json.load(open(f"{out}/{c}-10k-sat-{r}.json"))["throughput_msgs_per_s"]
                         for r in range(1, rounds + 1)) for c in ("uring", "epoll")]
print(f"{min(sat) / 2 / 10000:.3f}")
PY
)
    echo "10k-half: $half reports/s per connection"
fi
for r in $(seq 1 "$rounds"); do
    for shape in moderate 10k-half idle; do
        wanted "$shape" || continue
        for c in uring epoll raw; do
            [ "$c" = raw ] && [ "$shape" = idle ] && continue
            echo "round $r: $c $shape"
            run "$c" "$shape" "$r" "$half"
        done
    done
    for shape in closed-100 closed-1000 open-20k; do
        wanted "$shape" || continue
        for c in uring epoll conv raw; do
            echo "round $r: $c $shape"
            run "$c" "$shape" "$r" 0
        done
    done
done

python3 benches/compare_table.py "$out" "$rounds"
