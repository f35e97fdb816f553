"""What every scenario shares: the run's sizes, its context, the
registry's entry type, and the helpers that read a server and format a table.

A scenario is ``fn(ctx, spec) -> dict``: it starts its own server (a fresh
process, so scenarios don't inherit each other's heap), drives it with a
:class:`loadgen.LoadGen` from :meth:`Context.loadgen`, stops everything, and
returns plain JSON-able numbers. ``table(results)`` turns ``{server:
result}`` into Markdown rows, printed to the console and reused in
RESULTS.md; ``verdicts(results)`` (for a scenario that measures an issue's
target) gives ``{"issue", "target", "measured", "met"}`` rows, built with
:func:`_verdict`, shown under the table by :meth:`Scenario.report`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

# The issues' memory budget (#2/#3), judged by the idle-memory scenario at
# 15,000 connections and by the avalanche for the connections it leaves open.
MEMORY_BUDGET_KB = 3.5        # RSS per idle connection (KB = 1,000 bytes)


@dataclass(frozen=True)
class Profile:
    """Sizes of one kind of run. Every size with the reason for its value."""

    name: str
    # Idle memory at these connection counts (opened one after the other on
    # one server); 15,000 is the most one server process may hold here
    # (20,000 open files per process) with margin.
    memory_points: tuple[int, ...]
    # Idle memory beyond one process's file limit: mailpush with
    # _memory.MULTI_WORKERS worker processes at these counts (empty: not in this
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
    # dropped (+ _slow_consumers.SLOW_ROUNDS_AFTER), at most slow_max_rounds.
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
    # Pause before and between fan-out and broadcast rounds (FANOUT_GAP_S;
    # the smoke test's 50 connections are settled far sooner).
    fanout_gap_s: float = FANOUT_GAP_S


PROFILES = {
    # `make bench`: DESIGN.md's 9,000 connections for rates (5 upgrade runs,
    # 20 fan-out rounds, so a median is not one lucky round), memory up to one
    # process's limit, latency for 20 s at 1,000 events/s (the unloaded push
    # path) and at 10,000 events/s (200,000 samples: p99.9 rests on 200);
    # the issues' sizes for the broadcast (9,000 tabs of one subscriber),
    # avalanche (18,000 clients, limit 15,000), burst (15,000), slow
    # consumers (9,000 + 1,000 stalled) and drain (15,000 over 10 s).
    # About 9 minutes on 2 cores.
    "full": Profile("full", (1_000, 5_000, 10_000, 15_000), (20_000, 36_000), 9_000, 5, 9_000, 20,
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
                    drain_n=50, drain_seconds=1.0, slow_gap_s=0.02, fanout_gap_s=0.05),
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
    # run.py --repeat N: the N results of one server -> one result of the
    # same shape (medians, with the spread in "repeat_metrics");
    # combine_runs unless the scenario knows better.
    combine: Callable[[list[dict]], dict] | None = None

    def combined(self, results: list[dict]) -> dict:
        if len(results) == 1:
            return results[0]
        return (self.combine or combine_runs)(results)

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


def _median_or_none(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _per_op_us(parts: list[dict], seconds_key: str, count_key: str) -> float | None:
    """µs per operation over several measured phases (runs, rounds): their
    summed seconds over their summed operations. Used for user and system
    time, which tick every 10 ms: a sum over phases is what makes them
    precise enough, where a median of per-phase values would not be."""
    count = sum(p[count_key] or 0 for p in parts)
    return sum(p[seconds_key] for p in parts) / count * 1e6 if count else None


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def combine_runs(runs: list[dict], primary: str | None = None, sums: tuple[str, ...] = (),
                 min_of: tuple[str, ...] = ()) -> dict:
    """One result from the same scenario run on one server N times (run.py
    ``--repeat``): every top-level number becomes the median of the runs
    (its median, min, max and values in ``repeat_metrics``), except counts
    of problems in ``sums`` (summed: a delivery missing in any run shows)
    and ``min_of`` (the worst run). With ``primary`` = ``rate_median``,
    ``rate_min``/``rate_max`` become the lowest and highest of the runs'
    medians (``range_of`` = "runs"). Everything else (rounds, points, client
    stats) is the median run's (by ``primary``, index in ``repeat_base``);
    ``repeat_runs`` keeps every run's whole result."""
    if len(runs) == 1:
        return runs[0]
    order = list(range(len(runs)))
    if primary:
        order.sort(key=lambda i: runs[i].get(primary) if _is_num(runs[i].get(primary)) else float("-inf"))
    base = order[(len(runs) - 1) // 2]
    out = dict(runs[base])
    metrics = {}
    for key in runs[base]:
        vals = [r.get(key) for r in runs]
        nums = [v for v in vals if _is_num(v)]
        if not nums or any(v is not None and not _is_num(v) for v in vals):
            continue
        if key in sums:
            out[key] = sum(nums)
        elif len(set(nums)) == 1:  # the same in every run (a size): kept as it is
            out[key] = nums[0]
        elif key in min_of:
            out[key] = min(nums)
        else:
            out[key] = statistics.median(nums)
            metrics[key] = {"median": out[key], "min": min(nums), "max": max(nums), "values": vals}
    if primary == "rate_median" and "rate_median" in metrics:
        out["rate_min"], out["rate_max"] = metrics["rate_median"]["min"], metrics["rate_median"]["max"]
        out["range_of"] = "runs"
    out.update(repeats=len(runs), repeat_base=base, repeat_metrics=metrics, repeat_runs=runs)
    return out


def _repeats(ok: dict) -> int:
    return max((r.get("repeats", 1) for r in ok.values()), default=1)


def _range_head(ok: dict) -> str:
    """The min–max column's title: of the rounds (or runs) of one run, or,
    with --repeat, of the repeated runs' medians."""
    n = _repeats(ok)
    return f"min–max of {n} runs" if n > 1 else "min–max"


def _spread(r: dict, key: str, spec: str = ".1f") -> str:
    """A median, and with --repeat its min–max over the runs."""
    m = r.get("repeat_metrics", {}).get(key)
    if not m:
        return _fmt(r.get(key), spec)
    return f"{_fmt(r.get(key), spec)} ({_fmt(m['min'], spec)}–{_fmt(m['max'], spec)})"


def _cpu_fmt(r: dict, user_key: str, sys_key: str) -> str:
    """Server CPU per operation, user / system µs."""
    return f"{_spread(r, user_key)} / {_spread(r, sys_key)}"


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
