"""The scenarios: one function per measurement, and the registry run.py walks.

A scenario is ``fn(ctx, spec) -> dict``: it starts its own server (a fresh
process, so scenarios don't inherit each other's heap), drives it with a
:class:`loadgen.LoadGen`, stops everything, and returns plain JSON-able
numbers. ``table(results)`` turns ``{server: result}`` into a Markdown
table, printed to the console and reused in RESULTS.md.

Adding a scenario (the resource-control ones: reconnect avalanche, publish
burst, slow consumers, drain): write ``fn`` and ``table`` here, add a
:class:`Scenario` to :data:`SCENARIOS` with the servers it applies to, and
its sizes to :class:`Profile`. run.py, the JSON files and RESULTS.md pick it
up from the registry; report.py plots only what it knows.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loadgen import LoadGen, procs_for
from servers import HOST, SECRET, SERVERS, Server, ServerError, ServerSpec

# Path every client asks for: mailpush's endpoint; the reference servers
# upgrade on any path, so all servers parse the same request bytes.
WS_PATH = "/v1/ws"

# Idle memory: after opening connections, RSS is read every SETTLE_STEP_S
# until two readings differ by less than SETTLE_TOLERANCE (allocators and
# lazily-started tasks settle in well under a second), for at most
# Profile.settle_max_s.
SETTLE_STEP_S = 0.25
SETTLE_TOLERANCE = 0.005

# Pause between fan-out rounds so the previous round's ACKs and any
# per-round cleanup are done before the next trigger.
FANOUT_GAP_S = 0.3

# Latency publisher: one publish request per tick carrying rate*tick events
# (10,000 events/s -> 50 per 5 ms request, 1,000/s -> 5). Per-event requests would measure
# the admin HTTP server, not the push path; 5 ms batches keep the added
# queueing inside a batch far below the millisecond scale being measured.
PUBLISH_TICK_S = 0.005

# After the last publish, how long the clients may take to receive the rest.
DRAIN_TIMEOUT_S = 15.0

# Worker processes for the multi-process memory scenario: 2 x 15,000
# connections = 30,000, twice what one process may hold here.
MULTI_WORKERS = 2

# Buses to measure latency on: name -> extra `mailpush serve` arguments.
# The embedded bus is all mailpush has today; add e.g.
# "redis": ["--bus", "redis://127.0.0.1:6379/0"] (and start redis-server
# around the run) when the Redis bus lands.
LATENCY_BUSES: dict[str, list[str]] = {"embedded": []}


@dataclass(frozen=True)
class Profile:
    """Sizes of one kind of run. Every size with the reason for its value."""

    name: str
    # Idle memory at these connection counts (opened one after the other on
    # one server); 15,000 is the most one server process may hold here
    # (20,000 open files per process) with margin.
    memory_points: tuple[int, ...]
    # Idle memory beyond one process's file limit: mailpush with
    # MULTI_WORKERS worker processes at these counts (empty: not in this
    # profile). Skipped while mailpush refuses --workers > 1.
    memory_multi_points: tuple[int, ...]
    # Upgrade rate: open this many as fast as possible, this many times.
    upgrade_n: int
    upgrade_repeats: int
    # Fan-out: one message to each of N subscribers, repeated.
    fanout_n: int
    fanout_rounds: int
    # Latency: subscribers, events per second, measured seconds after warmup.
    latency_connections: int
    latency_rates: tuple[int, ...]
    latency_seconds: float
    latency_warmup_s: float
    # Longest wait for RSS to settle after opening connections.
    settle_max_s: float
    # Client worker processes (at least; more if a count needs them).
    client_procs: int = 2
    # Deadline for opening one batch of connections: the slowest server here
    # opens ~600/s, so 15,000 take 25 s; 120 s means something is wrong.
    open_timeout_s: float = 120.0


PROFILES = {
    # `make bench`: DESIGN.md's 9,000 connections for rates (5 upgrade runs,
    # 20 fan-out rounds, so a median is not one lucky round), memory up to one
    # process's limit, latency for 20 s at 1,000 events/s (the unloaded push
    # path) and at 10,000 events/s (200,000 samples: p99.9 rests on 200).
    # About 6-7 minutes on 2 cores.
    "full": Profile("full", (1_000, 5_000, 10_000, 15_000), (20_000, 30_000), 9_000, 5, 9_000, 20,
                    5_000, (1_000, 10_000), 20.0, 1.0, 5.0),
    # `make bench-quick`: the same shapes at 2,000 connections; 3 s of
    # 10,000 events/s (30,000 samples). About a minute.
    "quick": Profile("quick", (500, 1_000, 2_000), (), 2_000, 2, 2_000, 5,
                     1_000, (10_000,), 3.0, 0.5, 3.0),
    # The smoke test: 50 connections per server, everything once, seconds.
    "tiny": Profile("tiny", (50,), (), 50, 1, 50, 3, 50, (500,), 1.0, 0.2, 1.0,
                    client_procs=1, open_timeout_s=30.0),
}


@dataclass
class Context:
    profile: Profile
    out: Path                 # where JSON, plots and logs go
    log: Callable[[str], None] = print

    def server(self, spec: ServerSpec, scenario: str, extra_args: list[str] | None = None) -> Server:
        return Server(spec, self.out / "logs" / f"{scenario}-{spec.name}.log", extra_args)

    def loadgen(self, srv: Server, n: int) -> LoadGen:
        return LoadGen(HOST, srv.port, WS_PATH, SECRET,
                       procs=procs_for(n, self.profile.client_procs), subscribe=True)


@dataclass
class Scenario:
    name: str
    title: str
    fn: Callable[[Context, ServerSpec], dict]
    table: Callable[[dict], list[str]]
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    doc: str = ""


# -- helpers --------------------------------------------------------------------


def settle_rss(srv: Server, max_s: float) -> int:
    deadline = time.monotonic() + max_s
    prev = srv.rss_kb()
    while time.monotonic() < deadline:
        time.sleep(SETTLE_STEP_S)
        cur = srv.rss_kb()
        if abs(cur - prev) <= SETTLE_TOLERANCE * max(prev, 1):
            return cur
        prev = cur
    return prev


def _check_alive(srv: Server):
    if not srv.alive():
        raise ServerError(f"{srv.spec.name} died; log: {srv.log_tail()}")


def _pct(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _fmt(v, spec: str = ",.0f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return format(v, spec)


def _pct_fmt(v) -> str:
    return "–" if v is None else f"{v * 100:.0f}%"


def _ratio(v, ref) -> str:
    if not v or not ref:
        return "–"
    return f"{v / ref:.2f}×"


def _ok(results: dict) -> dict:
    return {k: v for k, v in results.items() if "error" not in v and "skipped" not in v}


def _problems(results: dict, ncols: int) -> list[str]:
    rows = []
    for name, r in results.items():
        why = r.get("error") or r.get("skipped")
        if why:
            label = SERVERS[name].label if name in SERVERS else name
            kind = "error" if "error" in r else "skipped"
            rows.append(f"| {label} | {kind}: {why.splitlines()[0][:160]} |" + " |" * (ncols - 2))
    return rows


def _label(name: str) -> str:
    return SERVERS[name].label if name in SERVERS else name


# -- idle memory ------------------------------------------------------------------


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


def _slope(xs, ys) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


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
            cells.append(_fmt(pt["kb_per_conn"], ".2f") if pt else "–")
        cells += [_fmt(r["marginal_kb_per_conn"], ".2f"), _ratio(at_top(r), mp), _ratio(at_top(r), fl)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows + _problems(results, len(head))


# -- upgrade rate -------------------------------------------------------------------


def upgrade(ctx: Context, spec: ServerSpec) -> dict:
    """Connections per second until N are open and subscribed (connect,
    upgrade, subscribe, answer), from the first connect to the last answer;
    repeated on the same server after closing them all; the median counts."""
    p = ctx.profile
    runs = []
    with ctx.server(spec, "upgrade") as srv, ctx.loadgen(srv, p.upgrade_n) as lg:
        for k in range(p.upgrade_repeats):
            cpu0, w0 = srv.cpu_s(), time.monotonic()
            r = lg.open(p.upgrade_n, timeout=p.open_timeout_s)
            cpu, wall = srv.cpu_s() - cpu0, time.monotonic() - w0
            _check_alive(srv)
            r["server_cpu_us_per_upgrade"] = cpu / r["ok"] * 1e6 if r["ok"] else None
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
            "server_busy": _median_or_none(r["server_busy"] for r in runs)}


def _median_or_none(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def upgrade_table(results: dict) -> list[str]:
    ok = _ok(results)
    mp = ok.get("mailpush", {}).get("rate_median")
    fl = ok.get("floor", {}).get("rate_median")
    head = ["server", "connections", "upgrades/s (median)", "min–max", "setup p50 ms", "setup p99 ms",
            "server CPU µs/upgrade", "server busy", "failed", "× mailpush", "× floor"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        rows.append("| " + " | ".join([
            _label(name), _fmt(r["n"]), _fmt(r["rate_median"]),
            f"{_fmt(r['rate_min'])}–{_fmt(r['rate_max'])}",
            _fmt(r["setup_ms_p50"], ".1f"), _fmt(r["setup_ms_p99"], ".1f"),
            _fmt(r["server_cpu_us_per_upgrade"]), _pct_fmt(r.get("server_busy")), _fmt(r["failed"]),
            _ratio(r["rate_median"], mp), _ratio(r["rate_median"], fl)]) + " |")
    return rows + _problems(results, len(head))


# -- fan-out ------------------------------------------------------------------------


def fanout(ctx: Context, spec: ServerSpec) -> dict:
    """One message to each of N connections, repeated: deliveries per second
    from the moment the trigger is sent to the moment the last client has
    the message. For mailpush the trigger is one publish request with one
    item per subscriber (built before the clock starts)."""
    p = ctx.profile
    rounds = []
    with ctx.server(spec, "fanout") as srv, ctx.loadgen(srv, p.fanout_n) as lg:
        opened = lg.open(p.fanout_n, timeout=p.open_timeout_s)
        if opened["ok"] < p.fanout_n:
            raise ServerError(f"only {opened['ok']:,}/{p.fanout_n:,} connections opened: {opened['errors']}")
        subs = list(lg.subscribers)
        time.sleep(FANOUT_GAP_S)
        for k in range(p.fanout_rounds):
            body = srv.fanout_body(subs, k)
            per = lg.arm()
            expected = sum(per)
            cpu0, w0 = srv.cpu_s(), time.monotonic()
            t0 = time.monotonic_ns()
            status, answer = srv.trigger_fanout(body)
            t_ans = time.monotonic_ns()
            if status not in (200, 202):
                raise ServerError(f"trigger answered {status}: {answer[:200]!r}")
            w = lg.wait_frames(per, timeout=max(30.0, expected / 1_000))
            cpu, wall = srv.cpu_s() - cpu0, time.monotonic() - w0
            _check_alive(srv)
            secs = (w["last_ns"] - t0) / 1e9 if w["last_ns"] else None
            rnd = {"expected": expected, "delivered": w["frames"],
                   "seconds": secs, "rate": w["frames"] / secs if secs else 0.0,
                   "first_ms": (w["first_ns"] - t0) / 1e6 if w["first_ns"] else None,
                   "answer_ms": (t_ans - t0) / 1e6, "answer": answer[:200].decode("utf-8", "replace"),
                   "server_cpu_us_per_delivery": cpu / w["frames"] * 1e6 if w["frames"] else None,
                   "server_busy": cpu / wall if wall else None,
                   "frame_bytes": w["frame_len"], "trigger_bytes": len(body)}
            rounds.append(rnd)
            ctx.log(f"  {spec.name} round {k + 1}: {w['frames']:,}/{expected:,} in "
                    f"{(secs or 0) * 1e3:.1f} ms = {rnd['rate']:,.0f}/s")
            time.sleep(FANOUT_GAP_S)
        stats = lg.stats()
    rates = [r["rate"] for r in rounds]
    return {"n": p.fanout_n, "rounds": rounds, "rate_median": statistics.median(rates),
            "rate_min": min(rates), "rate_max": max(rates),
            "missing": sum(r["expected"] - r["delivered"] for r in rounds),
            "first_ms_median": _median_or_none(r["first_ms"] for r in rounds),
            "server_cpu_us_per_delivery": _median_or_none(r["server_cpu_us_per_delivery"] for r in rounds),
            "server_busy": _median_or_none(r["server_busy"] for r in rounds),
            "answer_ms_median": _median_or_none(r["answer_ms"] for r in rounds),
            "answer_ms_max": max(r["answer_ms"] for r in rounds),
            "frame_bytes": max(r["frame_bytes"] for r in rounds),
            "client_stats": stats}


def fanout_table(results: dict) -> list[str]:
    ok = _ok(results)
    mp = ok.get("mailpush", {}).get("rate_median")
    fl = ok.get("floor", {}).get("rate_median")
    head = ["server", "connections", "deliveries/s (median)", "min–max", "trigger→first ms",
            "trigger answered ms (median / max)", "server CPU µs/delivery", "server busy", "frame bytes",
            "missing", "× mailpush", "× floor"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        rows.append("| " + " | ".join([
            _label(name), _fmt(r["n"]), _fmt(r["rate_median"]),
            f"{_fmt(r['rate_min'])}–{_fmt(r['rate_max'])}", _fmt(r["first_ms_median"], ".1f"),
            f"{_fmt(r.get('answer_ms_median'), '.1f')} / {_fmt(r.get('answer_ms_max'), '.1f')}",
            _fmt(r["server_cpu_us_per_delivery"], ".1f"), _pct_fmt(r.get("server_busy")),
            _fmt(r["frame_bytes"]), _fmt(r["missing"]),
            _ratio(r["rate_median"], mp), _ratio(r["rate_median"], fl)]) + " |")
    return rows + _problems(results, len(head))


# -- latency --------------------------------------------------------------------------


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
    buses = LATENCY_BUSES if spec.kind == "mailpush" else {"none": []}
    for bus, args in buses.items():
        for rate in ctx.profile.latency_rates:
            runs.append(_latency_one(ctx, spec, bus, args, rate))
            r = runs[-1]
            ctx.log(f"  {spec.name} {bus} bus @ {rate:,}/s: p50 {r['p50_ms']:.2f} ms, "
                    f"p99 {r['p99_ms']:.2f} ms, p99.9 {r['p999_ms']:.2f} ms, lost {r['lost']}")
    return {"runs": runs}


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


# -- the registry -------------------------------------------------------------------------

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("memory", "Idle memory per connection", memory, memory_table, doc=memory.__doc__),
    Scenario("memory_multi", f"Idle memory with {MULTI_WORKERS} worker processes", memory_multi,
             memory_table, servers=["mailpush"], doc=memory_multi.__doc__),
    Scenario("upgrade", "Upgrade rate", upgrade, upgrade_table, doc=upgrade.__doc__),
    Scenario("fanout", "Fan-out", fanout, fanout_table, doc=fanout.__doc__),
    Scenario("latency", "Publish-to-receive latency", latency, latency_table,
             servers=["mailpush", "floor"], doc=latency.__doc__),
    # Resource-control scenarios (avalanche, burst, slow consumers, drain)
    # go here once mailpush has the controls they exercise.
]}
