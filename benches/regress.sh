#!/usr/bin/env bash
# CI's regression check: ringlink measured against a reference that does not change with
# ringlink's code, in the same job, so that only ratios are compared and the machine's speed
# cancels out.
#
#   ringlink   ringlink serve --io uring --threads 1, pinned to core 0
#   reference  examples/conventional.rs (tokio + tokio-tungstenite + serde_json, the same
#              protocol the usual way), pinned to core 0
#   client     loadgen profiles/regress.toml (closed loop over 100 connections, 6 s), pinned
#              to core 1, with --server-pid for the server's CPU
#
# Rounds alternate ringlink and the reference (A B A B ...); per contender the median over the
# rounds of CPU per report and report p99 is taken, and the ratios ringlink / reference are
# compared with benches/regress-baseline.json. A ratio more than its tolerance above the
# baseline fails the check (exit 1). The tolerances there are about three times the spread of
# the ratios over repeated runs on the 2-core CI machine (written down in that file), while the
# absolute figures moved by 45% between the same runs. The table goes to stdout and target/regress/table.txt;
# every run's JSON and an HTML report of ringlink's last run stay under target/regress/.
#
#   benches/regress.sh              check (3 rounds)
#   benches/regress.sh --update     write the measured ratios as the new baseline
#   REGRESS_ROUNDS=N                rounds (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${REGRESS_ROUNDS:-3}
update=0
[ "${1:-}" = --update ] && update=1
out=target/regress
rm -rf "$out"; mkdir -p "$out"
# Bins and examples in one build: the same unified features as tests/run.sh's build, so in CI
# this is a no-op.
cargo build --release --workspace --bins --examples

start() { # $1 = ringlink|reference, $2 = log; sets pid, ws, api_args
    local line=""
    case "$1" in
        ringlink)
            rm -rf "$out/data"
            taskset -c 0 target/release/ringlink serve --io uring --threads 1 \
                --listen 127.0.0.1:0 --api 127.0.0.1:0 --data-dir "$out/data" >"$2" 2>&1 & ;;
        reference)
            taskset -c 0 target/release/examples/conventional 127.0.0.1:0 >"$2" 2>&1 & ;;
    esac
    pid=$!
    for _ in $(seq 1 100); do
        line="$(grep -m1 'listening on' "$2" || true)"; [ -n "$line" ] && break; sleep 0.1
    done
    [ -n "$line" ] || { echo "$1 did not start:" >&2; cat "$2" >&2; exit 1; }
    ws="$(echo "$line" | grep -oE '[0-9]+(\.[0-9]+){3}:[0-9]+' | head -n 1)"
    api_args=()
    if [ "$1" = ringlink ]; then
        api_args=(--api "$(echo "$line" | sed -n 's/.*api http:\/\/\([0-9.:]*\).*/\1/p')")
    fi
}

for r in $(seq 1 "$rounds"); do
    for c in ringlink reference; do
        base="$out/$c-$r"
        start "$c" "$base.server.log"
        report=()
        [ "$c" = ringlink ] && [ "$r" = "$rounds" ] && report=(--report "$out/ringlink.html")
        status=0
        taskset -c 1 target/release/loadgen profiles/regress.toml --target "ws://$ws" \
            "${api_args[@]}" --server-pid "$pid" --json "$base.json" "${report[@]}" \
            >"$base.log" 2>&1 || status=$?
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        if [ "$status" != 0 ]; then
            echo "loadgen against $c failed (exit $status):" >&2; tail -30 "$base.log" >&2; exit 1
        fi
    done
done

python3 - "$out" "$rounds" benches/regress-baseline.json "$update" <<'PY' | tee "$out/table.txt"
import json, statistics, sys
out, rounds, baseline_path, update = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"

def runs(c):
    return [json.load(open(f"{out}/{c}-{r}.json")) for r in range(1, rounds + 1)]

metrics = {
    "cpu_per_report": ("server CPU us/report", lambda j: j["server_cpu"]["per_report_us"]),
    "p99": ("report p99 ms", lambda j: j["latency_ms"]["report"]["p99"]),
}
measured = {}
print(f"regression check: median of {rounds} rounds, ringlink / reference (conventional server)")
print(f"{'metric':<22}{'ringlink':>12}{'reference':>12}{'ratio':>9}{'baseline':>10}{'change':>9}{'limit':>8}  verdict")
try:
    baseline = json.load(open(baseline_path))
except FileNotFoundError:
    baseline = {}
failed = False
for key, (label, get) in metrics.items():
    a = statistics.median(get(j) for j in runs("ringlink"))
    b = statistics.median(get(j) for j in runs("reference"))
    ratio = a / b
    measured[key] = round(ratio, 4)
    base = baseline.get("ratios", {}).get(key)
    tol = baseline.get("tolerance_pct", {}).get(key)
    if base is None or tol is None or update:
        print(f"{label:<22}{a:>12.3f}{b:>12.3f}{ratio:>9.3f}{'-':>10}{'-':>9}{'-':>8}  (no baseline)")
        continue
    change = (ratio / base - 1) * 100
    bad = change > tol
    failed |= bad
    print(f"{label:<22}{a:>12.3f}{b:>12.3f}{ratio:>9.3f}{base:>10.3f}{change:>+8.1f}%{tol:>7.0f}%  {'REGRESSION' if bad else 'ok'}")
if update:
    baseline["ratios"] = measured
    json.dump(baseline, open(baseline_path, "w"), indent=2)
    open(baseline_path, "a").write("\n")
    print(f"wrote {baseline_path}")
sys.exit(1 if failed else 0)
PY
