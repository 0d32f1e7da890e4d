"""The table of benches/compare.sh: medians over rounds of every contender and shape.

python3 benches/compare_table.py OUT_DIR ROUNDS
"""
import json
import statistics
import sys

out, rounds = sys.argv[1], int(sys.argv[2])
CONTENDERS = {"uring": "ringlink --io uring", "epoll": "ringlink --io epoll",
              "raw": "raw io_uring echo (ceiling)"}


def run(c, shape, r):
    """(answered/s, answered, p50 ms, p99 ms, errors, connect/s, KiB per conn, server cpu s,
    server busy fraction)"""
    base = f"{out}/{c}-{shape}-{r}"
    try:
        t0, t1, hz, w0, w1 = (float(x) for x in open(f"{base}.cpu").read().split())
        d = json.load(open(f"{base}.json"))
    except FileNotFoundError:
        return None  # not run (the raw echo has no idle shape)
    cpu = (t1 - t0) / hz
    busy = cpu / (w1 - w0)
    if c == "raw":
        return (d["msgs_per_s"], d["done"], d["p50_ms"], d["p99_ms"], 0, None, None, cpu, busy)
    lat = d["latency_ms"]["report"]
    rss = d.get("server_rss") or {}
    return (d["throughput_msgs_per_s"], d["reports_ok"], lat["p50"], lat["p99"],
            d["error_total"], d["connect_rate_per_s"], rss.get("per_connection_kib"), cpu, busy)


def med(c, shape, i):
    vals = [v[i] for r in range(1, rounds + 1) if (v := run(c, shape, r)) and v[i] is not None]
    return statistics.median(vals) if vals else None


def per_core(c, shape):
    """Reports answered per second of server CPU (median over rounds)."""
    vals = []
    for r in range(1, rounds + 1):
        v = run(c, shape, r)
        if v and v[7] > 0:
            vals.append(v[1] / v[7])
    return statistics.median(vals) if vals else None


def errors(c):
    return sum(v[4] for s in ("saturate", "10k-sat", "moderate", "10k-half", "idle")
               for r in range(1, rounds + 1) if (v := run(c, s, r)))


def fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


rows = {c: {
    "sat": med(c, "saturate", 0), "sat_core": per_core(c, "saturate"),
    "sat_busy": med(c, "saturate", 8), "k_busy": med(c, "10k-sat", 8),
    "k_sat": med(c, "10k-sat", 0), "k_core": per_core(c, "10k-sat"),
    "mod": (med(c, "moderate", 2), med(c, "moderate", 3)),
    "half": (med(c, "10k-half", 2), med(c, "10k-half", 3), med(c, "10k-half", 0)),
    "connect": med(c, "10k-sat", 5), "mem": med(c, "idle", 6), "errors": errors(c),
} for c in CONTENDERS}

print("\nThroughput (reports answered per second; per server core = per second of server CPU):\n")
print("| contender | 64 conns: answered/s | server busy | per server core | vs epoll | vs raw echo "
      "| 10,000 conns: answered/s | server busy | per server core | vs epoll | vs raw echo |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for c, name in CONTENDERS.items():
    x, e, w = rows[c], rows["epoll"], rows["raw"]
    ratio = lambda a, b: "-" if a is None or b is None else f"{a / b:.2f}x"
    print(f"| {name} | {fmt(x['sat'])} | {fmt(x['sat_busy'], '.0%')} | {fmt(x['sat_core'])} "
          f"| {ratio(x['sat_core'], e['sat_core'])} | {ratio(x['sat_core'], w['sat_core'])} "
          f"| {fmt(x['k_sat'])} | {fmt(x['k_busy'], '.0%')} | {fmt(x['k_core'])} "
          f"| {ratio(x['k_core'], e['k_core'])} | {ratio(x['k_core'], w['k_core'])} |")

print("\nLatency (CO-corrected, ms), connect rate, memory:\n")
print("| contender | p50 / p99 at 10,000/s, 100 conns | p50 / p99 at half saturation, "
      "10,000 conns (rate) | connects/s, 10,000 at once | KiB per idle conn | errors |")
print("| --- | --- | --- | --- | --- | --- |")
for c, name in CONTENDERS.items():
    x = rows[c]
    m50, m99 = x["mod"]
    h50, h99, hr = x["half"]
    print(f"| {name} | {fmt(m50, '.2f')} / {fmt(m99, '.2f')} | {fmt(h50, '.2f')} / {fmt(h99, '.2f')} "
          f"({fmt(hr)}/s) | {fmt(x['connect'])} | {fmt(x['mem'], '.2f')} | {x['errors']} |")
