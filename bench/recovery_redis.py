"""Redis topologies for bench/recovery.py's bus faults, on loopback, in a
temporary directory: a 3-master Redis Cluster (``cluster``) and a master
with one replica and three sentinels (``sentinel``), and the mail stores
that publish on them with ``FCALL mailpush_publish``.

The set-ups follow the suite's (tests/test_redis_cluster.py ``Cluster``,
tests/test_redis_sentinel.py ``Setup``): cluster nodes keep their
``nodes.conf`` and an AOF with ``appendfsync always`` in their own
directory, so a master restarted on its port rejoins as that master with
every write it acknowledged; the sentinels have quorum 2 and
``down-after-milliseconds`` SENTINEL_DOWN_MS.

The publishers never raise for a Redis that is away: ``publish(items)``
answers, per item, True (acknowledged with an offset), False (certainly
not run: refused, connection refused, ``LOADING``, ``CLUSTERDOWN``,
``READONLY`` …) or None (sent, but the connection ended before its answer:
it may or may not have run). The caller counts only the True ones as
published.

Resource handling: ``Cluster`` and ``Sentinels`` are context managers;
every redis-server they start (each in its own session) is killed and
reaped on exit, also on an error, and the directory removed.
"""

from __future__ import annotations

import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
# The cluster's node timeout (the suite's): a master back within it is
# never marked failed by the others.
CLUSTER_NODE_TIMEOUT_MS = 5000
# The sentinels (the suite's): a master silent this long is down; quorum 2.
SENTINEL_DOWN_MS = 1000
SENTINEL_FAILOVER_TIMEOUT_MS = 10_000
MASTER_NAME = "mymaster"
# The publishers' connect timeout (loopback: a refusal is immediate).
CONNECT_TIMEOUT_S = 0.5
REPLY_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on {port} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.02)


def cli(port: int, *args: str) -> str:
    return subprocess.run(
        [REDIS_CLI, "-h", HOST, "-p", str(port), *args], capture_output=True, text=True, timeout=10
    ).stdout


class ReplyError(Exception):
    """An error reply (``-LOADING …``): the command was not run."""


class Conn:
    """One Redis connection, pipelined commands, RESP2 replies; error
    replies are returned as ReplyError, not raised."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT_S)
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def closed(self) -> bool:
        """The server closed its end (a SIGKILLed server): seen before
        sending, so that nothing is sent into a dead connection."""
        if not select.select([self.sock], [], [], 0)[0]:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def send(self, commands: list[list]) -> None:
        out = bytearray()
        for args in commands:
            out += b"*%d\r\n" % len(args)
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.sock.sendall(out)

    def call(self, *commands: list) -> list:
        self.send(list(commands))
        return [self.reply() for _ in commands]

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"Redis on {self.port} closed the connection")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError(f"unexpected RESP line {line[:80]!r}")


def fcall_args(sub: str, q: int) -> list:
    return [
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


def pipeline(conn: Conn, items: list[tuple[str, int]]) -> tuple[list[bool | None], str | None]:
    """FCALL each item on ``conn``: statuses (see the module docstring) and
    the first error seen (None: all acknowledged)."""
    try:
        conn.send([fcall_args(sub, q) for sub, q in items])
    except OSError as e:  # part may have gone out
        return [None] * len(items), f"send: {e}"
    out: list[bool | None] = []
    error = None
    try:
        for _ in items:
            r = conn.reply()
            if isinstance(r, int) and r > 0:
                out.append(True)
            else:
                out.append(False)
                error = error or str(r)[:80]
    except (OSError, ConnectionError) as e:
        error = error or f"read: {e}"
        out += [None] * (len(items) - len(out))
    return out, error


# -- a Redis Cluster -----------------------------------------------------------


class Cluster:
    """Three masters (no replicas) on loopback, each with its nodes.conf
    and AOF (fsync always) in its own directory."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mailpush-bench-cluster-")
        self.root = Path(self._tmp.name)
        self.nodes = [(free_port(), free_port()) for _ in range(3)]  # (port, cluster bus port)
        self.procs: list[subprocess.Popen | None] = [None] * 3
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{p}" for p, _ in self.nodes) + "/"

    def __enter__(self):
        try:
            for i in range(3):
                self.start(i)
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *(f"{HOST}:{p}" for p, _ in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                capture_output=True,
                check=True,
                timeout=30,
            )
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self, i: int) -> None:
        port, bus_port = self.nodes[i]
        d = self.root / f"node{i}"
        d.mkdir(exist_ok=True)
        self.procs[i] = proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(port),
                "--cluster-port",
                str(bus_port),
                "--bind",
                HOST,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(CLUSTER_NODE_TIMEOUT_MS),
                "--cluster-require-full-coverage",
                "no",
                "--dir",
                str(d),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(port, proc)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            self.procs[i] = None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def wait_ok(self) -> None:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not all("cluster_state:ok" in cli(p, "cluster", "info") for p, _ in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up")
            time.sleep(0.05)

    def slot_ports(self) -> list[int]:
        """The port of the master serving each slot (CLUSTER SLOTS)."""
        owner = [0] * 16384
        conn = Conn(self.nodes[0][0])
        try:
            (ranges,) = conn.call([b"CLUSTER", b"SLOTS"])
        finally:
            conn.close()
        for lo, hi, master, *_ in ranges:
            for s in range(lo, hi + 1):
                owner[s] = master[1]
        return owner

    def keyslots(self, names: list[str]) -> list[int]:
        conn = Conn(self.nodes[0][0])
        try:
            return conn.call(*[[b"CLUSTER", b"KEYSLOT", f"mailpush:meta:{{{n}}}"] for n in names])
        finally:
            conn.close()

    def close(self) -> None:
        for i in range(len(self.procs)):
            self.kill(i)
        self._tmp.cleanup()


class ClusterPublisher:
    """The mail store on the cluster: each item's FCALL on the master of its
    subscriber's slot (one pipeline per master and call); a master that is
    away costs its items only."""

    def __init__(self, cluster: Cluster, names: list[str]) -> None:
        owner = cluster.slot_ports()
        self.port_of = {n: owner[s] for n, s in zip(names, cluster.keyslots(names), strict=True)}
        self.conns: dict[int, Conn] = {}
        self.errors: dict[str, int] = {}

    def _conn(self, port: int) -> Conn | None:
        conn = self.conns.get(port)
        if conn is not None and conn.closed():
            conn.close()
            del self.conns[port]
            conn = None
        if conn is None:
            try:
                conn = self.conns[port] = Conn(port)
            except OSError as e:
                self._error(f"connect: {e.strerror or e}")
                return None
        return conn

    def _error(self, what: str) -> None:
        key = what.split(" ")[0] if what.startswith(("LOADING", "CLUSTERDOWN", "MOVED", "TRYAGAIN")) else what
        self.errors[key] = self.errors.get(key, 0) + 1

    def publish(self, items: list[tuple[str, int]]) -> list[bool | None]:
        groups: dict[int, list[int]] = {}
        for j, (sub, _) in enumerate(items):
            groups.setdefault(self.port_of[sub], []).append(j)
        out: list[bool | None] = [False] * len(items)
        for port, idx in groups.items():
            conn = self._conn(port)
            if conn is None:
                continue
            statuses, error = pipeline(conn, [items[j] for j in idx])
            for j, s in zip(idx, statuses, strict=True):
                out[j] = s
            if error:
                self._error(error)
                if None in statuses:
                    conn.close()
                    self.conns.pop(port, None)
        return out

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


# -- Redis Sentinel --------------------------------------------------------------


class Sentinels:
    """A master, its replica and three sentinels (quorum 2)."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="mailpush-bench-sentinel-")
        self.root = Path(self._tmp.name)
        self.master, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.url = "redis+sentinel://" + ",".join(f"{HOST}:{p}" for p in self.sentinels) + f"/{MASTER_NAME}"

    def _run(self, port: int, *args: str) -> None:
        self.procs[port] = proc = subprocess.Popen(
            [REDIS, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_port(port, proc)

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _start(self) -> None:
        for port, extra in ((self.master, []), (self.replica, ["--replicaof", HOST, str(self.master)])):
            d = self.root / str(port)
            d.mkdir()
            self._run(
                port, "--port", str(port), "--bind", HOST, "--dir", str(d), "--save", "", "--appendonly", "no", *extra
            )
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while "master_link_status:up" not in cli(self.replica, "info", "replication"):
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync")
            time.sleep(0.05)
        for port in self.sentinels:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind {HOST}\ndir {self.root}\n"
                f"sentinel monitor {MASTER_NAME} {HOST} {self.master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {SENTINEL_DOWN_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
            )
            self._run(port, str(conf), "--sentinel")
        deadline = time.monotonic() + SETUP_TIMEOUT_S  # the sentinels find each other and the replica
        while not all(
            cli(p, "sentinel", "sentinels", MASTER_NAME).count("name") == 2
            and "name" in cli(p, "sentinel", "replicas", MASTER_NAME)
            for p in self.sentinels
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not find each other")
            time.sleep(0.1)

    def named(self) -> int | None:
        """The master's port as the first sentinel names it."""
        words = cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", MASTER_NAME).split()
        return int(words[1]) if len(words) == 2 else None

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def data_pids(self) -> list[int]:
        """The redis-servers (master and replica) still running."""
        return [self.procs[p].pid for p in (self.master, self.replica) if p in self.procs]

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(10)
        self.procs.clear()
        self._tmp.cleanup()


class SentinelPublisher:
    """The mail store behind Sentinel: FCALL on the master the sentinels
    name, asked again (``SENTINEL GET-MASTER-ADDR-BY-NAME``, each sentinel
    in turn) after any publish that failed."""

    def __init__(self, sentinels: list[int], name: str = MASTER_NAME) -> None:
        self.sentinels = list(sentinels)
        self.name = name
        self.conn: Conn | None = None
        self.masters: list[tuple[float, int]] = []  # (when, port) each time the named master changed
        self.errors: dict[str, int] = {}

    def _error(self, what: str) -> None:
        key = what.split(" ")[0] if what.startswith(("READONLY", "LOADING", "MASTERDOWN")) else what
        self.errors[key] = self.errors.get(key, 0) + 1

    def _master(self) -> int | None:
        for i, port in enumerate(self.sentinels):
            try:
                conn = Conn(port)
                try:
                    (reply,) = conn.call([b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", self.name])
                finally:
                    conn.close()
            except (OSError, ConnectionError):
                continue
            if isinstance(reply, list) and len(reply) == 2:
                self.sentinels.insert(0, self.sentinels.pop(i))
                return int(reply[1])
        return None

    def publish(self, items: list[tuple[str, int]]) -> list[bool | None]:
        if self.conn is not None and self.conn.closed():
            self.close()
        if self.conn is None:
            port = self._master()
            if port is None:
                self._error("no sentinel named the master")
                return [False] * len(items)
            if not self.masters or self.masters[-1][1] != port:
                self.masters.append((time.monotonic(), port))
            try:
                self.conn = Conn(port)
            except OSError as e:
                self._error(f"connect: {e.strerror or e}")
                return [False] * len(items)
        statuses, error = pipeline(self.conn, items)
        if error:
            self._error(error)
            self.close()  # ask the sentinels again next time
        return statuses

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
