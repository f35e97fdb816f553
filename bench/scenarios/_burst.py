"""Burst: every idle connection sends a packet at the same moment
(issue #4: the transient memory stays under BURST_BOUND_BYTES, 1 MiB, and
every connection gets its answer).
"""

from __future__ import annotations

import time

from probes import RssProbe
from servers import ServerError, ServerSpec

from ._common import Context, _check_alive, _fmt, _ok, _problems, _verdict, settle_rss

# Burst: issue #4's bound on the transient memory of every connection
# becoming readable at once (1 MiB: what a worker pool of 64 buffers of 16 KiB
# would hold). mailpush reads into one buffer of --buffer-size (its default,
# passed explicitly) and wakes at most 1,024 readers per loop iteration.
BURST_BOUND_BYTES = 1024 * 1024
READ_BUFFER_BYTES = 16_384


def burst(ctx: Context, spec: ServerSpec) -> dict:
    """Every idle subscribed connection sends ``{"type":"ping"}`` at the
    same moment (each load-generator worker writes it on all its sockets in
    one loop) and must get ``{"type":"pong"}`` back. A thread reads the
    server's RSS every 2 ms; the peak growth over the RSS just before the
    burst is compared with BURST_BOUND_BYTES."""
    p = ctx.profile
    n = p.burst_n
    args = ["--buffer-size", str(READ_BUFFER_BYTES)]
    with ctx.server(spec, "burst", args) as srv, ctx.loadgen(srv, n) as lg:
        opened = lg.open(n, timeout=p.open_timeout_s)
        if opened["ok"] < n:
            raise ServerError(f"only {opened['ok']:,}/{n:,} connections opened: {opened['errors']}")
        base_settled = settle_rss(srv, p.settle_max_s)
        with RssProbe(srv.pids(), period=0.002) as rss:
            time.sleep(0.2)
            per = lg.arm(track=True)
            t0 = time.monotonic_ns()
            b = lg.burst()
            w = lg.wait_frames(per, timeout=max(30.0, n / 1_000))
            t1 = time.monotonic_ns()
            time.sleep(0.3)
        _check_alive(srv)
        stats = lg.stats()
    pre = [kb for t, kb in rss.samples if t < t0]
    base = max(pre) if pre else base_settled
    peak = rss.peak(t0)
    bound_kb = BURST_BOUND_BYTES / 1024
    res = {"n": n, "sent": b["sent"], "send_failed": b["failed"],
           "send_loop_ms": (b["t1"] - b["t0"]) / 1e6, "answers": w["frames"],
           "connections_answered": w["with_frames"], "open_after": stats["open"],
           "answer_seconds": (w["last_ns"] - t0) / 1e9 if w["last_ns"] else None,
           "rss_before_kb": base, "rss_peak_kb": peak, "rss_growth_kb": peak - base,
           "rss_samples": len(rss.samples), "rss_timeline": [((t - t0) / 1e6, kb) for t, kb in rss.samples],
           "buffer_size": READ_BUFFER_BYTES, "bound_kb": bound_kb,
           "client_errors": stats["errors"], "wait_s": (t1 - t0) / 1e9}
    ctx.log(f"  {spec.name}: {b['sent']:,} pings, {w['frames']:,} pongs on {w['with_frames']:,} connections in "
            f"{(res['answer_seconds'] or 0) * 1e3:.0f} ms; RSS +{res['rss_growth_kb'] / 1024:.2f} MiB "
            f"(bound {bound_kb / 1024:.2f} MiB)")
    return res


def burst_table(results: dict) -> list[str]:
    rows = ["| measure | value |", "|---|---|"]
    for r in _ok(results).values():
        rows += [f"| connections, each sending one `{{\"type\":\"ping\"}}` at once | {r['n']:,} "
                 f"(writes took {r['send_loop_ms']:.0f} ms) |",
                 f"| `{{\"type\":\"pong\"}}` answers / connections answered | {r['answers']:,} / "
                 f"{r['connections_answered']:,} |",
                 f"| first ping → last pong | {_fmt((r['answer_seconds'] or 0) * 1e3, '.0f')} ms |",
                 f"| RSS before → peak (sampled every 2 ms, {r['rss_samples']:,} samples) | "
                 f"{r['rss_before_kb'] / 1024:.2f} → {r['rss_peak_kb'] / 1024:.2f} MiB |",
                 f"| peak RSS growth | {r['rss_growth_kb']:,} KiB |",
                 f"| the bound / the one read buffer (--buffer-size) | {r['bound_kb']:,.0f} KiB / "
                 f"{r['buffer_size']:,} bytes |",
                 f"| connections open after / client errors | {r['open_after']:,} / {r['client_errors'] or 'none'} |"]
    return rows + _problems(results, 2)


def burst_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r:
        return []
    return [
        _verdict("#4", f"peak RSS growth when all {r['n']:,} connections send at once ≤ {r['bound_kb']:,.0f} KiB",
                 f"{r['rss_growth_kb']:,} KiB", r["rss_growth_kb"] <= r["bound_kb"]),
        _verdict("#4", "every connection gets its answer",
                 f"{r['connections_answered']:,} of {r['n']:,} connections answered",
                 r["connections_answered"] == r["n"] and r["answers"] == r["n"]),
    ]
