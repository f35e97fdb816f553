"""Fan-out: one event to each of N subscribers (issue #3: at least
FANOUT_SHARE, 60%, of the floor's deliveries/s), and the broadcast of one
prebuilt frame to N tabs of one subscriber (issue #2: at least
BROADCAST_SHARE, 90%, of the floor's). Both run the same rounds
(:func:`_fanout_rounds`) and summarise them the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from loadgen import LoadGen
from servers import Server, ServerError, ServerSpec, cpu_delta

from ._common import (
    Context,
    _check_alive,
    _cpu_fmt,
    _fmt,
    _label,
    _median_or_none,
    _ok,
    _pct_fmt,
    _per_op_us,
    _problems,
    _range_head,
    _ratio,
    _verdict,
    combine_runs,
)

# The issues' targets: issue #3's per-subscriber fan-out and issue #2's
# prebuilt-frame fan-out, each as a share of the floor's deliveries/s.
FANOUT_SHARE = 0.60
BROADCAST_SHARE = 0.90

# Broadcast: the one subscriber every connection belongs to, and the event
# name: both one character, so mailpush's event frame is as small as its
# envelope allows (57 bytes with empty data; the floor's is 42).
BROADCAST_SUB = "b"
BROADCAST_EVENT = "e"


def fanout(ctx: Context, spec: ServerSpec) -> dict:
    """One message to each of N connections, repeated: deliveries per second
    from the moment the trigger is sent to the moment the last client has
    the message. For mailpush the trigger is one publish request with one
    item per subscriber (built before the clock starts)."""
    p = ctx.profile
    with ctx.server(spec, "fanout") as srv, ctx.loadgen(srv, p.fanout_n) as lg:
        opened = lg.open(p.fanout_n, timeout=p.open_timeout_s)
        if opened["ok"] < p.fanout_n:
            raise ServerError(f"only {opened['ok']:,}/{p.fanout_n:,} connections opened: {opened['errors']}")
        subs = list(lg.subscribers)
        time.sleep(ctx.profile.fanout_gap_s)
        rounds = _fanout_rounds(ctx, spec, srv, lg, p.fanout_rounds, lambda k: srv.fanout_body(subs, k))
        stats = lg.stats()
    return _fanout_summary(p.fanout_n, rounds, stats)


def _fanout_rounds(ctx: Context, spec: ServerSpec, srv: Server, lg: LoadGen, count: int,
                   body_of: Callable[[int], bytes], track: bool = False) -> list[dict]:
    """``count`` rounds of: arm the clients, send round k's trigger (built
    before the clock starts), wait until every open connection has its
    message. Per round: deliveries/s from trigger to last receipt, server
    CPU per delivery (total, and user and system seconds apart), trigger
    answer time, frame size."""
    rounds = []
    for k in range(count):
        body = body_of(k)
        per = lg.arm(track)
        expected = sum(per)
        workers = len(srv.pids()) > 1  # --workers: the supervisor's share apart
        root0 = srv.root_cpu_s() if workers else 0.0
        cpu0, w0 = srv.cpu_sample(), time.monotonic()
        t0 = time.monotonic_ns()
        status, answer = srv.trigger_fanout(body)
        t_ans = time.monotonic_ns()
        if status not in (200, 202):
            raise ServerError(f"trigger answered {status}: {answer[:200]!r}")
        w = lg.wait_frames(per, timeout=max(30.0, expected / 1_000))
        d, wall = cpu_delta(cpu0, srv.cpu_sample()), time.monotonic() - w0
        root = srv.root_cpu_s() - root0 if workers else None
        cpu = d["cpu_s"]
        _check_alive(srv)
        secs = (w["last_ns"] - t0) / 1e9 if w["last_ns"] else None
        rnd = {"expected": expected, "delivered": w["frames"],
               "seconds": secs, "rate": w["frames"] / secs if secs else 0.0,
               "first_ms": (w["first_ns"] - t0) / 1e6 if w["first_ns"] else None,
               "answer_ms": (t_ans - t0) / 1e6, "answer": answer[:200].decode("utf-8", "replace"),
               "server_cpu_us_per_delivery": cpu / w["frames"] * 1e6 if w["frames"] else None,
               "server_user_s": d["user_s"], "server_sys_s": d["sys_s"],
               "supervisor_cpu_us_per_delivery": root / w["frames"] * 1e6 if root is not None and w["frames"] else None,
               "server_busy": cpu / wall if wall else None,
               "frame_bytes": w["frame_len"], "trigger_bytes": len(body)}
        if track:
            rnd["connections_with_message"] = w["with_frames"]
        rounds.append(rnd)
        ctx.log(f"  {spec.name} round {k + 1}: {w['frames']:,}/{expected:,} in "
                f"{(secs or 0) * 1e3:.1f} ms = {rnd['rate']:,.0f}/s")
        time.sleep(ctx.profile.fanout_gap_s)
    return rounds


def _fanout_summary(n: int, rounds: list[dict], stats: dict) -> dict:
    """Medians of the rounds; server user and system µs per delivery over
    all rounds together (their ticks summed, see _per_op_us)."""
    rates = [r["rate"] for r in rounds]
    return {"n": n, "rounds": rounds, "rate_median": statistics.median(rates),
            "rate_min": min(rates), "rate_max": max(rates),
            "missing": sum(r["expected"] - r["delivered"] for r in rounds),
            "first_ms_median": _median_or_none(r["first_ms"] for r in rounds),
            "server_cpu_us_per_delivery": _median_or_none(r["server_cpu_us_per_delivery"] for r in rounds),
            "supervisor_cpu_us_per_delivery": _median_or_none(r.get("supervisor_cpu_us_per_delivery") for r in rounds),
            "server_user_us_per_delivery": _per_op_us(rounds, "server_user_s", "delivered"),
            "server_sys_us_per_delivery": _per_op_us(rounds, "server_sys_s", "delivered"),
            "server_busy": _median_or_none(r["server_busy"] for r in rounds),
            "answer_ms_median": _median_or_none(r["answer_ms"] for r in rounds),
            "answer_ms_max": max(r["answer_ms"] for r in rounds),
            "frame_bytes": max(r["frame_bytes"] for r in rounds),
            "client_stats": stats}


def fanout_combine(results: list[dict]) -> dict:
    """``--repeat``: the median of the runs' numbers, rates' min–max over
    the runs, missing deliveries summed."""
    return combine_runs(results, "rate_median", sums=("missing",))


def broadcast_combine(results: list[dict]) -> dict:
    out = fanout_combine(results)
    if len(results) > 1:
        out["every_connection_served"] = all(r["every_connection_served"] for r in results)
    return out


def fanout_table(results: dict) -> list[str]:
    ok = _ok(results)
    mp = ok.get("mailpush", {}).get("rate_median")
    fl = ok.get("floor", {}).get("rate_median")
    head = ["server", "connections", "deliveries/s (median)", _range_head(ok), "trigger→first ms",
            "trigger answered ms (median / max)", "server CPU µs/delivery", "user / sys µs/delivery",
            "server busy", "frame bytes", "missing", "× mailpush", "× floor"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        rows.append("| " + " | ".join([
            _label(name), _fmt(r["n"]), _fmt(r["rate_median"]),
            f"{_fmt(r['rate_min'])}–{_fmt(r['rate_max'])}", _fmt(r["first_ms_median"], ".1f"),
            f"{_fmt(r.get('answer_ms_median'), '.1f')} / {_fmt(r.get('answer_ms_max'), '.1f')}",
            _fmt(r["server_cpu_us_per_delivery"], ".1f"),
            _cpu_fmt(r, "server_user_us_per_delivery", "server_sys_us_per_delivery"),
            _pct_fmt(r.get("server_busy")), _fmt(r["frame_bytes"]), _fmt(r["missing"]),
            _ratio(r["rate_median"], mp), _ratio(r["rate_median"], fl)]) + " |")
    return rows + _problems(results, len(head))


def fanout_verdicts(results: dict) -> list[dict]:
    ok = _ok(results)
    mp, fl = ok.get("mailpush"), ok.get("floor")
    if not mp or not fl:
        return []
    share = mp["rate_median"] / fl["rate_median"]
    return [_verdict("#3", f"one event to each of {mp['n']:,} subscribers ≥ {FANOUT_SHARE:.0%} of the floor",
                     f"{share:.0%} ({mp['rate_median']:,.0f} vs {fl['rate_median']:,.0f} deliveries/s)",
                     share >= FANOUT_SHARE)]


# -- broadcast: N tabs of one subscriber --------------------------------------------------


def broadcast(ctx: Context, spec: ServerSpec) -> dict:
    """Fan-out of one prebuilt frame: every connection belongs to ONE
    subscriber (the load generator mints all tokens with the same ``sub``),
    and each round is one publish item with empty data, so mailpush builds
    one small event frame and sends the same bytes to every tab. The floor
    sends its prebuilt 40-byte message to every connection. Deliveries/s
    from the trigger to the last client's receipt, median of the rounds."""
    p = ctx.profile
    n = p.broadcast_n
    body = (b'{"subscriber":"%s","event":"%s","data":{}}' % (BROADCAST_SUB.encode(), BROADCAST_EVENT.encode())
            if spec.kind == "mailpush" else b"")
    with ctx.server(spec, "broadcast") as srv, ctx.loadgen(srv, n, sub=BROADCAST_SUB) as lg:
        opened = lg.open(n, timeout=p.open_timeout_s)
        if opened["ok"] < n:
            raise ServerError(f"only {opened['ok']:,}/{n:,} connections opened: {opened['errors']}")
        time.sleep(ctx.profile.fanout_gap_s)
        rounds = _fanout_rounds(ctx, spec, srv, lg, p.broadcast_rounds, lambda k: body, track=True)
        stats = lg.stats()
    out = _fanout_summary(n, rounds, stats)
    out["subscribers"] = 1 if spec.kind == "mailpush" else None
    out["every_connection_served"] = all(r.get("connections_with_message") == r["expected"] for r in rounds)
    return out


def broadcast_table(results: dict) -> list[str]:
    ok = _ok(results)
    fl = ok.get("floor", {}).get("rate_median")
    head = ["server", "connections", "subscribers", "deliveries/s (median)", _range_head(ok), "trigger→first ms",
            "server CPU µs/delivery", "user / sys µs/delivery", "server busy", "frame bytes", "missing", "× floor"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        rows.append("| " + " | ".join([
            _label(name), _fmt(r["n"]), _fmt(r.get("subscribers")), _fmt(r["rate_median"]),
            f"{_fmt(r['rate_min'])}–{_fmt(r['rate_max'])}", _fmt(r["first_ms_median"], ".1f"),
            _fmt(r["server_cpu_us_per_delivery"], ".1f"),
            _cpu_fmt(r, "server_user_us_per_delivery", "server_sys_us_per_delivery"),
            _pct_fmt(r.get("server_busy")), _fmt(r["frame_bytes"]), _fmt(r["missing"]),
            _ratio(r["rate_median"], fl)]) + " |")
    return rows + _problems(results, len(head))


def broadcast_verdicts(results: dict) -> list[dict]:
    ok = _ok(results)
    mp, fl = ok.get("mailpush"), ok.get("floor")
    if not mp or not fl:
        return []
    share = mp["rate_median"] / fl["rate_median"]
    return [_verdict("#2", f"fan-out of a prebuilt frame to {mp['n']:,} connections "
                           f"≥ {BROADCAST_SHARE:.0%} of the floor",
                     f"{share:.0%} ({mp['rate_median']:,.0f} vs {fl['rate_median']:,.0f} deliveries/s; "
                     f"frames {mp['frame_bytes']} vs {fl['frame_bytes']} bytes)", share >= BROADCAST_SHARE)]
