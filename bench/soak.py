"""`make soak`: one mailpush under a long, mixed, steady load; does anything leak?

One ``mailpush serve`` (embedded bus, the bench's ``--max-connections``
19,000, keepalive every 30 s) is driven for ``--seconds`` by:

- ``--connections`` steady WebSocket clients (default 15,000, in two or more
  loadgen processes, each under 18,000 sockets): a token each for its own
  subscriber, subscribed, reading everything and answering pings;
- a publisher on the admin API (``POST /v1/publish``, one JSON array every
  100 ms) sending ``--rate`` events/s round-robin to the steady subscribers,
  each event's data carrying the subscriber's own sequence number, so the
  clients count per subscriber what arrived against what was published;
- churn: ``--churn`` connections a second open, subscribe, get an event a
  second for a few seconds and close, by turns a clean close, a FIN without
  a Close frame and an RST;
- slow consumers: a few clients that subscribe and never read, sent 8 KiB
  events until the server drops them for ``--send-queue-bytes`` (the
  default 64 KiB); they reconnect every 30 s;
- malformed clients: ``--malformed`` a second, by turns binary junk, a
  header without a colon, an unmasked frame, a reserved opcode, a frame
  over the message limit, invalid JSON, half an upgrade request and a
  connection that sends nothing, each checked against the answer it must
  get (400, Close 1002/1009, an error packet, 408 at the handshake deadline).

Every ``--sample`` seconds the server is sampled: RSS, open fds
(/proc/PID/fd), its CPU time, and /metrics (the gauges ``mailpush_tasks``
and ``mailpush_event_loop_lag_seconds``, null when absent, and the counters);
with them the clients' published-vs-received counts. Then the load stops,
the churn, slow and malformed clients go, and fds and tasks must come back
to what they were with the steady clients alone; the steady clients' counts
are compared per subscriber; the steady clients close and fds and tasks must
come back to the empty server's.

    .venv/bin/python bench/soak.py [--seconds 600] [--connections 15000] [--rate 300] [--out DIR]
    make soak                       # the same, SOAK_SECONDS=600

Prints the verdict table and writes ``<out>/soak.json`` (``duration_s``,
the samples, the verdict, the command line and the git commit) and
``<out>/soak.png`` (RSS, fds, tasks and loop lag over time); the server's
log goes to ``<out>/logs/soak-mailpush.log``. Exit status 0 only if every
check passed (a check that cannot be judged, such as a gauge the server
does not expose or an RSS slope over too short a window, is shown as not
judged and does not fail the run).

Resource handling: the server is its own process group, stopped at the
end, on an error and on Ctrl-C/SIGTERM (servers.stop_all); every client
process ends with its context manager; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
from loadgen import LoadGen, LoadGenError, procs_for  # noqa: E402
from probes import parse_metrics  # noqa: E402
from run import cpu_busy, machine_facts  # noqa: E402
from scenarios._common import WS_PATH  # noqa: E402
from scenarios._slow_consumers import STALLED_MSS, STALLED_RCVBUF  # noqa: E402
from servers import HOST, ROOT, SECRET, SERVERS, Server, ServerError, stop_all  # noqa: E402
from soak_clients import MALFORMED_KINDS, Malformed, SoakLoadGen  # noqa: E402

# -- the load ---------------------------------------------------------------------

# Steady clients: DESIGN.md's 15,000 idle connections, the most one server
# process holds here with margin (20,000 open files).
CONNECTIONS = 15_000
# Events per second to the steady subscribers: "a few hundred", a mail
# server's trickle, so the server idles most of the time and what grows is
# what the soak looks for; each subscriber gets one every CONNECTIONS/RATE
# (50) s, 12 in ten minutes.
RATE = 300.0
# The publisher posts one array every tick: 30 items at 300/s, ten requests
# a second, like a mail store batching its notifications.
TICK_S = 0.1
# Churn: connections opened per second, how long each lives (getting one
# event a second), and the pool of subscriber ids they draw from (tabs of
# the same few hundred users coming and going; unbounded new ids would
# grow the server's per-subscriber bookkeeping by design, not by a leak).
CHURN_PER_S = 3.0
CHURN_LIFETIME_S = 3.0
CHURN_EVENT_EVERY_S = 1.0
CHURN_NAME_POOL = 500
# Slow consumers: how many at once, the size of the events sent to them and
# how often (16 KiB/s each: with the client's 1 KiB receive buffer and an
# Ethernet MSS, the scenarios' STALLED_RCVBUF/STALLED_MSS, the kernels hold
# ~60 KB, so 64 KiB of queue overflow in ~8 s), and how often they are
# read out, judged and replaced by new ones.
SLOW_COUNT = 5
SLOW_EVENT_BYTES = 8_192
SLOW_EVENT_EVERY_S = 0.5
SLOW_CYCLE_S = 30.0
# A slow consumer connected for longer than this must have been dropped by
# the server (~8 s to overflow, plus room for a loaded machine); younger ones
# at the end of the run are not judged.
SLOW_DROP_WITHIN_S = 20.0
# Reading a slow consumer's socket to its end when it is replaced: a
# dropped one gives its ~60 KB and EOF at once; one still open costs this
# long (the publisher catches up after).
SLOW_PROBE_S = 0.5
# Malformed clients started per second (the kinds of soak_clients.MALFORMED_KINDS in turn).
MALFORMED_PER_S = 3.0

# -- the server -----------------------------------------------------------------------

# Keepalive at its default, so pings and pongs are part of the load.
PING_INTERVAL_S = 30.0
# The handshake deadline (its default): when a stalled upgrade gets its 408.
HANDSHAKE_TIMEOUT_S = 5.0
# History retention. The defaults (100 events per subscriber for 600 s)
# are sized to cover a deploy and would fill for the whole run (at RATE,
# ~180,000 events in ten minutes, bounded by design) and read as a leak.
# Four per subscriber for 30 s reach their steady state within the warm-up
# whatever the mix: with 15,000 subscribers each gets an event every 50 s,
# longer than the TTL, so streams expire (about RATE x 30 s events held);
# with a few hundred, streams stay and are cut at four events. Both the
# expiry and the per-stream bound run all the time.
HISTORY_SIZE = 4
HISTORY_TTL_S = 30.0

# -- sampling and the verdict ---------------------------------------------------------------

# Seconds between samples of the server.
SAMPLE_S = 10.0
# Warm-up left out of the RSS slope: the first fifth of the run, at least
# a minute (allocator arenas, the history filling up), at most half of a
# short run.
WARMUP_FRACTION = 0.2
WARMUP_MIN_S = 60.0
# RSS slope limit after warm-up, MiB per 10 minutes: a leak of 1.7 KiB/s,
# one ~100-byte object per churned connection-second, would show.
RSS_SLOPE_LIMIT_MIB = 1.0
# Windows shorter than this cannot judge that slope: the heap moves in
# 256 KiB arenas and 1 MiB steps, which over a minute look like tens of
# MiB per 10 minutes. Shorter runs report the slope, not judged.
RSS_MIN_WINDOW_S = 240.0
# After the churn stops, fds and tasks must be back within this of what
# they were with the steady clients alone: the admin connections (the
# publisher's keep-alive one, the last /metrics scrape's) may be open or
# just closing, each an fd and a task.
FD_TOLERANCE = 2
TASK_TOLERANCE = 3
# How long they may take to get there: the server's close timeout (5 s,
# timers.CLOSE_TIMEOUT) for a peer that never answers our Close, a
# handshake deadline, and room for a loaded machine.
SETTLE_MAX_S = 20.0
SETTLE_POLL_S = 0.5
# After the last publish, the steady clients get this long to receive
# every event (normally milliseconds).
DELIVERY_WAIT_S = 15.0
# The worst event-loop lag allowed: the server's own LAG_TOLERANCE (1 s,
# timers.py), beyond which keepalive stops judging clients.
LAG_LIMIT_S = 1.0
# Opening the steady clients: the slowest server here opens ~600/s.
OPEN_TIMEOUT_S = 120.0

# A /metrics scrape must be answered within this (it is one render).
SCRAPE_TIMEOUT_S = 10.0
# The gauges this soak reads (another engineer's; null if absent).
GAUGE_TASKS = "mailpush_tasks"
GAUGE_LAG = "mailpush_event_loop_lag_seconds"

# Where results go unless --out says otherwise.
DEFAULT_OUT = BENCH / "results"
# Plot size (inches at report.DPI): four panels.
FIGSIZE = (11, 7.5)


# -- helpers ------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK  # utime, stime (fields 14, 15)


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def gauge(m: dict, name: str) -> float | None:
    return m.get(name)


def counter(m: dict, name: str) -> float:
    return m.get(name + "_total", m.get(name, 0.0))


def labelled(m: dict, name: str, label: str) -> dict[str, float]:
    """{label value: count} of a labelled counter (``name_total{label="v"}``)."""
    prefix = f'{name}_total{{{label}="'
    return {k[len(prefix):-2]: v for k, v in m.items() if k.startswith(prefix)}


def scrape(srv: Server) -> tuple[dict[str, float], str | None]:
    """/metrics on the admin API's keep-alive connection: (metrics, None),
    or ({}, what went wrong) for an error or a status other than 200."""
    try:
        status, body = srv.admin("GET", "/metrics", timeout=SCRAPE_TIMEOUT_S)
    except ServerError as e:
        return {}, str(e)
    if status != 200:
        return {}, f"/metrics answered {status}: {body[:200]!r}"
    return parse_metrics(body.decode("utf-8", "replace")), None


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per 10 minutes."""
    if len(points) < 3:
        return None
    xs, ys = zip(*points)
    if max(xs) - min(xs) <= 0:
        return None
    return statistics.linear_regression(xs, ys).slope * 600


def warmup_s(seconds: float) -> float:
    return min(max(WARMUP_FRACTION * seconds, WARMUP_MIN_S), 0.5 * seconds)


class Publisher:
    """Builds the publish arrays and keeps, per subscriber, the next sequence
    number (= how many events were accepted for it)."""

    def __init__(self, srv: Server, steady: list[str], rate: float):
        self.srv = srv
        self.steady = steady
        self.rate = rate
        self.next = 0                      # round-robin position in steady
        self.owed = 0.0                    # steady events due but not yet sent
        self.seq: dict[str, int] = {}      # subscriber -> events accepted for it
        self.sent = {"steady": 0, "churn": 0, "slow": 0}
        self.requests = 0
        self.refused: list[str] = []       # non-202 answers (first few)
        self.refused_items = 0
        self._pad = b"x" * SLOW_EVENT_BYTES

    def _item(self, sub: str, seq: int, pad: bool = False) -> bytes:
        if pad:
            return b'{"subscriber":"%s","event":"new_letter","data":{"seq":%d,"pad":"%s"}}' % (
                sub.encode(), seq, self._pad)
        return b'{"subscriber":"%s","event":"new_letter","data":{"seq":%d,"folder":"INBOX"}}' % (sub.encode(), seq)

    def publish(self, elapsed_s: float, churn: list[str], slow: list[str]) -> None:
        """One request: the steady events due for ``elapsed_s``, one event to
        each of ``churn`` and a large one to each of ``slow``."""
        self.owed += self.rate * elapsed_s
        k = int(self.owed)
        self.owed -= k
        targets: list[tuple[str, str]] = []
        n = len(self.steady)
        for _ in range(k if n else 0):
            targets.append(("steady", self.steady[self.next]))
            self.next = (self.next + 1) % n
        targets += [("churn", s) for s in churn] + [("slow", s) for s in slow]
        if not targets:
            return
        items = []
        for kind, sub in targets:
            items.append(self._item(sub, self.seq.get(sub, 0), pad=kind == "slow"))
        body = b"[" + b",".join(items) + b"]"
        self.requests += 1
        try:
            status, answer = self.srv.admin("POST", "/v1/publish", body)
        except ServerError as e:
            status, answer = 0, str(e).encode()
        accepted = None
        if status == 202:
            try:
                accepted = json.loads(answer).get("accepted")
            except ValueError:
                pass
        if accepted != len(items):
            self.refused_items += len(items)
            if len(self.refused) < 5:
                self.refused.append(f"{status} {answer[:200]!r}")
            return
        for kind, sub in targets:
            self.seq[sub] = self.seq.get(sub, 0) + 1
            self.sent[kind] += 1


def sample_server(srv: Server, t: float, extra: dict) -> dict:
    pid = srv.proc.pid
    fds = open_fds(pid)
    user, system = cpu_times(pid)
    s = {"t": round(t, 3), "alive": srv.alive(), "rss_kb": srv.rss_kb(), "fds": fds,
         "cpu_user_s": user, "cpu_sys_s": system}
    m, error = scrape(srv)
    if error:
        s["metrics_error"] = error
    s["tasks"] = gauge(m, GAUGE_TASKS)
    s["lag_s"] = gauge(m, GAUGE_LAG)
    s["metrics"] = {k: v for k, v in m.items() if k.startswith("mailpush_")}
    s.update(extra)
    return s


def settle(srv: Server, fds_target: int, tasks_target: float | None, max_s: float) -> dict:
    """Poll fds and tasks until both are within tolerance of their targets
    (or ``max_s``); returns the last reading and how long it took."""
    t0 = time.monotonic()
    while True:
        fds = open_fds(srv.proc.pid)
        tasks = gauge(scrape(srv)[0], GAUGE_TASKS)
        fds_ok = fds is not None and abs(fds - fds_target) <= FD_TOLERANCE
        tasks_ok = tasks_target is None or (tasks is not None and abs(tasks - tasks_target) <= TASK_TOLERANCE)
        took = time.monotonic() - t0
        if (fds_ok and tasks_ok) or took >= max_s:
            return {"fds": fds, "tasks": tasks, "seconds": round(took, 2), "fds_ok": fds_ok, "tasks_ok": tasks_ok}
        time.sleep(SETTLE_POLL_S)


def check(name: str, threshold: str, measured: str, met: bool | None, value=None) -> dict:
    return {"check": name, "threshold": threshold, "measured": measured, "met": met, "value": value}


# -- the run --------------------------------------------------------------------------------


def soak(a: argparse.Namespace, out: Path, log) -> dict:
    n = a.connections
    server_args = ["--ping-interval", f"{PING_INTERVAL_S:g}", "--handshake-timeout", f"{a.handshake_timeout:g}",
                   "--history-size", str(HISTORY_SIZE), "--history-ttl", f"{HISTORY_TTL_S:g}"]
    res: dict = {"connections": n, "rate": a.rate, "churn_per_s": a.churn, "slow_count": a.slow,
                 "malformed_per_s": a.malformed, "sample_s": a.sample}
    samples: list[dict] = []
    res["samples"] = samples
    procs = procs_for(n, 2)
    srv = Server(SERVERS["mailpush"], out / "logs" / "soak-mailpush.log", server_args)
    res["server_argv"] = SERVERS["mailpush"].argv(srv.port, srv.aport) + server_args
    with srv, \
            SoakLoadGen(HOST, srv.port, WS_PATH, SECRET, procs, prefix="s") as steady_lg, \
            SoakLoadGen(HOST, srv.port, WS_PATH, SECRET, 1, prefix="c", source_base=50,
                        name_pool=CHURN_NAME_POOL) as churn_lg, \
            LoadGen(HOST, srv.port, WS_PATH, SECRET, procs=1, prefix="slow", stall=True, source_base=100,
                    sockopts=((socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF),
                              (socket.IPPROTO_TCP, socket.TCP_MAXSEG, STALLED_MSS))) as slow_lg, \
            Malformed(HOST, srv.port, SECRET, a.malformed, a.handshake_timeout) as bad:
        pid = srv.proc.pid
        client_pids = [p.pid for lg in (steady_lg, churn_lg, slow_lg) for p in lg.procs] + [bad.proc.pid]
        srv.admin("GET", "/healthz")  # the publisher's keep-alive admin connection, in every baseline
        time.sleep(1.0)
        m0, err = scrape(srv)
        if err:
            log(f"warning: {err}")
        empty = {"fds": open_fds(pid), "tasks": gauge(m0, GAUGE_TASKS), "rss_kb": srv.rss_kb()}
        res["baseline_empty"] = empty
        log(f"empty server: {empty}")

        opened = steady_lg.open(n, timeout=OPEN_TIMEOUT_S)
        res["steady_open"] = {k: opened[k] for k in ("ok", "failed", "errors", "seconds", "rate")}
        log(f"steady: {opened['ok']:,}/{n:,} open in {opened['seconds']:.1f} s, failed {opened['failed']} "
            f"{opened['errors'] or ''}")
        if opened["ok"] < n:
            raise ServerError(f"only {opened['ok']:,}/{n:,} steady connections opened: {opened['errors']}")
        steady = list(steady_lg.subscribers)
        pub = Publisher(srv, steady, a.rate)
        time.sleep(2.0)
        m1, err = scrape(srv)
        if err:
            log(f"warning: {err}")
        base = {"fds": open_fds(pid), "tasks": gauge(m1, GAUGE_TASKS), "rss_kb": srv.rss_kb()}
        res["baseline_steady"] = base
        log(f"with {n:,} steady clients: {base}")

        # -- the load phase ------------------------------------------------------------
        cpu0 = {"server": cpu_times(pid), "clients": [cpu_times(p) for p in client_pids],
                "driver": cpu_times(os.getpid())}
        churn_open: deque[tuple[float, str]] = deque()   # (opened at, subscriber), oldest first
        churn_stats = {"opened": 0, "failed": 0, "errors": {}, "closed": 0, "missing_at_close": 0}
        slow_open: list[str] = []
        slow_opened_at = 0.0
        slow_stats = {"opened": 0, "failed": 0, "errors": {}, "judged": 0, "judged_outcomes": {},
                      "unjudged_outcomes": {}, "cycles": 0}
        bad.start()
        t0 = time.monotonic()
        t_end = t0 + a.seconds
        next_tick = t0
        next_churn = t0
        next_churn_event = t0
        next_slow_event = t0
        next_slow_cycle = t0
        next_sample = t0
        last_pub = t0
        churn_carry = 0.0

        def slow_cycle(now: float, reopen: bool):
            nonlocal slow_open, slow_opened_at
            if slow_open:
                probe = slow_lg.probe_stalled(SLOW_PROBE_S)
                judged = now - slow_opened_at >= SLOW_DROP_WITHIN_S
                key = "judged_outcomes" if judged else "unjudged_outcomes"
                for k, v in probe["outcomes"].items():
                    slow_stats[key][k] = slow_stats[key].get(k, 0) + v
                if judged:
                    slow_stats["judged"] += probe["count"]
                slow_stats["cycles"] += 1
                slow_open = []
            if reopen and a.slow:
                before = len(slow_lg.subscribers)
                r = slow_lg.open(a.slow, timeout=10)
                slow_stats["opened"] += r["ok"]
                slow_stats["failed"] += r["failed"]
                for k, v in r["errors"].items():
                    slow_stats["errors"][k] = slow_stats["errors"].get(k, 0) + v
                slow_open = slow_lg.subscribers[before:]
                slow_opened_at = time.monotonic()

        while True:
            now = time.monotonic()
            if now >= t_end:
                break
            if now >= next_sample:
                st = steady_lg.stats()
                samples.append(sample_server(srv, now - t0, {
                    "published": dict(pub.sent), "steady_received": st["total_frames"],
                    "steady_open": st["open"], "churn_open": len(churn_open), "slow_open": len(slow_open),
                    "client_cpu_s": sum(sum(cpu_times(p)) for p in client_pids) + sum(cpu_times(os.getpid()))}))
                s = samples[-1]
                log(f"  t={s['t']:6.0f} s  RSS {s['rss_kb'] / 1024:7.1f} MiB  fds {s['fds']}  tasks {s['tasks']}  "
                    f"lag {s['lag_s']}  steady {st['open']:,} open, {st['total_frames']:,}/{pub.sent['steady']:,} "
                    f"received/published")
                if not s["alive"]:
                    raise ServerError(f"mailpush died; log: {srv.log_tail()}")
                next_sample += a.sample
            if now >= next_churn:
                # Close those past their lifetime, open this second's new ones.
                old = []
                while churn_open and now - churn_open[0][0] >= CHURN_LIFETIME_S:
                    old.append(churn_open.popleft()[1])
                if old:
                    r = churn_lg.churn_close(old)
                    churn_stats["closed"] += r["closed"]
                    churn_stats["missing_at_close"] += r["missing"]
                churn_carry += a.churn
                k = int(churn_carry)
                churn_carry -= k
                if k:
                    before = len(churn_lg.subscribers)
                    r = churn_lg.open(k, timeout=10)
                    churn_stats["opened"] += r["ok"]
                    churn_stats["failed"] += r["failed"]
                    for e, v in r["errors"].items():
                        churn_stats["errors"][e] = churn_stats["errors"].get(e, 0) + v
                    opened_at = time.monotonic()
                    churn_open.extend((opened_at, s) for s in churn_lg.subscribers[before:])
                next_churn += 1.0
            if now >= next_slow_cycle:
                slow_cycle(now, reopen=True)
                next_slow_cycle += SLOW_CYCLE_S
            if now >= next_tick:
                churn_targets, slow_targets = [], []
                if now >= next_churn_event:
                    churn_targets = [s for _, s in churn_open]
                    next_churn_event += CHURN_EVENT_EVERY_S
                if now >= next_slow_event:
                    slow_targets = list(slow_open)
                    next_slow_event += SLOW_EVENT_EVERY_S
                pub.publish(now - last_pub, churn_targets, slow_targets)
                last_pub = now
                next_tick += TICK_S
                if next_tick < now:  # fell behind (a slow probe): no burst of catch-up requests
                    next_tick = now + TICK_S
            time.sleep(max(0.0, min(next_tick, next_sample, next_churn, t_end) - time.monotonic()))

        t_load_end = time.monotonic()
        res["duration_s"] = round(t_load_end - t0, 2)
        cpu1 = {"server": cpu_times(pid), "clients": [cpu_times(p) for p in client_pids],
                "driver": cpu_times(os.getpid())}
        log(f"load phase over after {res['duration_s']:.0f} s; stopping churn, slow and malformed clients")

        # -- the end: churn stops ----------------------------------------------------------
        bad_stats = bad.stop()
        if churn_open:
            r = churn_lg.churn_close([s for _, s in churn_open])
            churn_stats["closed"] += r["closed"]
            churn_stats["missing_at_close"] += r["missing"]
            churn_open.clear()
        slow_cycle(time.monotonic(), reopen=False)
        deadline = time.monotonic() + DELIVERY_WAIT_S
        while True:
            st = steady_lg.stats()
            if st["total_frames"] >= pub.sent["steady"] or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        churn_stats["clients"] = churn_lg.stats()
        churn_lg.churn_close([])  # drops clean closes still unanswered after CLEAN_CLOSE_WAIT_S
        after_churn = settle(srv, base["fds"], base["tasks"], SETTLE_MAX_S)
        after_churn["t"] = round(time.monotonic() - t0, 1)
        log(f"after the churn stopped: {after_churn} (baseline fds {base['fds']}, tasks {base['tasks']})")
        steady_seqs = steady_lg.seqs()
        churn_seqs = churn_lg.seqs()
        steady_stats = steady_lg.stats()
        m_end, err = scrape(srv)
        if err:
            log(f"warning: {err}")
        churn_lg.close_all()

        # -- the end: the steady clients go -------------------------------------------------
        steady_lg.close_all()
        after_all = settle(srv, empty["fds"], empty["tasks"], SETTLE_MAX_S)
        after_all["t"] = round(time.monotonic() - t0, 1)
        log(f"after every client closed: {after_all} (empty server: fds {empty['fds']}, tasks {empty['tasks']})")
        proc = srv.proc
        srv.stop()
        res["server_exit"] = proc.returncode

    res.update(pub_sent=pub.sent, pub_requests=pub.requests, pub_refused=pub.refused,
               pub_refused_items=pub.refused_items, after_churn=after_churn, after_all=after_all,
               churn=churn_stats, slow=slow_stats, malformed=bad_stats, steady_stats=steady_stats,
               metrics_start=m1, metrics_end=m_end,
               churn_close_outcomes=churn_seqs["close_outcomes"], churn_closed_by_mode=churn_seqs["closed_by_mode"])
    res["cpu"] = cpu_use(cpu0, cpu1, res["duration_s"])
    res["delivery"] = per_subscriber(pub, steady, steady_seqs, churn_seqs)
    return res


def cpu_use(c0: dict, c1: dict, seconds: float) -> dict:
    def d(a, b):
        return {"user_s": round(b[0] - a[0], 2), "sys_s": round(b[1] - a[1], 2),
                "cores": round((sum(b) - sum(a)) / seconds, 3) if seconds > 0 else None}
    clients = [d(a, b) for a, b in zip(c0["clients"], c1["clients"])]
    driver = d(c0["driver"], c1["driver"])
    lg_user = sum(c["user_s"] for c in clients) + driver["user_s"]
    lg_sys = sum(c["sys_s"] for c in clients) + driver["sys_s"]
    return {"server": d(c0["server"], c1["server"]),
            "load_generator": {"user_s": round(lg_user, 2), "sys_s": round(lg_sys, 2),
                               "cores": round((lg_user + lg_sys) / seconds, 3) if seconds > 0 else None,
                               "processes": len(clients) + 1},
            "client_processes": clients, "driver": driver}


def per_subscriber(pub: Publisher, steady: list[str], steady_seqs: dict, churn_seqs: dict) -> dict:
    """Published vs received, per subscriber: steady ones exactly once and in
    order; churned ones at most once (what was in flight when a tab closed
    may be lost with it)."""
    seen = steady_seqs["seen"]
    lost = dup = exact = 0
    worst = []
    for sub in steady:
        want = pub.seq.get(sub, 0)
        count, last, disorder = seen.get(sub, (0, -1, 0))
        ok = count == want and disorder == 0 and (want == 0 or last == want - 1)
        exact += ok
        lost += max(0, want - (count - disorder))
        dup += disorder + max(0, count - disorder - want)
        if not ok and len(worst) < 10:
            worst.append({"subscriber": sub, "published": want, "received": count, "last_seq": last,
                          "out_of_order": disorder})
    unknown = [s for s in seen if s not in pub.seq]
    cseen = churn_seqs["seen"]
    churn_pub = sum(v for k, v in pub.seq.items() if k.startswith("c"))
    churn_recv = sum(v[0] for v in cseen.values())
    churn_dup = sum(v[2] for v in cseen.values()) + sum(
        max(0, v[0] - pub.seq.get(k, 0)) for k, v in cseen.items())
    return {"steady_subscribers": len(steady), "steady_exact": exact, "steady_published": sum(
        pub.seq.get(s, 0) for s in steady), "steady_received": sum(v[0] for v in seen.values()),
        "steady_lost": lost, "steady_duplicated_or_reordered": dup, "steady_foreign": steady_seqs["foreign"],
        "steady_unknown_subscribers": unknown[:10], "steady_mismatches": worst,
        "churn_published": churn_pub, "churn_received": churn_recv, "churn_duplicated_or_reordered": churn_dup,
        "churn_foreign": churn_seqs["foreign"]}


# -- the verdict -----------------------------------------------------------------------------


def verdict(res: dict) -> list[dict]:
    out = []
    samples = res["samples"]
    seconds = res["duration_s"]
    n = res["connections"]
    m0, m1 = res["metrics_start"], res["metrics_end"]

    def delta(name):
        return counter(m1, name) - counter(m0, name)

    alive = all(s["alive"] for s in samples)
    out.append(check("server up for the whole run, clean exit", "alive at every sample, exit 0",
                     f"alive at {sum(s['alive'] for s in samples)}/{len(samples)} samples, exit {res['server_exit']}",
                     alive and res["server_exit"] == 0))

    errors = [s for s in samples if s.get("metrics_error")]
    out.append(check("/metrics answered at every sample", "200 each time",
                     f"{len(samples) - len(errors)}/{len(samples)}"
                     + (f"; first failure at {errors[0]['t']:.0f} s: {errors[0]['metrics_error'][:160]}"
                        if errors else ""), not errors and bool(m1)))

    warm = warmup_s(seconds)
    pts = [(s["t"], s["rss_kb"] / 1024) for s in samples if s["t"] >= warm]
    slope = slope_per_10min(pts)
    window = (pts[-1][0] - pts[0][0]) if len(pts) >= 2 else 0.0
    judged = slope is not None and window >= RSS_MIN_WINDOW_S
    measured = (f"{slope:+.2f} MiB/10 min over {window:.0f} s after {warm:.0f} s warm-up ({len(pts)} samples)"
                if slope is not None else "too few samples")
    if not judged:
        measured += f"; not judged: window under {RSS_MIN_WINDOW_S:.0f} s"
    out.append(check("RSS slope after warm-up", f"< {RSS_SLOPE_LIMIT_MIB:g} MiB per 10 min", measured,
                     (slope < RSS_SLOPE_LIMIT_MIB) if judged else None, slope))

    b, e = res["baseline_steady"], res["after_churn"]
    out.append(check("open fds back after the churn stopped",
                     f"baseline {b['fds']} ± {FD_TOLERANCE}, within {SETTLE_MAX_S:g} s",
                     f"{e['fds']} after {e['seconds']:g} s ({e['fds'] - b['fds']:+d})", e["fds_ok"], e["fds"]))
    if b["tasks"] is None or e["tasks"] is None:
        out.append(check("live tasks back after the churn stopped", f"baseline ± {TASK_TOLERANCE}",
                         f"gauge {GAUGE_TASKS} absent (null)", None))
    else:
        out.append(check("live tasks back after the churn stopped",
                         f"baseline {b['tasks']:.0f} ± {TASK_TOLERANCE}, within {SETTLE_MAX_S:g} s",
                         f"{e['tasks']:.0f} after {e['seconds']:g} s ({e['tasks'] - b['tasks']:+.0f})",
                         e["tasks_ok"], e["tasks"]))
    b0, e0 = res["baseline_empty"], res["after_all"]
    tasks_txt = (f", tasks {e0['tasks']:.0f} (empty {b0['tasks']:.0f})"
                 if e0["tasks"] is not None and b0["tasks"] is not None else "")
    out.append(check("fds and tasks back to the empty server's after every client closed",
                     f"fds {b0['fds']} ± {FD_TOLERANCE}, tasks ± {TASK_TOLERANCE}",
                     f"fds {e0['fds']}{tasks_txt} after {e0['seconds']:g} s",
                     e0["fds_ok"] and e0["tasks_ok"], e0["fds"]))

    d = res["delivery"]
    out.append(check("every event to a steady subscriber delivered exactly once",
                     "0 lost, 0 duplicated, 0 for another subscriber, per subscriber",
                     f"{d['steady_exact']:,}/{d['steady_subscribers']:,} subscribers exact; "
                     f"{d['steady_received']:,}/{d['steady_published']:,} received; lost {d['steady_lost']}, "
                     f"duplicated/reordered {d['steady_duplicated_or_reordered']}, foreign {d['steady_foreign']}",
                     d["steady_exact"] == d["steady_subscribers"] and d["steady_foreign"] == 0
                     and not d["steady_unknown_subscribers"] and d["steady_published"] > 0))
    st = res["steady_stats"]
    out.append(check("steady connections stayed open", f"{n:,} open, 0 closed or lost",
                     f"{st['open']:,} open; server closes {st['close_codes'] or 0}, errors {st['errors'] or 0}",
                     st["open"] == n and not st["close_codes"] and not st["errors"]))

    sent = sum(res["pub_sent"].values())
    published, received = delta("mailpush_events_published"), delta("mailpush_events_received")
    delivered, dropped = delta("mailpush_events_delivered"), delta("mailpush_events_dropped")
    got = d["steady_received"] + d["churn_received"]
    out.append(check("counts add up: server published = publisher sent, received = published",
                     "equal; 0 publish requests refused",
                     f"sent {sent:,}, published {published:,.0f}, received {received:,.0f}; "
                     f"refused {res['pub_refused_items']} items",
                     published == sent == received and res["pub_refused_items"] == 0))
    out.append(check("counts add up: delivered ≥ what clients received, delivered + dropped ≤ received",
                     "received by clients ≤ delivered ≤ received - dropped",
                     f"clients received {got:,} ≤ delivered {delivered:,.0f}; "
                     f"delivered + dropped {delivered + dropped:,.0f} ≤ {received:,.0f}",
                     got <= delivered and delivered + dropped <= received))
    out.append(check("churned tabs received at most once", "0 duplicated, 0 foreign; clean closes answered 1000",
                     f"{d['churn_received']:,}/{d['churn_published']:,} received; duplicated "
                     f"{d['churn_duplicated_or_reordered']}, foreign {d['churn_foreign']}; "
                     f"close outcomes {res['churn_close_outcomes']}",
                     d["churn_duplicated_or_reordered"] == 0 and d["churn_foreign"] == 0
                     and set(res["churn_close_outcomes"]) <= {"clean: server answered Close 1000"}))
    c = res["churn"]
    sl = res["slow"]
    out.append(check("every churn and slow-consumer connection opened", "0 failed",
                     f"churn {c['opened']:,} opened, {c['failed']} failed {c['errors'] or ''}; "
                     f"slow {sl['opened']} opened, {sl['failed']} failed {sl['errors'] or ''}",
                     c["failed"] == 0 and sl["failed"] == 0 and c["opened"] > 0))
    slow_dropped = delta("mailpush_slow_consumers")
    judged_ok = sum(v for k, v in sl["judged_outcomes"].items() if k in ("eof", "reset"))
    out.append(check("slow consumers dropped by the send-queue bound",
                     f"each gone within {SLOW_DROP_WITHIN_S:g} s (EOF/RST, no Close); "
                     "server's slow-consumer count ≥ those",
                     f"{judged_ok}/{sl['judged']} judged dropped {sl['judged_outcomes']}; server counted "
                     f"{slow_dropped:.0f}; not judged (young at the end) {sl['unjudged_outcomes']}",
                     (sl["judged"] > 0 and judged_ok == sl["judged"] and slow_dropped >= judged_ok)
                     if res["slow_count"] else None))
    kinds = res["malformed"]["kinds"]
    sent_k = {k: v["sent"] for k, v in kinds.items()}
    ok_k = {k: v["expected"] for k, v in kinds.items()}
    all_ok = sent_k == ok_k and res["malformed"]["in_flight"] == 0 and sum(sent_k.values()) > 0
    surprises = {k: v["surprises"] for k, v in kinds.items() if v["surprises"]}
    out.append(check("malformed clients got the answers they must", "every one as in the table below",
                     f"{sum(ok_k.values())}/{sum(sent_k.values())} expected" + (f"; surprises {surprises}"
                                                                              if surprises else ""), all_ok))
    rej0, rej1 = labelled(m0, "mailpush_rejections", "reason"), labelled(m1, "mailpush_rejections", "reason")
    rej = {k: v - rej0.get(k, 0) for k, v in rej1.items() if v - rej0.get(k, 0)}
    cl0, cl1 = labelled(m0, "mailpush_closes", "code"), labelled(m1, "mailpush_closes", "code")
    closes = {k: int(v - cl0.get(k, 0)) for k, v in cl1.items() if v - cl0.get(k, 0)}
    want_rej = {"bad_request": sent_k["garbage"] + sent_k["bad_header"],
                "timeout": sent_k["half_upgrade"] + sent_k["silent"]}
    # Close frames the server sent (mailpush_closes, by code): 1000 echoing
    # the churned tabs' clean closes and the bad-JSON clients' closes, 1002
    # and 1009 for the bad frames, 1008 counted for each slow consumer
    # dropped; nothing else (a 1001 would be a keepalive timeout).
    want_closes = {"1000": res["churn_closed_by_mode"].get("clean", 0) + sent_k["bad_json"],
                   "1002": sent_k["unmasked"] + sent_k["bad_opcode"], "1008": int(slow_dropped),
                   "1009": sent_k["oversized"]}
    want_rej = {k: v for k, v in want_rej.items() if v}
    want_closes = {k: v for k, v in want_closes.items() if v}
    packet_errors = delta("mailpush_packet_errors")
    rej = {k: int(v) for k, v in rej.items()}
    server_side = rej == want_rej and closes == want_closes and packet_errors == sent_k["bad_json"]
    out.append(check("server's rejections and close codes match what the clients did",
                     f"rejections {want_rej}, closes {want_closes}, packet errors {sent_k['bad_json']}",
                     f"rejections {rej}, closes {closes}, packet errors {packet_errors:.0f}", server_side))
    lags = [s["lag_s"] for s in samples if s["lag_s"] is not None]
    out.append(check("event-loop lag", f"worst < {LAG_LIMIT_S:g} s (keepalive's tolerance)",
                     f"worst {max(lags):.3f} s, median {statistics.median(lags):.3f} s" if lags
                     else f"gauge {GAUGE_LAG} absent (null)",
                     (max(lags) < LAG_LIMIT_S) if lags else None, max(lags) if lags else None))
    internal = delta("mailpush_internal_errors")
    out.append(check("no internal errors", "mailpush_internal_errors +0", f"+{internal:.0f}", internal == 0))
    return out


# -- output ----------------------------------------------------------------------------------


def table(res: dict, checks: list[dict]) -> list[str]:
    cpu = res["cpu"]
    rows = [f"soak: {res['duration_s']:.0f} s, {res['connections']:,} steady connections, "
            f"{res['rate']:g} events/s, churn {res['churn_per_s']:g}/s, {res['slow_count']} slow consumers, "
            f"{res['malformed_per_s']:g} malformed clients/s",
            f"CPU: server {cpu['server']['cores'] * 100:.1f}% of a core (user {cpu['server']['user_s']:.1f} s, "
            f"sys {cpu['server']['sys_s']:.1f} s); load generator ({cpu['load_generator']['processes']} processes) "
            f"{cpu['load_generator']['cores'] * 100:.1f}% (user {cpu['load_generator']['user_s']:.1f} s, "
            f"sys {cpu['load_generator']['sys_s']:.1f} s)", "",
            "| check | threshold | measured | pass |", "|---|---|---|---|"]
    for c in checks:
        met = {True: "yes", False: "**NO**", None: "not judged"}[c["met"]]
        rows.append(f"| {c['check']} | {c['threshold']} | {c['measured']} | {met} |")
    rows += ["", "| malformed client | must get | sent | as expected |", "|---|---|---|---|"]
    for k, v in res["malformed"]["kinds"].items():
        rows.append(f"| {k} | {MALFORMED_KINDS[k]} | {v['sent']} | {v['expected']} |")
    return rows


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = res["samples"]
    ts = [s["t"] for s in samples]
    warm = warmup_s(res["duration_s"])
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=report.DPI, sharex=True)
    (ax_rss, ax_fds), (ax_tasks, ax_lag) = axes
    rss = [s["rss_kb"] / 1024 for s in samples]
    ax_rss.plot(ts, rss, "o-", ms=3, color=report.COLORS["mailpush"], label="RSS")
    pts = [(t, r) for t, r in zip(ts, rss) if t >= warm]
    if len(pts) >= 3:
        fit = statistics.linear_regression(*zip(*pts))
        xs = [pts[0][0], pts[-1][0]]
        ax_rss.plot(xs, [fit.intercept + fit.slope * x for x in xs], "--", color="black",
                    label=f"fit after warm-up: {fit.slope * 600:+.2f} MiB/10 min")
    ax_rss.set(ylabel="RSS (MiB)", title="Server memory")
    ax_rss.legend(fontsize=8)
    ax_fds.plot(ts, [s["fds"] for s in samples], "o-", ms=3, color="#1f77b4")
    ax_fds.axhline(res["baseline_steady"]["fds"], ls=":", color="gray", label="steady clients alone")
    end = res["after_churn"]
    ax_fds.plot([end["t"]], [end["fds"]], "*", ms=10, color="black", label="after the churn stopped")
    ax_fds.set(ylabel="open fds", title="Server file descriptors")
    ax_fds.legend(fontsize=8)
    tasks = [s["tasks"] for s in samples]
    if any(t is not None for t in tasks):
        ax_tasks.plot(ts, tasks, "o-", ms=3, color="#2ca02c")
        if res["baseline_steady"]["tasks"] is not None:
            ax_tasks.axhline(res["baseline_steady"]["tasks"], ls=":", color="gray", label="steady clients alone")
            if end["tasks"] is not None:
                ax_tasks.plot([end["t"]], [end["tasks"]], "*", ms=10, color="black", label="after the churn stopped")
            ax_tasks.legend(fontsize=8)
    else:
        ax_tasks.text(0.5, 0.5, f"{GAUGE_TASKS} not exposed", ha="center", transform=ax_tasks.transAxes)
    ax_tasks.set(xlabel="seconds", ylabel="live Trio tasks", title="Server tasks")
    lags = [s["lag_s"] * 1e3 if s["lag_s"] is not None else None for s in samples]
    if any(v is not None for v in lags):
        ax_lag.plot(ts, lags, "o-", ms=3, color="#ff7f0e")
    else:
        ax_lag.text(0.5, 0.5, f"{GAUGE_LAG} not exposed", ha="center", transform=ax_lag.transAxes)
    ax_lag.set(xlabel="seconds", ylabel="worst lag over the last 15 s (ms)", title="Event-loop lag")
    ax_lag.set_ylim(bottom=0)
    for ax in axes.flat:
        ax.axvline(warm, ls=":", color="gray", lw=0.8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"mailpush soak: {res['connections']:,} connections, {res['duration_s']:.0f} s "
                 f"(dotted line: end of warm-up)", fontsize=10)
    report._save(plt, fig, path, "soak")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="length of the load phase")
    ap.add_argument("--connections", type=int, default=CONNECTIONS, help="steady WebSocket clients")
    ap.add_argument("--rate", type=float, default=RATE, help="events/s to the steady subscribers")
    ap.add_argument("--churn", type=float, default=CHURN_PER_S, help="churned connections opened per second")
    ap.add_argument("--slow", type=int, default=SLOW_COUNT, help="slow consumers at a time")
    ap.add_argument("--malformed", type=float, default=MALFORMED_PER_S, help="malformed clients per second")
    ap.add_argument("--sample", type=float, default=SAMPLE_S, help="seconds between samples of the server")
    ap.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT_S,
                    help="the server's --handshake-timeout (when a stalled upgrade gets its 408)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for soak.json, soak.png, logs/")
    a = ap.parse_args(argv)
    if a.connections < 1 or a.seconds <= 0 or a.sample <= 0:
        ap.error("--connections, --seconds and --sample must be positive")
    why = SERVERS["mailpush"].unavailable()
    if why:
        print(f"cannot soak mailpush: {why}")
        return 1
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "logs" / "soak-mailpush.log"
    if log_path.exists():
        log_path.unlink()
    args = argv if argv is not None else sys.argv[1:]
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    signal.signal(signal.SIGTERM, _sigterm)
    busy = cpu_busy()
    began = time.monotonic()
    meta = {"command": shlex.join([python, "bench/soak.py", *args]),
            "make": "make soak" if list(args) in (["--seconds", "600"], ["--seconds", "600.0"]) else None,
            "commit": git("rev-parse", "HEAD"), "src_uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_facts(), "load_before_run_cores": round(busy, 2)}
    print(f"soak: {a.seconds:g} s, {a.connections:,} connections, {a.rate:g} events/s; "
          f"machine {busy:.2f} cores busy before the run; writing to {out}", flush=True)
    try:
        res = soak(a, out, lambda s: print(s, flush=True))
        error = None
    except (ServerError, LoadGenError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
        print(f"soak FAILED: {error}\n{traceback.format_exc()}", flush=True)
        res = None
    finally:
        stop_all()
    meta["wall_s"] = round(time.monotonic() - began, 1)
    meta["notes"] = sorted(Server.notes)
    if res is None:
        (out / "soak.json").write_text(json.dumps({**meta, "error": error, "verdict": {"passed": False}}, indent=1))
        return 1
    checks = verdict(res)
    passed = all(c["met"] is not False for c in checks)
    not_judged = [c["check"] for c in checks if c["met"] is None]
    doc = {**meta, "duration_s": res["duration_s"], "verdict": {"passed": passed, "checks": checks,
                                                                 "not_judged": not_judged},
           "constants": {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, str))},
           **{k: v for k, v in res.items() if k != "duration_s"}}
    (out / "soak.json").write_text(json.dumps(doc, indent=1, default=str))
    plot(res, out / "soak.png")
    print("\n" + "\n".join(table(res, checks)))
    if meta["notes"]:
        print("\nnotes: " + "; ".join(meta["notes"]))
    print(f"\n{'PASSED' if passed else 'FAILED'}" + (f" (not judged: {', '.join(not_judged)})" if not_judged else "")
          + f"; {out / 'soak.json'}, {out / 'soak.png'}; took {meta['wall_s']:.0f} s")
    return 0 if passed else 1


def _sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
