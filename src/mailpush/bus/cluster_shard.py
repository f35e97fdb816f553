"""One master of a Redis Cluster, seen from the cluster bus: its
subscription connection (sharded pub/sub, read by mailpush's own RESP
parser), the subscribers SSUBSCRIBEd on it, its control channel and
heartbeat. The cluster bus (``redis_cluster.py``) keeps one per master and
tells it what to subscribe.

Sharded pub/sub differs from the plain kind in three ways: an SSUBSCRIBE
of several channels must keep to one slot (so one command per slot, sent
together in one write); a node refuses a channel whose slot it does not
serve (``-MOVED``, matched to its command: replies come in command order);
and a node drops subscriptions on its own when their slot leaves it (an
``sunsubscribe`` push no command asked for), which the bus answers by
refreshing its slot map and subscribing the subscriber on its new node.
The connection's side of this is
:class:`~mailpush.bus.redis_conn.ShardSubscription`.
"""

from __future__ import annotations

import ssl
import traceback
from collections.abc import Callable, Collection, Iterable
from typing import Any, Protocol

import trio

from ..backoff import Backoff
from ..errors import BusUnavailable, RespError
from ..log import LogLimiter
from .base import Event, Sink
from .redis_common import (
    CONNECT_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    LOST,
    RECONNECT_FIRST,
    RECONNECT_MAX,
    innermost,
    read_pushes,
)
from .redis_conn import ShardSubscription, describe, open_stream, safe
from .slots import Node


class ShardOwner(Protocol):
    """What a shard uses of the cluster bus (``redis_cluster.ClusterBus``)."""

    url: str
    username: str | None
    password: str | None
    tls: ssl.SSLContext | None  # rediss+cluster://
    library_source: str
    beat: bytes
    client: Any  # coredis.RedisCluster
    log: Any

    def item_of(self, channel: bytes, data: bytes) -> Event | None: ...
    def subscriber_of(self, channel: bytes) -> str: ...
    def channel(self, subscriber: str) -> str: ...
    def slot_of(self, subscriber: str) -> int: ...
    def assigned(self, node: Node) -> list[str]: ...
    def control_for(self, node: Node) -> str: ...
    def refresh(self) -> None: ...
    def shard_changed(self) -> None: ...
    def gap(self, reason: str, subscribers: Collection[str]) -> None: ...


__all__ = ["Shard", "ShardOwner", "COMMANDS_PER_WRITE"]

# SSUBSCRIBE commands (one per slot) sent in one write: a thousand tabs
# arriving at once cost one write and one wait.
COMMANDS_PER_WRITE = 1000


def _is_redirect(error: RespError) -> bool:
    """The node does not serve that slot (now): refresh the map."""
    return str(error).startswith(("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"))


class Shard:
    """One master: sessions of its subscription connection, one after
    another, until the cluster bus stops it (the node serves no slot any
    more).

    ``sub`` is set while a session is up and every subscriber it was given
    is subscribed; ``subscribed`` holds the subscribers acknowledged on it.
    """

    def __init__(self, bus: ShardOwner, node: Node) -> None:
        self.bus = bus
        self.node = node
        self.name = f"{node[0]}:{node[1]}"
        self.sub: ShardSubscription | None = None
        self.subscribed: set[str] = set()
        self.control = ""  # its control channel (a slot it serves)
        self.heard = 0.0
        self.scope = trio.CancelScope()
        self._error_log = LogLimiter()

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The shard's task: one session after another, until cancelled
        (``scope``). ``task_status.started()`` once the first is up.

        Error handling: a failure of the connection (network, a timeout, a
        stream the parser refuses, an SSUBSCRIBE refused, the heartbeat
        silent) ends the session: its subscribers count as unsubscribed,
        the bus refreshes its slot map (the node may have failed over),
        and a new session is made with backoff; the subscribers it
        subscribes are then brought up to date (``on_gap``). A failure of
        the first session before ``started()`` propagates (the server does
        not start). Anything else (a bug) is logged with its traceback and
        handled the same way: one shard's trouble never ends the process
        or the other shards' sessions.
        """
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_MAX)
        started = False

        def up() -> None:
            nonlocal started
            backoff.reset()
            if not started:
                started = True
                task_status.started()

        try:
            with self.scope:
                while True:
                    lost: BaseException | None = None
                    try:
                        await self._session(sink, up)
                    except* LOST as group:
                        lost = innermost(group)
                    except* Exception as group:  # the isolation boundary, see above
                        if not started:
                            raise
                        lost = self._bug(innermost(group))
                    await trio.sleep(self._ended(lost, started, backoff))
        finally:
            self.sub = None  # stopped: nothing may use its connection any more
            self.subscribed.clear()

    def _bug(self, error: BaseException) -> BaseException:
        if n := self._error_log.tick():
            trace = "".join(traceback.format_exception(error))[-4000:]
            self.bus.log.error("bus_shard_failed", node=self.name, count=n, error=repr(error), trace=trace)
        return error

    def _ended(self, lost: BaseException | None, started: bool, backoff: Backoff) -> float:
        """A session ended: its subscriptions are gone; the map is asked for
        again. Returns the wait before the next session.

        Raises:
          ConnectionError: the first session failed (the bus does not start).
        """
        self.sub = None
        self.subscribed.clear()
        self.bus.shard_changed()
        if not started:
            raise ConnectionError(f"{self.name}: {describe(lost)}")
        delay = backoff.next()
        self.bus.log.error(
            "bus_lost", url=safe(self.bus.url), node=self.name, error=describe(lost), retry_in=round(delay, 3)
        )
        self.bus.refresh()
        return delay

    async def _session(self, sink: Sink, up: Callable[[], None]) -> None:
        """Connect, load the functions on this node, subscribe the control
        channel and the subscribers whose slots it serves, then read until
        the connection fails or the heartbeats stop."""
        bus = self.bus
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await open_stream(*self.node, bus.tls)
        async with stream:
            sub = ShardSubscription(stream, self._dropped)
            with trio.fail_after(CONNECT_TIMEOUT):
                if bus.password is not None:
                    await sub.auth(bus.username, bus.password)
                # A master restarted empty or a replica just promoted may lack them.
                await sub.call(b"FUNCTION", b"LOAD", b"REPLACE", bus.library_source)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, sub, sink)
                control = bus.control_for(self.node)
                (error,) = await sub.request_many(b"SSUBSCRIBE", [[control]])
                if error is not None:
                    raise BusUnavailable(f"{self.name} refused SSUBSCRIBE: {error}")
                self.control, self.heard = control, trio.current_time()
                done = await self.ssubscribe(sub, bus.assigned(self.node))
                self.sub = sub
                nursery.start_soon(self._heartbeat)
                up()
                bus.shard_changed()
                if done:
                    bus.log.warning("bus_reconnected", url=safe(bus.url), node=self.name, subscribers=len(done))
                    bus.gap(f"shard {self.name} reconnected", done)

    async def ssubscribe(self, sub: ShardSubscription, subscribers: Iterable[str]) -> list[str]:
        """SSUBSCRIBE these subscribers here, one command per slot; returns
        those acknowledged. One the node refuses (its slot moved) makes the
        bus refresh its map, and is subscribed where the new map says.

        Raises:
          BusUnavailable: the connection failed.
        """
        by_slot: dict[int, list[str]] = {}
        slot_of = self.bus.slot_of
        for s in subscribers:
            by_slot.setdefault(slot_of(s), []).append(s)
        groups = list(by_slot.values())
        done: list[str] = []
        for i in range(0, len(groups), COMMANDS_PER_WRITE):
            part = groups[i : i + COMMANDS_PER_WRITE]
            channels = [[self.bus.channel(s) for s in group] for group in part]
            errors = await sub.request_many(b"SSUBSCRIBE", channels)
            for group, error in zip(part, errors, strict=True):
                if error is None:
                    self.subscribed.update(group)
                    done.extend(group)
                else:
                    if not _is_redirect(error) and (n := self._error_log.tick()):
                        self.bus.log.warning("bus_subscribe_refused", node=self.name, error=str(error), count=n)
                    self.bus.refresh()
        return done

    async def sunsubscribe(self, sub: ShardSubscription, subscribers: Iterable[str]) -> None:
        """SUNSUBSCRIBE these subscribers here (a refusal means they are not
        subscribed here anyway)."""
        by_slot: dict[int, list[str]] = {}
        for s in subscribers:
            self.subscribed.discard(s)
            by_slot.setdefault(self.bus.slot_of(s), []).append(s)
        groups = [[self.bus.channel(s) for s in group] for group in by_slot.values()]
        for i in range(0, len(groups), COMMANDS_PER_WRITE):
            await sub.request_many(b"SUNSUBSCRIBE", groups[i : i + COMMANDS_PER_WRITE])

    async def retag(self, sub: ShardSubscription) -> None:
        """Move the control channel to a slot this node serves (after a
        resharding took the old one away)."""
        control = self.bus.control_for(self.node)
        if control != self.control:
            (error,) = await sub.request_many(b"SSUBSCRIBE", [[control]])
            if error is None:
                old, self.control = self.control, control
                if old:
                    await sub.request_many(b"SUNSUBSCRIBE", [[old]])

    def _dropped(self, channel: bytes) -> None:
        """The node dropped a subscription itself: its slot moved."""
        if channel == self.control.encode():
            self.control = ""  # the heartbeat pauses until retag()
        else:
            self.subscribed.discard(self.bus.subscriber_of(channel))
        self.bus.refresh()

    async def _heartbeat(self) -> None:
        """SPUBLISH a heartbeat on the control channel every
        HEARTBEAT_INTERVAL; end the session when none has been heard for
        HEARTBEAT_TIMEOUT.

        Raises:
          TimeoutError: the node stopped delivering (or the publish failed,
            its own error): the session ends and is made again.
        """
        while True:
            if self.control:
                with trio.fail_after(HEARTBEAT_TIMEOUT):
                    await self.bus.client.spublish(self.control, self.bus.beat)
            else:
                self.heard = trio.current_time()  # between a resharding and retag()
            await trio.sleep(HEARTBEAT_INTERVAL)
            silent = trio.current_time() - self.heard
            if silent > HEARTBEAT_TIMEOUT:
                raise TimeoutError(f"no heartbeat through {self.name} for {silent:.1f} s: it stopped delivering")

    async def _read(self, sub: ShardSubscription, sink: Sink) -> None:
        """The subscription connection's reader, as the standalone bus's
        (:func:`~mailpush.bus.redis_common.read_pushes`); the control
        channel is read anew for each batch (a resharding retags it)."""
        await read_pushes(sub, sink, self.bus.item_of, lambda: self.control.encode(), self._hear, self.name)

    def _hear(self) -> None:
        self.heard = trio.current_time()
