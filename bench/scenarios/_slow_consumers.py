"""Slow consumers: clients that stop reading while others receive at full
rate (issue #4: the others keep within 10% of their rate without them, and
memory stays bounded, about stalled x --send-queue-bytes at worst, judged
with SLOW_RSS_SLACK; every stalled client is closed and counted).
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable

from loadgen import LoadGen, procs_for
from probes import RssProbe, metrics_now
from servers import HOST, SECRET, Server, ServerError, ServerSpec

from ._common import FANOUT_GAP_S, WS_PATH, Context, _check_alive, _fmt, _ok, _problems, _verdict, settle_rss

# Slow consumers: the stalled clients' receive buffer (the kernel makes it
# its minimum, ~2.3 KB) and MSS (Ethernet's: on loopback the MSS is ~64 KB,
# and the server's kernel would buffer ~1.6 MB for each stalled client
# before mailpush's own queue saw a byte); how long their sockets are read
# at the end; rounds after the last one is dropped.
STALLED_RCVBUF = 1_024
STALLED_MSS = 1_448
STALLED_PROBE_S = 5.0
SLOW_ROUNDS_AFTER = 2
# A fast-only round before every SLOW_ALONE_EVERY-th round to everybody
# (so that drift on this shared machine hits both alike); their events
# carry n = SLOW_ALONE_BASE + round.
SLOW_ALONE_EVERY = 2
SLOW_ALONE_BASE = 1_000
SLOW_LOG_EVERY = 10
# "≈ stalled x --send-queue-bytes at worst": besides up to that many bytes
# of frames, each stalled connection holds a writer task, its deque and
# one heap allocation per queued frame, and frames kept across rounds pin
# heap pages among the publish bodies' churn; judged as at most this
# multiple (the measured multiple is in the table).
SLOW_RSS_SLACK = 1.5


def _pad_item(sub: str, k: int, frame_bytes: int) -> bytes:
    """A publish item whose event frame is about ``frame_bytes``."""
    env = len(b'{"type":"event","subscriber":"","event":"new_letter","data":{"n":,"pad":""}}') + 4
    pad = max(0, frame_bytes - env - len(sub) - len(str(k)))
    return b'{"subscriber":"%s","event":"new_letter","data":{"n":%d,"pad":"%s"}}' % (sub.encode(), k, b"x" * pad)


def slow_consumers(ctx: Context, spec: ServerSpec) -> dict:
    """Clients that stop reading while others receive at full rate.

    First the fast clients alone: rounds of one event to each of them
    (frames of ~``slow_frame_bytes``), deliveries/s from publish to the
    last fast client's receipt: the baseline. Then the stalled clients
    connect, subscribe and never read again (SO_RCVBUF 1 KiB and an
    Ethernet MSS, TCP_MAXSEG 1448, so the server's kernel buffers for them
    are what a real network gives, ~60 KB, not loopback's megabytes); the
    rounds go on with one event to every subscriber, fast and stalled
    interleaved, until the server has dropped every stalled client. The
    fast clients' rate in those rounds is compared with the baseline, the
    server's RSS (every 10 ms) with stalled × --send-queue-bytes, and the
    stalled sockets are read at the end to see how they were closed."""
    p = ctx.profile
    n_fast, n_slow = p.slow_fast, p.slow_stalled
    # Keepalive off: a client that never reads never answers a ping either,
    # and would otherwise be closed by whichever of the two bounds it hits
    # first; this scenario measures the send-queue bound alone.
    args = ["--send-queue-bytes", str(p.slow_queue_bytes), "--ping-interval", "0"]
    sockopts = ((socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF),
                (socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALLED_MSS))
    with ctx.server(spec, "slow_consumers", args) as srv, ctx.loadgen(srv, n_fast) as lg, \
            LoadGen(HOST, srv.port, WS_PATH, SECRET, procs=procs_for(n_slow, 1), prefix="slow",
                    sockopts=sockopts, stall=True, source_base=100) as slg:
        opened = lg.open(n_fast, timeout=p.open_timeout_s)
        if opened["ok"] < n_fast:
            raise ServerError(f"only {opened['ok']:,}/{n_fast:,} connections opened: {opened['errors']}")
        fast = list(lg.subscribers)

        def fast_body(k):
            return b"[" + b",".join(_pad_item(s, k, p.slow_frame_bytes) for s in fast) + b"]"

        time.sleep(FANOUT_GAP_S)
        rss_before = settle_rss(srv, p.settle_max_s)
        with RssProbe(srv.pids(), period=0.01, max_s=600) as base_rss:
            base_rounds = _slow_rounds(ctx, spec, srv, lg, p.slow_baseline_rounds, fast_body, "baseline",
                                       p.slow_gap_s)
        base_peak = base_rss.peak()
        m0 = metrics_now(HOST, srv.aport)
        sopened = slg.open(n_slow, timeout=p.open_timeout_s)
        if sopened["ok"] < n_slow:
            raise ServerError(f"only {sopened['ok']:,}/{n_slow:,} stalled clients opened: {sopened['errors']}")
        slow = list(slg.subscribers)
        # Stalled and fast subscribers interleaved evenly in each publish.
        total = n_fast + n_slow
        mixed = [None] * total
        slow_at = {min(total - 1, (i * total) // n_slow + total // (2 * n_slow)) for i in range(n_slow)}
        si, fi = iter(slow), iter(fast)
        for i in range(total):
            mixed[i] = next(si, None) if i in slow_at else None
        for i in range(total):
            if mixed[i] is None:
                mixed[i] = next(fi, None) or next(si)

        def mixed_body(k):
            return b"[" + b",".join(_pad_item(s, k, p.slow_frame_bytes) for s in mixed) + b"]"

        rss_open = settle_rss(srv, p.settle_max_s)
        rounds = []  # one event to every subscriber, the stalled ones included
        alone = []   # interleaved with those: one event to each fast subscriber only
        dropped = 0
        with RssProbe(srv.pids(), period=0.01, max_s=600) as rss:
            t_start = time.monotonic_ns()
            after_all = 0
            for k in range(p.slow_max_rounds):
                if k % SLOW_ALONE_EVERY == 0:
                    a = _slow_rounds(ctx, spec, srv, lg, 1, lambda _, k=k: fast_body(SLOW_ALONE_BASE + k), "",
                                     p.slow_gap_s)[0]
                    a["attached_before"] = n_slow - dropped
                    a["round"] = k + 1
                    alone.append(a)
                r = _slow_rounds(ctx, spec, srv, lg, 1, lambda _, k=k: mixed_body(k), "", p.slow_gap_s)[0]
                r["attached_before"] = n_slow - dropped
                m = metrics_now(HOST, srv.aport)
                dropped = (m.get("mailpush_slow_consumers_total") or 0) - (m0.get("mailpush_slow_consumers_total") or 0)
                r["slow_dropped"] = dropped
                r["writers"] = (m.get("mailpush_writers_total") or 0) - (m0.get("mailpush_writers_total") or 0)
                r["rss_kb"] = rss.samples[-1][1] if rss.samples else None
                rounds.append(r)
                if k % SLOW_LOG_EVERY == 0 or dropped >= n_slow:
                    ctx.log(f"  {spec.name} round {k + 1}: fast alone {a['rate']:,.0f}/s, with stalled "
                            f"{r['rate']:,.0f}/s; stalled dropped {dropped:,.0f}/{n_slow:,}")
                if dropped >= n_slow:
                    after_all += 1
                    if after_all > SLOW_ROUNDS_AFTER:
                        break
        _check_alive(srv)
        m1 = metrics_now(HOST, srv.aport)
        rss_after = settle_rss(srv, p.settle_max_s)
        probe = slg.probe_stalled(STALLED_PROBE_S)
        stats = lg.stats()
    attached = [r for r in rounds if r["attached_before"] > 0] or rounds
    alone_attached = [r for r in alone if r["attached_before"] > 0] or alone
    before_rate = statistics.median(r["rate"] for r in base_rounds)
    base_rate = statistics.median(r["rate"] for r in base_rounds + alone_attached)
    during = statistics.median(r["rate"] for r in attached)
    all_rate = statistics.median(r["rate"] for r in rounds)
    first_drop = next((i + 1 for i, r in enumerate(rounds) if r["slow_dropped"] > 0), None)
    last_drop = next((i + 1 for i, r in enumerate(rounds) if r["slow_dropped"] >= n_slow), None)

    def delta(name):
        return (m1.get(name) or 0) - (m0.get(name) or 0)

    peak = rss.peak(t_start)
    # What the stalled clients cost: the peak with them over the higher of
    # the peak of the same rounds without them (publish bodies of ~N x frame
    # bytes come and go in both) and the RSS with them connected and idle.
    ref = max(base_peak, rss_open)
    res = {"fast": n_fast, "stalled": n_slow, "frame_bytes": max(r["frame_bytes"] for r in base_rounds + rounds),
           "send_queue_bytes": p.slow_queue_bytes, "stalled_rcvbuf": STALLED_RCVBUF, "stalled_mss": STALLED_MSS,
           "baseline_rounds": base_rounds, "rounds": rounds, "alone_rounds": alone,
           "baseline_rate": base_rate, "rate_before": before_rate,
           "rate_alone_interleaved": statistics.median(r["rate"] for r in alone_attached),
           "rate_while_attached": during, "rate_all_rounds": all_rate,
           "rounds_while_attached": len(attached), "first_drop_round": first_drop, "all_dropped_round": last_drop,
           "missing_fast": sum(r["expected"] - r["delivered"] for r in base_rounds + rounds),
           "slow_consumers_total": delta("mailpush_slow_consumers_total"),
           "closes_1008": delta('mailpush_closes_total{code="1008"}'),
           "writers": delta("mailpush_writers_total"),
           "rss_before_kb": rss_before, "rss_baseline_peak_kb": base_peak, "rss_with_stalled_kb": rss_open,
           "rss_peak_kb": peak, "rss_growth_kb": peak - ref, "rss_after_kb": rss_after,
           "rss_bound_kb": n_slow * p.slow_queue_bytes / 1024,
           "rss_timeline": [((t - t_start) / 1e6, kb) for t, kb in rss.samples[::10]],
           "stalled_probe": probe, "fast_client_errors": stats["errors"],
           "fast_server_closed": stats["server_closed"], "fast_open_after": stats["open"]}
    ctx.log(f"  {spec.name}: fast rate {base_rate:,.0f}/s alone, {during:,.0f}/s with {n_slow:,} stalled "
            f"({during / base_rate:.0%}); dropped {res['slow_consumers_total']:.0f} by round {last_drop}; "
            f"RSS +{res['rss_growth_kb'] / 1024:.1f} MiB (bound {res['rss_bound_kb'] / 1024:.1f} MiB); "
            f"stalled sockets: {probe['outcomes']}")
    return res


def _slow_rounds(ctx: Context, spec: ServerSpec, srv: Server, lg: LoadGen, count: int,
                 body_of: Callable[[int], bytes], label: str, gap: float) -> list[dict]:
    """Like _fanout_rounds, lighter: deliveries/s per round, logged once if ``label``."""
    out = []
    for k in range(count):
        body = body_of(k)
        per = lg.arm()
        expected = sum(per)
        t0 = time.monotonic_ns()
        status, answer = srv.trigger_fanout(body)
        if status not in (200, 202):
            raise ServerError(f"publish answered {status}: {answer[:200]!r}")
        w = lg.wait_frames(per, timeout=max(30.0, expected / 1_000))
        _check_alive(srv)
        secs = (w["last_ns"] - t0) / 1e9 if w["last_ns"] else None
        out.append({"expected": expected, "delivered": w["frames"], "seconds": secs,
                    "rate": w["frames"] / secs if secs else 0.0, "frame_bytes": w["frame_len"],
                    "trigger_bytes": len(body)})
        time.sleep(gap)
    if label:
        ctx.log(f"  {spec.name} {label}: {count} rounds, median "
                f"{statistics.median(r['rate'] for r in out):,.0f} fast deliveries/s")
    return out


def slow_consumers_table(results: dict) -> list[str]:
    rows = ["| measure | value |", "|---|---|"]
    for r in _ok(results).values():
        probe = r["stalled_probe"]
        rows += [f"| fast clients / stalled clients | {r['fast']:,} / {r['stalled']:,} |",
                 f"| event frame / --send-queue-bytes / stalled SO_RCVBUF, TCP_MAXSEG | {r['frame_bytes']:,} B / "
                 f"{r['send_queue_bytes']:,} B / {r['stalled_rcvbuf']:,} B, {r['stalled_mss']:,} |",
                 f"| fast deliveries/s alone: before the stalled clients connect (median of "
                 f"{len(r['baseline_rounds'])} rounds) / in fast-only rounds between those below | "
                 f"{r['rate_before']:,.0f} / {r['rate_alone_interleaved']:,.0f} |",
                 f"| **fast deliveries/s alone** (median of both) | {r['baseline_rate']:,.0f} |",
                 f"| **fast deliveries/s with the stalled clients attached** (median of {r['rounds_while_attached']} "
                 f"rounds to every subscriber) | {r['rate_while_attached']:,.0f} "
                 f"({r['rate_while_attached'] / r['baseline_rate']:.0%}) |",
                 f"| fast deliveries/s over all {len(r['rounds'])} rounds with stalled clients | "
                 f"{r['rate_all_rounds']:,.0f} |",
                 f"| first drop / all dropped (round) | {_fmt(r['first_drop_round'])} / "
                 f"{_fmt(r['all_dropped_round'])} |",
                 f"| mailpush_slow_consumers_total / mailpush_closes_total{{code=\"1008\"}} | "
                 f"{r['slow_consumers_total']:,.0f} / {r['closes_1008']:,.0f} |",
                 f"| writer tasks spawned (mailpush_writers_total) | {r['writers']:,.0f} |",
                 f"| stalled sockets read at the end: how they ended | {probe['outcomes']} "
                 f"({probe['bytes']:,} bytes were waiting) |",
                 f"| RSS: idle → peak of the rounds without stalled clients → with them connected, idle → "
                 f"peak of the rounds with them | {r['rss_before_kb'] / 1024:.1f} → "
                 f"{r['rss_baseline_peak_kb'] / 1024:.1f} → "
                 f"{r['rss_with_stalled_kb'] / 1024:.1f} → {r['rss_peak_kb'] / 1024:.1f} MiB |",
                 f"| RSS after the last round (settled) | {r['rss_after_kb'] / 1024:.1f} MiB |",
                 f"| RSS growth for the stalled clients (last peak over the higher of the two before) vs "
                 f"stalled × --send-queue-bytes | {r['rss_growth_kb'] / 1024:.2f} MiB vs "
                 f"{r['rss_bound_kb'] / 1024:.2f} MiB |",
                 f"| fast clients: missing deliveries / closed by server / errors | {r['missing_fast']:,} / "
                 f"{r['fast_server_closed']:,} / {r['fast_client_errors'] or 'none'} |"]
    return rows + _problems(results, 2)


def slow_consumers_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r:
        return []
    share = r["rate_while_attached"] / r["baseline_rate"] if r["baseline_rate"] else 0
    return [
        _verdict("#4", f"with {r['stalled']:,} clients that never read, the other {r['fast']:,} receive within 10% "
                       "of their rate without them",
                 f"{share:.0%} ({r['rate_while_attached']:,.0f} vs {r['baseline_rate']:,.0f} deliveries/s); "
                 f"{r['missing_fast']} fast deliveries missing", share >= 0.9 and r["missing_fast"] == 0),
        _verdict("#4", "memory bounded, ≈ stalled × --send-queue-bytes at worst (judged: growth ≤ "
                       f"{SLOW_RSS_SLACK:g}× that), every stalled client closed and counted",
                 f"+{r['rss_growth_kb'] / 1024:.2f} MiB = {r['rss_growth_kb'] / r['rss_bound_kb']:.2f}× "
                 f"{r['rss_bound_kb'] / 1024:.2f} MiB; {r['slow_consumers_total']:,.0f} of {r['stalled']:,} "
                 "dropped as slow consumers",
                 r["rss_growth_kb"] <= SLOW_RSS_SLACK * r["rss_bound_kb"]
                 and r["slow_consumers_total"] >= r["stalled"]),
    ]
