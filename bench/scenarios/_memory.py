"""Idle memory per connection (issues #2 and #3: at most
MEMORY_BUDGET_KB, 3.5 KB, of RSS per idle subscribed connection at 15,000),
and the same measurement past one process's file limit with mailpush's
worker processes.
"""

from __future__ import annotations

import statistics

from servers import ServerError, ServerSpec

from ._common import (
    MEMORY_BUDGET_KB,
    Context,
    _check_alive,
    _fmt,
    _kb,
    _label,
    _ok,
    _problems,
    _ratio,
    _verdict,
    combine_runs,
    settle_rss,
)

# Worker processes for the multi-process memory scenario: up to 2 x 18,000
# connections = 36,000 (issue 13), past what one process may hold here.
MULTI_WORKERS = 2


def memory(ctx: Context, spec: ServerSpec) -> dict:
    """RSS per idle connection: open the profile's counts one after the
    other on one server, read VmRSS (summed over the process tree) once it
    settles; per-connection = (RSS - RSS with no connection) / connections,
    plus the least-squares slope over all points (the marginal cost,
    free of fixed start-up allocations)."""
    return _memory(ctx, spec, ctx.profile.memory_points, "memory")


def memory_multi(ctx: Context, spec: ServerSpec) -> dict:
    """Idle memory past one process's 20,000 open files: mailpush with
    several worker processes (RSS summed over all of them), measured the
    same way as the one-process memory scenario."""
    points = ctx.profile.memory_multi_points
    if not points:
        return {"skipped": f"no multi-process points in the {ctx.profile.name} profile"}
    args = ["--workers", str(MULTI_WORKERS)]
    try:
        return _memory(ctx, spec, points, "memory_multi", args)
    except ServerError as e:
        if "--workers" in str(e):  # this mailpush runs one process only
            return {"skipped": f"mailpush refused --workers {MULTI_WORKERS}: " + str(e).splitlines()[-1][:200]}
        raise


def _memory(ctx: Context, spec: ServerSpec, counts: tuple[int, ...], scenario: str,
            args: list[str] | None = None) -> dict:
    p = ctx.profile
    with ctx.server(spec, scenario, args) as srv, ctx.loadgen(srv, max(counts)) as lg:
        base = settle_rss(srv, p.settle_max_s)
        points = []
        for n in counts:
            r = lg.open(n - len(lg.subscribers), timeout=p.open_timeout_s)
            have = len(lg.subscribers)
            rss = settle_rss(srv, p.settle_max_s)
            _check_alive(srv)
            open_now = lg.stats()["open"]
            points.append({"target": n, "connections": have, "still_open": open_now,
                           "rss_kb": rss, "delta_kb": rss - base,
                           "kb_per_conn": (rss - base) / have if have else None,
                           "upgrades_per_s": r["rate"], "failed": r["failed"], "errors": r["errors"]})
            ctx.log(f"  {spec.name}: {have:,} open, RSS {rss / 1024:,.1f} MiB, "
                    f"{(rss - base) / max(have, 1):.2f} KiB/conn")
            if r["failed"]:
                break
        srv_pids = srv.pids()
        xs = [0] + [pt["connections"] for pt in points]
        ys = [base] + [pt["rss_kb"] for pt in points]
        slope = _slope(xs, ys)
    return {"baseline_kb": base, "points": points, "marginal_kb_per_conn": slope,
            "processes": len(srv_pids)}


def memory_combine(results: list[dict]) -> dict:
    """``--repeat``: per connection count, the median of the runs' RSS
    figures (with ``*_min``/``*_max`` over the runs); the marginal cost
    and baseline likewise (combine_runs)."""
    out = combine_runs(results, "marginal_kb_per_conn")
    if len(results) == 1:
        return out
    points = []
    for pt in out["points"]:
        same = [q for r in results for q in r["points"] if q["target"] == pt["target"]]
        p2 = dict(pt)
        for key in ("rss_kb", "delta_kb", "kb_per_conn", "upgrades_per_s"):
            vals = [q[key] for q in same if q.get(key) is not None]
            if vals:
                p2[key] = statistics.median(vals)
                p2[f"{key}_min"], p2[f"{key}_max"] = min(vals), max(vals)
        p2["connections"] = min(q["connections"] for q in same)
        p2["still_open"] = min(q["still_open"] for q in same)
        p2["failed"] = sum(q["failed"] for q in same)
        p2["runs"] = len(same)
        points.append(p2)
    out["points"] = points
    return out


def _slope(xs, ys) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def memory_table(results: dict) -> list[str]:
    ok = _ok(results)
    counts = sorted({pt["target"] for r in ok.values() for pt in r["points"]})
    top = counts[-1] if counts else None

    def at_top(r):
        for pt in r["points"]:
            if pt["target"] == top:
                return pt["kb_per_conn"]
        return None

    mp = at_top(ok["mailpush"]) if "mailpush" in ok else None
    fl = at_top(ok["floor"]) if "floor" in ok else None
    head = (["server", "baseline MiB"] + [f"KiB/conn @ {c:,}" for c in counts]
            + ["marginal KiB/conn", f"× mailpush @ {top:,}" if top else "× mailpush",
               f"× floor @ {top:,}" if top else "× floor"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        by = {pt["target"]: pt for pt in r["points"]}
        cells = [_label(name), _fmt(r["baseline_kb"] / 1024, ".1f")]
        for c in counts:
            pt = by.get(c)
            cell = _fmt(pt["kb_per_conn"], ".2f") if pt else "–"
            if pt and "kb_per_conn_min" in pt:  # --repeat: the runs' spread
                cell += f" ({_fmt(pt['kb_per_conn_min'], '.2f')}–{_fmt(pt['kb_per_conn_max'], '.2f')})"
            cells.append(cell)
        cells += [_fmt(r["marginal_kb_per_conn"], ".2f"), _ratio(at_top(r), mp), _ratio(at_top(r), fl)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows + _problems(results, len(head))


def memory_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r or not r["points"]:
        return []
    pt = r["points"][-1]
    kb = _kb(pt["kb_per_conn"])
    return [_verdict("#2, #3", f"RSS per idle subscribed connection at 15,000 ≤ {MEMORY_BUDGET_KB} KB",
                     f"{kb:.2f} KB at {pt['connections']:,}", kb <= MEMORY_BUDGET_KB
                     if pt["connections"] >= 15_000 else None)]
