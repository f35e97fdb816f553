"""The server: start-up, the nursery tree, and the start of a drain.

What it answers about itself (``/healthz``, ``/metrics``) lives in
``health.py``; how a drain closes its connections, in ``drain.py``.

Nursery tree::

    Server.serve
    ├── bus-client task          Bus.run → Dispatcher.deliver      (bus/, dispatch.py)
    ├── subscription flusher     Dispatcher.run_subscriptions      (dispatch.py)
    ├── shared cap (Redis, with  SharedCap.run: each subscriber's   (shared_cap.py)
    │   a per-subscriber cap)    connections counted across instances
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
import socket

import trio

from . import _trio_compat
from .acceptor import Acceptor
from .admin import serve_admin
from .auth import Verifier
from .bus import Bus, make_bus
from .config import Config
from .connection import Connection
from .context import Context
from .dispatch import Dispatcher
from .drain import close_all
from .errors import ConfigError
from .health import Health
from .log import get_logger
from .metrics import Stats
from .poller import SharedPoller
from .reader import serve_socket
from .registry import Registry
from .shared_cap import SharedCap
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
# Small frames go out at once, never held back behind an unacked one
# (Nagle): TCP_NODELAY on every connection, set on the listener (its
# connections have it from there) or else on each (see Acceptor).
NODELAY_ON_LISTENER = True
# Readers woken per event-loop iteration at most (see _trio_compat): a
# burst of 15,000 readable connections is handled 1,024 at a time.
MAX_WAKEUPS = 1024


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
        # Bound now (after logging was configured): a call on structlog's
        # lazy proxy resolves it again every time (~1.3 µs; bound: ~0.2),
        # and the connections log through this one.
        self.log = get_logger().bind()
        self.stats = Stats()
        self.registry = Registry()
        self.dispatcher = Dispatcher(self.registry, self.bus, self.stats, Connection)
        if not config.secret:
            raise ConfigError("no token secret: set --secret, MAILPUSH_SECRET or --secret-file")
        self.verifier = Verifier(config.secret)
        self.handshakes = trio.CapacityLimiter(config.max_handshakes)
        ctx = Context(
            config, self.stats, self.registry, self.dispatcher, self.verifier, self.handshakes, self.log, self.health
        )
        # --poller shared: one epoll set and one task for every connection.
        self.poller = SharedPoller(ctx) if config.poller == "shared" else None
        expire = self.poller.expire if self.poller else functools.partial(expire_handshake, ctx)
        ctx.timers = Timers(config, self.stats, ctx.connections, expire, ctx.task_failed, self.log)
        self.ctx, self.timers = ctx, ctx.timers
        if self.bus.restricts_subscribers:
            ctx.subscriber_check = self.bus.check_subscriber
        if config.max_connections_per_subscriber and self.bus.shares_connections:
            ctx.shared_cap = SharedCap(ctx, self.bus)
        self.acceptor = Acceptor(self.ctx, serve_socket, self.poller.add if self.poller else None)
        self.vitals = Health(self.ctx, self.acceptor, self.bus)
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
                    if self.ctx.shared_cap is not None:
                        await root.start(self.ctx.shared_cap.run)
                    if self.config.admin is not None:
                        self.admin_address = await root.start(serve_admin, self, self.config.admin)
                    await root.start(self.timers.run)
                    async with trio.open_nursery() as conns:
                        self.ctx.nursery = conns
                        if self.poller is not None:
                            await conns.start(self.poller.run)
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
        if NODELAY_ON_LISTENER:
            # Before listen(): every connection accepted has it from the
            # start (on Linux; see acceptor._accepted_have_nodelay).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        """What /healthz answers on both ports (see :meth:`Health.status`)."""
        return self.vitals.status(own_sockets=own_sockets)

    async def metrics(self) -> bytes:
        """The Prometheus text of /metrics."""
        return await self.vitals.metrics()

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
        try:
            await close_all(ctx, seconds)
        finally:
            self._drained.set()

    def stop(self) -> None:
        """Stop at once, without draining."""
        self._cancel.cancel()


def _fmt(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
