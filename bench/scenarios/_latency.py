"""Publish-to-receive latency at a fixed event rate, on every bus mailpush
has (issue #3: p99 under LATENCY_P99_MS, 20 ms, at LATENCY_RATE, 10,000
events/s), beside the floor's loopback-and-wakeup cost.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import time

from servers import HOST, ServerError, ServerSpec

from ._common import Context, _check_alive, _fmt, _label, _ok, _pct, _problems, _verdict

# Latency publisher: one publish request per tick carrying rate*tick events
# (10,000 events/s -> 50 per 5 ms request, 1,000/s -> 5). Per-event requests would measure
# the admin HTTP server, not the push path; 5 ms batches keep the added
# queueing inside a batch far below the millisecond scale being measured.
PUBLISH_TICK_S = 0.005

# After the last publish, how long the clients may take to receive the rest.
DRAIN_TIMEOUT_S = 15.0

# Buses to measure latency on: name -> extra `mailpush serve` arguments.
# Every bus mailpush has; "redis" starts a throwaway redis-server (Debian's)
# on a free port for the run, and is skipped if none is installed.
LATENCY_BUSES: tuple[str, ...] = ("embedded", "redis")

# Issue #3's target: p99 publish->receive at this many events/s ...
LATENCY_RATE = 10_000
# ... under this.
LATENCY_P99_MS = 20.0


def latency(ctx: Context, spec: ServerSpec) -> dict:
    """Publish-to-receive latency at a fixed event rate, on every bus.

    Each event carries ``"t": monotonic_ns()`` taken just before its publish
    request is sent (one request per 5 ms tick); the client records receive
    time minus t. mailpush: subscribers picked round-robin among all its
    connections. The floor row does the same sends per tick without any
    routing: one request per tick to its admin port, the stamped message
    sent to each of its rate x tick connections; it shows what loopback and
    waking idle processes cost on this machine. Samples published during
    the warmup are dropped."""
    runs = []
    buses = LATENCY_BUSES if spec.kind == "mailpush" else ("none",)
    for bus in buses:
        with _bus_args(bus) as args:
            if args is None:
                ctx.log(f"  {spec.name} {bus} bus skipped: redis-server is not installed")
                continue
            for rate in ctx.profile.latency_rates:
                runs.append(_latency_one(ctx, spec, bus, args, rate))
                r = runs[-1]
                ctx.log(f"  {spec.name} {bus} bus @ {rate:,}/s: p50 {r['p50_ms']:.2f} ms, "
                        f"p99 {r['p99_ms']:.2f} ms, p99.9 {r['p999_ms']:.2f} ms, lost {r['lost']}, "
                        f"server CPU {r['server_cpu_us_per_event']:.1f} µs/event")
    return {"runs": runs}


@contextlib.contextmanager
def _bus_args(bus: str):
    """mailpush's options for ``bus``, with its server running; None if the
    bus cannot be had here."""
    if bus != "redis":
        yield []
        return
    exe = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if exe is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise ServerError("redis-server did not start") from None
                time.sleep(0.05)
        yield ["--bus", f"redis://{HOST}:{port}/0"]
    finally:
        proc.kill()
        proc.wait(10)


def _latency_one(ctx: Context, spec: ServerSpec, bus: str, args: list[str], rate: int) -> dict:
    p = ctx.profile
    routed = spec.kind == "mailpush"
    # A reference server sends each tick's message to all its connections.
    n = p.latency_connections if routed else max(1, math.ceil(rate * PUBLISH_TICK_S))
    with ctx.server(spec, f"latency-{bus}-{rate}", args) as srv, ctx.loadgen(srv, n) as lg:
        opened = lg.open(n, timeout=p.open_timeout_s)
        if opened["ok"] < n:
            raise ServerError(f"only {opened['ok']:,}/{n:,} opened: {opened['errors']}")
        subs = [s.encode() for s in lg.subscribers]
        worker_of = [int(s[1:].split("-")[0]) for s in lg.subscribers]
        total = p.latency_warmup_s + p.latency_seconds
        ticks = int(total / PUBLISH_TICK_S)
        lg.arm()
        expected = [0] * len(lg.open_per_worker)
        start = time.monotonic_ns() + 50_000_000  # leaves time for latency_on to reach the workers
        lg.latency_on(start + int(p.latency_warmup_s * 1e9))
        tick_ns = int(PUBLISH_TICK_S * 1e9)
        sent = late = 0
        cpu0 = srv.cpu_s()
        answer_ms: list[float] = []
        j = 0
        for i in range(ticks):
            due = start + i * tick_ns
            now = time.monotonic_ns()
            if now < due:
                time.sleep((due - now) / 1e9)
            elif now - due > tick_ns:
                late += 1
            t = time.monotonic_ns()
            if routed:
                items = []
                # Events due by the end of tick i, minus those already sent:
                # the exact rate even when rate * tick is not a whole number.
                for _ in range(int(rate * (i + 1) * PUBLISH_TICK_S) - sent):
                    items.append(b'{"subscriber":"%s","event":"new_letter","data":{"t":%d}}' % (subs[j], t))
                    expected[worker_of[j]] += 1
                    j = (j + 1) % len(subs)
                if not items:
                    continue
                count = len(items)
                status, answer = srv.admin("POST", "/v1/publish", b"[" + b",".join(items) + b"]")
            else:
                count = n
                for w, k in enumerate(lg.open_per_worker):
                    expected[w] += k
                status, answer = srv.admin("POST", "/fanout", b'{"type":"event","data":{"t":%d}}' % t)
            answer_ms.append((time.monotonic_ns() - t) / 1e6)
            if status != 202:
                raise ServerError(f"publish answered {status}: {answer[:200]!r}")
            sent += count
        elapsed = (time.monotonic_ns() - start) / 1e9
        w = lg.wait_frames(expected, DRAIN_TIMEOUT_S)
        cpu = srv.cpu_s() - cpu0  # mailpush's own (a Redis bus's server is not in its process tree)
        samples = sorted(lg.latency_off())
        _check_alive(srv)
        stats = lg.stats()
    ms = [s / 1e6 for s in samples]
    # Keep the CDF plottable and the JSON small: 1,000 evenly spaced quantiles.
    cdf = [ms[min(len(ms) - 1, int(q * len(ms) / 1000))] for q in range(1000)] if ms else []
    return {"bus": bus if routed else "none (admin trigger)", "connections": n, "target_rate": rate,
            "achieved_rate": sent / elapsed if elapsed else 0.0, "published": sent,
            "received": w["frames"], "lost": sent - w["frames"], "late_ticks": late,
            "publish_requests": len(answer_ms), "events_per_request": sent / max(1, len(answer_ms)),
            "publish_answer_ms_p50": _pct(sorted(answer_ms), 0.5),
            "publish_answer_ms_p99": _pct(sorted(answer_ms), 0.99),
            "publish_answer_ms_max": max(answer_ms, default=None), "samples": len(ms),
            "p50_ms": _pct(ms, 0.50), "p90_ms": _pct(ms, 0.90), "p99_ms": _pct(ms, 0.99),
            "p999_ms": _pct(ms, 0.999), "max_ms": ms[-1] if ms else None,
            "server_cpu_us_per_event": cpu / sent * 1e6 if sent else None,
            "cdf_ms": cdf, "server_closed": stats["server_closed"], "client_errors": stats["errors"]}


def latency_table(results: dict) -> list[str]:
    head = ["server", "bus", "connections", "events/s target", "achieved", "samples",
            "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "lost", "publish answer p50 / p99 ms"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in _ok(results).items():
        for b in r["runs"]:
            rows.append("| " + " | ".join([
                _label(name), b["bus"], _fmt(b["connections"]), _fmt(b["target_rate"]),
                _fmt(b["achieved_rate"]), _fmt(b["samples"]), _fmt(b["p50_ms"], ".2f"),
                _fmt(b["p90_ms"], ".2f"), _fmt(b["p99_ms"], ".2f"), _fmt(b["p999_ms"], ".2f"),
                _fmt(b["max_ms"], ".2f"), _fmt(b["lost"]),
                f"{_fmt(b['publish_answer_ms_p50'], '.2f')} / {_fmt(b['publish_answer_ms_p99'], '.2f')}"]) + " |")
    return rows + _problems(results, len(head))


def latency_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r:
        return []
    out = []
    for b in r["runs"]:
        if b["target_rate"] >= LATENCY_RATE:
            out.append(_verdict("#3", f"p99 publish→receive at {LATENCY_RATE:,} events/s < {LATENCY_P99_MS:g} ms",
                                f"{b['p99_ms']:.2f} ms ({b['bus']} bus)", b["p99_ms"] < LATENCY_P99_MS))
    return out
