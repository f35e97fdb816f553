"""What one idle connection costs, everything a capacity plan needs beyond
the main bench: user-space memory, kernel memory per socket, and server CPU
per keepalive ping (docs/operations.md builds the plan for 3 million
connections from these and from bench/RESULTS.md).

Each round starts a fresh mailpush (embedded bus) with ``--ping-interval
PING_INTERVAL_S``, reads the machine's kernel memory, opens ``--connections``
idle subscribed connections with the bench's load generator, lets them
settle and measures:

- RSS per connection: (server RSS - RSS before) / connections;
- kernel memory per socket: the growth of the kernel's slab
  (``/proc/meminfo`` Slab) and of the TCP buffer pages (``/proc/net/sockstat``
  "TCP: mem") over the ``2 x connections`` loopback sockets (the clients'
  ends are TCP sockets alike, so half of it is the server's);
- RSS per idle SSE connection (``GET /v1/events``, the fallback), opened
  by this process with plain sockets on a fresh server, to set beside a
  WebSocket's;
- CPU per keepalive ping: the server's user and system CPU time
  (``/proc/PID/stat``) over ``WINDOW_S`` of idling, divided by the pings it
  sent then (``mailpush_pings_total``); the pongs' reading is included.
  The same window with pings off gives the idle CPU, subtracted first.

Repeated ``--rounds`` times; medians with min-max.

    .venv/bin/python bench/capacity.py [--connections 15000] [--rounds 3] [--out bench/results]

Prints a table and writes ``<out>/capacity.json`` (``--name`` to change it;
``--server-args '--poller shared'`` measures the shared poller).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

from loadgen import LoadGen, procs_for  # noqa: E402
from probes import metrics_now  # noqa: E402
from scenarios._common import WS_PATH, settle_rss  # noqa: E402
from servers import HOST, SECRET, SERVERS, Server  # noqa: E402

# The idle count (one process stays under this machine's file limit).
CONNECTIONS = 15_000
ROUNDS = 3
# Keepalive interval during the ping window: 15,000 / 2 s = 7,500 pings a
# second, enough CPU to measure against the noise of a shared machine.
PING_INTERVAL_S = 2.0
# How long each CPU window lasts.
WINDOW_S = 20.0
# Idle SSE streams opened by this process itself (one file each, under its
# 20,000-file limit with the load generator's workers apart).
SSE_CONNECTIONS = 10_000
# RSS is read once it changes by less than this fraction per step.
SETTLE_MAX_S = 20.0
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def slab_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                return int(line.split()[1])
    raise RuntimeError("no Slab line in /proc/meminfo")


def tcp_mem_pages() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    raise RuntimeError("no TCP line in /proc/net/sockstat")


def user_sys_s(srv: Server) -> tuple[float, float]:
    """User and system CPU seconds of the server's process tree."""
    user = system = 0.0
    for pid in srv.pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / _TICK
        system += int(fields[12]) / _TICK
    return user, system


def window(srv: Server, seconds: float) -> tuple[float, float, float]:
    """(user s, system s, pings) of the server over ``seconds`` of idling."""
    p0 = metrics_now(HOST, srv.aport).get("mailpush_pings_total", 0.0)
    u0, s0 = user_sys_s(srv)
    time.sleep(seconds)
    u1, s1 = user_sys_s(srv)
    p1 = metrics_now(HOST, srv.aport).get("mailpush_pings_total", 0.0)
    return u1 - u0, s1 - s0, p1 - p0


def sse_rss_per_conn(n: int, out: Path, extra: list[str]) -> float:
    """RSS per idle SSE connection: ``n`` streams held open by this process."""
    from mailpush.auth import mint

    socks = []
    with Server(
        SERVERS["mailpush"], out / "logs" / "capacity-mailpush-sse.log", ["--ping-interval", "0", *extra]
    ) as srv:
        rss0 = settle_rss(srv, SETTLE_MAX_S)
        try:
            for i in range(n):
                s = socket.create_connection((HOST, srv.port), timeout=10)
                socks.append(s)
                token = mint(SECRET, f"sse{i}", 3600)
                s.sendall(f"GET /v1/events?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                got = b""
                while b'"subscribed"' not in got:
                    chunk = s.recv(4096)
                    if not chunk:
                        raise RuntimeError(f"SSE stream {i} closed: {got[:200]!r}")
                    got += chunk
            rss1 = settle_rss(srv, SETTLE_MAX_S)
        finally:
            for s in socks:
                s.close()
    return (rss1 - rss0) / n


def one_round(n: int, out: Path, extra: list[str]) -> dict:
    spec = SERVERS["mailpush"]
    logs = out / "logs"
    result: dict = {}
    # Pings off: memory, and the idle CPU the ping window is compared with.
    with Server(spec, logs / "capacity-mailpush.log", ["--ping-interval", "0", *extra]) as srv:
        rss0 = settle_rss(srv, SETTLE_MAX_S)
        slab0, tcp0 = slab_kb(), tcp_mem_pages()
        with LoadGen(HOST, srv.port, WS_PATH, SECRET, procs=procs_for(n, 2), subscribe=True) as lg:
            opened = lg.open(n)
            if opened["ok"] != n:
                raise RuntimeError(f"opened {opened['ok']} of {n}: {opened['errors']}")
            rss1 = settle_rss(srv, SETTLE_MAX_S)
            time.sleep(2)
            slab1, tcp1 = slab_kb(), tcp_mem_pages()
            idle_user, idle_sys, _ = window(srv, WINDOW_S)
    result["rss_kib_per_conn"] = (rss1 - rss0) / n
    result["kernel_slab_kib_per_socket"] = (slab1 - slab0) / (2 * n)
    result["kernel_tcp_buffers_kib_per_socket"] = (tcp1 - tcp0) * _PAGE / 1024 / (2 * n)
    result["idle_cpu_user_s"] = idle_user
    result["idle_cpu_sys_s"] = idle_sys
    # Pings on.
    args = ["--ping-interval", f"{PING_INTERVAL_S:g}", "--pong-timeout", "10", *extra]
    with (
        Server(spec, logs / "capacity-mailpush-pings.log", args) as srv,
        LoadGen(HOST, srv.port, WS_PATH, SECRET, procs=procs_for(n, 2), subscribe=True) as lg,
    ):
        opened = lg.open(n)
        if opened["ok"] != n:
            raise RuntimeError(f"opened {opened['ok']} of {n}: {opened['errors']}")
        time.sleep(PING_INTERVAL_S * 2)  # into steady rounds
        user, system, pings = window(srv, WINDOW_S)
        timeouts = metrics_now(HOST, srv.aport).get("mailpush_pong_timeouts_total", 0.0)
    if pings <= 0:
        raise RuntimeError("no pings counted in the window")
    result["pings"] = pings
    result["pong_timeouts"] = timeouts
    result["ping_cpu_user_us"] = max(0.0, user - idle_user) / pings * 1e6
    result["ping_cpu_sys_us"] = max(0.0, system - idle_sys) / pings * 1e6
    result["ping_cpu_us"] = result["ping_cpu_user_us"] + result["ping_cpu_sys_us"]
    result["sse_rss_kib_per_conn"] = sse_rss_per_conn(min(n, SSE_CONNECTIONS), out, extra)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=CONNECTIONS)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--server-args", default="", help="extra mailpush serve options, e.g. '--poller shared'")
    ap.add_argument("--name", default="capacity", help="the JSON's name in --out: NAME.json")
    args = ap.parse_args()
    extra = args.server_args.split()
    rounds = []
    for r in range(args.rounds):
        res = one_round(args.connections, args.out, extra)
        rounds.append(res)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    keys = rounds[0].keys()
    summary = {
        k: {
            "median": statistics.median(r[k] for r in rounds),
            "min": min(r[k] for r in rounds),
            "max": max(r[k] for r in rounds),
        }
        for k in keys
    }
    print(f"\n{args.connections:,} idle subscribed connections, {args.rounds} rounds (median, min-max):")
    rows = [
        ("RSS per connection (KiB)", "rss_kib_per_conn"),
        ("RSS per idle SSE connection (KiB)", "sse_rss_kib_per_conn"),
        ("kernel slab per socket (KiB)", "kernel_slab_kib_per_socket"),
        ("kernel TCP buffers per socket (KiB)", "kernel_tcp_buffers_kib_per_socket"),
        ("server CPU per keepalive ping, user (µs)", "ping_cpu_user_us"),
        ("server CPU per keepalive ping, system (µs)", "ping_cpu_sys_us"),
        ("server CPU per keepalive ping, total (µs)", "ping_cpu_us"),
    ]
    print("| figure | median | min–max |\n|---|---|---|")
    for label, key in rows:
        s = summary[key]
        print(f"| {label} | {s['median']:.2f} | {s['min']:.2f}–{s['max']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    path.write_text(
        json.dumps(
            {
                "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
                "connections": args.connections,
                "ping_interval_s": PING_INTERVAL_S,
                "window_s": WINDOW_S,
                "server_args": extra,
                "rounds": rounds,
                "summary": summary,
            },
            indent=1,
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
