"""Recovery under faults, the issue-11 targets ("Never lose a letter"),
counted per tab AnyCable-style: every tab of bench/recovery_clients.py is
its own subscriber, resumes with ``since`` whenever its connection ends,
and counts ``messages_missing`` and ``messages_duplicated`` against what
the publisher says it published to it.

``faults``: TABS tabs under a steady publish load (RATE events/s, round
robin, each subscriber's events numbered in their data), one fault in the
middle, then the count. 0 missing and 0 duplicated per tab is the target,
with no resync:

- ``kill``: two mailpush instances behind HAProxy (mode tcp, /healthz
  checks) on one Redis (``--bus redis://``), the mail store publishing with
  ``FCALL mailpush_publish``; one instance is SIGKILLed; its tabs come back
  through HAProxy to the other and resume from the Redis Streams.
- ``drain``: the same, but one instance is drained (SIGTERM,
  ``--drain-seconds DRAIN_S``): its tabs are closed with 1012 and resume.
- ``workers``: ``--workers 2`` on the embedded bus, publishing at the
  supervisor's admin API; worker 1 (its pid from the process tree) is
  SIGKILLed, its tabs reconnect to the shared port, reach worker 0 (and the
  restarted worker 1), and resume from the history the supervisor keeps.
- ``cluster``: one instance on a 3-master Redis Cluster (``--bus
  redis+cluster://``, recovery_redis.py), the tabs connected to it
  directly, the mail store publishing with ``FCALL mailpush_publish`` on
  the master of each subscriber's slot; one master is SIGKILLed and
  started again at once on its port with its nodes.conf and AOF: it
  rejoins as that master with its data, and mailpush catches that shard's
  tabs up from the history over their open connections.
- ``sentinel``: one instance on a master, its replica and three sentinels
  (``--bus redis+sentinel://``), the mail store publishing on the master
  the sentinels name; the master is SIGKILLed, the sentinels promote the
  replica, mailpush follows and catches every tab up (replication is
  asynchronous: writes the old master acknowledged but had not sent are
  Redis's loss, counted as the tabs see it, missing or resynced).

For the two bus faults the mail store skips a publish that Redis refused
or did not answer (its master away) and expects only the acknowledged
ones; each tab is counted by which ``q`` it got, and the figures add when
Redis served again, when the mail store's publishes to the cut-off tabs
were acknowledged again, when each cut-off tab first got an event
published after the fault, and the longest an acknowledged event waited
for its tab (``bus_faults_table``).

Server CPU (the mailpush processes, summed; Redis apart) is reported per
delivered event, beside the rate.

``resume``: RESUME_TABS tabs of as many subscribers on one instance (Redis
bus), another instance idle on the same Redis; every tab has had one
event; the first instance is SIGKILLed, one more event is published to
every subscriber while the tabs are away, then they all resume at once on
the other instance (the tabs hold until then, so that the count starts
from one moment). Measured: the time until every tab has its missed event
(target RESUME_TARGET_S), Redis commands per resuming subscriber (``INFO
commandstats`` before and after, commands the functions run included), and
CPU per resume of the instance and of Redis.

``memory``: with the embedded bus, RSS per retained event in the history
(a realistic small event; RSS growth with ``--history-size 100`` minus the
growth of the same publishes with ``--history-size 0``), and RSS per idle
subscribed connection at IDLE_CONNECTIONS with history on and off in the
same run (target MEMORY_BUDGET_KB).

``publish``: what the history costs a publish on the Redis bus: the bus's
own ``publish()`` (a pipeline of ``FCALL mailpush_publish``, what the admin
API runs) against a pipeline of plain PUBLISHes of the same events: time
per request of PUBLISH_ITEMS, the publisher's CPU and Redis's per event.

``latency``: publish-to-receive latency through the Redis history (issue
target: p99 < 20 ms at 10,000 events/s over 5,000 connections). The
latency scenario measures it already (its publishes go through the admin
API, which pipelines ``FCALL mailpush_publish``): this runs that
scenario's own Redis-bus run (``_latency_one``, the full profile's sizes)
once a round, for a median, with Redis's CPU beside mailpush's and how
busy the machine was before each round. The whole scenario, every bus and
rate, is::

    .venv/bin/python bench/run.py --only latency --servers mailpush --out bench/results/recovery_latency

This one::

    .venv/bin/python bench/recovery.py [--only faults,resume,memory,publish,latency] [--rounds 3]
                                       [--faults kill,drain,workers,cluster,sentinel]
                                       [--tabs 1000] [--resume-tabs 15000]

prints the tables and writes bench/results/recovery.json (servers' logs in
bench/results/logs/recovery-*.log); the parts and fault kinds not run keep
their stored results. Needs redis-server, redis-cli and haproxy (``make
test`` installs them).

Resource handling: every process started here (redis-server, sentinels,
haproxy, mailpush instances, client processes) is stopped when its round
ends, also on an error or Ctrl-C; the Redis directories are removed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loadgen import LoadGen, procs_for  # noqa: E402
from recovery_clients import Tabs  # noqa: E402
from recovery_redis import (  # noqa: E402
    CLUSTER_NODE_TIMEOUT_MS,
    SENTINEL_DOWN_MS,
    Cluster,
    ClusterPublisher,
    SentinelPublisher,
    Sentinels,
)
from recovery_redis import cli as redis_cli  # noqa: E402
from scenarios import PROFILES, Context, settle_rss  # noqa: E402
from scenarios._latency import LATENCY_P99_MS, LATENCY_RATE, _bus_args, _latency_one  # noqa: E402
from servers import HOST, SECRET, SERVERS, Server, ServerError, free_port, stop_all  # noqa: E402

# -- faults ----------------------------------------------------------------------
# The issue's count of tabs, over two client processes (one core's worth).
TABS = 1000
FAULT_PROCS = 2
# Events per second over all tabs (two a second per tab: a busy mailbox,
# and a load two cores carry with the clients and Redis beside), published
# every TICK_S (10,000 events/s is the latency scenario's business).
RATE = 2000
TICK_S = 0.01
# Load before the fault, and after it until the publisher stops: long enough
# for every tab of the failed instance to be back and live again.
BEFORE_S = 2.0
AFTER_S = 4.0
# After the last publish, how long the tabs may take to have everything.
CATCH_UP_S = 30.0
# The drained instance's --drain-seconds.
DRAIN_S = 2.0
# The faults of the Redis behind one instance (recovery_redis.py), and the
# cluster's master that is restarted (the second of three).
BUS_FAULTS = ("cluster", "sentinel")
CLUSTER_VICTIM = 1
# A bus fault's load goes on at least this long after Redis serves again
# (however long its failover took), at most BUS_FAULT_MAX_S after the fault.
BUS_AFTER_BACK_S = 2.0
BUS_FAULT_MAX_S = 30.0
# HAProxy's health checks: every 100 ms, one failure takes a server out
# (test_haproxy.py's configuration); a connection refused by a server that
# is down but not yet marked so goes to another server at once (redispatch
# on every retry), instead of HAProxy's one-second turn-around before
# retrying the same one.
HAPROXY_CONFIG = """
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
frontend push
    bind {host}:{port}
    default_backend mailpush
backend mailpush
    balance roundrobin
    retries 3
    option redispatch 1
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
    server a {host}:{a} check inter 100ms fall 1 rise 2
    server b {host}:{b} check inter 100ms fall 1 rise 2
"""

# -- resume --------------------------------------------------------------------------
# The issue's storm: this many tabs (and subscribers) resume at once, on one
# instance; over three client processes (one may hold ~18,000 sockets).
RESUME_TABS = 15_000
RESUME_PROCS = 3
# The issue's target: all of them recovered within this (seconds).
RESUME_TARGET_S = 5.0
# FCALLs per pipeline when publishing to every subscriber.
PIPELINE = 1000
# How long the storm may take before the round counts as failed.
RESUME_TIMEOUT_S = 60.0

# -- memory ---------------------------------------------------------------------------
# A realistic small event: a new letter's id, folder and sender (the frame
# a tab gets is about 190 bytes).
EVENT_DATA = '{{"id":"M{n:08d}","mailbox":"INBOX","from":"bob@example.com","subject":"Lunch on Friday?"}}'
# (subscribers, events each): most subscribers hold a few events; a few
# hold many (the history's default size is 100).
HISTORY_SHAPES = ((10_000, 10), (1_000, 100))
HISTORY_BATCH = 5000  # items per publish request
# Idle connections for the per-connection figure (the memory scenario's 15,000).
IDLE_CONNECTIONS = 15_000
MEMORY_BUDGET_KB = 3.5
SETTLE_MAX_S = 5.0

ROUNDS = 3
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


# -- the processes ---------------------------------------------------------------------


@contextlib.contextmanager
def redis_server():
    """A throwaway redis-server (no persistence) on a free port: yields (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def haproxy(a: int, b: int, log_dir: Path):
    """HAProxy in front of two instances: yields its port once both pass their checks."""
    port = free_port()
    cfg = log_dir / "recovery-haproxy.cfg"
    cfg.write_text(HAPROXY_CONFIG.format(host=HOST, port=port, a=a, b=b))
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # a /healthz through it answered 200: a backend is up
            try:
                conn = http.client.HTTPConnection(HOST, port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
                conn.close()
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise ServerError("haproxy did not come up")
            time.sleep(0.05)
        time.sleep(0.5)  # both checked twice
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)


def mailpush(log_dir: Path, name: str, args: list[str]) -> Server:
    return Server(SERVERS["mailpush"], log_dir / f"recovery-{name}.log", args)


def kill(srv: Server) -> None:
    """SIGKILL the instance (its whole process group) and reap it."""
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(10)


def worker_pid(srv: Server, index: int) -> int:
    """The pid of worker ``index`` of a ``--workers`` supervisor (its command line says ``--worker-index i``)."""
    for pid in srv.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--worker-index" in argv and argv[argv.index(b"--worker-index") + 1] == str(index).encode():
            return pid
    raise ServerError(f"no worker {index} among {srv.pids()}")


def healthy(host: str, port: int) -> bool:
    """An admin API's /healthz answers 200."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def gauge(host: str, port: int, name: str) -> float:
    """One value of an admin API's /metrics."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def cpu_s(pid: int) -> float:
    """CPU seconds of one process, every thread (schedstat: ns resolution)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return total / 1e9


class CpuWatch:
    """CPU of processes that may die meanwhile: sampled every PERIOD_S, the
    last reading of each pid kept (a killed process's last ~0.1 s is lost)."""

    PERIOD_S = 0.1

    def __init__(self, pids_of) -> None:
        self.pids_of = pids_of
        self.last: dict[int, float] = {}
        self.first: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in self.pids_of():
            t = cpu_s(pid)
            if t:
                self.first.setdefault(pid, t)
                self.last[pid] = max(self.last.get(pid, 0.0), t)

    def _run(self) -> None:
        while not self._stop.wait(self.PERIOD_S):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def seconds(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last)


# -- publishing ---------------------------------------------------------------------------


class Resp:
    """A minimal Redis client: pipelined commands, RESP2 replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=30)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def call(self, *commands: list) -> list:
        out = bytearray()
        for args in commands:
            out += b"*%d\r\n" % len(args)
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.sock.sendall(out)
        return [self._reply() for _ in commands]

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(f"Redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("Redis closed the connection")
                self.buf += chunk
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"unexpected RESP line {line[:80]!r}")

    def fcall(self, items: list[tuple[str, int]]) -> None:
        """``mailpush_publish`` each (subscriber, q), pipelined; each must get its offset."""
        for i in range(0, len(items), PIPELINE):
            chunk = items[i : i + PIPELINE]
            replies = self.call(
                *[
                    [
                        b"FCALL",
                        b"mailpush_publish",
                        b"2",
                        f"mailpush:meta:{{{sub}}}",
                        f"mailpush:hist:{{{sub}}}",
                        sub,
                        b"new_letter",
                        b'{"q":%d}' % q,
                        b"",
                    ]
                    for sub, q in chunk
                ]
            )
            if not all(isinstance(r, int) and r > 0 for r in replies):
                raise RuntimeError(f"FCALL answered {replies[:3]}")

    def commandstats(self) -> dict[str, int]:
        """Calls per command since start (commands run by functions included)."""
        text = self.call([b"INFO", b"commandstats"])[0].decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line[len("cmdstat_") :].partition(":")
                out[name] = int(dict(f.split("=") for f in fields.split(","))["calls"])
        return out


class AdminPublisher:
    """Publishes at an admin API (a supervisor's: it relays to every worker)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=30)

    def fcall(self, items: list[tuple[str, int]]) -> None:
        body = json.dumps(
            [{"subscriber": sub, "event": "new_letter", "data": {"q": q}} for sub, q in items], separators=(",", ":")
        ).encode()
        self.conn.request("POST", "/v1/publish", body=body, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        answer = resp.read()
        if resp.status != 202:
            raise RuntimeError(f"publish answered {resp.status}: {answer[:200]!r}")

    def close(self) -> None:
        self.conn.close()


class Load(threading.Thread):
    """RATE events a second, round robin over the tabs' subscribers, each
    subscriber's events numbered ``q`` = 1, 2, …; ``published[i]`` counts
    the events of subscriber i that were acknowledged, ``acked[i]`` says
    which (q, when sent, when acknowledged; monotonic ns).

    A publisher with ``fcall(items)`` raises unless every item was
    acknowledged (the round fails). One with ``publish(items)`` (the bus
    faults' mail stores, recovery_redis.py) answers per item: True
    (acknowledged), False (certainly not run: skipped, its ``q`` is never
    used again), None (sent, unanswered: it may have run; kept in
    ``unknown[i]``, neither expected nor counted missing)."""

    def __init__(self, names: list[str], rate: int, publisher) -> None:
        super().__init__(daemon=True)
        self.names = names
        self.rate = rate
        self.publisher = publisher
        self.published = [0] * len(names)
        self.assigned = [0] * len(names)  # q given out (acknowledged or not)
        self.sent = 0
        self.late = 0
        self.acked: list[list[tuple[int, int, int]]] = [[] for _ in names]
        self.unknown: list[list[int]] = [[] for _ in names]
        self.refused = 0
        self.lenient = hasattr(publisher, "publish")
        self.error: str | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        turn, tick, start = 0, 0, time.monotonic()
        n = len(self.names)
        try:
            while not self.stopping.is_set():
                tick += 1
                due = start + tick * TICK_S
                now = time.monotonic()
                if now < due:
                    time.sleep(due - now)
                elif now - due > TICK_S:
                    self.late += 1
                k = int(self.rate * tick * TICK_S) - self.sent
                if not k:
                    continue
                picked = [(turn + j) % n for j in range(k)]
                turn += k
                items = []
                for i in picked:
                    self.assigned[i] += 1
                    items.append((self.names[i], self.assigned[i]))
                t_sent = time.monotonic_ns()
                if self.lenient:
                    statuses = self.publisher.publish(items)
                else:
                    self.publisher.fcall(items)  # raises unless every item was acknowledged
                    statuses = [True] * k
                t_ack = time.monotonic_ns()
                for i, (_, q), ok in zip(picked, items, statuses, strict=True):
                    if ok:
                        self.published[i] += 1
                        self.acked[i].append((q, t_sent, t_ack))
                    elif ok is None:
                        self.unknown[i].append(q)
                    else:
                        self.refused += 1
                self.sent += k
        except Exception as e:  # noqa: BLE001 - recorded: the round reports it and fails
            self.error = f"{type(e).__name__}: {e}"

    def start(self) -> None:
        self.began = time.monotonic()
        super().start()

    def stop(self) -> float:
        self.stopping.set()
        self.join(30)
        return time.monotonic() - self.began


# -- faults ----------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def count(report: dict, expected: list[int]) -> dict:
    """The per-tab counts, AnyCable-style, and their totals."""
    missing, dups = report["missing"], report["duplicated"]
    return {
        "messages_expected": sum(expected),
        "messages_received": sum(report["got"]),
        "messages_missing": sum(missing),
        "messages_duplicated": sum(dups),
        "tabs_missing": sum(1 for m in missing if m),
        "tabs_duplicated": sum(1 for d in dups if d),
        "max_missing_per_tab": max(missing, default=0),
        "max_duplicated_per_tab": max(dups, default=0),
        "out_of_order": sum(report["disorder"]),
        "resyncs": sum(report["resyncs"]),
        "resync_reasons": report["reasons"],
        "answers": report["answers"],
        "ended": report["ended"],
        "other_packets": report["packets"],
    }


def fault_round(kind: str, tabs_n: int, log_dir: Path) -> dict:
    """One round of ``kind`` (kill, drain, workers, cluster, sentinel): see the module docstring."""
    busy = busy_cores(1.0)
    bus_fault = kind in BUS_FAULTS
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        redis = None
        redis_pids = None
        cluster = sentinels = None
        if kind == "workers":
            srv = stack.enter_context(mailpush(log_dir, "workers", ["--workers", "2"]))
            servers.append(srv)
            deadline = time.monotonic() + 30
            for i in range(2):  # each worker listens (the group's /healthz says only that they run)
                while not healthy(HOST, srv.aport + 1 + i):
                    if time.monotonic() > deadline:
                        raise ServerError(f"worker {i} did not come up")
                    time.sleep(0.05)
            targets = [(HOST, srv.port)]
            publisher = AdminPublisher(srv.aport)  # the supervisor's: into the relay
        elif kind == "cluster":
            cluster = stack.enter_context(Cluster())
            servers.append(stack.enter_context(mailpush(log_dir, "cluster", ["--bus", cluster.url])))
            targets = [(HOST, servers[0].port)]
            redis_pids = cluster.pids
            publisher = None  # it routes by the tabs' names
        elif kind == "sentinel":
            sentinels = stack.enter_context(Sentinels())
            servers.append(stack.enter_context(mailpush(log_dir, "sentinel", ["--bus", sentinels.url])))
            targets = [(HOST, servers[0].port)]
            redis_pids = sentinels.data_pids
            publisher = SentinelPublisher(sentinels.sentinels)
        else:
            redis, rport = stack.enter_context(redis_server())
            redis_pids = lambda: [redis.pid]  # noqa: E731
            bus = ["--bus", f"redis://{HOST}:{rport}/0", "--drain-seconds", str(DRAIN_S)]
            a = stack.enter_context(mailpush(log_dir, f"{kind}-a", bus))
            b = stack.enter_context(mailpush(log_dir, f"{kind}-b", bus))
            servers += [a, b]
            _lb, lport = stack.enter_context(haproxy(a.port, b.port, log_dir))
            targets = [(HOST, lport)]
            publisher = Resp(rport)  # the mail store: FCALL
        tabs = stack.enter_context(Tabs(tabs_n, FAULT_PROCS, targets, SECRET, prefix=f"{kind}-"))
        if cluster is not None:
            publisher = ClusterPublisher(cluster, tabs.names)
        stack.callback(publisher.close)
        opened = tabs.open(60)
        if opened["ok"] < tabs_n:
            raise ServerError(f"only {opened['ok']:,}/{tabs_n:,} tabs opened: {opened['ended']}")

        if kind == "workers":  # the kernel spread them (SO_REUSEPORT): the victim holds some
            held = [gauge(HOST, srv.aport + 1 + i, "mailpush_connections") for i in range(2)]
            if min(held) == 0:
                raise ServerError(f"tabs per worker: {held}")
        # The tabs the fault cuts off from their events: the victim master's
        # (cluster), every tab (sentinel); None: the instance faults' own count.
        affected = None
        if cluster is not None:
            victim_port = cluster.nodes[CLUSTER_VICTIM][0]
            affected = [publisher.port_of[n] == victim_port for n in tabs.names]
        elif sentinels is not None:
            affected = [True] * tabs_n

        def pids():
            return [p for s in servers for p in s.pids()]

        with CpuWatch(pids) as mp_cpu, CpuWatch(redis_pids or list) as redis_cpu:
            load = Load(tabs.names, RATE, publisher)
            load.start()
            time.sleep(BEFORE_S)
            t_fault = time.monotonic_ns()
            exit_code = None
            redis_back_s = None  # the victim serving again (cluster), the replica named master (sentinel)
            if kind == "kill":
                kill(servers[0])
            elif kind == "drain":
                os.kill(servers[1].proc.pid, signal.SIGTERM)
                exit_code = servers[1].proc.wait(DRAIN_S + 10)
            elif kind == "workers":
                os.kill(worker_pid(servers[0], 1), signal.SIGKILL)
            elif kind == "cluster":
                cluster.kill(CLUSTER_VICTIM)
                cluster.start(CLUSTER_VICTIM)  # same port, dir, nodes.conf and AOF: it rejoins as that master
            else:
                sentinels.kill(sentinels.master)
            stop_at = load.began + BEFORE_S + AFTER_S
            if bus_fault:  # and BUS_AFTER_BACK_S after Redis serves again
                stop_at = t_fault / 1e9 + BUS_FAULT_MAX_S
            while (now := time.monotonic()) < stop_at:
                if not bus_fault:
                    time.sleep(stop_at - now)
                    continue
                if redis_back_s is None:
                    if cluster is not None:
                        ok = "cluster_state:ok" in redis_cli(victim_port, "cluster", "info")
                    else:
                        ok = sentinels.named() == sentinels.replica
                    if ok:
                        redis_back_s = (time.monotonic_ns() - t_fault) / 1e9
                        stop_at = max(load.began + BEFORE_S + AFTER_S, now + BUS_AFTER_BACK_S)
                time.sleep(0.05)
            seconds = load.stop()
            if load.error:
                raise ServerError(f"publishing failed: {load.error}")
            expected = load.published
            t_end = time.monotonic()
            have = tabs.expect(expected, CATCH_UP_S)
            caught_up_s = time.monotonic() - t_end
            report = tabs.report(expected, detail=bus_fault)
            if bus_fault:  # counted by which q were acknowledged: wait for those (an unanswered one may have come)
                while True:
                    lacking = sum(1 for m in acked_missing(report, load) if m)
                    if not lacking or time.monotonic() > t_end + CATCH_UP_S:
                        break
                    time.sleep(0.2)
                    report = tabs.report(expected, detail=True)
        back = [(t - t_fault) / 1e9 for t in report["recovered_ns"] if t > t_fault]
        delivered = sum(report["got"])
        extra = {}
        if bus_fault:
            extra = bus_fault_figures(report, load, affected, t_fault, t_end)
            report["missing"] = extra.pop("missing")
            have = tabs_n - sum(1 for m in report["missing"] if m)
            caught_up_s = extra.pop("catch_up_s")
            back = extra.pop("back")
        out = {
            "kind": kind,
            "tabs": tabs_n,
            "rate": RATE,
            "seconds": seconds,
            "published": load.sent,
            "late_ticks": load.late,
            "tabs_complete": have,
            "catch_up_s": caught_up_s,
            "tabs_resumed": len(back),
            "last_resumed_after_fault_s": max(back, default=None),
            "resumed_p50_s": _pct(back, 0.5),
            "drain_exit_code": exit_code,
            "busy_cores_before": busy,
            "server_cpu_s": mp_cpu.seconds(),
            "redis_cpu_s": redis_cpu.seconds(),
            "server_cpu_us_per_event": mp_cpu.seconds() / delivered * 1e6 if delivered else None,
            "redis_cpu_us_per_event": redis_cpu.seconds() / delivered * 1e6 if delivered and redis_pids else None,
            **count(report, expected),
        }
        if bus_fault:
            out.update(extra, redis_back_s=redis_back_s, publish_errors=dict(publisher.errors))
            if sentinels is not None:
                out["masters_named"] = [(round(t - t_fault / 1e9, 3), p) for t, p in publisher.masters]
        per_tab = [
            {"tab": n, "missing": m, "duplicated": d}
            for n, m, d in zip(report["names"], report["missing"], report["duplicated"], strict=True)
            if m or d
        ]
        out["tabs_with_problems"] = per_tab[:20]
    return out


def acked_missing(report: dict, load: Load) -> list[int]:
    """Per tab, the acknowledged q it never got."""
    out = []
    for arrivals, acked in zip(report["arrivals"], load.acked, strict=True):
        seen = {q for q, _ in arrivals}
        out.append(sum(1 for q, _, _ in acked if q not in seen))
    return out


def bus_fault_figures(report: dict, load: Load, affected: list[bool], t_fault: int, t_end: float) -> dict:
    """The bus faults' figures, from when each tab first got each q and
    when each q was sent and acknowledged: a tab is back once it gets an
    event sent after the fault (the earlier ones may have been on their
    way); the mail store is back once Redis acknowledges a publish for an
    affected subscriber again."""
    missing, back, store_back, delays, after_delays = [], [], [], [], []
    unknown_got = phantom = 0
    last_arrival = 0
    for k, (arrivals, acked) in enumerate(zip(report["arrivals"], load.acked, strict=True)):
        got = dict(arrivals)
        unknown = set(load.unknown[k])
        acked_q = set()
        first_after = None
        for q, sent, ack in acked:
            acked_q.add(q)
            t = got.get(q)
            if t is None:
                continue
            last_arrival = max(last_arrival, t)
            delays.append(max(0, t - ack) / 1e9)
            if sent > t_fault:
                after_delays.append(max(0, t - ack) / 1e9)
                first_after = t if first_after is None else min(first_after, t)
        missing.append(sum(1 for q in acked_q if q not in got))
        unknown_got += sum(1 for q in got if q in unknown)
        phantom += sum(1 for q in got if q not in acked_q and q not in unknown)
        if affected[k]:
            if first_after is not None:
                back.append((first_after - t_fault) / 1e9)
            sent_after = [sent for _, sent, _ in acked if sent > t_fault]
            if sent_after:
                store_back.append((min(sent_after) - t_fault) / 1e9)
    complete = not any(missing)
    return {
        "missing": missing,
        "back": back,
        "catch_up_s": max(0.0, last_arrival / 1e9 - t_end) if complete else None,
        "tabs_affected": sum(affected),
        "tabs_affected_never_back": sum(affected) - len(back),
        "store_back_s": min(store_back, default=None),
        "delay_max_s": max(delays, default=None),
        "delay_p99_s": _pct(delays, 0.99),
        "delay_after_fault_max_s": max(after_delays, default=None),
        "publishes_refused": load.refused,
        "publishes_unanswered": sum(len(u) for u in load.unknown),
        "unanswered_delivered": unknown_got,
        "phantoms": phantom,
    }


# -- resume -------------------------------------------------------------------------------------


def resume_round(tabs_n: int, log_dir: Path) -> dict:
    busy = busy_cores(1.0)
    with contextlib.ExitStack() as stack:
        redis, rport = stack.enter_context(redis_server())
        bus = ["--bus", f"redis://{HOST}:{rport}/0"]
        a = stack.enter_context(mailpush(log_dir, "resume-a", bus))
        b = stack.enter_context(mailpush(log_dir, "resume-b", bus))
        store = Resp(rport)
        stack.callback(store.close)
        tabs = stack.enter_context(
            Tabs(tabs_n, RESUME_PROCS, [(HOST, a.port), (HOST, b.port)], SECRET, prefix="storm-")
        )
        t0 = time.monotonic()
        opened = tabs.open(120)
        if opened["ok"] < tabs_n:
            raise ServerError(f"only {opened['ok']:,}/{tabs_n:,} tabs opened: {opened['ended']}")
        open_s = time.monotonic() - t0
        store.fcall([(s, 1) for s in tabs.names])  # one live event each: every tab has an offset
        if tabs.expect([1] * tabs_n, 30) < tabs_n:
            raise ServerError("not every tab got its live event")
        tabs.auto(False)  # from now on the lost tabs wait for go
        kill(a)
        deadline = time.monotonic() + 15
        while tabs.state()["waiting"] < tabs_n:
            if time.monotonic() > deadline:
                raise ServerError(f"the tabs did not all notice the kill: {tabs.state()}")
            time.sleep(0.05)
        store.fcall([(s, 2) for s in tabs.names])  # missed while away
        before = store.commandstats()
        b_cpu0, r_cpu0 = b.cpu_s(), cpu_s(redis.pid)
        t_go = time.monotonic_ns()
        have = tabs.expect([2] * tabs_n, RESUME_TIMEOUT_S, meanwhile=tabs.go)
        all_s = (time.monotonic_ns() - t_go) / 1e9
        b_cpu, r_cpu = b.cpu_s() - b_cpu0, cpu_s(redis.pid) - r_cpu0
        after = store.commandstats()
        report = tabs.report([2] * tabs_n)
    done = [(t - t_go) / 1e9 for t in report["done_ns"] if t > t_go]
    answered = [(t - t_go) / 1e9 for t in report["recovered_ns"] if t > t_go]
    calls = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    calls = {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v}
    calls.pop("info", None)  # our own
    top = {k: v for k, v in calls.items() if k in ("fcall", "subscribe", "ping", "publish", "unsubscribe")}
    return {
        "tabs": tabs_n,
        "open_s": open_s,
        "tabs_complete": have,
        "busy_cores_before": busy,
        "all_recovered_s": max(done, default=None),
        "wall_s": all_s,
        "recovered_p50_s": _pct(done, 0.5),
        "recovered_p99_s": _pct(done, 0.99),
        "answered_p50_s": _pct(answered, 0.5),
        "answered_max_s": max(answered, default=None),
        "redis_commands": sum(calls.values()),
        "redis_commands_per_subscriber": sum(calls.values()) / tabs_n,
        "redis_top_level_commands_per_subscriber": sum(top.values()) / tabs_n,
        "redis_calls": calls,
        "server_cpu_us_per_resume": b_cpu / tabs_n * 1e6,
        "redis_cpu_us_per_resume": r_cpu / tabs_n * 1e6,
        "resumes_per_s": tabs_n / max(done, default=float("nan")) if done else None,
        **count(report, [2] * tabs_n),
    }


# -- memory -------------------------------------------------------------------------------------


def history_round(subscribers: int, each: int, size: int, log_dir: Path) -> dict:
    """RSS growth of an idle embedded-bus instance after ``subscribers`` x
    ``each`` events published with --history-size ``size``."""
    args = ["--history-size", str(size), "--history-max-events", str(max(1_000_000, subscribers * each))]
    with mailpush(log_dir, f"history-{size}", args) as srv:
        base = settle_rss(srv, SETTLE_MAX_S)
        items, n = [], 0
        frame = None
        for _ in range(each):
            for s in range(subscribers):
                n += 1
                items.append(
                    f'{{"subscriber":"user{s:06d}@example.com","event":"new_letter","data":{EVENT_DATA.format(n=n)}}}'
                )
        cpu0 = srv.cpu_s()
        t0 = time.monotonic()
        for i in range(0, len(items), HISTORY_BATCH):
            status, answer = srv.admin(
                "POST", "/v1/publish", ("[" + ",".join(items[i : i + HISTORY_BATCH]) + "]").encode()
            )
            if status != 202:
                raise ServerError(f"publish answered {status}: {answer[:200]!r}")
        seconds, cpu = time.monotonic() - t0, srv.cpu_s() - cpu0
        rss = settle_rss(srv, SETTLE_MAX_S)
        frame = len(
            json.dumps(
                {
                    "type": "event",
                    "subscriber": "user000000@example.com",
                    "event": "new_letter",
                    "data": json.loads(EVENT_DATA.format(n=1)),
                    "offset": 123456,
                },
                separators=(",", ":"),
            )
        )
        _, metrics = srv.admin("GET", "/metrics")
    retained = None
    for line in metrics.decode().splitlines():
        if line.startswith("mailpush_history_events "):
            retained = int(float(line.split()[1]))
    return {
        "subscribers": subscribers,
        "events_each": each,
        "history_size": size,
        "events": n,
        "retained": retained,
        "frame_bytes": frame,
        "rss_base_kib": base,
        "rss_kib": rss,
        "delta_bytes": (rss - base) * 1024,
        "publish_rate": n / seconds,
        "server_cpu_us_per_publish": cpu / n * 1e6,
    }


def idle_round(history: bool, log_dir: Path) -> dict:
    args = [] if history else ["--history-size", "0"]
    n = IDLE_CONNECTIONS
    with (
        mailpush(log_dir, f"idle-{'on' if history else 'off'}", args) as srv,
        LoadGen(HOST, srv.port, "/v1/ws", SECRET, procs=procs_for(n, 2), subscribe=True) as lg,
    ):
        base = settle_rss(srv, SETTLE_MAX_S)
        r = lg.open(n, timeout=120)
        if r["failed"]:
            raise ServerError(f"{r['failed']} connections failed: {r['errors']}")
        rss = settle_rss(srv, SETTLE_MAX_S)
    return {
        "history": history,
        "connections": n,
        "rss_base_kib": base,
        "rss_kib": rss,
        "kb_per_connection": (rss - base) * 1.024 / n,
    }


# -- latency ------------------------------------------------------------------------------------------


def busy_cores(seconds: float = 2.0) -> float:
    """Cores in use machine-wide over ``seconds`` (as run.py samples before a run)."""

    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals) - vals[3] - vals[4], sum(vals)

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / (t1 - t0) * os.cpu_count() if t1 > t0 else 0.0


def redis_children() -> list[int]:
    """This process's redis-server children (the latency scenario starts one)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and comm.startswith("redis-server"):
                out.append(int(entry))
    return out


def latency_round(out_dir: Path) -> dict:
    """The latency scenario's Redis-bus run at LATENCY_RATE, full profile."""
    busy = busy_cores()
    ctx = Context(PROFILES["full"], out_dir, log=lambda _: None)
    with _bus_args("redis") as args:
        if args is None:
            raise ServerError("redis-server is not installed")
        with CpuWatch(redis_children) as redis_cpu:
            r = _latency_one(ctx, SERVERS["mailpush"], "redis", args, LATENCY_RATE)
    r.pop("cdf_ms", None)
    r["redis_cpu_us_per_event"] = redis_cpu.seconds() / r["published"] * 1e6 if r["published"] else None
    r["busy_cores_before"] = busy
    return r


# Publishing with history: requests of this many items, this many times.
PUBLISH_ITEMS = 50
PUBLISH_REQUESTS = 400


def publish_cost_round() -> dict:
    """What the history costs a publish on the Redis bus: the bus's own
    ``publish()`` (one pipeline of ``FCALL mailpush_publish``, what the admin
    API does) against a pipeline of plain PUBLISHes of the same events, in
    this process, to a Redis of its own: time per request, this process's
    CPU and Redis's per event."""
    import trio

    sys.path.insert(0, str(BENCH.parent / "src"))
    from mailpush import Config
    from mailpush.bus.redis import RedisBus

    with redis_server() as (redis, port):
        url = f"redis://{HOST}:{port}/0"
        out = {}

        async def main() -> None:
            bus = RedisBus(url, Config(bus=url, secret=SECRET))

            async def sink(batch) -> None:
                pass

            items = [(f"user{i}@example.com", "new_letter", {"t": 1234567890123}, None) for i in range(PUBLISH_ITEMS)]
            plain = [
                (f"mailpush:{s}", json.dumps({"subscriber": s, "event": e, "data": d}).encode()) for s, e, d, _ in items
            ]

            async def fcall() -> None:
                await bus.publish(items)

            async def publish() -> None:
                async with bus.client.pipeline(transaction=False) as pipe:
                    for channel, payload in plain:
                        pipe.publish(channel, payload)

            async with trio.open_nursery() as nursery:
                await nursery.start(bus.run, sink)
                for name, fn in (("fcall", fcall), ("publish", publish)):
                    for _ in range(20):  # warm up
                        await fn()
                    times = []
                    cpu0, r0 = time.process_time(), cpu_s(redis.pid)
                    for _ in range(PUBLISH_REQUESTS):
                        t = time.perf_counter()
                        await fn()
                        times.append(time.perf_counter() - t)
                    events = PUBLISH_REQUESTS * PUBLISH_ITEMS
                    out[name] = {
                        "request_ms_p50": statistics.median(times) * 1e3,
                        "request_ms_p99": _pct(times, 0.99) * 1e3,
                        "client_cpu_us_per_event": (time.process_time() - cpu0) / events * 1e6,
                        "redis_cpu_us_per_event": (cpu_s(redis.pid) - r0) / events * 1e6,
                    }
                nursery.cancel_scope.cancel()

        trio.run(main)
    return out


def publish_table(rounds: list[dict]) -> list[str]:
    rows = [
        f"| {PUBLISH_ITEMS} events per request, through the Redis bus's publish() | time per request p50 / p99 (ms)"
        " | publisher CPU µs / event | Redis CPU µs / event |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("fcall", "FCALL mailpush_publish (history, what mailpush does)"),
        ("publish", "plain PUBLISH (no history, no offset)"),
    ):
        rs = [r[name] for r in rounds]
        rows.append(
            f"| {label} | {fmt(med(rs, 'request_ms_p50'))} / {fmt(med(rs, 'request_ms_p99'))} | "
            f"{fmt(med(rs, 'client_cpu_us_per_event'), ',.1f')} | {fmt(med(rs, 'redis_cpu_us_per_event'), ',.1f')} |"
        )
    return rows


def latency_table(rounds: list[dict]) -> list[str]:
    rows = ["| figure | median [min–max] over rounds |", "|---|---|"]
    for label, key, spec in [
        ("connections", "connections", ",.0f"),
        ("events/s achieved", "achieved_rate", ",.0f"),
        ("p50 publish→receive (ms)", "p50_ms", ",.2f"),
        ("p99 publish→receive (ms)", "p99_ms", ",.2f"),
        ("p99.9 publish→receive (ms)", "p999_ms", ",.2f"),
        ("lost", "lost", ",.0f"),
        ("mailpush CPU µs / event", "server_cpu_us_per_event", ",.1f"),
        ("Redis CPU µs / event", "redis_cpu_us_per_event", ",.1f"),
        ("cores busy with other work before the round", "busy_cores_before", ",.2f"),
    ]:
        rows.append(f"| {label} | {fmt(med(rounds, key), spec)} |")
    return rows


# -- the report -------------------------------------------------------------------------------------


def med(rounds: list[dict], key: str):
    values = [r[key] for r in rounds if r.get(key) is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(triple, spec: str = ",.2f") -> str:
    m, lo, hi = triple
    if m is None:
        return "–"
    return f"{m:{spec}}" if lo == hi else f"{m:{spec}} [{lo:{spec}}–{hi:{spec}}]"


def total(rounds: list[dict], key: str) -> int:
    return sum(r[key] for r in rounds)


def faults_table(results: dict) -> list[str]:
    head = [
        "fault",
        "tabs × rounds",
        "events published",
        "received",
        "missing",
        "duplicated",
        "tabs missing / duplicated",
        "out of order",
        "resyncs",
        "tabs resumed per round",
        "last tab back after the fault (s)",
        "every tab complete after the last publish (s)",
        "server CPU µs / delivered event",
        "Redis CPU µs / event",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {
        "kill": "SIGKILL one of 2 instances behind HAProxy, Redis bus",
        "drain": f"SIGTERM (drain {DRAIN_S:g} s) one of 2 instances behind HAProxy, Redis bus",
        "workers": "SIGKILL worker 1 of --workers 2, embedded bus",
        "cluster": "SIGKILL one of 3 Redis Cluster masters, restarted with its data, one instance",
        "sentinel": "SIGKILL the Redis master, Sentinel promotes the replica, one instance",
    }
    for kind, rounds in results.items():
        if not rounds or "error" in rounds[0]:
            rows.append(f"| {names.get(kind, kind)} | error: {rounds[0].get('error', '')[:200] if rounds else ''} |")
            continue
        rows.append(
            "| "
            + " | ".join(
                [
                    names[kind],
                    f"{rounds[0]['tabs']:,} × {len(rounds)}",
                    f"{total(rounds, 'messages_expected'):,}",
                    f"{total(rounds, 'messages_received'):,}",
                    f"{total(rounds, 'messages_missing'):,}",
                    f"{total(rounds, 'messages_duplicated'):,}",
                    f"{total(rounds, 'tabs_missing')} / {total(rounds, 'tabs_duplicated')}",
                    f"{total(rounds, 'out_of_order')}",
                    f"{total(rounds, 'resyncs')}",
                    fmt(med(rounds, "tabs_resumed"), ",.0f"),
                    fmt(med(rounds, "last_resumed_after_fault_s")),
                    fmt(med(rounds, "catch_up_s")),
                    fmt(med(rounds, "server_cpu_us_per_event"), ",.1f"),
                    fmt(med(rounds, "redis_cpu_us_per_event"), ",.1f"),
                ]
            )
            + " |"
        )
    return rows


def bus_faults_table(results: dict) -> list[str]:
    """What the bus faults' tabs and mail store saw (faults_table has the counts)."""
    head = [
        "fault",
        "tabs cut off per round",
        "Redis serving again after the fault (s)",
        "mail store's first acknowledged publish to them after the fault (s)",
        "tabs cut off receiving again after the fault: p50 / last (s)",
        "longest wait of an acknowledged event for its tab (s)",
        "publishes refused / unanswered (of which delivered)",
        "resync reasons",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {
        "cluster": "Redis Cluster master SIGKILL, restarted with its data (the restarted master's `cluster_state:ok`)",
        "sentinel": "Redis master SIGKILL, Sentinel failover (the sentinels name the replica)",
    }
    for kind in BUS_FAULTS:
        rounds = results.get(kind)
        if not rounds or "error" in rounds[0]:
            continue
        reasons: dict[str, int] = {}
        for r in rounds:
            for k, v in r["resync_reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        rows.append(
            "| "
            + " | ".join(
                [
                    names[kind],
                    fmt(med(rounds, "tabs_affected"), ",.0f"),
                    fmt(med(rounds, "redis_back_s")),
                    fmt(med(rounds, "store_back_s")),
                    f"{fmt(med(rounds, 'resumed_p50_s'))} / {fmt(med(rounds, 'last_resumed_after_fault_s'))}",
                    fmt(med(rounds, "delay_max_s")),
                    f"{total(rounds, 'publishes_refused'):,} / {total(rounds, 'publishes_unanswered')} "
                    f"({total(rounds, 'unanswered_delivered')})",
                    ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none",
                ]
            )
            + " |"
        )
    return rows


BUS_FAULTS_NOTES = f"""\
Issue 13's target, the time for all clients to receive again after a worker
SIGKILL, an instance SIGKILL behind HAProxy, a Redis Cluster master restart
and a Sentinel failover, is the "last tab back after the fault" of those
four rows (the next table has more for the last two). The Redis Cluster and
Sentinel rows are faults of the Redis behind one instance (the tabs connect
to it directly and stay connected: mailpush catches them up over their open
connections), {TABS:,} tabs, the same load. `cluster`: three masters (AOF,
`appendfsync always`, node timeout {CLUSTER_NODE_TIMEOUT_MS / 1000:g} s); the master of a third of the
slots is SIGKILLed and started again at once on its port with its directory
(nodes.conf and AOF): it rejoins as that master with every write it
acknowledged; Redis answers `CLUSTERDOWN` on it for its first ~2 s (a
restarted master's rejoin delay). `sentinel`: a master, one replica and
three sentinels (quorum 2, `down-after-milliseconds` {SENTINEL_DOWN_MS}); the master is
SIGKILLed and not restarted. The mail store publishes with `FCALL
mailpush_publish` on the master of each subscriber's slot (cluster) or on
the master the sentinels name (asked again after any failed publish); a
publish refused, or not answered because its connection ended, is not
retried (its `q` is skipped) and only acknowledged ones are expected: for
these two rows each tab is counted by which `q` it got against which were
acknowledged (an unanswered publish that Redis ran may reach a tab: counted
apart, not as an error). In their rows above "tabs resumed" are the tabs cut
off (the restarted master's, every tab) that received again, and "last tab
back" when the last of them first got an event published after the fault;
the load gives each tab an event every {TABS / RATE:g} s, so that figure is
up to {TABS / RATE:g} s above the moment mailpush delivers again ("longest
wait" is that part alone: an acknowledged event's time from its
acknowledgement to its tab). Sentinel's replication is asynchronous: a write
the old master acknowledged and had not yet sent to the replica is lost in
the failover; the tabs' counts say what became of it (missing, or a resync
with its reason): Redis's loss, reported as the tabs saw it. The load goes
on until {BUS_AFTER_BACK_S:g} s after Redis serves again ({AFTER_S:g} s after the fault at least)."""


def resume_table(rounds: list[dict]) -> list[str]:
    rows = ["| figure | median [min–max] over rounds |", "|---|---|"]
    for label, key, spec in [
        ("tabs (one subscriber each) resuming at once", "tabs", ",.0f"),
        ("every tab has its missed event, after go (s)", "all_recovered_s", ",.2f"),
        ("p50 / p99 tab complete (s)", None, None),
        ("last recovered answer (s)", "answered_max_s", ",.2f"),
        ("resumes per second", "resumes_per_s", ",.0f"),
        (
            "Redis commands per resuming subscriber (functions' inner commands included)",
            "redis_commands_per_subscriber",
            ",.2f",
        ),
        (
            "Redis top-level commands per resuming subscriber (FCALL, SUBSCRIBE, PING)",
            "redis_top_level_commands_per_subscriber",
            ",.3f",
        ),
        ("instance CPU µs per resume", "server_cpu_us_per_resume", ",.0f"),
        ("Redis CPU µs per resume", "redis_cpu_us_per_resume", ",.0f"),
        ("missing / duplicated / resyncs (total over rounds)", None, None),
    ]:
        if key:
            rows.append(f"| {label} | {fmt(med(rounds, key), spec)} |")
        elif label.startswith("p50"):
            rows.append(f"| {label} | {fmt(med(rounds, 'recovered_p50_s'))} / {fmt(med(rounds, 'recovered_p99_s'))} |")
        else:
            rows.append(
                f"| {label} | {total(rounds, 'messages_missing')} / {total(rounds, 'messages_duplicated')} / "
                f"{total(rounds, 'resyncs')} |"
            )
    return rows


def memory_tables(history: dict, idle: dict) -> list[str]:
    rows = [
        "| subscribers × events each | frame bytes | RSS growth, history 100 (MiB) | RSS growth, history 0 (MiB) | "
        "bytes per retained event | publishes/s | server CPU µs / publish |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, pairs in history.items():
        per = [(on["delta_bytes"] - off["delta_bytes"]) / on["events"] for on, off in pairs]
        rows.append(
            f"| {shape} | {pairs[0][0]['frame_bytes']} | "
            f"{fmt((statistics.median([on['delta_bytes'] / 2**20 for on, _ in pairs]),) * 3, ',.1f')} | "
            f"{fmt((statistics.median([off['delta_bytes'] / 2**20 for _, off in pairs]),) * 3, ',.1f')} | "
            f"{fmt((statistics.median(per), min(per), max(per)), ',.0f')} | "
            f"{fmt(med([on for on, _ in pairs], 'publish_rate'), ',.0f')} | "
            f"{fmt(med([on for on, _ in pairs], 'server_cpu_us_per_publish'), ',.1f')} |"
        )
    rows += [
        "",
        f"| idle subscribed connections @ {IDLE_CONNECTIONS:,} | KB per connection (target ≤ {MEMORY_BUDGET_KB}) |",
        "|---|---|",
    ]
    for label, key in (("history on (default, --history-size 100)", "on"), ("history off (--history-size 0)", "off")):
        rows.append(f"| {label} | {fmt(med(idle[key], 'kb_per_connection'))} |")
    return rows


def verdicts(results: dict) -> list[str]:
    """The issue's targets next to this file's numbers."""
    rows = ["| target | measured | met |", "|---|---|---|"]

    def row(target: str, measured: str, met: bool) -> None:
        rows.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")

    names = {
        "kill": "instance SIGKILL behind HAProxy, Redis",
        "drain": "drain (SIGTERM) behind HAProxy, Redis",
        "workers": "worker SIGKILL, --workers 2, embedded bus",
        "cluster": "Redis Cluster master SIGKILL and restart",
        "sentinel": "Redis master SIGKILL, Sentinel failover",
    }
    for kind, rounds in results.get("faults", {}).items():
        missing, dups = total(rounds, "messages_missing"), total(rounds, "messages_duplicated")
        resyncs = total(rounds, "resyncs")
        row(
            f"{names.get(kind, kind)}: 0 missed and 0 duplicated events per tab",
            f"{missing} missed, {dups} duplicated, {resyncs} resyncs over {len(rounds)} × {rounds[0]['tabs']:,} tabs "
            f"({total(rounds, 'messages_expected'):,} events)",
            missing == dups == resyncs == 0,
        )
    if results.get("resume"):
        rounds = results["resume"]
        m = med(rounds, "all_recovered_s")
        row(
            f"{rounds[0]['tabs']:,} tabs of as many subscribers resuming at once after an instance kill: "
            f"all recovered within {RESUME_TARGET_S:g} s",
            f"{fmt(m)} s (median [min–max] of {len(rounds)})",
            m[0] is not None and m[0] <= RESUME_TARGET_S,
        )
    if results.get("memory"):
        idle = results["memory"]["idle"]["on"]
        m = med(idle, "kb_per_connection")
        row(
            f"RSS per idle subscribed connection, history on, no events ≤ {MEMORY_BUDGET_KB} KB",
            f"{fmt(m)} KB (history off: {fmt(med(results['memory']['idle']['off'], 'kb_per_connection'))} KB)",
            m[0] <= MEMORY_BUDGET_KB,
        )
    if results.get("latency"):
        rounds = results["latency"]
        m = med(rounds, "p99_ms")
        rate = med(rounds, "achieved_rate")
        row(
            f"Redis bus with history, {LATENCY_RATE:,} events/s over 5,000 connections: p99 publish→receive "
            f"< {LATENCY_P99_MS:g} ms",
            f"{fmt(m)} ms at {fmt(rate, ',.0f')} events/s achieved",
            m[0] < LATENCY_P99_MS and rate[0] >= 0.98 * LATENCY_RATE,
        )
    return rows


def markdown(results: dict) -> str:
    """The RESULTS.md section: the commands, the tables, the targets."""
    out = ["## Recovery under faults (issue 11, never lose a letter)", ""]
    out.append(
        "Measured by `bench/recovery.py` (not part of `make bench`), rendered by "
        "`.venv/bin/python bench/recovery.py --markdown` from `results/recovery.json`. Runs:"
    )
    out.append("")
    for part, run in results.get("runs", {}).items():
        busy = run.get("busy_cores_before")
        busy = "–" if busy is None else f"{busy:.2f}"
        out.append(
            f"- {part}: `{run['command']}` ({run['date']}, {run['rounds']} rounds; "
            f"{busy} cores busy with other work before it)"
        )
    out += ["", "### Targets", ""] + verdicts(results)
    if results.get("faults"):
        out += ["", f"### Faults under load ({RATE:,} events/s, per tab counts)", ""] + faults_table(results["faults"])
        if any(kind in results["faults"] for kind in BUS_FAULTS):
            out += ["", BUS_FAULTS_NOTES.replace("\n", " "), ""] + bus_faults_table(results["faults"])
    if results.get("resume"):
        out += ["", "### A resume storm", ""] + resume_table(results["resume"])
        calls = results["resume"][0]["redis_calls"]
        n = results["resume"][0]["tabs"]
        out += [
            "",
            "Redis commands during the storm, per resuming subscriber (first round): "
            + ", ".join(f"{k.upper()} {v / n:.3g}" for k, v in calls.items())
            + ".",
        ]
    if results.get("memory"):
        out += ["", "### Memory", ""] + memory_tables(results["memory"]["history"], results["memory"]["idle"])
    if results.get("latency"):
        out += ["", "### Publish-to-receive latency through the Redis history", ""] + latency_table(results["latency"])
    if results.get("publish"):
        out += ["", "### What the history costs a publish on the Redis bus", ""] + publish_table(results["publish"])
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="faults,resume,memory,publish,latency")
    ap.add_argument("--faults", default="kill,drain,workers", help="which faults: kill,drain,workers,cluster,sentinel")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--tabs", type=int, default=TABS)
    ap.add_argument("--resume-tabs", type=int, default=RESUME_TABS)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "recovery.json")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section from --out and exit")
    args = ap.parse_args()
    only = args.only.split(",")
    log_dir = args.out.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}  # the parts not run now stay
    if args.markdown:
        print(markdown(results))
        return 0
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    runs = results.setdefault("runs", {})

    def began() -> dict:
        """What to record of a part once it is done: the command, when, how busy the machine was."""
        return {
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rounds": args.rounds,
            "busy_cores_before": busy_cores(),
        }

    ok = True
    try:
        if "faults" in only:
            results.setdefault("faults", {})
            for kind in args.faults.split(","):
                meta = began()
                rounds = []
                for i in range(args.rounds):
                    r = fault_round(kind, args.tabs, log_dir)
                    rounds.append(r)
                    print(
                        f"{kind} round {i + 1}: missing {r['messages_missing']}, duplicated "
                        f"{r['messages_duplicated']}, resyncs {r['resyncs']}, resumed {r['tabs_resumed']} "
                        f"(last {r['last_resumed_after_fault_s']} s), complete {r['tabs_complete']}/{r['tabs']}, "
                        f"{r['server_cpu_us_per_event']:.1f} µs/event"
                        + (
                            f"; Redis back {r['redis_back_s']} s, store back {r['store_back_s']} s, longest wait "
                            f"{r['delay_max_s']} s, refused {r['publishes_refused']}, unanswered "
                            f"{r['publishes_unanswered']} ({r['unanswered_delivered']} delivered), resync reasons "
                            f"{r['resync_reasons']}, ended {r['ended']}, errors {r['publish_errors']}"
                            if kind in BUS_FAULTS
                            else ""
                        ),
                        flush=True,
                    )
                    ok &= r["messages_missing"] == 0 and r["messages_duplicated"] == 0 and r["resyncs"] == 0
                results["faults"][kind] = rounds
                runs[f"faults {kind}"] = meta
            print("\n".join(faults_table(results["faults"])))
            if any(kind in results["faults"] for kind in BUS_FAULTS):
                print("\n".join(bus_faults_table(results["faults"])))
        if "resume" in only:
            meta = began()
            rounds = []
            for i in range(args.rounds):
                r = resume_round(args.resume_tabs, log_dir)
                rounds.append(r)
                print(
                    f"resume round {i + 1}: {r['tabs_complete']}/{r['tabs']} in {r['all_recovered_s']} s, "
                    f"{r['redis_commands_per_subscriber']:.2f} Redis commands/subscriber, "
                    f"missing {r['messages_missing']}, duplicated {r['messages_duplicated']}, "
                    f"resyncs {r['resyncs']}",
                    flush=True,
                )
                ok &= r["tabs_complete"] == r["tabs"] and (r["all_recovered_s"] or 1e9) <= RESUME_TARGET_S
            results["resume"] = rounds
            runs["resume"] = meta
            print("\n".join(resume_table(rounds)))
        if "memory" in only:
            meta = began()
            history = {}
            for subscribers, each in HISTORY_SHAPES:
                pairs = []
                for _ in range(args.rounds):
                    pairs.append(
                        (history_round(subscribers, each, 100, log_dir), history_round(subscribers, each, 0, log_dir))
                    )
                    on, off = pairs[-1]
                    per = (on["delta_bytes"] - off["delta_bytes"]) / on["events"]
                    print(
                        f"history {subscribers:,} x {each}: {per:.0f} bytes/event (retained {on['retained']})",
                        flush=True,
                    )
                history[f"{subscribers:,} × {each}"] = pairs
            idle = {"on": [], "off": []}
            for _ in range(args.rounds):
                for key in ("on", "off"):
                    idle[key].append(idle_round(key == "on", log_dir))
                    print(f"idle history {key}: {idle[key][-1]['kb_per_connection']:.2f} KB/conn", flush=True)
            results["memory"] = {"history": history, "idle": idle}
            runs["memory"] = meta
            print("\n".join(memory_tables(history, idle)))
        if "publish" in only:
            meta = began()
            rounds = [publish_cost_round() for _ in range(args.rounds)]
            results["publish"] = rounds
            runs["publish"] = meta
            print("\n".join(publish_table(rounds)))
        if "latency" in only:
            meta = began()
            rounds = []
            for i in range(args.rounds):
                r = latency_round(args.out.parent)
                rounds.append(r)
                print(
                    f"latency round {i + 1}: p99 {r['p99_ms']:.2f} ms at {r['achieved_rate']:,.0f}/s, "
                    f"lost {r['lost']}, {r['busy_cores_before']:.2f} cores busy before",
                    flush=True,
                )
            results["latency"] = rounds
            runs["latency"] = meta
            ok &= statistics.median(r["p99_ms"] for r in rounds) < LATENCY_P99_MS
            print("\n".join(latency_table(rounds)))
    finally:
        stop_all()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
