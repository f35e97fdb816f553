"""``--workers N``: N server processes on one port, supervised, each failing
alone.

One process may hold at most ~20,000 open files here (and one Python process
uses one core), so a machine's worth of connections needs several processes.
The supervisor starts N workers (``mailpush serve … --worker-index i``, a
fresh interpreter each); each is a whole mailpush server bound to the same
listen port with SO_REUSEPORT (the kernel spreads new connections over them)
and its own admin port. With the embedded bus, publishes are relayed to
every worker through the supervisor, which keeps the history they share
(:mod:`mailpush.bus.relay`).

A worker that dies on its own is restarted on its own, with crash-loop
backoff (a log line and ``mailpush_worker_restarts_total`` each time); the
others keep their connections, and its tabs reconnect to them and recover
from the history. SIGTERM/SIGINT are passed to every worker, which drain; the
supervisor exits 0 once all of them have exited 0. Workers run in sessions of
their own (a terminal's Ctrl-C or hangup reaches the supervisor alone, which
passes SIGTERM/SIGINT on once) and die with their supervisor, even a
SIGKILLed one.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import attrs
import trio

from .admin import serve_admin
from .backoff import Backoff
from .bus import history_of
from .bus.relay import Relay
from .config import Config
from .errors import ConfigError
from .group import Group, admin_request
from .log import get_logger, log_sighup

__all__ = ["run_workers", "worker_admin", "die_with_supervisor", "RESTART_FIRST", "RESTART_MAX", "STABLE_AFTER"]

# A worker that died is started again after this long, doubling (jittered)
# up to RESTART_MAX while it keeps dying: a crash loop costs a start every
# half minute, not a core.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
# A worker that ran this long before it died was not crash-looping: the
# next restart is quick again.
STABLE_AFTER = 60.0
# How often the supervisor asks a starting worker's /healthz whether it is
# ready (its /healthz says 503 "starting" until then).
READY_POLL = 0.05
# The environment variable through which a worker learns its supervisor.
_SUPERVISOR_ENV = "MAILPUSH_SUPERVISOR_PID"


def worker_admin(config: Config, index: int) -> tuple[str, int] | None:
    """Worker ``index``'s admin address: the admin port + 1 + index (the
    admin port itself is the supervisor's), or port 0 (any) if the admin
    port is 0; None without an admin API."""
    if config.admin is None:
        return None
    host, port = config.admin
    return (host, port + 1 + index) if port else (host, 0)


def run_workers(config: Config, argv: Sequence[str]) -> int:
    """Run ``config.workers`` workers (``mailpush serve`` with ``argv`` and
    a worker index) under this supervisor until a signal drains them.

    Returns:
      The exit status: 0 if every worker exited 0 after a signal.
    """
    host, port = config.listen
    reserve = None
    if port == 0:
        # Pick one port for all workers: bind (never listen, so it takes no
        # connections) with SO_REUSEPORT, so the workers can bind it too.
        reserve = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserve.bind((host, 0))
        port = reserve.getsockname()[1]
    if config.admin is not None and config.admin[1] == 0:
        # The supervisor's admin port and each worker's after it: known in
        # advance, so that the supervisor can sum their metrics.
        config = attrs.evolve(config, admin=(config.admin[0], _free_ports(config.admin[0], config.workers + 1)))
    try:
        return trio.run(_Supervisor(config, list(argv), port).run)
    finally:
        if reserve is not None:
            reserve.close()


def _free_ports(host: str, n: int, tries: int = 50) -> int:
    """A port free now with the ``n - 1`` above it free too."""
    for _ in range(tries):
        held: list[socket.socket] = []
        try:
            for k in range(n):
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                held.append(s)
                s.bind((host, held[0].getsockname()[1] + k if k else 0))
            return held[0].getsockname()[1]
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise ConfigError(f"no {n} consecutive free ports on {host} for the admin APIs; give --admin HOST:PORT")


def die_with_supervisor() -> None:
    """In a worker: have the kernel send this process SIGTERM (a drain) if
    the supervisor dies, even by SIGKILL, so no worker is left holding the
    port alone."""
    supervisor = int(os.environ.get(_SUPERVISOR_ENV, "0"))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if supervisor and os.getppid() != supervisor:  # it died before prctl took effect
        os._exit(1)


# linux/prctl.h
_PR_SET_PDEATHSIG = 1


class _Supervisor:
    def __init__(self, config: Config, argv: list[str], port: int) -> None:
        self.config = config
        self.argv = argv
        self.port = port
        self.log = get_logger()
        self.relay = Relay(history_of(config)) if config.bus == "embedded" else None
        self.stopping = False
        self.restarts = 0
        self.exit_codes: dict[int, int] = {}
        self.procs: dict[int, subprocess.Popen] = {}
        # Running workers whose own /healthz has said 200 since they started.
        self.ready: set[int] = set()
        self.group: Group | None = None

    async def run(self) -> int:
        """The supervisor's Trio run: start and keep the workers, relay the
        embedded bus (and keep its history), pass signals on.

        Error handling: SIGHUP is logged and ignored; a worker that dies on
        its own is restarted; anything else is a bug and ends the
        supervisor (its workers then drain: they die with it).
        """
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, signals)
                if self.config.admin is not None:
                    await nursery.start(self._serve_admin)
                async with trio.open_nursery() as workers:
                    for i in range(self.config.workers):
                        workers.start_soon(self._keep, i)
                nursery.cancel_scope.cancel()
        return 0 if all(code == 0 for code in self.exit_codes.values()) else 1

    async def _serve_admin(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group's admin API on the --admin address (see group.py)."""
        self.group = Group(
            self.config,
            self.relay,
            lambda: [worker_admin(self.config, i) for i in range(self.config.workers)],
            lambda: {i for i, p in self.procs.items() if p.returncode is None},
            lambda: self.restarts,
            lambda: set(self.ready),
        )
        async with trio.open_nursery() as nursery:
            if self.relay is None:
                await nursery.start(self.group.bus.run, _ignore)
            address = await nursery.start(serve_admin, self.group, self.config.admin)
            self.log.info(
                "supervising", workers=self.config.workers, admin=f"{address[0]}:{address[1]}", pid=os.getpid()
            )
            task_status.started()

    async def _watch_signals(self, signals) -> None:
        async for sig in signals:
            if sig == signal.SIGHUP:
                log_sighup()
                continue
            self.stopping = True
            if self.group is not None:
                self.group.draining = True
            for proc in list(self.procs.values()):  # a second signal is passed on too: stop at once
                if proc.returncode is None:
                    proc.send_signal(sig)

    def _command(self, index: int) -> list[str]:
        host = self.config.listen[0]
        admin = worker_admin(self.config, index)
        return [
            sys.executable, "-m", "mailpush", "serve", *self.argv,
            "--listen", f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}",
            "--admin", "off" if admin is None else f"{admin[0]}:{admin[1]}",
            "--worker-index", str(index),
        ]  # fmt: skip

    async def _keep(self, index: int) -> None:
        """Run worker ``index``, and again each time it dies on its own."""
        backoff = Backoff(RESTART_FIRST, RESTART_MAX)
        env = {**os.environ, _SUPERVISOR_ENV: str(os.getpid()), "MAILPUSH_SECRET": self.config.secret}
        while not self.stopping:
            parent, child = socket.socketpair()
            cmd = self._command(index) + ["--relay-fd", str(child.fileno())]
            try:
                # Started from this (the main) thread, not through
                # trio.lowlevel.open_process: that forks in a worker thread,
                # and the worker's PR_SET_PDEATHSIG fires when the thread
                # that forked it exits (Trio retires idle threads after 10
                # s), so every worker was drained and restarted every ~10 s.
                proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env, start_new_session=True)
            finally:
                child.close()
            self.procs[index] = proc
            if self.stopping:  # the signal came while it was starting
                proc.send_signal(signal.SIGTERM)
            started = trio.current_time()
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))
            async with trio.open_nursery() as nursery:
                if self.relay is not None:
                    nursery.start_soon(self.relay.serve, index, stream)
                nursery.start_soon(self._until_ready, index)
                code = await _exited(proc)
                self.ready.discard(index)
                nursery.cancel_scope.cancel()
            await stream.aclose()
            if self.stopping:
                self.exit_codes[index] = code
                return
            if trio.current_time() - started > STABLE_AFTER:
                backoff.reset()
            delay = backoff.next()
            self.restarts += 1
            self.log.error(
                "worker_died",
                worker=index,
                pid=proc.pid,
                exit_code=code,
                restart_in=round(delay, 2),
                restarts=self.restarts,
            )
            await trio.sleep(delay)

    async def _until_ready(self, index: int) -> None:
        """Mark worker ``index`` ready once its own admin API answers
        /healthz with 200 (its port bound, its bus up), asking every
        READY_POLL seconds; without an admin API, at once. Ended (cancelled)
        when the worker exits.

        Error handling: a refused or failed probe is the worker not ready
        yet, and is asked again; nothing else is expected here (a bug ends
        the supervisor, like any in its nursery)."""
        address = worker_admin(self.config, index)
        if address is None:
            self.ready.add(index)
            return
        request = admin_request(self.config, "/healthz")
        while True:
            with trio.move_on_after(READY_POLL * 10):
                try:
                    stream = await trio.open_tcp_stream(*address)
                    async with stream:
                        await stream.send_all(request)
                        head = await stream.receive_some(64)
                    if head.startswith(b"HTTP/1.1 200"):
                        self.ready.add(index)
                        return
                except (OSError, trio.BrokenResourceError):
                    pass
            await trio.sleep(READY_POLL)


async def _exited(proc: subprocess.Popen) -> int:
    """Wait for ``proc`` to exit, without a thread: its pidfd turns
    readable when it does. Returns its exit code."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.wait()


async def _ignore(batch: object) -> None:
    """The supervisor's Redis bus hands it nothing it needs."""
