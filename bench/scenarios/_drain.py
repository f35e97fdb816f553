"""Graceful drain: SIGTERM with N connections open (issue #4: the 1012
closes spread evenly over --drain-seconds, exit code 0, and exit within
the drain time plus a small margin, DRAIN_EXIT_MARGIN_S).
"""

from __future__ import annotations

import os
import re
import select
import signal
import statistics
import time

from servers import ServerError, ServerSpec

from ._common import Context, _fmt, _ok, _pct, _problems, _verdict, settle_rss

# Drain: histogram bins over the window; the "small margin" on exit
# (mailpush's drain promises window + 1 s, plus interpreter shutdown); how
# much longer the bench waits before giving up; what counts as spread
# evenly (every tenth of the window between these multiples of n/10).
DRAIN_BINS = 10
DRAIN_EXIT_MARGIN_S = 1.5
DRAIN_WAIT_EXTRA_S = 10.0
DRAIN_EVEN_LOW = 0.5
DRAIN_EVEN_HIGH = 1.5
# A Close frame received this little after the window's end was sent at
# its end (the last one is due at (n-1)/n of it; loopback and the client's
# loop add a few ms).
DRAIN_EDGE_S = 0.1

# The suggested delay in the reason: "reconnect_after_ms=N" (and, from
# servers before it, "reconnect in N s").
_DELAY_RE = re.compile(rb"reconnect_after_ms=(\d+)|(\d+(?:\.\d+)?)\s*s")


def drain(ctx: Context, spec: ServerSpec) -> dict:
    """Graceful drain: N connections open, SIGTERM, mailpush started with
    ``--drain-seconds D``. Every client records when its Close frame came
    (relative to the signal), its code and the reconnect delay the reason
    suggests; the histogram shows how the closes (and so the reconnects)
    spread over the window. The process's exit code and the time from the
    signal to its exit come from a pidfd."""
    p = ctx.profile
    n, window = p.drain_n, p.drain_seconds
    args = ["--drain-seconds", f"{window:g}"]
    with ctx.server(spec, "drain", args) as srv, ctx.loadgen(srv, n) as lg:
        opened = lg.open(n, timeout=p.open_timeout_s)
        if opened["ok"] < n:
            raise ServerError(f"only {opened['ok']:,}/{n:,} connections opened: {opened['errors']}")
        settle_rss(srv, p.settle_max_s)
        lg.closes()  # forget anything before the signal
        pidfd = os.pidfd_open(srv.proc.pid)
        try:
            t_sig = time.monotonic_ns()
            srv.proc.send_signal(signal.SIGTERM)
            limit = window + DRAIN_EXIT_MARGIN_S + DRAIN_WAIT_EXTRA_S
            ready, _, _ = select.select([pidfd], [], [], limit)
            t_exit = time.monotonic_ns() if ready else None
        finally:
            os.close(pidfd)
        code = srv.proc.wait(5) if t_exit is not None else None
        deadline = time.monotonic() + 5
        while lg.stats()["open"] and time.monotonic() < deadline:
            time.sleep(0.1)
        closes = lg.closes()
        stats = lg.stats()
    times = sorted((t - t_sig) / 1e9 for t, _, _ in closes)
    codes: dict[str, int] = {}
    delays = []
    reconnects = []
    for t, c, reason in closes:
        codes[str(c)] = codes.get(str(c), 0) + 1
        m = _DELAY_RE.search(reason)
        if m:
            d = int(m.group(1)) / 1000 if m.group(1) else float(m.group(2))
            delays.append(d)
            reconnects.append((t - t_sig) / 1e9 + d)
    step = window / DRAIN_BINS
    bins = [0] * DRAIN_BINS
    before = after = 0
    for x in times:
        if x < 0:
            before += 1
        elif x >= window + DRAIN_EDGE_S:
            after += 1
        else:  # the close issued at the very end of the window counts in its last tenth
            bins[min(DRAIN_BINS - 1, int(x / step))] += 1
    rstep = 2 * window / DRAIN_BINS
    rbins = [0] * (DRAIN_BINS + 1)
    for x in reconnects:
        rbins[min(DRAIN_BINS, int(x / rstep))] += 1
    sample_reason = next((r.decode("utf-8", "replace") for _, _, r in closes if r), "")
    res = {"n": n, "drain_seconds": window, "exit_code": code,
           "exit_seconds": (t_exit - t_sig) / 1e9 if t_exit else None,
           "exit_limit_s": window + DRAIN_EXIT_MARGIN_S,
           "closes": len(closes), "codes": codes, "sample_reason": sample_reason,
           "first_close_s": times[0] if times else None, "last_close_s": times[-1] if times else None,
           "close_p10_s": _pct(times, 0.1), "close_p50_s": _pct(times, 0.5), "close_p90_s": _pct(times, 0.9),
           "hist_step_s": step, "hist": bins, "before_window": before, "after_window": after,
           "delays_with_reason": len(delays),
           "delay_min_s": min(delays, default=None), "delay_max_s": max(delays, default=None),
           "delay_median_s": statistics.median(delays) if delays else None,
           "reconnect_hist_step_s": rstep, "reconnect_hist": rbins,
           "client_open_after": stats["open"], "client_errors": stats["errors"]}
    ctx.log(f"  {spec.name}: {len(closes):,}/{n:,} closes {codes}, spread {bins}, "
            f"exit {code} after {(res['exit_seconds'] or float('nan')):.2f} s")
    return res


def drain_table(results: dict) -> list[str]:
    rows = []
    for r in _ok(results).values():
        step = r["hist_step_s"]
        rows += ["| seconds after SIGTERM | "
                 + " | ".join(f"{i * step:g}–{(i + 1) * step:g}" for i in range(len(r["hist"])))
                 + " | later |",
                 "|---|" + "---|" * (len(r["hist"]) + 1),
                 "| Close frames | " + " | ".join(f"{c:,}" for c in r["hist"]) + f" | {r['after_window']:,} |"]
        rstep = r["reconnect_hist_step_s"]
        rows += ["", "| suggested reconnect at (close + delay), s | "
                 + " | ".join(f"{i * rstep:g}–{(i + 1) * rstep:g}" for i in range(len(r["reconnect_hist"]) - 1))
                 + " | later |", "|---|" + "---|" * len(r["reconnect_hist"]),
                 "| clients | " + " | ".join(f"{c:,}" for c in r["reconnect_hist"]) + " |"]
        rows += ["", "| measure | value |", "|---|---|",
                 f"| connections / --drain-seconds | {r['n']:,} / {r['drain_seconds']:g} s |",
                 f"| Close frames received / codes | {r['closes']:,} / {r['codes']} |",
                 f"| first / p10 / p50 / p90 / last close after SIGTERM | {_fmt(r['first_close_s'], '.2f')} / "
                 f"{_fmt(r['close_p10_s'], '.2f')} / {_fmt(r['close_p50_s'], '.2f')} / "
                 f"{_fmt(r['close_p90_s'], '.2f')} / {_fmt(r['last_close_s'], '.2f')} s |",
                 f"| suggested reconnect delay min / median / max (from the reason, e.g. \"{r['sample_reason']}\") | "
                 f"{_fmt(r['delay_min_s'], 'g')} / {_fmt(r['delay_median_s'], 'g')} / "
                 f"{_fmt(r['delay_max_s'], 'g')} s |",
                 f"| exit code / time from SIGTERM to exit | {r['exit_code']} / {_fmt(r['exit_seconds'], '.2f')} s |",
                 f"| clients still open after exit / client errors | {r['client_open_after']:,} / "
                 f"{r['client_errors'] or 'none'} |"]
    return rows + _problems(results, 2)


def drain_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r:
        return []
    even = r["n"] / DRAIN_BINS
    lo, hi = min(r["hist"]), max(r["hist"])
    spread_ok = lo >= DRAIN_EVEN_LOW * even and hi <= DRAIN_EVEN_HIGH * even and r["after_window"] == 0
    return [
        _verdict("#4", f"drain of {r['n']:,} connections over {r['drain_seconds']:g} s: closes (1012) spread over "
                       f"the window, every tenth of it within "
                       f"{DRAIN_EVEN_LOW:.1f}–{DRAIN_EVEN_HIGH:.1f}× an even share",
                 f"{r['codes'].get('1012', 0):,} × 1012; per tenth {lo:,}–{hi:,} (even: {even:,.0f}); "
                 f"{r['after_window']:,} after the window",
                 spread_ok and r["codes"].get("1012", 0) == r["n"]),
        _verdict("#4", "exit code 0", f"{r['exit_code']}", r["exit_code"] == 0),
        _verdict("#4", f"exit within the drain time plus a small margin (≤ {r['exit_limit_s']:g} s)",
                 f"{_fmt(r['exit_seconds'], '.2f')} s",
                 r["exit_seconds"] is not None and r["exit_seconds"] <= r["exit_limit_s"]),
    ]
