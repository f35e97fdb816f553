"""What a connection may use of its server, and nothing more.

A :class:`~mailpush.connection.Connection`, the upgrade and the reader task
see the server only through a :class:`Context`: the limits (``config``),
the counters, the subscriber registry and the dispatcher, the token
verifier, the handshake slots, the timers, the one read buffer, and the few
things they may ask for (a writer task, a close deadline, a slow-consumer
drop, a report of a bug). The server owns the context; the context owns the
books of open sockets and connections, each changed in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from .auth import Verifier
from .config import Config
from .dispatch import Dispatcher
from .errors import HandshakeError
from .log import LogLimiter
from .metrics import Stats
from .registry import Registry, Subscription
from .timers import Keepalive, Timers

__all__ = ["Context", "Channel", "SLOW_LOG_INTERVAL"]

# Slow-consumer drops are logged at most once per this many seconds.
SLOW_LOG_INTERVAL = 1.0


class Channel(Subscription, Keepalive, Protocol):
    """What the server's books hold: a connection as the registry, the
    dispatcher and keepalive see it (a
    :class:`~mailpush.connection.Connection` is one)."""


@attrs.define(slots=True, eq=False)
class Context:
    """The server as its connections see it (see the module docstring).

    ``sockets`` counts accepted sockets not yet closed (handshaking or
    open): the accept loop adds each one as it hands it to its task, the
    task takes it off when it ends (:func:`~mailpush.reader.serve_socket`).
    ``connections`` holds the upgraded ones, changed only by
    :meth:`added` and :meth:`removed`.
    """

    config: Config
    stats: Stats
    registry: Registry
    dispatcher: Dispatcher
    verifier: Verifier
    handshakes: trio.CapacityLimiter
    log: Any
    # /healthz on the public port: the server's health check.
    health: Callable[..., tuple[int, str]]
    timers: Timers = attrs.field(init=False)
    # The one read buffer: every read is handled before the next await, so
    # one buffer serves every connection (Trio's single thread is the bound).
    buffer: bytearray = attrs.field(init=False)
    view: memoryview = attrs.field(init=False)
    connections: set[Channel] = attrs.field(init=False, factory=set)
    # Open connections per subscriber, kept only with a per-subscriber cap.
    per_subscriber: dict[str, int] = attrs.field(init=False, factory=dict)
    # The cap across instances (a SharedCap), on a bus that shares counts.
    shared_cap: Any = None
    # Why the bus cannot serve a subscriber ("" when it can), on a bus that
    # cannot serve every id (a Redis Cluster); None: it can.
    subscriber_check: Callable[[str], str] | None = None
    nursery: trio.Nursery | None = None  # where connection and writer tasks run
    wait_readable: Callable[[Any], Awaitable[None]] = trio.lowlevel.wait_readable
    # Called by a connection that closes, before its descriptor is closed:
    # with --poller shared, the poller takes it off its set and the books
    # (in the default mode its reader task does that when it wakes).
    on_close: Callable[[Any], None] | None = None
    draining: bool = False
    sockets: int = 0
    _slow_log: LogLimiter = attrs.field(init=False, factory=lambda: LogLimiter(SLOW_LOG_INTERVAL))
    _error_log: LogLimiter = attrs.field(init=False, factory=LogLimiter)

    def __attrs_post_init__(self) -> None:
        self.buffer = bytearray(self.config.buffer_size)
        self.view = memoryview(self.buffer)

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: object, name: str) -> None:
        """Start a task beside the connections (a writer)."""
        assert self.nursery is not None, "the server is not serving"
        self.nursery.start_soon(fn, *args, name=name)

    def at_subscriber_cap(self, subscriber: str) -> bool:
        """``subscriber`` has as many connections here as the cap allows."""
        cap = self.config.max_connections_per_subscriber
        return bool(cap) and self.per_subscriber.get(subscriber, 0) >= cap

    def unservable(self, subscriber: str) -> HandshakeError | None:
        """A 403 when the bus cannot serve ``subscriber``, else None."""
        check = self.subscriber_check
        if check is not None and (reason := check(subscriber)):
            return HandshakeError(403, reason)
        return None

    def subscriber_cap_error(self) -> HandshakeError:
        """The refusal of a subscriber at ``--max-connections-per-subscriber``."""
        cap = self.config.max_connections_per_subscriber
        return HandshakeError(
            429, f"this subscriber has {cap} connections open here, the most allowed", (("Retry-After", "30"),)
        )

    def added(self, conn: Channel) -> None:
        """``conn`` was upgraded."""
        self.connections.add(conn)
        if self.config.max_connections_per_subscriber and conn.subscriber:  # an echo connection has none
            self.per_subscriber[conn.subscriber] = self.per_subscriber.get(conn.subscriber, 0) + 1
            if self.shared_cap is not None:
                self.shared_cap.opened(conn)
        self.stats.upgrades += 1
        self.log.debug("connected", subscriber=conn.subscriber)

    def removed(self, conn: Channel) -> None:
        """``conn`` is closed: off the books, and its subscription gone."""
        self.connections.discard(conn)
        if self.config.max_connections_per_subscriber and conn.subscriber:
            left = self.per_subscriber.pop(conn.subscriber, 1) - 1
            if left:
                self.per_subscriber[conn.subscriber] = left
            if self.shared_cap is not None:
                self.shared_cap.closed(conn.subscriber)
        self.dispatcher.unsubscribed(conn)
        if self.registry.remove(conn):
            self.dispatcher.changed(conn.subscriber)
        self.log.debug("disconnected", subscriber=conn.subscriber)

    def slow_consumer(self, conn: Subscription) -> None:
        """Count a client dropped for not reading; log at most once a second
        (a thousand dropped at once must not become a thousand log lines)."""
        self.stats.slow_consumers += 1
        self.stats.closes[1008] += 1  # CloseCode.POLICY_VIOLATION: what it would have been told
        if n := self._slow_log.tick():
            self.log.warning(
                "slow_consumers_dropped",
                count=n,
                last_subscriber=conn.subscriber,
                send_queue_bytes=self.config.send_queue_bytes,
            )

    def task_failed(self, task: str) -> None:
        """Log an unexpected error caught at a task's isolation boundary
        (call it from the ``except`` block; at most one line a second, the
        count says how many) and count it (``mailpush_internal_errors``)."""
        self.stats.internal_errors += 1
        if n := self._error_log.tick():
            self.log.exception("internal_error", task=task, count=n)
