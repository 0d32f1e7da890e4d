#!/usr/bin/env bash
# Reload under load (issue 11, must-show): with loadgen holding 10,000 devices and reporting, a
# registry reload that adds 1,000 devices, removes 10 and changes a thing model
#   - drops no other connection      (the main loadgen: no reconnect, no error but the removed
#                                     devices' 109000)
#   - lets the added devices online at once (a loadgen run onlining all 1,000 right after)
#   - takes the removed ones offline (none of them in /v1/devices?online=true)
#   - keeps report p99 during the reload under twice its value before
#   - pauses no shard's loop for 10 ms or more (ringlink_registry_swap_max_seconds).
#
# p99 is measured by a probe: a second, small loadgen (100 devices, 10 reports/s each) run twice
# for PROBE_S seconds, once before the reload and once around it (the reload fires RELOAD_AT_S
# into the second run); each run writes its own JSON. The main load's own p99 covers the whole
# run (its histogram is not windowed), so it is printed but not compared.
#
# Release build, 127.0.0.1 only, about 35 s of run time; stops everything it started; exit 0 =
# every check passed, 1 = a check failed, 2 = setup failed.
#   benches/reload.sh                 # results under target/reload-bench/
#   IO=epoll benches/reload.sh        # the epoll driver (default: auto)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/target/reload-bench}
MAIN_DEVICES=${MAIN_DEVICES:-10000}
ADDED=${ADDED:-1000}
REMOVED=${REMOVED:-10}
PROBE_DEVICES=100
PROBE_S=${PROBE_S:-4}
RELOAD_AT_S=${RELOAD_AT_S:-1.5}
MAIN_S=${MAIN_S:-32}
IO=${IO:-auto}

rm -rf "$OUT"
mkdir -p "$OUT/data"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

echo "== load before: $(uptime)"
(cd "$ROOT" && cargo build --release -q -p ringlink -p loadgen) || exit 2
RINGLINK=$ROOT/target/release/ringlink
LOADGEN=$ROOT/target/release/loadgen

# Sources: the demo thermostat model, main + probe devices, and the 10 to remove.
cp "$ROOT/src/registry/demo/thermostat.json" "$OUT/thermostat.json"
cat > "$OUT/ringlink.toml" <<TOML
[registry]
products = ["thermostat.json"]
devices = "devices.csv"
TOML
devices() { # $1 = first main device kept, $2 = added count
    echo "productKey,deviceName"
    seq -f "a1ThermoPK0,thermo-%05g" "$1" $((MAIN_DEVICES - 1))
    seq -f "a1ThermoPK0,probe-%03g" 0 $((PROBE_DEVICES - 1))
    if [ "$2" -gt 0 ]; then seq -f "a1ThermoPK0,added-%04g" 0 $(($2 - 1)); fi
}
devices 0 0 > "$OUT/devices.csv"

"$RINGLINK" serve --config "$OUT/ringlink.toml" --listen 127.0.0.1:0 --api 127.0.0.1:0 \
    --io "$IO" --data-dir "$OUT/data" > "$OUT/ringlink.out" 2> "$OUT/ringlink.err" &
PIDS+=($!)
SERVER=$!
for _ in $(seq 100); do
    grep -q "listening on" "$OUT/ringlink.out" 2>/dev/null && break
    sleep 0.1
done
LINE=$(grep "listening on" "$OUT/ringlink.out") || { echo "ringlink did not start"; exit 2; }
WS=$(sed -E 's|.*ws://([0-9.:]+).*|\1|' <<<"$LINE")
API=$(sed -E 's|.*api http://([0-9.:]+).*|\1|' <<<"$LINE")
echo "== $LINE"
metric() { curl -s "http://$API/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

profile() { # name connections devices_per_conn prefix width count rate
    cat > "$OUT/$1.toml" <<TOML
connections = $2
devices_per_connection = $3
source_addrs = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
ramp_per_second = 2500
report_rate_per_device = $7
event_ratio = 0
warmup_s = 0.5
duration_s = 10
[devices]
prefix = "$4"
width = $5
count = $6
TOML
}
profile main "$MAIN_DEVICES" 1 thermo- 5 "$MAIN_DEVICES" 0.2
profile probe "$PROBE_DEVICES" 1 probe- 3 "$PROBE_DEVICES" 10
profile added 100 $((ADDED / 100)) added- 4 "$ADDED" 1

"$LOADGEN" "$OUT/main.toml" --target "ws://$WS" --duration "$MAIN_S" --json "$OUT/main.json" \
    > "$OUT/main.out" 2>&1 &
PIDS+=($!)
MAIN=$!
for _ in $(seq 200); do
    [ "$(metric ringlink_devices_online)" = "$MAIN_DEVICES" ] && break
    sleep 0.1
done
echo "== main load: $(metric ringlink_devices_online) devices online, $(metric ringlink_connections_open) connections"

"$LOADGEN" "$OUT/probe.toml" --target "ws://$WS" --duration "$PROBE_S" --json "$OUT/before.json" \
    > "$OUT/before.out" 2>&1 || true

# The new sources: the first $REMOVED main devices gone, $ADDED added, roomTemp max 125 -> 150
# (a changed thing model that the load's values still fit).
devices "$REMOVED" "$ADDED" > "$OUT/devices.csv"
python3 - "$OUT/thermostat.json" <<'PY'
import json, sys
p = sys.argv[1]
tsl = json.load(open(p))
for prop in tsl["properties"]:
    if prop["identifier"] == "roomTemp":
        prop["dataType"]["specs"]["max"] = "150"
json.dump(tsl, open(p, "w"), indent=2)
PY

"$LOADGEN" "$OUT/probe.toml" --target "ws://$WS" --duration "$PROBE_S" --json "$OUT/during.json" \
    > "$OUT/during.out" 2>&1 &
PIDS+=($!)
PROBE=$!
sleep "$RELOAD_AT_S"
T0=$(date +%s%N)
curl -s -X POST "http://$API/v1/registry/reload" > "$OUT/reload.json"
T1=$(date +%s%N)
echo "== reload answered in $(( (T1 - T0) / 1000000 )) ms: $(cat "$OUT/reload.json")"
metric ringlink_registry_swap_max_seconds > "$OUT/swap_max_seconds"
wait "$PROBE" || true

# The added devices online at once: 100 sub-gateways onlining all of them, then reporting;
# who is online is read while they are (loadgen offlines its devices when it ends).
"$LOADGEN" "$OUT/added.toml" --target "ws://$WS" --duration 4 --json "$OUT/added.json" \
    > "$OUT/added.out" 2>&1 &
PIDS+=($!)
ADDING=$!
sleep 2.5
curl -s "http://$API/v1/devices?online=true" > "$OUT/online.json"
wait "$ADDING" || true
wait "$MAIN" || true
echo "== load after: $(uptime)"
kill -TERM "$SERVER" 2>/dev/null || true
wait "$SERVER" 2>/dev/null || true

python3 - "$OUT" "$MAIN_DEVICES" "$ADDED" "$REMOVED" <<'PY'
import json, sys
out, main_n, added_n, removed_n = sys.argv[1], *map(int, sys.argv[2:])
swap_ms = float(open(f"{out}/swap_max_seconds").read() or "nan") * 1000
load = lambda n: json.load(open(f"{out}/{n}.json"))
main, before, during, added = load("main"), load("before"), load("during"), load("added")
reload = load("reload")
online = {d["deviceName"] for d in load("online")}
removed = {f"thermo-{i:05d}" for i in range(removed_n)}
p99 = lambda s: s["latency_ms"]["report"]["p99"]
checks = []
def check(name, ok, detail):
    checks.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
check("reload answer", reload.get("added") == added_n and reload.get("removed") == removed_n
      and reload.get("changed") == main_n - removed_n + 100, json.dumps(reload))
# The removed devices' reports and final offline get 109000; anything else is a failure.
expected = ("report_code_109000", "offline_code_109000")
other = {k: v for k, v in main["errors"].items() if k not in expected}
check("no other connection dropped", main["reconnects"] == 0 and not other
      and main["errors"].get("offline_code_109000", 0) <= removed_n,
      f"main load: {main['connects']} connects, {main['reconnects']} reconnects, errors {main['errors']}")
added_online = sum(d.startswith("added-") for d in online)
check("added devices online at once", added["error_total"] == 0 and added["reports_ok"] > 0
      and added_online == added_n,
      f"{added_online} of {added_n} online, {added['reports_ok']} reports ok, errors {added['errors']}")
check("removed devices offline", not (online & removed), f"{len(online & removed)} of {removed_n} still online")
for name, s in (("before", before), ("during", during)):
    r = s["latency_ms"]["report"]
    print(f"      probe {name}: {s['reports_ok']} reports, errors {s['error_total']}, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, p99.9 {r['p999']:.2f} ms, max {r['max']:.2f} ms")
check("no shard paused 10 ms or more", swap_ms < 10, f"longest swap {swap_ms:.2f} ms")
check("probe clean", before["error_total"] == 0 and during["error_total"] == 0, "no probe errors")
check("p99 during < 2x before", p99(during) < 2 * p99(before),
      f"{p99(during):.2f} ms vs {p99(before):.2f} ms (ratio {p99(during) / p99(before):.2f})")
print(f"      main load over the whole run: {main['reports_ok']} reports, p99 {p99(main):.2f} ms")
sys.exit(0 if all(checks) else 1)
PY
