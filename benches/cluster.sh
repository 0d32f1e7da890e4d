#!/usr/bin/env bash
# One clustered gateway on this machine, loaded and measured: a 3-server NATS JetStream cluster
# and N ringlink nodes with the nats sink (replicas 3, nodes n1..nN), then loadgen with one
# --target and one --api per node, and each node's memory while the load holds its connections.
#
#   benches/cluster.sh PROFILE.toml [-- LOADGEN_ARGS...]
#   e.g. benches/cluster.sh profiles/cluster-100k.toml
#
# Environment:
#   CLUSTER_NODES=N     ringlink nodes (default 6)
#   CLUSTER_THREADS=N   shard threads per node (default: ringlink's, one per core)
#   CLUSTER_OUT=DIR     where logs, data dirs and NATS stores go (default target/cluster)
#   CLUSTER_NOBUILD=1   skip `cargo build --release --workspace --bins`
#   CLUSTER_DRAIN_S=S   after the load, wait at most this long for every node to have forwarded
#                       its log to NATS before stopping them (default 180)
#
# The nodes serve a registry written here: every device of the profile's [devices] range
# (productKey, prefix, width, first, count as loadgen reads them) with the three demo thing
# models, so a profile may name more devices than the built-in demo registry has.
#
# Output: loadgen's table (and its --json when given after --), then per node: pid, idle RSS
# (after start, before the load), RSS held (sampled each second; the last sample at the most
# connections the node had open), peak RSS, connections held and (held - idle) / connections.
# Exits with loadgen's status; everything started here is stopped (SIGTERM, then wait) on any
# exit, also when loadgen or a start fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ $# -ge 1 ] || { echo "usage: $0 PROFILE.toml [-- LOADGEN_ARGS...]" >&2; exit 2; }
profile=$1; shift
[ "${1:-}" = "--" ] && shift
extra=("$@")
nodes=${CLUSTER_NODES:-6}
out=${CLUSTER_OUT:-$root/target/cluster}
[ -f "$profile" ] || { echo "no profile $profile" >&2; exit 2; }

if [ "${CLUSTER_NOBUILD:-0}" != 1 ]; then
    cargo build --release --workspace --bins
fi
nats_bin="$(command -v nats-server || true)"
[ -n "$nats_bin" ] || for b in /usr/sbin/nats-server /usr/bin/nats-server; do
    [ -x "$b" ] && nats_bin=$b
done
[ -n "$nats_bin" ] || { echo "nats-server not found (tests/run.sh installs it)" >&2; exit 2; }

rm -rf "$out"
mkdir -p "$out"

pids=()      # everything started here, in start order
node_pids=()
nats_pids=()
cleanup() {
    local status=$? p
    trap - EXIT INT TERM
    # Nodes first (they flush to NATS on the way out), then the NATS servers.
    for p in "${node_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${node_pids[@]}"; do
        wait "$p" 2>/dev/null || echo "node pid $p exited with status $?" >&2
    done
    for p in "${nats_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${nats_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    [ -n "${sampler:-}" ] && { kill -TERM "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; }
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free loopback ports: bound and released together, so they are distinct.
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()' "$1"
}

# --- NATS: 3 servers, JetStream, routes to each other --------------------------------------
read -r -a ports <<<"$(free_ports 9)"
routes=""
for i in 0 1 2; do routes+="    \"nats-route://127.0.0.1:${ports[3 * i + 1]}\""$'\n'; done
urls=""
for i in 0 1 2; do
    name="s$((i + 1))"
    dir="$out/nats-$name"
    mkdir -p "$dir/jetstream"
    cat >"$dir/nats.conf" <<EOF
server_name: $name
listen: "127.0.0.1:${ports[3 * i]}"
http: "127.0.0.1:${ports[3 * i + 2]}"
log_file: "$dir/nats.log"
max_payload: 1MB
jetstream {
  store_dir: "$dir/jetstream"
  max_memory_store: 256MB
  max_file_store: 8GB
}
cluster {
  name: ringlink_bench
  listen: "127.0.0.1:${ports[3 * i + 1]}"
  routes: [
$routes  ]
}
EOF
    "$nats_bin" -c "$dir/nats.conf" >"$dir/stdout.log" 2>&1 &
    nats_pids+=("$!"); pids+=("$!")
    urls+="${urls:+,}nats://127.0.0.1:${ports[3 * i]}"
done
# Ready: every server has a JetStream meta leader.
for i in 0 1 2; do
    ok=""
    for _ in $(seq 1 300); do
        if curl -sf "http://127.0.0.1:${ports[3 * i + 2]}/jsz" 2>/dev/null |
            python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("meta_cluster",{}).get("leader") else 1)' 2>/dev/null; then
            ok=1; break
        fi
        sleep 0.1
    done
    [ -n "$ok" ] || { echo "NATS server s$((i + 1)) has no JetStream meta leader:" >&2; tail -20 "$out/nats-s$((i + 1))/nats.log" >&2; exit 2; }
done
echo "nats: $urls"

# --- the registry: every device of the profile's range ------------------------------------
python3 - "$profile" "$out/devices.csv" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    p = tomllib.load(f)
d = p.get("devices", {})
pk = d.get("product_key", "a1ThermoPK0")
prefix = d.get("prefix", "thermo-")
width = d.get("width", 5)
first = d.get("first", 0)
count = d.get("count", 20000)
with open(sys.argv[2], "w") as out:
    for i in range(first, first + count):
        out.write(f"{pk},{prefix}{i:0{width}d}\n")
print(f"registry: {count} devices {pk} {prefix}{first:0{width}d}..", file=sys.stderr)
EOF
cat >"$out/ringlink.toml" <<EOF
[registry]
products = ["$root/src/registry/demo/thermostat.json", "$root/src/registry/demo/light.json", "$root/src/registry/demo/export_builtins.json"]
devices = "$out/devices.csv"
EOF

# --- ringlink nodes -------------------------------------------------------------------------
threads=()
[ -n "${CLUSTER_THREADS:-}" ] && threads=(--threads "$CLUSTER_THREADS")
targets=(); apis=(); api_addrs=()
for n in $(seq 1 "$nodes"); do
    log="$out/n$n.log"
    RINGLINK_UPLINK_SINK=nats RINGLINK_UPLINK_NATS_URLS="$urls" RINGLINK_UPLINK_NATS_NODE="n$n" \
        RINGLINK_UPLINK_NATS_REPLICAS=3 \
        target/release/ringlink serve --config "$out/ringlink.toml" --listen 127.0.0.1:0 \
        --api 127.0.0.1:0 --data-dir "$out/data-n$n" "${threads[@]}" >"$log" 2>&1 &
    node_pids+=("$!"); pids+=("$!")
    line=""
    for _ in $(seq 1 300); do
        line="$(grep -m1 'listening on' "$log" || true)"
        [ -n "$line" ] && break
        kill -0 "${node_pids[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$line" ] || { echo "node n$n did not start:" >&2; cat "$log" >&2; exit 2; }
    ws="$(echo "$line" | sed -n 's/.*listening on \(ws:\/\/[0-9.:]*\).*/\1/p')"
    api="$(echo "$line" | sed -n 's/.*api http:\/\/\([0-9.:]*\).*/\1/p')"
    targets+=(--target "$ws"); apis+=(--api "$api"); api_addrs+=("$api")
    echo "node n$n: pid ${node_pids[-1]} $ws api $api"
done

metric() { # $1 = api, $2 = metric name (no labels): its value, or empty (never fails)
    { curl -sf --max-time 5 "http://$1/metrics" 2>/dev/null || true; } |
        awk -v m="$2" '$1 == m {print $2; exit}'
}
# Ready: every node sees every node alive.
for i in "${!api_addrs[@]}"; do
    ok=""
    for _ in $(seq 1 300); do
        alive="$(metric "${api_addrs[$i]}" ringlink_nats_nodes_alive)"
        [ -n "$alive" ] && awk -v a="$alive" -v n="$nodes" 'BEGIN { exit !(a + 0 == n) }' &&
            { ok=1; break; }
        sleep 0.1
    done
    [ -n "$ok" ] || { echo "node n$((i + 1)) does not see $nodes nodes alive" >&2; exit 2; }
done

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
idle=()
for p in "${node_pids[@]}"; do idle+=("$(rss_kib "$p")"); done

# --- the load, and each node's RSS each second while it runs --------------------------------
# One line per node per second: "n PID RSS_KIB CONNECTIONS_OPEN BACKLOG_RECORDS OLDEST_S"
# (records of the node's log not yet acknowledged by JetStream, and the age of the oldest: does
# NATS keep up). No errexit here: a slow /metrics under load must not end the sampling.
(
    set +e +o pipefail
    while true; do
        for i in "${!node_pids[@]}"; do
            curl -sf --max-time 5 "http://${api_addrs[$i]}/metrics" 2>/dev/null | awk \
                -v n="$((i + 1))" -v p="${node_pids[$i]}" -v r="$(rss_kib "${node_pids[$i]}")" '
                $1 == "ringlink_connections_open" { c = $2 }
                $1 == "ringlink_sink_backlog_records" { b = $2 }
                $1 == "ringlink_sink_oldest_unforwarded_seconds" { o = $2 }
                END { print n, p, r, c + 0, b + 0, o + 0 }'
        done
        sleep 1
    done
) >"$out/rss.log" 2>/dev/null &
sampler=$!

t0=$(date +%s.%N)
status=0
target/release/loadgen "$profile" "${targets[@]}" "${apis[@]}" "${extra[@]}" || status=$?
t1=$(date +%s.%N)
kill -TERM "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
sampler=""

# Let every node's forwarder catch up with its log (the offline burst at the end of the load)
# before they are stopped, and time it: a stopping node would leave the rest for its next
# start.
drain_limit=${CLUSTER_DRAIN_S:-180}
drain_start=$SECONDS
while true; do
    left=0
    for a in "${api_addrs[@]}"; do
        b="$(metric "$a" ringlink_sink_backlog_records)"
        b="${b%.*}"
        left=$((left + ${b:-1})) # no answer: not known to be drained
    done
    [ "$left" = 0 ] && break
    if [ $((SECONDS - drain_start)) -ge "$drain_limit" ]; then
        echo "NATS backlog: $left records still not forwarded after ${drain_limit} s" >&2
        break
    fi
    sleep 0.5
done
drained_in=$((SECONDS - drain_start))

echo
calc() { awk "BEGIN { print $1 }"; }
printf 'loadgen exit %s, wall %.1f s (loadgen alone; nodes and NATS started before)\n' \
    "$status" "$(calc "$t1 - $t0")"
printf '%-5s %8s %10s %10s %10s %8s %10s %12s %10s\n' node pid idle_MiB held_MiB peak_MiB \
    conns KiB/conn max_backlog max_age_s
total_idle=0; total_held=0; total_conns=0
for i in "${!node_pids[@]}"; do
    n=$((i + 1))
    # Held: the last sample at the most connections; peak: the largest RSS.
    # Backlog: the most records not yet in JetStream, and the oldest one's age, while the load
    # ran (the offline burst at the end included).
    read -r held conns peak backlog age < <(awk -v n="$n" '$1 == n {
            if ($4 >= c) { c = $4; h = $3 }
            if ($3 > p) p = $3
            if ($5 > b) b = $5
            if ($6 > a) a = $6
        } END { print h + 0, c + 0, p + 0, b + 0, a + 0 }' "$out/rss.log")
    per="-"
    [ "$conns" -gt 0 ] && per=$(calc "sprintf(\"%.2f\", ($held - ${idle[$i]}) / $conns)")
    printf '%-5s %8s %10.1f %10.1f %10.1f %8s %10s %12s %10s\n' "n$n" "${node_pids[$i]}" \
        "$(calc "${idle[$i]} / 1024")" "$(calc "$held / 1024")" "$(calc "$peak / 1024")" \
        "$conns" "$per" "$backlog" "$age"
    total_idle=$((total_idle + idle[i])); total_held=$((total_held + held))
    total_conns=$((total_conns + conns))
done
per="-"
[ "$total_conns" -gt 0 ] &&
    per=$(calc "sprintf(\"%.2f\", ($total_held - $total_idle) / $total_conns)")
printf '%-5s %8s %10.1f %10.1f %10s %8s %10s\n' all - "$(calc "$total_idle / 1024")" \
    "$(calc "$total_held / 1024")" - "$total_conns" "$per"
for i in 0 1 2; do
    printf 'nats s%d: RSS %s MiB\n' "$((i + 1))" "$(( $(rss_kib "${nats_pids[$i]}") / 1024 ))"
done
# What each node forwarded to NATS, and what it still holds back (0 = it kept up).
for i in "${!api_addrs[@]}"; do
    m="$(curl -sf --max-time 5 "http://${api_addrs[$i]}/metrics" 2>/dev/null || true)"
    v() { echo "$m" | awk -v k="$1" '$1 == k {print $2; exit}'; }
    echo "n$((i + 1)): accepted $(v ringlink_connections_accepted_total)" \
        "nats_published $(v ringlink_nats_published_total)" \
        "backlog_records $(v ringlink_sink_backlog_records)" \
        "publish_errors $(v ringlink_nats_publish_errors_total)" \
        "kv_errors $(v ringlink_nats_kv_errors_total)" \
        "forwarded_downlinks $(v ringlink_nats_downlinks_forwarded_total)"
done
echo "NATS backlog after the load: $left records left, ${drained_in} s waiting for it"
echo "script wall ${SECONDS} s (build excluded when CLUSTER_NOBUILD=1)"
exit "$status"
