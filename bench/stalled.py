"""Stalled upgrades against a normal client: the issue-9 target "1,000
stalled upgrades do not delay a normal client's upgrade by more than 50 ms".

A stalled upgrade is a connection that sent half an upgrade request (or
nothing) and stopped: a slowloris, a broken proxy, a browser pre-connect.
Each round starts a fresh mailpush, times UPGRADES normal upgrades one after
another (connect, request with a token, 101, close) as a baseline, opens
STALLED stalled connections, waits until the server holds all of them, and
times the normal upgrades again while they sit there. The delay is the
difference of the percentiles; the server's CPU per normal upgrade is
reported beside it. Repeated ROUNDS times; medians, with min-max.

    .venv/bin/python bench/stalled.py [--stalled 1000] [--rounds 3]

Prints a table and writes bench/results/stalled.json.
"""

from __future__ import annotations

import argparse
import base64
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

from servers import HOST, SECRET, SERVERS, Server  # noqa: E402

from mailpush.auth import mint  # noqa: E402

# The count, and its target for the added delay (ms).
STALLED = 1000
TARGET_DELAY_MS = 50.0
# Normal upgrades timed per phase: enough for a stable p99.
UPGRADES = 1000
ROUNDS = 3
# The server's handshake deadline: longer than a round, so that no stalled
# connection is answered 408 (and frees its socket) while it is measured.
HANDSHAKE_TIMEOUT_S = 60
# How long the server may take to have accepted every stalled connection.
SETTLE_TIMEOUT_S = 30.0
# A normal upgrade that takes longer than this is a failure, not a sample.
UPGRADE_TIMEOUT_S = 10.0

REQUEST = ("GET /v1/ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")


def upgrade_once(port: int, token: str) -> float:
    """Seconds from connect to the end of the 101 head."""
    key = base64.b64encode(os.urandom(16)).decode()
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=UPGRADE_TIMEOUT_S) as s:
        s.sendall(REQUEST.format(token=token, key=key).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError(f"closed before the answer: {head[:80]!r}")
            head += chunk
    elapsed = time.perf_counter() - t0
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"not upgraded: {head[:80]!r}")
    return elapsed


def phase(server: Server, token: str) -> dict:
    cpu0 = server.cpu_s()
    times = sorted(upgrade_once(server.port, token) for _ in range(UPGRADES))
    cpu = server.cpu_s() - cpu0
    return {"median_ms": statistics.median(times) * 1e3, "p99_ms": times[int(len(times) * 0.99) - 1] * 1e3,
            "max_ms": times[-1] * 1e3, "server_cpu_us_per_upgrade": cpu / UPGRADES * 1e6}


def gauge(server: Server, name: str) -> float:
    _, body = server.admin("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def stall(port: int, n: int) -> list[socket.socket]:
    """``n`` connections: two in three send half an upgrade request and
    stop, one in three sends nothing."""
    token = mint(SECRET, "stalled", 3600)
    half = REQUEST.format(token=token, key=base64.b64encode(os.urandom(16)).decode()).encode()
    socks = []
    for i in range(n):
        s = socket.create_connection((HOST, port), timeout=5)
        if i % 3:
            s.sendall(half[: len(half) // 2 + i % 40])
        socks.append(s)
    return socks


def one_round(stalled: int, log_dir: Path) -> dict:
    spec = SERVERS["mailpush"]
    with Server(spec, log_dir / "stalled-mailpush.log", ["--handshake-timeout", str(HANDSHAKE_TIMEOUT_S)]) as server:
        token = mint(SECRET, "normal", 3600)
        upgrade_once(server.port, token)  # warm up
        base = phase(server, token)
        socks = stall(server.port, stalled)
        try:
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while gauge(server, "mailpush_sockets") < stalled:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not accept every stalled connection")
                time.sleep(0.05)
            slots = gauge(server, "mailpush_handshakes_in_progress")
            status, body = server.admin("GET", "/healthz")
            loaded = phase(server, token)
        finally:
            for s in socks:
                s.close()
    return {"baseline": base, "stalled": loaded, "slots_in_use_while_stalled": slots, "healthz_while_stalled": [status, body.decode().strip()],
            "delay_median_ms": loaded["median_ms"] - base["median_ms"], "delay_p99_ms": loaded["p99_ms"] - base["p99_ms"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stalled", type=int, default=STALLED)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "stalled.json")
    args = ap.parse_args()
    rounds = [one_round(args.stalled, args.out.parent / "logs") for _ in range(args.rounds)]

    def med(get) -> tuple[float, float, float]:
        values = [get(r) for r in rounds]
        return statistics.median(values), min(values), max(values)

    rows = [
        ("normal upgrade, median (ms)", lambda r: r["baseline"]["median_ms"], lambda r: r["stalled"]["median_ms"]),
        ("normal upgrade, p99 (ms)", lambda r: r["baseline"]["p99_ms"], lambda r: r["stalled"]["p99_ms"]),
        ("normal upgrade, max (ms)", lambda r: r["baseline"]["max_ms"], lambda r: r["stalled"]["max_ms"]),
        ("server CPU per upgrade (µs)", lambda r: r["baseline"]["server_cpu_us_per_upgrade"], lambda r: r["stalled"]["server_cpu_us_per_upgrade"]),
    ]
    print(f"\n{args.stalled} stalled upgrades, {UPGRADES} normal upgrades per phase, {args.rounds} rounds (median [min-max])\n")
    print(f"| figure | without stalled | with {args.stalled} stalled |\n|---|---|---|")
    for name, a, b in rows:
        ma, mb = med(a), med(b)
        print(f"| {name} | {ma[0]:.2f} [{ma[1]:.2f}-{ma[2]:.2f}] | {mb[0]:.2f} [{mb[1]:.2f}-{mb[2]:.2f}] |")
    delay = med(lambda r: r["delay_p99_ms"])
    met = delay[0] <= TARGET_DELAY_MS
    print(f"\nadded delay at p99: {delay[0]:.2f} ms [{delay[1]:.2f}-{delay[2]:.2f}] (target <= {TARGET_DELAY_MS:g} ms: {'met' if met else 'NOT met'})")
    print(f"handshake slots in use while stalled: {[r['slots_in_use_while_stalled'] for r in rounds]}; /healthz: {[r['healthz_while_stalled'] for r in rounds]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"stalled": args.stalled, "upgrades_per_phase": UPGRADES, "rounds": rounds,
                                    "delay_p99_ms": {"median": delay[0], "min": delay[1], "max": delay[2]},
                                    "target_ms": TARGET_DELAY_MS, "met": met, "command": " ".join(sys.argv)}, indent=1))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
