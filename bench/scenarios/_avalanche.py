"""A reconnect avalanche: more clients than mailpush's --max-connections
connect at once (issue #4: the server never exceeds its limits, every
client upgrades or is refused within 1 s, RSS per connection stays within
MEMORY_BUDGET_KB, and /healthz keeps answering).
"""

from __future__ import annotations

import time

from probes import HealthProbe, MetricsProbe, RssProbe, metrics_now
from servers import HOST, ServerSpec

from ._common import MEMORY_BUDGET_KB, Context, _check_alive, _fmt, _kb, _ok, _pct, _problems, _verdict, settle_rss

# Avalanche: mailpush's handshake slots (its default, passed explicitly so
# the limit judged is the one in force); the load balancer's health check
# every 20 ms, each allowed 2 s; what /metrics is scraped for; the
# time-to-outcome histogram's bins (the last one: beyond).
MAILPUSH_MAX_HANDSHAKES = 256
HEALTH_PERIOD_S = 0.02
HEALTH_TIMEOUT_S = 2.0
AVALANCHE_GAUGES = ("mailpush_sockets", "mailpush_connections", "mailpush_handshakes_in_progress")
AVALANCHE_COUNTERS = ("mailpush_accept_pauses_total", 'mailpush_rejections_total{reason="full"}',
                      'mailpush_rejections_total{reason="timeout"}', 'mailpush_rejections_total{reason="overloaded"}',
                      "mailpush_upgrades_total")
AVALANCHE_HIST_STEP_S = 0.25
AVALANCHE_HIST_BINS = 24


def _outcome_kind(reason: str) -> str:
    if reason.startswith("status: HTTP/1.1 503") or reason.startswith("status: HTTP/1.0 503"):
        return "503"
    if reason.startswith("status:"):
        return "other status"
    if reason in ("timeout", "not started"):
        return "timeout"
    if ("refused or reset" in reason or "ECONNRESET" in reason or "ECONNREFUSED" in reason
            or "EPIPE" in reason or reason.startswith("eof")):
        return "reset/refused"
    return "other"


def _dist_ms(values_ns) -> dict:
    srt = sorted(values_ns)
    return {"count": len(srt), "p50_ms": _pct(srt, 0.5) / 1e6 if srt else None,
            "p99_ms": _pct(srt, 0.99) / 1e6 if srt else None, "max_ms": srt[-1] / 1e6 if srt else None}


def avalanche(ctx: Context, spec: ServerSpec) -> dict:
    """A reconnect avalanche: more clients than mailpush's
    ``--max-connections`` connect at once (the load generator starts every
    connect without a window, reading the answers that have arrived after
    each 64), each recording its outcome and the time
    from connect to it: upgraded (and subscribed), 503, reset/refused, or
    no answer before the deadline. Meanwhile one thread reads the server's
    RSS every 5 ms, one scrapes ``/metrics`` every 50 ms (sockets,
    connections, handshakes in progress), and one plays the load balancer:
    a fresh ``GET /healthz`` on the listen port every 20 ms."""
    p = ctx.profile
    n, limit = p.avalanche_clients, p.avalanche_limit
    args = ["--max-connections", str(limit), "--max-handshakes", str(MAILPUSH_MAX_HANDSHAKES)]
    with ctx.server(spec, "avalanche", args) as srv, ctx.loadgen(srv, n) as lg:
        base = settle_rss(srv, p.settle_max_s)
        before = metrics_now(HOST, srv.aport)
        with RssProbe(srv.pids(), period=0.005) as rss, \
                MetricsProbe(HOST, srv.aport, AVALANCHE_GAUGES, period=0.05) as mets, \
                HealthProbe(HOST, srv.port, period=HEALTH_PERIOD_S, timeout=HEALTH_TIMEOUT_S) as health, \
                HealthProbe(HOST, srv.aport, period=HEALTH_PERIOD_S, timeout=HEALTH_TIMEOUT_S,
                            source="127.0.250.2") as admin_health:
            time.sleep(0.3)  # a few health checks before
            t0 = time.monotonic_ns()
            opened = lg.open(n, window=n, timeout=p.avalanche_timeout_s)
            t1 = time.monotonic_ns()
            time.sleep(0.5)  # and after
        _check_alive(srv)
        settled = settle_rss(srv, p.settle_max_s)
        after = metrics_now(HOST, srv.aport)
        stats = lg.stats()
    outcomes: dict[str, list[int]] = {"upgrade": list(lg.last_setup_ns)}
    for reason, times in lg.last_fail_ns.items():
        outcomes.setdefault(_outcome_kind(reason), []).extend(times)
    answered = [t for kind, ts in outcomes.items() if kind != "timeout" for t in ts]
    all_times = [t for ts in outcomes.values() for t in ts]
    in_1s = sum(1 for t in answered if t <= 1e9)
    during = [s for s in health.samples if t0 <= s[0] <= t1]
    h_lat = sorted(s[1] for s in during)
    h_out: dict[str, int] = {}
    for s in during:
        h_out[s[2]] = h_out.get(s[2], 0) + 1
    a_during = [s for s in admin_health.samples if t0 <= s[0] <= t1]
    a_lat = sorted(s[1] for s in a_during)
    a_out: dict[str, int] = {}
    for s in a_during:
        a_out[s[2]] = a_out.get(s[2], 0) + 1
    open_conns = after.get("mailpush_connections", 0)
    hist_edges = [i * AVALANCHE_HIST_STEP_S for i in range(AVALANCHE_HIST_BINS + 1)]
    hist = {}
    for kind, ts in outcomes.items():
        counts = [0] * (AVALANCHE_HIST_BINS + 1)  # the last bin: beyond the edges
        for t in ts:
            counts[min(AVALANCHE_HIST_BINS, int(t / 1e9 / AVALANCHE_HIST_STEP_S))] += 1
        hist[kind] = counts
    res = {
        "clients": n, "limit": limit, "max_handshakes": MAILPUSH_MAX_HANDSHAKES,
        "seconds": (t1 - t0) / 1e9, "connects_seconds": opened["connects_seconds"],
        "opened": opened["ok"], "errors": opened["errors"],
        "outcomes": {k: _dist_ms(v) for k, v in outcomes.items()},
        "answered_within_1s": in_1s, "answered": len(answered), "all": len(all_times),
        "outcome_hist": {"step_s": AVALANCHE_HIST_STEP_S, "edges_s": hist_edges, "counts": hist},
        "peak": {name: mets.peak(name) for name in AVALANCHE_GAUGES},
        "metrics_samples": len(mets.samples), "metrics_failures": mets.failures,
        "final": {k: after.get(k) for k in AVALANCHE_COUNTERS + AVALANCHE_GAUGES},
        "before": {k: before.get(k) for k in AVALANCHE_COUNTERS},
        "client_open_after": stats["open"],
        "rss_baseline_kb": base, "rss_peak_kb": rss.peak(t0), "rss_settled_kb": settled,
        "kb_per_conn_settled": (settled - base) / open_conns if open_conns else None,
        "kb_per_conn_peak": (rss.peak(t0) - base) / open_conns if open_conns else None,
        "health": {"checks": len(during), "outcomes": h_out,
                   "p50_ms": _pct(h_lat, 0.5), "p99_ms": _pct(h_lat, 0.99),
                   "max_ms": h_lat[-1] if h_lat else None, "period_ms": HEALTH_PERIOD_S * 1e3,
                   "timeout_ms": HEALTH_TIMEOUT_S * 1e3,
                   "timeline": [((t - t0) / 1e6, lat, o) for t, lat, o in health.samples]},
        # The same check on the admin port (loopback only: not the load
        # balancer's, but the same event loop without the accept backlog).
        "admin_health": {"checks": len(a_during), "outcomes": a_out, "p50_ms": _pct(a_lat, 0.5),
                         "p99_ms": _pct(a_lat, 0.99), "max_ms": a_lat[-1] if a_lat else None},
    }
    ctx.log(f"  {spec.name}: {n:,} clients in {res['seconds']:.2f} s (connects over {res['connects_seconds']:.2f} s): "
            + ", ".join(f"{k} {v['count']:,}" for k, v in res["outcomes"].items())
            + f"; answered within 1 s {in_1s:,}/{n:,}; peak sockets {res['peak'].get('mailpush_sockets')}; "
              f"healthz p99 {res['health']['p99_ms']:.1f} ms {h_out}")
    return res


def avalanche_table(results: dict) -> list[str]:
    rows = []
    for r in _ok(results).values():
        head = ["outcome", "clients", "time to outcome p50 ms", "p99 ms", "max ms"]
        rows += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for kind, d in r["outcomes"].items():
            rows.append(f"| {kind} | {d['count']:,} | {_fmt(d['p50_ms'], '.1f')} | {_fmt(d['p99_ms'], '.1f')} | "
                        f"{_fmt(d['max_ms'], '.1f')} |")
        pk, fin, h = r["peak"], r["final"], r["health"]
        rej = {k.split('"')[1]: v for k, v in fin.items() if k.startswith("mailpush_rejections_total") and v}
        rows += ["", "| measure | value |", "|---|---|",
                 f"| clients / --max-connections / handshake slots | {r['clients']:,} / {r['limit']:,} / "
                 f"{r['max_handshakes']:,} |",
                 f"| avalanche took (first connect → last outcome) | {r['seconds']:.2f} s |",
                 f"| connects started over (the load generator's pace) | {r['connects_seconds']:.2f} s = "
                 f"{r['clients'] / max(r['connects_seconds'], 1e-9):,.0f}/s |",
                 f"| answered (any outcome but timeout) within 1 s | {r['answered_within_1s']:,} of {r['all']:,} |",
                 f"| peak mailpush_sockets / mailpush_connections (sampled every 50 ms) | "
                 f"{_fmt(pk.get('mailpush_sockets'))} / {_fmt(pk.get('mailpush_connections'))} |",
                 f"| peak mailpush_handshakes_in_progress | {_fmt(pk.get('mailpush_handshakes_in_progress'))} |",
                 f"| open after (server / clients) | {_fmt(fin.get('mailpush_connections'))} / "
                 f"{r['client_open_after']:,} |",
                 f"| mailpush_accept_pauses_total | {_fmt(fin.get('mailpush_accept_pauses_total'))} |",
                 f"| mailpush_rejections_total by reason | {rej or '–'} |",
                 f"| RSS baseline → peak → settled | {r['rss_baseline_kb'] / 1024:.1f} → "
                 f"{r['rss_peak_kb'] / 1024:.1f} → {r['rss_settled_kb'] / 1024:.1f} MiB |",
                 f"| RSS per open connection (settled / peak) | {_fmt(r['kb_per_conn_settled'], '.2f')} / "
                 f"{_fmt(r['kb_per_conn_peak'], '.2f')} KiB |",
                 f"| /healthz on the listen port during the avalanche: checks, p50 / p99 / max | "
                 f"{h['checks']:,}, {_fmt(h['p50_ms'], '.1f')} / {_fmt(h['p99_ms'], '.1f')} / "
                 f"{_fmt(h['max_ms'], '.1f')} ms |",
                 f"| /healthz answers | {h['outcomes']} |",
                 f"| for comparison, /healthz on the admin port: checks, p50 / p99 / max, answers | "
                 f"{r['admin_health']['checks']:,}, {_fmt(r['admin_health']['p50_ms'], '.1f')} / "
                 f"{_fmt(r['admin_health']['p99_ms'], '.1f')} / {_fmt(r['admin_health']['max_ms'], '.1f')} ms, "
                 f"{r['admin_health']['outcomes']} |"]
    return rows + _problems(results, 5)


def avalanche_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r:
        return []
    pk, fin, h = r["peak"], r["final"], r["health"]
    socks = max(v for v in (pk.get("mailpush_sockets"), fin.get("mailpush_sockets"), 0) if v is not None)
    conns = max(v for v in (pk.get("mailpush_connections"), fin.get("mailpush_connections"), 0) if v is not None)
    hs = pk.get("mailpush_handshakes_in_progress") or 0
    limits_ok = socks <= r["limit"] and conns <= r["limit"] and r["client_open_after"] <= r["limit"] \
        and hs <= r["max_handshakes"]
    slow = r["all"] - r["answered_within_1s"]
    worst = max((d["max_ms"] or 0) for d in r["outcomes"].values())
    no_answer = sum(v for k, v in h["outcomes"].items() if not k.isdigit())
    budget_ok = r["kb_per_conn_settled"] is not None and _kb(r["kb_per_conn_settled"]) <= MEMORY_BUDGET_KB
    return [
        _verdict("#4", "the server never exceeds its limits (sockets and connections ≤ --max-connections, "
                       "handshakes ≤ --max-handshakes)",
                 f"peak sockets {socks:,.0f}, connections {conns:,.0f} (limit {r['limit']:,}); "
                 f"handshakes {hs:,.0f} (limit {r['max_handshakes']})", limits_ok),
        _verdict("#4", f"every one of {r['clients']:,} clients upgrades or gets a 503/refusal within 1 s",
                 f"{r['answered_within_1s']:,} did; {slow:,} took longer or got no answer "
                 f"(slowest {worst / 1e3:.2f} s)",
                 slow == 0),
        _verdict("#4", f"RSS per connection within the {MEMORY_BUDGET_KB} KB budget",
                 f"{_kb(r['kb_per_conn_settled'] or 0):.2f} KB settled, "
                 f"{_kb(r['kb_per_conn_peak'] or 0):.2f} KB at the peak",
                 budget_ok),
        _verdict("#4", f"/healthz keeps answering (200 or 503, each within {h['timeout_ms'] / 1e3:g} s; report p99)",
                 f"p99 {_fmt(h['p99_ms'], '.1f')} ms, max {_fmt(h['max_ms'], '.1f')} ms; "
                 f"{no_answer} of {h['checks']} without an answer", no_answer == 0 and h["checks"] > 0),
    ]
