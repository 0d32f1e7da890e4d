"""The tables of benches/compare.sh: medians over rounds of every contender and shape. A shape
that was not run (COMPARE_SHAPES) shows "-".

python3 benches/compare_table.py OUT_DIR ROUNDS
"""
import json
import statistics
import sys

out, rounds = sys.argv[1], int(sys.argv[2])
CONTENDERS = {"uring": "ringlink --io uring", "epoll": "ringlink --io epoll",
              "raw": "raw io_uring echo (ceiling)"}


def read_ctx(path):
    """{tid: (thread name, context switches, CPU ticks)} of a .ctx file."""
    d = {}
    for line in open(path):  # TID SWITCHES TICKS NAME; the last line is "process SWITCHES - -"
        f = line.split(maxsplit=3)
        if f[0] != "process":
            d[f[0]] = (f[3].strip(), int(f[1]), int(f[2]))
    return d


def ctx_switches(base):
    """(context switches of the server's threads during the run, threads that exited during
    it, {thread name: (switches, CPU ticks)}): per thread id after - before, a thread born
    during the run counted whole."""
    try:
        before, after = read_ctx(f"{base}.ctx0"), read_ctx(f"{base}.ctx1")
    except FileNotFoundError:
        return None, None, {}
    by_name = {}
    for t, (name, sw, ticks) in after.items():
        _, sw0, ticks0 = before.get(t, (name, 0, 0))
        a, b = by_name.get(name, (0, 0))
        by_name[name] = (a + sw - sw0, b + ticks - ticks0)
    return (sum(v[0] for v in by_name.values()), sum(1 for t in before if t not in after),
            by_name)


def run(c, shape, r):
    """(answered/s, answered, p50 ms, p99 ms, errors, connect/s, KiB per conn, server cpu s,
    server busy fraction)"""
    base = f"{out}/{c}-{shape}-{r}"
    try:
        t0, t1, hz, w0, w1 = (float(x) for x in open(f"{base}.cpu").read().split())
        d = json.load(open(f"{base}.json"))
    except (FileNotFoundError, ValueError):
        return None  # not run (the raw echo has no idle shape), or its client failed
    cpu = (t1 - t0) / hz
    busy = cpu / (w1 - w0)
    if c == "raw":
        return (d["msgs_per_s"], d["done"], d["p50_ms"], d["p99_ms"], 0, None, None, cpu, busy)
    lat = d["latency_ms"]["report"]
    rss = d.get("server_rss") or {}
    return (d["throughput_msgs_per_s"], d["reports_ok"], lat["p50"], lat["p99"],
            d["error_total"], d["connect_rate_per_s"], rss.get("per_connection_kib"), cpu, busy)


def connect_cost(c, r):
    """Shard CPU microseconds per upgrade + online in the idle shape (benches/connect_cost.py)."""
    try:
        return json.load(open(f"{out}/{c}-idle-{r}.connect"))["us_per_connect"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


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
    return sum(v[4] for s in OLD_SHAPES
               for r in range(1, rounds + 1) if (v := run(c, s, r)))


def fmt(x, spec=",.0f"):
    return "-" if x is None else format(x, spec)


OLD_SHAPES = ("saturate", "10k-sat", "moderate", "10k-half", "idle")
ran_old = any(run(c, s, r) for c in CONTENDERS for s in OLD_SHAPES for r in range(1, rounds + 1))

rows = {c: {
    "sat": med(c, "saturate", 0), "sat_core": per_core(c, "saturate"),
    "sat_busy": med(c, "saturate", 8), "k_busy": med(c, "10k-sat", 8),
    "k_sat": med(c, "10k-sat", 0), "k_core": per_core(c, "10k-sat"),
    "mod": (med(c, "moderate", 2), med(c, "moderate", 3)),
    "half": (med(c, "10k-half", 2), med(c, "10k-half", 3), med(c, "10k-half", 0)),
    "connect": med(c, "10k-sat", 5), "mem": med(c, "idle", 6), "errors": errors(c),
    "connect_us": statistics.median(v) if (v := [x for r in range(1, rounds + 1)
                                                 if (x := connect_cost(c, r)) is not None]) else None,
} for c in CONTENDERS}

if ran_old:
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
          "10,000 conns (rate) | connects/s, 10,000 at once | shard CPU per upgrade + online "
          "(per shard-core-second) | KiB per idle conn | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c, name in CONTENDERS.items():
        x = rows[c]
        m50, m99 = x["mod"]
        h50, h99, hr = x["half"]
        us = x["connect_us"]
        cost = "-" if us is None else f"{us:.0f} us ({1e6 / us:,.0f}/s)"
        print(f"| {name} | {fmt(m50, '.2f')} / {fmt(m99, '.2f')} | {fmt(h50, '.2f')} / {fmt(h99, '.2f')} "
              f"({fmt(hr)}/s) | {fmt(x['connect'])} | {cost} | {fmt(x['mem'], '.2f')} "
              f"| {x['errors']} |")


# Second table: closed and open loop, per report.
SHAPES2 = {"closed-100": "closed loop, 100 conns", "closed-1000": "closed loop, 1,000 conns",
           "open-20k": "open loop, 5,000 conns x 4/s"}
CONTENDERS2 = {"uring": "ringlink --io uring", "epoll": "ringlink --io epoll",
               "conv": "conventional (tokio + tungstenite + serde_json)",
               "raw": "raw io_uring echo (ceiling)"}


def run2(c, shape, r):
    """dict of one run of the second table, None when it was not run."""
    base = f"{out}/{c}-{shape}-{r}"
    try:
        t0, t1, hz, w0, w1 = (float(x) for x in open(f"{base}.cpu").read().split())
        d = json.load(open(f"{base}.json"))
    except (FileNotFoundError, ValueError):
        return None  # not run, or its client failed
    cpu = (t1 - t0) / hz
    ctx, lost, by_name = ctx_switches(base)
    if c == "raw":
        v = {"rate": d["msgs_per_s"], "answered": d["done"], "p50": d["p50_ms"],
             "p99": d["p99_ms"], "errors": None}
    else:
        lat = d["latency_ms"]["report"]
        v = {"rate": d["throughput_msgs_per_s"], "answered": d["reports_ok"], "p50": lat["p50"],
             "p99": lat["p99"], "errors": d["error_total"]}
    n = v["answered"]
    v.update(busy=cpu / (w1 - w0), lost=lost,
             # per thread name: (switches per report, CPU us per report)
             threads={k: (a / n, b / hz * 1e6 / n) for k, (a, b) in by_name.items()} if n else {},
             cpu_us=cpu * 1e6 / n if n else None,
             ctx=ctx / n if n and ctx is not None else None,
             core=n / cpu if cpu > 0 else None)
    return v


def med2(c, shape, key):
    vals = [v[key] for r in range(1, rounds + 1)
            if (v := run2(c, shape, r)) and v[key] is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.2f}x"


if any(run2(c, s, r) for c in CONTENDERS2 for s in SHAPES2 for r in range(1, rounds + 1)):
    print("\nClosed and open loop (per report = per report answered; server CPU and context "
          "switches over the whole client run; per server core = reports per second of server "
          "CPU):\n")
    print("| shape | contender | answered/s | server busy | server CPU us per report | vs conv "
          "| context switches per report | p50 / p99 ms | per server core | vs epoll | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    notes = []
    for shape, sname in SHAPES2.items():
        m = {c: {k: med2(c, shape, k) for k in
                 ("rate", "busy", "cpu_us", "ctx", "p50", "p99", "core", "errors", "lost")}
             for c in CONTENDERS2}
        for c, name in CONTENDERS2.items():
            x = m[c]
            if x["rate"] is None:
                continue
            lost = f" ({x['lost']:.0f} threads exited)" if x["lost"] else ""
            err = "-" if x["errors"] is None else f"{x['errors']:.0f}"
            print(f"| {sname} | {name} | {fmt(x['rate'])} | {fmt(x['busy'], '.0%')} "
                  f"| {fmt(x['cpu_us'], '.2f')} | {ratio(x['cpu_us'], m['conv']['cpu_us'])} "
                  f"| {fmt(x['ctx'], '.3f')}{lost} | {fmt(x['p50'], '.2f')} / {fmt(x['p99'], '.2f')} "
                  f"| {fmt(x['core'])} | {ratio(x['core'], m['epoll']['core'])} | {err} |")
        if m["conv"]["cpu_us"] is not None or m["epoll"]["core"] is not None:
            notes.append(
                f"- {sname}: server CPU per report uring / conv = "
                f"{ratio(m['uring']['cpu_us'], m['conv']['cpu_us'])}, epoll / conv = "
                f"{ratio(m['epoll']['cpu_us'], m['conv']['cpu_us'])}; reports per server-core-second "
                f"uring / epoll = {ratio(m['uring']['core'], m['epoll']['core'])}")
    print()
    print("\n".join(notes))
    print("\nBy server thread, first round (context switches / CPU us, per report; threads "
          "with neither left out):\n")
    for shape, sname in SHAPES2.items():
        parts = []
        for c in CONTENDERS2:
            v = run2(c, shape, 1)
            if v and v["threads"]:
                parts.append(f"{c}: " + ", ".join(
                    f"{k} {sw:.3f} / {us:.2f}" for k, (sw, us) in sorted(v["threads"].items())
                    if sw >= 0.0005 or us >= 0.005))
        if parts:
            print(f"- {sname}: " + "; ".join(parts))
