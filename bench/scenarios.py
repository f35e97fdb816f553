"""The scenarios: one function per measurement, and the registry run.py walks.

A scenario is ``fn(ctx, spec) -> dict``: it starts its own server (a fresh
process, so scenarios don't inherit each other's heap), drives it with a
:class:`loadgen.LoadGen`, stops everything, and returns plain JSON-able
numbers. ``table(results)`` turns ``{server: result}`` into a Markdown
table, printed to the console and reused in RESULTS.md.

Adding a scenario: write ``fn`` and ``table`` here (and ``verdicts`` if it
measures an issue's target), add a :class:`Scenario` to :data:`SCENARIOS`
with the servers it applies to, and its sizes to :class:`Profile`. run.py,
the JSON files and RESULTS.md pick it up from the registry; report.py plots
only what it knows.

The resource-control scenarios (issue 4: avalanche, burst, slow consumers,
drain) and the one-subscriber broadcast (issue 2) watch the server while
they load it with the threads of probes.py (RSS every few ms, /metrics,
a load balancer's /healthz) and judge the issues' targets in ``verdicts``:
each is ``{"issue", "target", "measured", "met"}``, shown under the
scenario's table and gathered in the summary of RESULTS.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loadgen import LoadGen, procs_for
from probes import HealthProbe, MetricsProbe, RssProbe, metrics_now
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
# Every bus mailpush has; "redis" starts a throwaway redis-server (Debian's)
# on a free port for the run, and is skipped if none is installed.
LATENCY_BUSES: tuple[str, ...] = ("embedded", "redis")

# The issues' targets, judged in the report (issue numbers in the verdicts).
MEMORY_BUDGET_KB = 3.5        # #2/#3: RSS per idle connection at 15,000 (KB = 1,000 bytes)
UPGRADE_TARGET = 3_500        # #2/#3: upgrades/s, one process
FANOUT_SHARE = 0.60           # #3: per-subscriber fan-out vs the floor
LATENCY_RATE = 10_000         # #3: p99 publish->receive at this many events/s ...
LATENCY_P99_MS = 20.0         # ... under this
BROADCAST_SHARE = 0.90        # #2: prebuilt-frame fan-out vs the floor

# Broadcast: the one subscriber every connection belongs to, and the event
# name: both one character, so mailpush's event frame is as small as its
# envelope allows (57 bytes with empty data; the floor's is 42).
BROADCAST_SUB = "b"
BROADCAST_EVENT = "e"

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

# Burst: issue #4's bound on the transient memory of every connection
# becoming readable at once (1 MiB: what a worker pool of 64 buffers of 16 KiB
# would hold). mailpush reads into one buffer of --buffer-size (its default,
# passed explicitly) and wakes at most 1,024 readers per loop iteration.
BURST_BOUND_BYTES = 1024 * 1024
READ_BUFFER_BYTES = 16_384

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
    # Broadcast (issue 2): N tabs of ONE subscriber, one small event, repeated.
    broadcast_n: int = 9_000
    broadcast_rounds: int = 20
    # Avalanche (issue 4): this many clients connect at once against
    # mailpush --max-connections avalanche_limit (below it, so some are
    # refused); a client still without an answer after avalanche_timeout_s
    # counts as "timeout" (the target is an answer within 1 s).
    avalanche_clients: int = 18_000
    avalanche_limit: int = 15_000
    avalanche_timeout_s: float = 15.0
    # Burst (issue 4): this many idle connections each send one packet at once.
    burst_n: int = 15_000
    # Slow consumers (issue 4): fast + stalled clients, per-subscriber
    # fan-out rounds of events whose frame is slow_frame_bytes (so that a
    # stalled client's kernel buffers, ~31 KB, and mailpush's queue,
    # --send-queue-bytes slow_queue_bytes, its default 64 KiB, fill in ~70
    # rounds rather than thousands; 10,000 such items are a 14 MB publish,
    # under the admin API's 16 MiB limit); slow_baseline_rounds without the
    # stalled clients first, then rounds to everybody until all stalled are
    # dropped (+ SLOW_ROUNDS_AFTER), at most slow_max_rounds.
    slow_fast: int = 9_000
    slow_stalled: int = 1_000
    slow_frame_bytes: int = 1_400
    slow_queue_bytes: int = 65_536
    slow_baseline_rounds: int = 10
    slow_max_rounds: int = 110
    # Drain (issue 4): connections, and mailpush --drain-seconds.
    drain_n: int = 15_000
    drain_seconds: float = 10.0
    # Pause between fan-out rounds of the slow-consumer scenario.
    slow_gap_s: float = 0.1


PROFILES = {
    # `make bench`: DESIGN.md's 9,000 connections for rates (5 upgrade runs,
    # 20 fan-out rounds, so a median is not one lucky round), memory up to one
    # process's limit, latency for 20 s at 1,000 events/s (the unloaded push
    # path) and at 10,000 events/s (200,000 samples: p99.9 rests on 200);
    # the issues' sizes for the broadcast (9,000 tabs of one subscriber),
    # avalanche (18,000 clients, limit 15,000), burst (15,000), slow
    # consumers (9,000 + 1,000 stalled) and drain (15,000 over 10 s).
    # About 9 minutes on 2 cores.
    "full": Profile("full", (1_000, 5_000, 10_000, 15_000), (20_000, 30_000), 9_000, 5, 9_000, 20,
                    5_000, (1_000, 10_000), 20.0, 1.0, 5.0),
    # `make bench-quick`: the same shapes at 2,000 connections; 3 s of
    # 10,000 events/s (30,000 samples); a 3 s drain. About 1.5 minutes.
    "quick": Profile("quick", (500, 1_000, 2_000), (), 2_000, 2, 2_000, 5,
                     1_000, (10_000,), 3.0, 0.5, 3.0,
                     broadcast_n=2_000, broadcast_rounds=5,
                     avalanche_clients=2_400, avalanche_limit=2_000, avalanche_timeout_s=10.0,
                     burst_n=2_000, slow_fast=1_800, slow_stalled=200, slow_baseline_rounds=5,
                     drain_n=2_000, drain_seconds=3.0),
    # The smoke test: 50 connections per server, everything once, seconds.
    # Slow consumers: bigger frames and the smallest queue mailpush allows
    # (--max-message-size 4096), so the stalled clients fill up in ~15 rounds.
    "tiny": Profile("tiny", (50,), (), 50, 1, 50, 3, 50, (500,), 1.0, 0.2, 1.0,
                    client_procs=1, open_timeout_s=30.0,
                    broadcast_n=50, broadcast_rounds=2,
                    avalanche_clients=60, avalanche_limit=50, avalanche_timeout_s=5.0,
                    burst_n=50, slow_fast=45, slow_stalled=5, slow_frame_bytes=4_000,
                    slow_queue_bytes=4_096, slow_baseline_rounds=2, slow_max_rounds=40,
                    drain_n=50, drain_seconds=1.0, slow_gap_s=0.02),
}


@dataclass
class Context:
    profile: Profile
    out: Path                 # where JSON, plots and logs go
    log: Callable[[str], None] = print

    def server(self, spec: ServerSpec, scenario: str, extra_args: list[str] | None = None) -> Server:
        return Server(spec, self.out / "logs" / f"{scenario}-{spec.name}.log", extra_args)

    def loadgen(self, srv: Server, n: int, **kw) -> LoadGen:
        return LoadGen(HOST, srv.port, WS_PATH, SECRET,
                       procs=procs_for(n, self.profile.client_procs), subscribe=True, **kw)


@dataclass
class Scenario:
    name: str
    title: str
    fn: Callable[[Context, ServerSpec], dict]
    table: Callable[[dict], list[str]]
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    doc: str = ""
    # {server: result} -> [{"issue", "target", "measured", "met"}]: the
    # issues' targets this scenario measures, for its section and the summary.
    verdicts: Callable[[dict], list[dict]] | None = None

    def report(self, results: dict) -> list[str]:
        """The table, then the issues' targets next to what was measured."""
        return self.table(results) + (_verdict_rows(self.verdicts(results)) if self.verdicts else [])


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
    with ctx.server(spec, "fanout") as srv, ctx.loadgen(srv, p.fanout_n) as lg:
        opened = lg.open(p.fanout_n, timeout=p.open_timeout_s)
        if opened["ok"] < p.fanout_n:
            raise ServerError(f"only {opened['ok']:,}/{p.fanout_n:,} connections opened: {opened['errors']}")
        subs = list(lg.subscribers)
        time.sleep(FANOUT_GAP_S)
        rounds = _fanout_rounds(ctx, spec, srv, lg, p.fanout_rounds, lambda k: srv.fanout_body(subs, k))
        stats = lg.stats()
    return _fanout_summary(p.fanout_n, rounds, stats)


def _fanout_rounds(ctx: Context, spec: ServerSpec, srv: Server, lg: LoadGen, count: int,
                   body_of: Callable[[int], bytes], track: bool = False) -> list[dict]:
    """``count`` rounds of: arm the clients, send round k's trigger (built
    before the clock starts), wait until every open connection has its
    message. Per round: deliveries/s from trigger to last receipt, server
    CPU per delivery, trigger answer time, frame size."""
    rounds = []
    for k in range(count):
        body = body_of(k)
        per = lg.arm(track)
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
        if track:
            rnd["connections_with_message"] = w["with_frames"]
        rounds.append(rnd)
        ctx.log(f"  {spec.name} round {k + 1}: {w['frames']:,}/{expected:,} in "
                f"{(secs or 0) * 1e3:.1f} ms = {rnd['rate']:,.0f}/s")
        time.sleep(FANOUT_GAP_S)
    return rounds


def _fanout_summary(n: int, rounds: list[dict], stats: dict) -> dict:
    rates = [r["rate"] for r in rounds]
    return {"n": n, "rounds": rounds, "rate_median": statistics.median(rates),
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
                        f"p99 {r['p99_ms']:.2f} ms, p99.9 {r['p999_ms']:.2f} ms, lost {r['lost']}")
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


# -- verdict helpers ----------------------------------------------------------------------


def _verdict(issue: str, target: str, measured: str, met: bool | None) -> dict:
    return {"issue": issue, "target": target, "measured": measured, "met": met}


def _verdict_rows(verdicts: list[dict]) -> list[str]:
    if not verdicts:
        return []
    rows = ["", "| issue | target | measured | met |", "|---|---|---|---|"]
    for v in verdicts:
        met = {True: "yes", False: "**no**", None: "–"}[v["met"]]
        rows.append(f"| {v['issue']} | {v['target']} | {v['measured']} | {met} |")
    return rows


def _kb(kib: float) -> float:
    """KiB (what /proc reports) -> KB (1,000 bytes, what the issues write)."""
    return kib * 1.024


def memory_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r or not r["points"]:
        return []
    pt = r["points"][-1]
    kb = _kb(pt["kb_per_conn"])
    return [_verdict("#2, #3", f"RSS per idle subscribed connection at 15,000 ≤ {MEMORY_BUDGET_KB} KB",
                     f"{kb:.2f} KB at {pt['connections']:,}", kb <= MEMORY_BUDGET_KB
                     if pt["connections"] >= 15_000 else None)]


def upgrade_verdicts(results: dict) -> list[dict]:
    r = _ok(results).get("mailpush")
    if not r:
        return []
    return [_verdict("#2, #3", f"upgrades (token check + subscribe) ≥ {UPGRADE_TARGET:,}/s, one process",
                     f"{r['rate_median']:,.0f}/s (median of {len(r['runs'])}, {r['n']:,} connections)",
                     r["rate_median"] >= UPGRADE_TARGET)]


def fanout_verdicts(results: dict) -> list[dict]:
    ok = _ok(results)
    mp, fl = ok.get("mailpush"), ok.get("floor")
    if not mp or not fl:
        return []
    share = mp["rate_median"] / fl["rate_median"]
    return [_verdict("#3", f"one event to each of {mp['n']:,} subscribers ≥ {FANOUT_SHARE:.0%} of the floor",
                     f"{share:.0%} ({mp['rate_median']:,.0f} vs {fl['rate_median']:,.0f} deliveries/s)",
                     share >= FANOUT_SHARE)]


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
        time.sleep(FANOUT_GAP_S)
        rounds = _fanout_rounds(ctx, spec, srv, lg, p.broadcast_rounds, lambda k: body, track=True)
        stats = lg.stats()
    out = _fanout_summary(n, rounds, stats)
    out["subscribers"] = 1 if spec.kind == "mailpush" else None
    out["every_connection_served"] = all(r.get("connections_with_message") == r["expected"] for r in rounds)
    return out


def broadcast_table(results: dict) -> list[str]:
    ok = _ok(results)
    fl = ok.get("floor", {}).get("rate_median")
    head = ["server", "connections", "subscribers", "deliveries/s (median)", "min–max", "trigger→first ms",
            "server CPU µs/delivery", "server busy", "frame bytes", "missing", "× floor"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in ok.items():
        rows.append("| " + " | ".join([
            _label(name), _fmt(r["n"]), _fmt(r.get("subscribers")), _fmt(r["rate_median"]),
            f"{_fmt(r['rate_min'])}–{_fmt(r['rate_max'])}", _fmt(r["first_ms_median"], ".1f"),
            _fmt(r["server_cpu_us_per_delivery"], ".1f"), _pct_fmt(r.get("server_busy")),
            _fmt(r["frame_bytes"]), _fmt(r["missing"]), _ratio(r["rate_median"], fl)]) + " |")
    return rows + _problems(results, len(head))


def broadcast_verdicts(results: dict) -> list[dict]:
    ok = _ok(results)
    mp, fl = ok.get("mailpush"), ok.get("floor")
    if not mp or not fl:
        return []
    share = mp["rate_median"] / fl["rate_median"]
    return [_verdict("#2", f"fan-out of a prebuilt frame to {mp['n']:,} connections ≥ {BROADCAST_SHARE:.0%} of the floor",
                     f"{share:.0%} ({mp['rate_median']:,.0f} vs {fl['rate_median']:,.0f} deliveries/s; "
                     f"frames {mp['frame_bytes']} vs {fl['frame_bytes']} bytes)", share >= BROADCAST_SHARE)]


# -- avalanche: more clients than the limit, all at once ----------------------------------


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
        "seconds": (t1 - t0) / 1e9, "connects_seconds": opened["connects_seconds"], "opened": opened["ok"], "errors": opened["errors"],
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
    for name, r in _ok(results).items():
        head = ["outcome", "clients", "time to outcome p50 ms", "p99 ms", "max ms"]
        rows += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for kind, d in r["outcomes"].items():
            rows.append(f"| {kind} | {d['count']:,} | {_fmt(d['p50_ms'], '.1f')} | {_fmt(d['p99_ms'], '.1f')} | "
                        f"{_fmt(d['max_ms'], '.1f')} |")
        pk, fin, h = r["peak"], r["final"], r["health"]
        rej = {k.split('"')[1]: v for k, v in fin.items() if k.startswith("mailpush_rejections_total") and v}
        rows += ["", "| measure | value |", "|---|---|",
                 f"| clients / --max-connections / handshake slots | {r['clients']:,} / {r['limit']:,} / {r['max_handshakes']:,} |",
                 f"| avalanche took (first connect → last outcome) | {r['seconds']:.2f} s |",
                 f"| connects started over (the load generator's pace) | {r['connects_seconds']:.2f} s = "
                 f"{r['clients'] / max(r['connects_seconds'], 1e-9):,.0f}/s |",
                 f"| answered (any outcome but timeout) within 1 s | {r['answered_within_1s']:,} of {r['all']:,} |",
                 f"| peak mailpush_sockets / mailpush_connections (sampled every 50 ms) | "
                 f"{_fmt(pk.get('mailpush_sockets'))} / {_fmt(pk.get('mailpush_connections'))} |",
                 f"| peak mailpush_handshakes_in_progress | {_fmt(pk.get('mailpush_handshakes_in_progress'))} |",
                 f"| open after (server / clients) | {_fmt(fin.get('mailpush_connections'))} / {r['client_open_after']:,} |",
                 f"| mailpush_accept_pauses_total | {_fmt(fin.get('mailpush_accept_pauses_total'))} |",
                 f"| mailpush_rejections_total by reason | {rej or '–'} |",
                 f"| RSS baseline → peak → settled | {r['rss_baseline_kb'] / 1024:.1f} → {r['rss_peak_kb'] / 1024:.1f} → "
                 f"{r['rss_settled_kb'] / 1024:.1f} MiB |",
                 f"| RSS per open connection (settled / peak) | {_fmt(r['kb_per_conn_settled'], '.2f')} / "
                 f"{_fmt(r['kb_per_conn_peak'], '.2f')} KiB |",
                 f"| /healthz on the listen port during the avalanche: checks, p50 / p99 / max | "
                 f"{h['checks']:,}, {_fmt(h['p50_ms'], '.1f')} / {_fmt(h['p99_ms'], '.1f')} / {_fmt(h['max_ms'], '.1f')} ms |",
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
                 f"{r['answered_within_1s']:,} did; {slow:,} took longer or got no answer (slowest {worst / 1e3:.2f} s)",
                 slow == 0),
        _verdict("#4", f"RSS per connection within the {MEMORY_BUDGET_KB} KB budget",
                 f"{_kb(r['kb_per_conn_settled'] or 0):.2f} KB settled, {_kb(r['kb_per_conn_peak'] or 0):.2f} KB at the peak",
                 budget_ok),
        _verdict("#4", f"/healthz keeps answering (200 or 503, each within {h['timeout_ms'] / 1e3:g} s; report p99)",
                 f"p99 {_fmt(h['p99_ms'], '.1f')} ms, max {_fmt(h['max_ms'], '.1f')} ms; "
                 f"{no_answer} of {h['checks']} without an answer", no_answer == 0 and h["checks"] > 0),
    ]


# -- burst: every connection sends a packet at once -----------------------------------------


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
    for name, r in _ok(results).items():
        rows += [f"| connections, each sending one `{{\"type\":\"ping\"}}` at once | {r['n']:,} "
                 f"(writes took {r['send_loop_ms']:.0f} ms) |",
                 f"| `{{\"type\":\"pong\"}}` answers / connections answered | {r['answers']:,} / {r['connections_answered']:,} |",
                 f"| first ping → last pong | {_fmt((r['answer_seconds'] or 0) * 1e3, '.0f')} ms |",
                 f"| RSS before → peak (sampled every 2 ms, {r['rss_samples']:,} samples) | "
                 f"{r['rss_before_kb'] / 1024:.2f} → {r['rss_peak_kb'] / 1024:.2f} MiB |",
                 f"| peak RSS growth | {r['rss_growth_kb']:,} KiB |",
                 f"| the bound / the one read buffer (--buffer-size) | {r['bound_kb']:,.0f} KiB / {r['buffer_size']:,} bytes |",
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


# -- slow consumers ------------------------------------------------------------------------


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
                    a = _slow_rounds(ctx, spec, srv, lg, 1, lambda _: fast_body(SLOW_ALONE_BASE + k), "",
                                     p.slow_gap_s)[0]
                    a["attached_before"] = n_slow - dropped
                    a["round"] = k + 1
                    alone.append(a)
                r = _slow_rounds(ctx, spec, srv, lg, 1, lambda _: mixed_body(k), "", p.slow_gap_s)[0]
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
           "rss_peak_kb": peak, "rss_growth_kb": peak - ref, "rss_after_kb": rss_after, "rss_bound_kb": n_slow * p.slow_queue_bytes / 1024,
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
    for name, r in _ok(results).items():
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
                 f"| fast deliveries/s over all {len(r['rounds'])} rounds with stalled clients | {r['rate_all_rounds']:,.0f} |",
                 f"| first drop / all dropped (round) | {_fmt(r['first_drop_round'])} / {_fmt(r['all_dropped_round'])} |",
                 f"| mailpush_slow_consumers_total / mailpush_closes_total{{code=\"1008\"}} | "
                 f"{r['slow_consumers_total']:,.0f} / {r['closes_1008']:,.0f} |",
                 f"| writer tasks spawned (mailpush_writers_total) | {r['writers']:,.0f} |",
                 f"| stalled sockets read at the end: how they ended | {probe['outcomes']} ({probe['bytes']:,} bytes were waiting) |",
                 f"| RSS: idle → peak of the rounds without stalled clients → with them connected, idle → "
                 f"peak of the rounds with them | {r['rss_before_kb'] / 1024:.1f} → {r['rss_baseline_peak_kb'] / 1024:.1f} → "
                 f"{r['rss_with_stalled_kb'] / 1024:.1f} → {r['rss_peak_kb'] / 1024:.1f} MiB |",
                 f"| RSS after the last round (settled) | {r['rss_after_kb'] / 1024:.1f} MiB |",
                 f"| RSS growth for the stalled clients (last peak over the higher of the two before) vs "
                 f"stalled × --send-queue-bytes | {r['rss_growth_kb'] / 1024:.2f} MiB vs {r['rss_bound_kb'] / 1024:.2f} MiB |",
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


# -- drain -----------------------------------------------------------------------------------

_DELAY_RE = re.compile(rb"(\d+(?:\.\d+)?)\s*s")


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
            d = float(m.group(1))
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
    for name, r in _ok(results).items():
        step = r["hist_step_s"]
        rows += ["| seconds after SIGTERM | " + " | ".join(f"{i * step:g}–{(i + 1) * step:g}" for i in range(len(r["hist"])))
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
                 f"{_fmt(r['close_p10_s'], '.2f')} / {_fmt(r['close_p50_s'], '.2f')} / {_fmt(r['close_p90_s'], '.2f')} / "
                 f"{_fmt(r['last_close_s'], '.2f')} s |",
                 f"| suggested reconnect delay min / median / max (from the reason, e.g. \"{r['sample_reason']}\") | "
                 f"{_fmt(r['delay_min_s'], 'g')} / {_fmt(r['delay_median_s'], 'g')} / {_fmt(r['delay_max_s'], 'g')} s |",
                 f"| exit code / time from SIGTERM to exit | {r['exit_code']} / {_fmt(r['exit_seconds'], '.2f')} s |",
                 f"| clients still open after exit / client errors | {r['client_open_after']:,} / {r['client_errors'] or 'none'} |"]
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
                       f"the window, every tenth of it within {DRAIN_EVEN_LOW:.1f}–{DRAIN_EVEN_HIGH:.1f}× an even share",
                 f"{r['codes'].get('1012', 0):,} × 1012; per tenth {lo:,}–{hi:,} (even: {even:,.0f}); "
                 f"{r['after_window']:,} after the window",
                 spread_ok and r["codes"].get("1012", 0) == r["n"]),
        _verdict("#4", "exit code 0", f"{r['exit_code']}", r["exit_code"] == 0),
        _verdict("#4", f"exit within the drain time plus a small margin (≤ {r['exit_limit_s']:g} s)",
                 f"{_fmt(r['exit_seconds'], '.2f')} s",
                 r["exit_seconds"] is not None and r["exit_seconds"] <= r["exit_limit_s"]),
    ]


# -- the registry -------------------------------------------------------------------------

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("memory", "Idle memory per connection", memory, memory_table, doc=memory.__doc__,
             verdicts=memory_verdicts),
    Scenario("memory_multi", f"Idle memory with {MULTI_WORKERS} worker processes", memory_multi,
             memory_table, servers=["mailpush"], doc=memory_multi.__doc__),
    Scenario("upgrade", "Upgrade rate", upgrade, upgrade_table, doc=upgrade.__doc__, verdicts=upgrade_verdicts),
    Scenario("fanout", "Fan-out", fanout, fanout_table, doc=fanout.__doc__, verdicts=fanout_verdicts),
    Scenario("broadcast", "Broadcast: one subscriber's N tabs, one prebuilt frame", broadcast, broadcast_table,
             servers=["mailpush", "floor"], doc=broadcast.__doc__, verdicts=broadcast_verdicts),
    Scenario("latency", "Publish-to-receive latency", latency, latency_table,
             servers=["mailpush", "floor"], doc=latency.__doc__, verdicts=latency_verdicts),
    # Resource control (issue 4): mailpush only, its limits under load.
    Scenario("avalanche", "Connection avalanche", avalanche, avalanche_table, servers=["mailpush"],
             doc=avalanche.__doc__, verdicts=avalanche_verdicts),
    Scenario("burst", "Burst: every connection sends at once", burst, burst_table, servers=["mailpush"],
             doc=burst.__doc__, verdicts=burst_verdicts),
    Scenario("slow_consumers", "Slow consumers", slow_consumers, slow_consumers_table, servers=["mailpush"],
             doc=slow_consumers.__doc__, verdicts=slow_consumers_verdicts),
    Scenario("drain", "Graceful drain", drain, drain_table, servers=["mailpush"], doc=drain.__doc__,
             verdicts=drain_verdicts),
]}
