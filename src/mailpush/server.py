"""The server: start-up, the nursery tree, health, drain.

Nursery tree::

    Server.serve
    ├── bus-client task          Bus.run → Dispatcher.deliver      (bus/, dispatch.py)
    ├── subscription flusher     Dispatcher.run_subscriptions      (dispatch.py)
    ├── admin HTTP server        admin.serve_admin                 (admin.py)
    ├── timers                   Timers.run: handshake and close   (timers.py)
    │                            deadlines, keepalive
    └── connections nursery
        ├── accept loop          Acceptor.run, bounded by the      (acceptor.py)
        │                        handshake CapacityLimiter
        ├── serve_socket × N     one parked reader per connection  (reader.py, upgrade.py)
        └── writer × k           only for connections with unsent  (connection.py)
                                 bytes

Each task has its own isolation boundary (its docstring says what happens
to an unexpected error); the connections see the server only through a
:class:`~mailpush.context.Context`.
"""

from __future__ import annotations

import functools
import os
import random
import socket

import trio

from . import _trio_compat
from .acceptor import Acceptor
from .admin import serve_admin
from .auth import Verifier
from .bus import Bus, make_bus
from .config import Config
from .context import Context
from .dispatch import Dispatcher
from .errors import ConfigError
from .frames import CloseCode
from .log import get_logger
from .metrics import Stats, render
from .reader import serve_socket
from .registry import Registry
from .timers import Timers
from .upgrade import expire_handshake

__all__ = ["Server"]

# Kernel accept backlog: as large as the system allows (the kernel caps it at
# net.core.somaxconn, 4096 on a stock Debian). While all handshake slots are
# busy, new connections wait here, not in tasks, and the accept loop sheds
# what cannot be served in time. When the queue itself overflows, the kernel
# drops SYNs and clients retry only after a second or more: for reconnect
# avalanches raise net.core.somaxconn and net.ipv4.tcp_max_syn_backlog.
LISTEN_BACKLOG = 65535
# Readers woken per event-loop iteration at most (see _trio_compat): a
# burst of 15,000 readable connections is handled 1,024 at a time.
MAX_WAKEUPS = 1024
# Drain: after the window, how long the last closed peers get to answer
# their Close before the rest are cut; the exit comes within the drain
# window plus this (and a little shutdown work).
DRAIN_GRACE = 1.0
# Drain: closes are issued in ticks of this length, a group per tick.
DRAIN_TICK = 0.01


class Server:
    """One mailpush process.

    Args:
      config: the options.
      bus: the bus to use; by default the one ``config.bus`` names.

    Raises:
      ConfigError: no token secret, or a bus URL that cannot be used.
    """

    def __init__(self, config: Config, bus: Bus | None = None) -> None:
        self.config = config
        self.bus = bus if bus is not None else make_bus(config)
        self.log = get_logger()
        self.stats = Stats()
        self.registry = Registry()
        self.dispatcher = Dispatcher(self.registry, self.bus, self.stats)
        if not config.secret:
            raise ConfigError("no token secret: set --secret, MAILPUSH_SECRET or --secret-file")
        self.verifier = Verifier(config.secret)
        self.handshakes = trio.CapacityLimiter(config.max_handshakes)
        ctx = Context(
            config, self.stats, self.registry, self.dispatcher, self.verifier, self.handshakes, self.log, self.health
        )
        expire = functools.partial(expire_handshake, ctx)
        ctx.timers = Timers(config, self.stats, ctx.connections, expire, ctx.task_failed, self.log)
        self.ctx, self.timers = ctx, ctx.timers
        self.acceptor = Acceptor(self.ctx, serve_socket)
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._cancel = trio.CancelScope()
        self._drained = trio.Event()

    # The books, as the tests and the admin API read them.
    connections = property(lambda self: self.ctx.connections)
    open_sockets = property(lambda self: self.ctx.sockets, doc="Accepted sockets not yet closed (handshaking or open).")
    draining = property(lambda self: self.ctx.draining)
    paused = property(lambda self: self.acceptor.paused, doc="The accept loop waits for a handshake slot.")

    # -- lifecycle ----------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`drain` finishes or the caller cancels.

        ``task_status.started(self)`` once both ports are bound, with
        :attr:`listen_address` and :attr:`admin_address` filled in.

        Resource handling: the listener is closed on every way out, the
        bus's resources released after the nursery tree has ended, and the
        Trio patches of :mod:`~mailpush._trio_compat` undone.

        Raises:
          ConfigError: at startup: a port that cannot be bound, a bus that
            cannot be reached.

        Error handling: every task below has its own isolation boundary; an
        exception that still reaches this nursery is a bug that the server
        cannot survive, and ends it.
        """
        self.ctx.wait_readable = _trio_compat.parking_wait_readable()
        listener = self._bind(self.config.listen)
        self._listener = listener
        self.listen_address = listener.getsockname()[:2]
        try:
            with self._cancel, _trio_compat.bounded_wakeups(MAX_WAKEUPS):
                async with trio.open_nursery() as root:
                    await root.start(self.bus.run, self.dispatcher.deliver)
                    await root.start(self.dispatcher.run_subscriptions)
                    await root.start(self.dispatcher.recovery.run)
                    if self.config.admin is not None:
                        self.admin_address = await root.start(serve_admin, self, self.config.admin)
                    await root.start(self.timers.run)
                    async with trio.open_nursery() as conns:
                        self.ctx.nursery = conns
                        conns.start_soon(self.acceptor.run, listener)
                        self.log.info(
                            "listening",
                            listen=_fmt(self.listen_address),
                            admin=_fmt(self.admin_address),
                            bus=type(self.bus).__name__,
                            pid=os.getpid(),
                        )
                        task_status.started(self)
                        await self._drained.wait()
                        root.cancel_scope.cancel()
        finally:
            listener.close()  # also when startup failed (bus, admin port)
        await self.bus.aclose()

    def _bind(self, address: tuple[str, int]) -> socket.socket:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.workers > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    # -- health and metrics ---------------------------------------------------

    def health(self, *, own_sockets: int = 0) -> tuple[int, str]:
        """What /healthz answers on both ports.

        Args:
          own_sockets: sockets of the asking probe itself among
            :attr:`open_sockets` (1 on the public port), not counted
            against the limit it asks about.
        """
        if self.ctx.draining:
            return 503, "draining"
        if self.ctx.sockets - own_sockets >= self.config.max_connections:
            return 503, "at connection limit"
        if self.acceptor.paused:
            return 503, "overloaded: all handshake slots busy"
        if not self.bus.up:
            return 503, "bus unavailable: events would not arrive"
        return 200, "ok"

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Live values for /metrics."""
        return {
            "mailpush_connections": ("Open WebSocket connections", len(self.ctx.connections)),
            "mailpush_sockets": ("Accepted sockets, handshaking or open", self.ctx.sockets),
            "mailpush_subscribers": ("Subscribers with at least one subscribed connection here", len(self.registry)),
            "mailpush_handshakes_in_progress": (
                "Handshake slots in use (requests being parsed now)",
                self.handshakes.borrowed_tokens,
            ),
            "mailpush_draining": ("1 while draining", int(self.ctx.draining)),
            "mailpush_bus_up": ("1 while the bus is connected", int(self.bus.up)),
            "mailpush_tasks": ("Live Trio tasks in this process", _count_tasks()),
            "mailpush_event_loop_lag_seconds": (
                "Worst lateness of the timer task's ticks over the last 15 s",
                self.timers.loop_lag(),
            ),
            "mailpush_resuming_tabs": (
                "Tabs being answered from the history now",
                len(self.dispatcher.recovery.resuming),
            ),
            **self._bus_gauges(),
        }

    def _bus_gauges(self) -> dict[str, tuple[str, float]]:
        gauges: dict[str, tuple[str, float]] = {}
        history = getattr(self.bus, "history", None)
        if history is not None:  # kept in this process (embedded bus)
            gauges["mailpush_history_events"] = ("Events kept in the history", history.events)
            gauges["mailpush_history_subscribers"] = ("Subscribers with events in the history", len(history))
        lag = getattr(self.bus, "heartbeat_lag", None)
        if lag is not None:
            gauges["mailpush_bus_heartbeat_lag_seconds"] = (
                "Seconds since the last heartbeat came through the bus",
                lag(),
            )
        return gauges

    async def metrics(self) -> bytes:
        """The Prometheus text of /metrics: the counters and the gauges."""
        return render(self.stats, self.gauges, self.counters)

    def counters(self) -> dict[str, tuple[str, float]]:
        """Counters for /metrics kept outside :class:`Stats`."""
        return {
            "mailpush_bus_bad_items": (
                "Items from the bus dropped as unusable (malformed payload, or delivery failed)",
                self.stats.bad_items + self.bus.bad_items,
            ),
        }

    # -- drain ----------------------------------------------------------------

    async def drain(self, seconds: float | None = None) -> None:
        """Stop accepting, then close every connection, spread over ``seconds``.

        Each connection gets 1012 (service restart) with a suggested reconnect
        delay; its queued events go out before the Close frame. Returns when
        all connections are closed (or seconds + DRAIN_GRACE have passed),
        then stops :meth:`serve`.

        Error handling: a connection that fails to close (a bug) is reported
        and cut; the drain goes on, and :meth:`serve` is stopped in any case.
        """
        ctx = self.ctx
        if ctx.draining:
            return
        seconds = self.config.drain_seconds if seconds is None else seconds
        ctx.draining = True
        self.log.info("draining", connections=len(ctx.connections), seconds=seconds)
        if self._listener is not None:
            trio.lowlevel.notify_closing(self._listener)
            self._listener.close()
        conns = list(ctx.connections)
        random.shuffle(conns)
        start = trio.current_time()
        try:
            for i, conn in enumerate(conns):
                # Connection i closes at i/n of the window: an even spread, the
                # order random, so reconnects arrive evenly over the window.
                at = start + seconds * i / len(conns)
                if at - trio.current_time() > DRAIN_TICK:
                    await trio.sleep_until(at)
                try:
                    if conn.is_open:
                        delay = random.uniform(1.0, max(1.0, seconds))
                        conn.close(CloseCode.SERVICE_RESTART, f"restarting; reconnect in {delay:.0f} s")
                except Exception:  # noqa: BLE001 - the isolation boundary, see above
                    ctx.task_failed("drain")
                    conn.abort()
            with trio.move_on_after(DRAIN_GRACE):
                while ctx.connections:
                    await trio.sleep(0.05)
        finally:
            for conn in list(ctx.connections):
                conn.abort()
            self._drained.set()

    def stop(self) -> None:
        """Stop at once, without draining."""
        self._cancel.cancel()


def _count_tasks() -> int:
    """Live tasks of the running Trio loop (a walk of the task tree: a few
    milliseconds at 15,000 connections, for a scrape)."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _fmt(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
