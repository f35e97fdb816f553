"""What the per-subscriber cap across instances costs (issue 13):
mailpush's CPU and Redis's per ``mailpush_connections`` call, the call each
instance makes for every subscriber it holds once every RENEW_S (and once
per batch of new connections), in pipelines of BATCH as the server sends
them. A real redis-server on loopback, the bus's own ``count_connections``.

    .venv/bin/python bench/cap_cost.py [--subscribers 15000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import time

import trio

from mailpush.bus.redis import RedisBus
from mailpush.shared_cap import BATCH, LEASE_S, RENEW_S

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=15_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        rounds = trio.run(_measure, f"redis://127.0.0.1:{port}/0", args.subscribers, args.rounds, redis.pid)
    finally:
        redis.kill()
        redis.wait()
    own = statistics.median(r[0] for r in rounds)
    red = statistics.median(r[1] for r in rounds)
    n = args.subscribers
    print(f"{n:,} subscribers, pipelines of {BATCH}, {args.rounds} rounds (median [min–max]):")
    print(f"  mailpush CPU per count: {own:.1f} µs [{min(r[0] for r in rounds):.1f}–{max(r[0] for r in rounds):.1f}]")
    print(f"  Redis CPU per count:    {red:.1f} µs [{min(r[1] for r in rounds):.1f}–{max(r[1] for r in rounds):.1f}]")
    print(
        f"  renewing {n:,} subscribers every {RENEW_S:g} s (lease {LEASE_S:g} s): "
        f"{own * n / RENEW_S / 1e4:.2f}% of a core in mailpush, {red * n / RENEW_S / 1e4:.2f}% in Redis"
    )


async def _measure(url: str, n: int, rounds: int, redis_pid: int) -> list[tuple[float, float]]:
    bus = RedisBus(url)
    subs = [f"user{i}" for i in range(n)]
    out = []

    async def sink(batch) -> None:
        pass

    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run, sink)
        for r in range(rounds + 1):  # the first round warms up
            own0, red0 = time.process_time(), cpu_s(redis_pid)
            for i in range(0, n, BATCH):
                await bus.count_connections("bench", [(s, 1, 0) for s in subs[i : i + BATCH]], 5, int(LEASE_S * 1000))
            if r:
                out.append(((time.process_time() - own0) / n * 1e6, (cpu_s(redis_pid) - red0) / n * 1e6))
        nursery.cancel_scope.cancel()
    await bus.aclose()
    return out


if __name__ == "__main__":
    main()
