#!/usr/bin/env python3
"""Memory per idle device connection: RSS growth of one ringlink process / connections.

    python3 benches/idle_memory.py --io uring --connections 19000
    python3 benches/idle_memory.py --io epoll --connections 19000

Starts the release binary (build it first: cargo build --release) with the demo registry on
a free port, opens N WebSocket connections from this process (one direct device each,
onlined with onlineDevice), waits until every one is answered, lets the server settle,
and reads VmRSS from /proc before and after. The connections then stay idle: no reports.
One process may hold at most ~19,900 sockets here (ulimit -n 20000), so N <= 19,000.
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

HANDSHAKE = (
    b"GET // HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: alibaba-iot-linkedge-protocol\r\n\r\n"
)


def frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


async def hold(host, port, index, ready, stop, opening):
    # At most `opening` connections between connect and their online reply: one Python thread
    # cannot serve 19,000 handshakes at once within the server's 5 s handshake timeout.
    async with opening:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(HANDSHAKE)
        await reader.readuntil(b"\r\n\r\n")
        msg = {"version": "1.0", "messageId": index + 1, "method": "onlineDevice",
               "payload": {"productKey": "a1ThermoPK0", "deviceName": f"thermo-{index:05d}"}}
        writer.write(frame(json.dumps(msg).encode() + b"\0"))
        head = await reader.readexactly(2)
        reply = json.loads(await reader.readexactly(head[1] & 0x7F))
        assert reply["code"] == 0, reply
        ready.append(index)
    # Idle: answer pings (none come within a default 30 s interval), hold until told to stop.
    await stop.wait()
    writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--io", default="uring", choices=["uring", "epoll"])
    ap.add_argument("--connections", type=int, default=19000)
    ap.add_argument("--binary", default="target/release/ringlink")
    ap.add_argument("--opening", type=int, default=1000,
                    help="connections between connect and online reply at once")
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="ringlink-idle-")
    # The device cap is what the open-files limit leaves after the API's connections: with
    # 20,000 files, 19,000 devices need the API's share lowered from its default 1024. Every
    # connection comes from 127.0.0.1 as fast as this client goes: the per-address cap (10,000)
    # and the accept pacing (5,000/s) are turned off, as for a gateway behind a trusted proxy.
    env = dict(os.environ, RINGLINK_API_MAX_CONNECTIONS="64",
               RINGLINK_LIMITS_MAX_CONNECTIONS_PER_IP="0",
               RINGLINK_LIMITS_MAX_NEW_CONNECTIONS_PER_S="0")
    server = subprocess.Popen(
        [args.binary, "serve", "--io", args.io, "--listen", "127.0.0.1:0",
         "--api", "127.0.0.1:0", "--data-dir", data],
        stdout=subprocess.PIPE, text=True, env=env)
    line = server.stdout.readline()
    m = re.search(r"ws://([0-9.]+):(\d+)", line)
    if not m:
        server.kill()
        sys.exit(f"no start line: {line!r}")
    host, port = m.group(1), int(m.group(2))
    api = re.search(r"api (http://[0-9.:]+)", line).group(1)
    try:
        await measure(args, server, host, port)
    except BaseException:
        # Say why the server ended connections: its close reasons and limits.
        if server.poll() is None:
            with urllib.request.urlopen(f"{api}/metrics", timeout=5) as r:
                for l in r.read().decode().splitlines():
                    if l.startswith(("ringlink_connections_closed_total", "ringlink_limited_total",
                                     "ringlink_connections ", "ringlink_handshake")):
                        print(l, file=sys.stderr)
        raise
    finally:
        if server.poll() is None:
            server.kill()


async def measure(args, server, host, port):
    time.sleep(0.5)
    before = rss_kib(server.pid)

    ready, stop = [], asyncio.Event()
    started = time.monotonic()
    opening = asyncio.Semaphore(args.opening)
    tasks = [asyncio.create_task(hold(host, port, i, ready, stop, opening))
             for i in range(args.connections)]
    while len(ready) < args.connections:
        done = [t for t in tasks if t.done() and t.exception()]
        if done:
            raise done[0].exception()
        await asyncio.sleep(0.05)
    connect_s = time.monotonic() - started
    await asyncio.sleep(2)  # let allocator caches settle
    after = rss_kib(server.pid)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    server.terminate()
    server.wait(timeout=20)

    growth = (after - before) * 1024
    print(json.dumps({
        "io": args.io,
        "connections": args.connections,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_connection": round(growth / args.connections),
        "connect_and_online_s": round(connect_s, 2),
        "connects_per_s": round(args.connections / connect_s),
    }))


if __name__ == "__main__":
    asyncio.run(main())
