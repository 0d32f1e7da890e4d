#!/usr/bin/env python3
"""What one shard spends on a connection: its thread's CPU time (utime + stime) from before the
first connect until N devices are online, divided by N. The client shares the machine (in
benches/compare.sh it has the other core), so the connects per second it reaches measure the
client as much as the server; the shard's CPU per upgrade + online does not, and its inverse is
what one shard can take per second of its core.

    python3 benches/connect_cost.py SERVER_PID API_ADDR N [OUT.json]

Started before the client connects; polls the server's /metrics (served by the API thread, not
the shard) every 5 ms until the online records reach N (60 s at most), then prints one line and
writes {"onlines", "shard_cpu_s", "us_per_connect", "per_shard_core_s", "wall_s"} to OUT.
"""
import json
import os
import re
import sys
import time
import urllib.request

pid, api, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = sys.argv[4] if len(sys.argv) > 4 else None
hz = os.sysconf("SC_CLK_TCK")


def shard_threads():
    return [t for t in os.listdir(f"/proc/{pid}/task")
            if "shard" in open(f"/proc/{pid}/task/{t}/comm").read()]


def ticks(tids):
    total = 0
    for t in tids:
        # Fields after the command name: utime and stime are the 12th and 13th.
        f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
    return total


def onlines():
    body = urllib.request.urlopen(f"http://{api}/metrics", timeout=5).read().decode()
    m = re.search(r'ringlink_uplinks_total\{kind="online"\} (\d+)', body)
    return int(m.group(1)) if m else 0


tids = shard_threads()
if not tids:
    sys.exit(f"connect_cost: no shard thread in process {pid}")
start, t0 = ticks(tids), time.monotonic()
seen = onlines()
deadline = t0 + 60
while seen < n:
    if time.monotonic() > deadline:
        sys.exit(f"connect_cost: {seen} of {n} devices online after 60 s")
    time.sleep(0.005)
    seen = onlines()
cpu = (ticks(tids) - start) / hz
result = {"onlines": seen, "shard_threads": len(tids), "shard_cpu_s": cpu,
          "us_per_connect": cpu / seen * 1e6, "per_shard_core_s": seen / cpu if cpu else None,
          "wall_s": time.monotonic() - t0}
print(f"connect cost: {seen} upgrades + onlines, shard CPU {cpu:.2f} s: "
      f"{result['us_per_connect']:.1f} us each, {result['per_shard_core_s']:,.0f} per "
      f"shard-core-second")
if out:
    json.dump(result, open(out, "w"))
