"""Upgrade rate: connections per second until N are open and subscribed
(issues #2 and #3: at least UPGRADE_TARGET, 3,500/s, token check and
subscribe included, in one process).
"""

from __future__ import annotations

import statistics
import time

from servers import ServerSpec, cpu_delta

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

# Issue #2/#3's target: upgrades/s, one process.
UPGRADE_TARGET = 3_500


def upgrade(ctx: Context, spec: ServerSpec) -> dict:
    """Connections per second until N are open and subscribed (connect,
    upgrade, subscribe, answer), from the first connect to the last answer;
    repeated on the same server after closing them all; the median counts.
    Server CPU per upgrade: the total (scheduler time) per run, median of
    the runs; user and system time apart (clock ticks), summed over the
    runs and divided by all their upgrades."""
    p = ctx.profile
    runs = []
    with ctx.server(spec, "upgrade") as srv, ctx.loadgen(srv, p.upgrade_n) as lg:
        for k in range(p.upgrade_repeats):
            cpu0, w0 = srv.cpu_sample(), time.monotonic()
            r = lg.open(p.upgrade_n, timeout=p.open_timeout_s)
            d, wall = cpu_delta(cpu0, srv.cpu_sample()), time.monotonic() - w0
            cpu = d["cpu_s"]
            _check_alive(srv)
            r["server_cpu_us_per_upgrade"] = cpu / r["ok"] * 1e6 if r["ok"] else None
            r["server_user_s"], r["server_sys_s"] = d["user_s"], d["sys_s"]
            r["server_user_us_per_upgrade"] = d["user_s"] / r["ok"] * 1e6 if r["ok"] else None
            r["server_sys_us_per_upgrade"] = d["sys_s"] / r["ok"] * 1e6 if r["ok"] else None
            # Share of one core the server used while the clients opened: near
            # 100% means the rate is the server's CPU cost, well below means
            # it waited for something (limits, timers, the clients).
            r["server_busy"] = cpu / wall if wall else None
            runs.append(r)
            ctx.log(f"  {spec.name}: {r['ok']:,}/{p.upgrade_n:,} in {r['seconds']:.2f} s = "
                    f"{r['rate']:,.0f}/s, failed {r['failed']} {r['errors'] or ''}")
            lg.close_all()
            if k + 1 < p.upgrade_repeats:
                time.sleep(1.0)  # let the server reap the closed connections
    rates = [r["rate"] for r in runs]
    return {"n": p.upgrade_n, "runs": runs, "rate_median": statistics.median(rates),
            "rate_min": min(rates), "rate_max": max(rates),
            "ok_min": min(r["ok"] for r in runs), "failed": sum(r["failed"] for r in runs),
            "setup_ms_p50": statistics.median(r["setup_ms_p50"] for r in runs),
            "setup_ms_p99": statistics.median(r["setup_ms_p99"] for r in runs),
            "server_cpu_us_per_upgrade": _median_or_none(r["server_cpu_us_per_upgrade"] for r in runs),
            "server_user_us_per_upgrade": _per_op_us(runs, "server_user_s", "ok"),
            "server_sys_us_per_upgrade": _per_op_us(runs, "server_sys_s", "ok"),
            "server_busy": _median_or_none(r["server_busy"] for r in runs)}


def upgrade_combine(results: list[dict]) -> dict:
    """``--repeat``: the median of the runs' numbers, rates' min–max over the runs."""
    return combine_runs(results, "rate_median", sums=("failed",), min_of=("ok_min",))


def upgrade_table(results: dict) -> list[str]:
    ok = _ok(results)
    mp = ok.get("mailpush", {}).get("rate_median")
    fl = ok.get("floor", {}).get("rate_median")
    head = ["server", "connections", "upgrades/s (median)", _range_head(ok), "setup p50 ms", "setup p99 ms",
            "server CPU µs/upgrade", "user / sys µs/upgrade", "server busy", "failed", "× mailpush", "× floor"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        rows.append("| " + " | ".join([
            _label(name), _fmt(r["n"]), _fmt(r["rate_median"]),
            f"{_fmt(r['rate_min'])}–{_fmt(r['rate_max'])}",
            _fmt(r["setup_ms_p50"], ".1f"), _fmt(r["setup_ms_p99"], ".1f"),
            _fmt(r["server_cpu_us_per_upgrade"]),
            _cpu_fmt(r, "server_user_us_per_upgrade", "server_sys_us_per_upgrade"),
            _pct_fmt(r.get("server_busy")), _fmt(r["failed"]),
            _ratio(r["rate_median"], mp), _ratio(r["rate_median"], fl)]) + " |")
    return rows + _problems(results, len(head))


def upgrade_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r:
        return []
    return [_verdict("#2, #3", f"upgrades (token check + subscribe) ≥ {UPGRADE_TARGET:,}/s, one process",
                     f"{r['rate_median']:,.0f}/s (median of {len(r['runs'])}, {r['n']:,} connections)",
                     r["rate_median"] >= UPGRADE_TARGET)]
