#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client against an echo endpoint built on ringlink's `ws`
# module and diffs the outcome against tests/autobahn/expected-results.json.
#
#   tests/autobahn/run.sh            quick gate against examples/ws_echo.rs (the ws module alone)
#   tests/autobahn/run.sh --io uring the same against `ringlink serve --echo` on a real driver
#   tests/autobahn/run.sh --io epoll (io_uring or epoll): one baseline for all three
#                                    (quick gate: every case except 9.*, 12.*, 13.*)
#   tests/autobahn/run.sh --full     also 9.* (slow: messages up to 16 MiB)
#   AUTOBAHN_CASES='["1.*","5.*"]' tests/autobahn/run.sh   a custom case list (no diff)
#   tests/autobahn/run.sh --update   rewrite expected-results.json from this run
#
# Needs Python 2.7 from pyenv (Autobahn|Testsuite runs on nothing newer); the virtualenv is
# created once under target/autobahn-venv. Exit status: 0 only if every behavior is acceptable
# and the summary matches the committed baseline.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/tests/autobahn"
work="$root/target/autobahn"
venv="$root/target/autobahn-venv"
full=0
update=0
io=""
while [ $# -gt 0 ]; do
    case "$1" in
        --full) full=1 ;;
        --update) update=1 ;;
        --io) io="$2"; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

if [ ! -x "$venv/bin/wstest" ]; then
    py27="$(pyenv root)/versions/2.7.18/bin/python"
    [ -x "$py27" ] || { echo "Python 2.7.18 not found at $py27" >&2; exit 1; }
    rm -rf "$root/target/autobahn-bootstrap" "$venv"
    python3 -m venv "$root/target/autobahn-bootstrap"
    "$root/target/autobahn-bootstrap/bin/pip" install -q 'virtualenv<20.22'
    "$root/target/autobahn-bootstrap/bin/virtualenv" -q -p "$py27" "$venv"
    "$venv/bin/pip" install -q autobahntestsuite==25.10.1
fi

mkdir -p "$work"
rm -rf "$work/reports"
log="$work/server.log"
if [ -z "$io" ]; then
    cargo build --release --workspace --bins --examples --manifest-path "$root/Cargo.toml"
    "$root/target/release/examples/ws_echo" 127.0.0.1:0 >"$log" 2>&1 &
    name="ws_echo"
else
    cargo build --release --workspace --bins --examples --manifest-path "$root/Cargo.toml"
    # Autobahn's messages reach 16 MiB (9.*), the most the config allows.
    RINGLINK_LIMITS_MAX_FRAME_BYTES=$((16 << 20)) "$root/target/release/ringlink" serve --echo \
        --io "$io" --listen 127.0.0.1:0 --api 127.0.0.1:0 --data-dir "$work/data" >"$log" 2>&1 &
    name="ringlink serve --echo --io $io"
fi
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
addr=""
for _ in $(seq 1 100); do
    addr="$(sed -n 's/^listening on \([0-9.:]*\).*/\1/p; s/.*listening on ws:\/\/\([0-9.:]*\).*/\1/p' "$log" | head -n 1)"
    [ -n "$addr" ] && break
    sleep 0.1
done
[ -n "$addr" ] || { echo "$name did not start:" >&2; cat "$log" >&2; exit 1; }
echo "$name listening on $addr"

custom="${AUTOBAHN_CASES:-}"
python3 - "$here/fuzzingclient.json" "$work/spec.json" "$addr" "$full" "$custom" <<'PY'
import json, sys
src, dst, addr, full, custom = sys.argv[1:]
spec = json.load(open(src))
spec["outdir"] = "./reports"
spec["servers"][0]["url"] = "ws://" + addr
if full == "1":
    spec["exclude-cases"] = [c for c in spec["exclude-cases"] if c != "9.*"]
if custom:
    spec["cases"] = json.loads(custom)
json.dump(spec, open(dst, "w"), indent=2)
PY

(cd "$work" && "$venv/bin/wstest" -m fuzzingclient -s spec.json >wstest.log 2>&1) || {
    echo "wstest failed:" >&2; tail -20 "$work/wstest.log" >&2; exit 1;
}

python3 - "$work/reports/index.json" "$work/summary.json" <<'PY'
import json, sys
index = json.load(open(sys.argv[1]))
ok = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
def key(case):
    return [int(p) for p in case.split(".")]
summary, bad, counts = {}, [], {}
for agent, cases in index.items():
    for case in sorted(cases, key=key):
        r = cases[case]
        summary[case] = {"behavior": r["behavior"], "behaviorClose": r["behaviorClose"]}
        for b in (r["behavior"], r["behaviorClose"]):
            counts[b] = counts.get(b, 0) + 1
        if r["behavior"] not in ok or r["behaviorClose"] not in ok:
            bad.append("%s: %s / %s" % (case, r["behavior"], r["behaviorClose"]))
json.dump(summary, open(sys.argv[2], "w"), indent=1, sort_keys=False)
open(sys.argv[2], "a").write("\n")
print("%d cases; behavior/behaviorClose counts: %s" % (len(summary), json.dumps(counts, sort_keys=True)))
for line in bad:
    print("FAILED " + line)
sys.exit(1 if bad else 0)
PY

expected="$here/expected-results.json"
if [ "$update" = 1 ]; then
    cp "$work/summary.json" "$expected"
    echo "updated $expected"
elif [ -n "$custom" ] || [ "$full" = 1 ]; then
    echo "custom or full run: not compared with $expected"
else
    diff -u "$expected" "$work/summary.json" || {
        echo "Autobahn results differ from $expected (rerun with --update if intended)" >&2
        exit 1
    }
    echo "Autobahn results match $expected"
fi
