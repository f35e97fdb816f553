"""``--workers N``: N server processes on one port, supervised.

One process may hold at most ~20,000 open files here (and one Python process
uses one core), so a machine's worth of connections needs several processes.
The supervisor forks N workers; each is a whole mailpush server bound to the
same listen port with SO_REUSEPORT (the kernel spreads new connections over
them) and its own admin port (``--admin HOST:PORT`` → worker i on PORT+i, so
each can be scraped). With the embedded bus, publishes are relayed to every
worker (:mod:`mailpush.bus.relay`).

Signals: SIGTERM/SIGINT are passed to every worker, which drain; the
supervisor exits 0 once all of them have exited 0. If a worker dies on its
own, the others are stopped too and the supervisor exits 1, so the service
manager restarts the whole set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

import attrs
import trio

from .bus import history_of
from .bus.relay import RelayBus, relay
from .config import Config
from .history import History
from .log import get_logger, log_sighup

__all__ = ["run_workers"]


def run_workers(config: Config, demo: bool, serve) -> int:
    """Fork ``config.workers`` workers running ``serve(config, demo, bus, index)``."""
    host, port = config.listen
    reserve = None
    if port == 0:
        # Pick one port for all workers: bind (never listen, so it takes no
        # connections) with SO_REUSEPORT, so the workers can bind it too.
        reserve = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserve.bind((host, 0))
        port = reserve.getsockname()[1]
    pairs = [socket.socketpair() for _ in range(config.workers)]
    supervisor = os.getpid()
    pids = []
    for i in range(config.workers):
        admin = config.admin
        if admin is not None and admin[1] != 0:
            admin = (admin[0], admin[1] + i)
        worker_config = attrs.evolve(config, listen=(host, port), admin=admin)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            _die_with(supervisor)
            try:
                for j, (parent_end, child_end) in enumerate(pairs):
                    parent_end.close()
                    if j != i:
                        child_end.close()
                if reserve is not None:
                    reserve.close()
                bus = RelayBus(pairs[i][1]) if config.bus == "embedded" else None
                trio.run(serve, worker_config, demo and i == 0, bus, i)
                code = 0
            except BaseException as e:  # noqa: BLE001 - report, then leave this process
                if not isinstance(e, KeyboardInterrupt):
                    print(f"mailpush worker {i}: {e!r}", file=sys.stderr)
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    for _, child_end in pairs:
        child_end.close()
    try:
        return trio.run(_supervise, [p for p, _ in pairs], pids, history_of(config))
    finally:
        if reserve is not None:
            reserve.close()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _die_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM (a drain) if the supervisor
    dies, even by SIGKILL, so no worker is left holding the port alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != supervisor:  # it died before prctl took effect
        os._exit(1)


# linux/prctl.h
_PR_SET_PDEATHSIG = 1


async def _supervise(socks: list[socket.socket], pids: list[int], history: History) -> int:
    """The supervisor's Trio run: relay the embedded bus (and keep its
    history, which every worker reads), pass signals on, wait for the workers.

    Returns:
      0 if every worker exited 0 after a signal, else 1 (a worker died on
      its own: the others were stopped).

    Error handling: SIGHUP is logged and ignored; a dead worker's relay
    stream ends its pump quietly; anything else is a bug and ends the
    supervisor (its workers then drain: they die with it, see _die_with).
    """
    log = get_logger()
    streams = [trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in socks]
    status: dict[int, int] = {}
    stopping = False
    failed = trio.Event()

    async def wait(pid: int) -> None:
        _, st = await trio.to_thread.run_sync(os.waitpid, pid, 0, abandon_on_cancel=True)
        code = os.waitstatus_to_exitcode(st)
        status[pid] = code
        if code != 0 and not stopping:
            log.error("worker_died", pid=pid, exit_code=code)
            failed.set()

    def kill_all(sig: int) -> None:
        for pid in pids:
            if pid not in status:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, streams, history)

            async def watch_signals() -> None:
                nonlocal stopping
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        log_sighup()  # workers that got it too log their own
                        continue
                    stopping = True
                    kill_all(sig)  # a second signal is passed on too: stop at once

            async def watch_failure() -> None:
                await failed.wait()
                kill_all(signal.SIGTERM)

            nursery.start_soon(watch_signals)
            nursery.start_soon(watch_failure)
            async with trio.open_nursery() as waiting:
                for pid in pids:
                    waiting.start_soon(wait, pid)
            nursery.cancel_scope.cancel()
    return 0 if all(code == 0 for code in status.values()) and not failed.is_set() else 1
