"""What the Redis buses share (standalone and Sentinel in ``redis.py`` and
``sentinel.py``, Redis Cluster in ``redis_cluster.py``): the timing of
heartbeats and reconnects, the errors that end a session, turning a message
into an event, and publishing and reading the history through the Redis
Functions with coredis."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import coredis
import msgspec
import trio

from ..config import Config
from ..errors import BusNotReady, BusUnavailable, PublishError, RespProtocolError
from ..history import Position, Replay, Stored
from ..items import Item, parse_bus_item
from ..log import LogLimiter, get_logger
from ..packets import event_frame
from .base import Bus, Event, Read, Sink
from .redis_conn import describe, safe
from .redis_functions import CONNECTIONS, PUBLISH, READ, connections_key, history_key, library, meta_key
from .resp import PushParser

__all__ = [
    "RedisBase",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TIMEOUT",
    "RECONNECT_FIRST",
    "RECONNECT_MAX",
    "CONNECT_TIMEOUT",
    "RECV_SIZE",
    "LOST",
    "UNREACHABLE",
    "NOT_READY",
    "innermost",
    "read_pushes",
]

# Every process publishes a heartbeat this often (seconds)…
HEARTBEAT_INTERVAL = 2.0
# …and one that has heard none for this long ends its session and makes a
# new one: a bus that stopped delivering is noticed within about 10 s.
HEARTBEAT_TIMEOUT = 7.0
# Reconnect backoff after the connection to Redis is lost: first wait, cap
# (each wait jittered, see backoff.py).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
# How long connecting (and AUTH, and loading the functions) may take.
CONNECT_TIMEOUT = 5.0
# Bytes per read of a subscription connection.
RECV_SIZE = 256 * 1024
# Errors of the publishing side that mean "Redis is not reachable now".
UNREACHABLE = (
    coredis.exceptions.ConnectionError,
    OSError,
    RuntimeError,  # coredis's pool closed with the session meanwhile
    TimeoutError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)
# Answers of a Redis that is up but does not serve yet, and will shortly:
# a Cluster master rejoining (CLUSTERDOWN for its first ~2 s), a slot in
# migration (TRYAGAIN), a Redis loading its data (LOADING; coredis makes it
# a ConnectionError, so this is matched before UNREACHABLE).
NOT_READY = (
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.TryAgainError,
    coredis.exceptions.BusyLoadingError,
)
# Errors that end a subscription session (it is made again with backoff);
# coredis may also fail on its own cleanup of a dead connection.
LOST = (
    *UNREACHABLE,
    trio.TooSlowError,
    RespProtocolError,
    BusUnavailable,
    coredis.exceptions.ResponseError,
    coredis.exceptions.RedisError,
)
# The answer of a FCALL to a node that lost its functions (a master
# restarted empty, a replica promoted before they were replicated).
_NO_FUNCTION = "Function not found"

_encode = msgspec.json.Encoder().encode


def _json(value: object) -> bytes:
    return bytes(value) if isinstance(value, msgspec.Raw) else _encode(value)


def innermost(error: BaseException) -> BaseException:
    """The first leaf of an exception group (or the error itself)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


class RedisBase(Bus):
    """The parts of every Redis bus: messages to events, publishing and
    reading the history with the Redis Functions (``client`` is a coredis
    client, standalone or cluster, set by the subclass).

    Args:
      url: the --bus URL (logged without its password).
      config: the history options; the defaults without one.
      sharded: the functions SPUBLISH on ``mailpush:{S}`` (Redis Cluster).
    """

    routes_by_subscription = True
    may_lose = True
    shares_connections = True
    client: Any  # coredis.Redis or coredis.RedisCluster

    def __init__(self, url: str, config: Config | None, *, sharded: bool = False) -> None:
        config = config or Config()
        self.url = url
        self.log = get_logger()
        size = config.history_size if config.history_ttl else 0
        self._library = library(size, int(config.history_ttl * 1000), sharded=sharded)
        self._beat = ("hb " + secrets.token_hex(4)).encode()
        self._bad_log = LogLimiter()

    def _subscriber_of(self, channel: bytes) -> str:
        """The subscriber whose channel this is."""
        raise NotImplementedError

    def _item(self, channel: bytes, data: bytes) -> Event | None:
        """The event of one message, or None (dropped, counted and logged)
        when it is not one: whatever the payload holds, nothing else
        happens to the session or to the other messages."""
        try:
            sub = self._subscriber_of(channel)
            item = parse_bus_item(data)
            if item[0] == sub:
                return (*item, None)
            reason = f"payload names subscriber {item[0][:100]!r}, not the channel's"
        except PublishError as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - one bad message must not end the session
            reason = f"unexpected {e!r}"[:300]
        self.bad_items += 1
        if n := self._bad_log.tick():
            self.log.warning(
                "bus_bad_payload", count=n, channel=channel.decode("utf-8", "replace")[:300], reason=reason
            )
        return None

    async def _refused(self, error: Exception) -> None:
        """Redis refused a publish with ``error`` (after the retry of a
        missing function); a subclass may act on it (Sentinel: READONLY
        means the master is now a replica)."""

    async def _reload_functions(self, error: Exception) -> None:
        """Load the functions again on a Redis that lost them (``error``:
        its "Function not found"): restarted empty, or FUNCTION FLUSH."""
        self.log.warning("bus_functions_reloaded", url=safe(self.url), reason=str(error))
        await self.client.function_load(self._library, replace=True)

    async def _fcall_publish(self, items: Sequence[Item]) -> None:
        """``mailpush_publish`` each item in one pipeline. A node that lost
        the functions (restarted empty) gets them loaded again and only the
        items it refused are sent again, once.

        Raises:
          BusUnavailable: Redis is not reachable, or refused an item; the
            items may or may not have been published, the caller retries.
        """
        pending, reloaded = list(items), False
        while True:
            try:
                async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
                    requests = [
                        pipe.fcall(
                            PUBLISH,
                            [meta_key(sub), history_key(sub)],
                            [sub, event, _json(data), _json(state) if state is not None else b""],
                        )
                        for sub, event, data, state in pending
                    ]
                failed: list[tuple[Item, Exception]] = []
                for item, request in zip(pending, requests, strict=True):
                    try:
                        await request
                    except coredis.exceptions.ResponseError as e:
                        failed.append((item, e))
                if failed and not reloaded and any(_NO_FUNCTION in str(e) for _, e in failed):
                    reloaded = True
                    await self._reload_functions(failed[0][1])
                    pending = [item for item, _ in failed]
                    continue
            except UNREACHABLE as e:
                raise BusUnavailable(f"publishing to the Redis bus at {safe(self.url)} failed: {describe(e)}") from None
            except coredis.exceptions.RedisError as e:
                raise BusUnavailable(f"Redis refused the publish: {e}") from None
            if failed:
                await self._refused(failed[0][1])
                raise BusUnavailable(f"Redis refused the publish: {failed[0][1]}")
            return

    async def _fcall_read(self, requests: Sequence[Read]) -> list[Replay]:
        """``mailpush_read`` each request in one pipeline (no barrier).

        Raises:
          BusNotReady: Redis answered that it does not serve yet.
          BusUnavailable: Redis is not reachable now, or refused.
        """
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pending = [
                    pipe.fcall(READ, [meta_key(s), history_key(s)], [epoch or "", "" if at is None else str(at)])
                    for s, epoch, at in requests
                ]
            results = [await p for p in pending]
        except NOT_READY as e:
            raise BusNotReady(f"Redis does not serve the history read yet: {e}") from None
        except UNREACHABLE as e:
            raise BusUnavailable(f"reading the history from Redis failed: {describe(e)}") from None
        except coredis.exceptions.RedisError as e:
            raise BusUnavailable(f"Redis refused the history read: {e}") from None
        return [_replay(request[0], result) for request, result in zip(requests, results, strict=True)]

    async def count_connections(
        self, instance: str, counts: Sequence[tuple[str, int, int]], cap: int, lease_ms: int
    ) -> list[int]:
        """``mailpush_connections`` for each subscriber, in one pipeline (see
        :meth:`Bus.count_connections`).

        Raises:
          BusUnavailable: Redis is not reachable now, or refused.
        """

        async def count() -> list[int]:
            async with self.client.pipeline(transaction=False) as pipe:
                pending = [
                    pipe.fcall(CONNECTIONS, [connections_key(s)], [instance, kept, wanted, cap, lease_ms])
                    for s, kept, wanted in counts
                ]
            return [int(await p) for p in pending]

        try:
            try:
                return await count()
            except coredis.exceptions.ResponseError as e:
                if _NO_FUNCTION not in str(e):
                    raise
                await self._reload_functions(e)
                return await count()
        except UNREACHABLE as e:
            raise BusUnavailable(f"counting connections on Redis failed: {describe(e)}") from None
        except coredis.exceptions.RedisError as e:
            raise BusUnavailable(f"Redis refused the connection count: {e}") from None


def _replay(subscriber: str, result: list) -> Replay:
    """A Replay from ``mailpush_read``'s answer (see redis_functions)."""
    epoch, top, state, reason, entries = result
    epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
    position = Position(epoch, int(top), msgspec.Raw(state) if state else None)
    if entries is None:
        return Replay(position, None, reason.decode() if isinstance(reason, bytes) else str(reason))
    events: list[Stored] = []
    for i in range(0, len(entries), 3):
        offset, event, data = int(entries[i]), entries[i + 1].decode(), entries[i + 2]
        events.append((offset, event, event_frame(subscriber, event, msgspec.Raw(data), offset), 0.0))
    return Replay(position, events)


class _Reading(Protocol):
    """A subscription connection as its reader sees it (the standalone
    bus's and a cluster shard's)."""

    stream: trio.abc.Stream

    def reply(self, push: Any) -> None: ...

    def fail(self, error: BaseException) -> None: ...


async def read_pushes(
    sub: _Reading,
    sink: Sink,
    item_of: Callable[[bytes, bytes], Event | None],
    control: Callable[[], bytes],
    heard: Callable[[], None],
    peer: str,
) -> None:
    """The reader of a subscription connection: every push of a read is
    parsed at once, and the messages among them go to ``sink`` as one batch.

    Args:
      item_of: the event of one (channel, payload) message, or None (dropped).
      control: the control channel now; a message on it is a heartbeat,
        reported through ``heard``.
      peer: who the connection is to, for the error when it closes.

    Error handling: a stream the parser refuses ends the session (the
    replies complete before the fault are handled first); so does the peer
    closing it. Either way waiting requests fail with the cause.
    """
    receive, parser = sub.stream.receive_some, PushParser()
    try:
        while data := await receive(RECV_SIZE):
            try:
                pushes = parser.feed(data)
            except RespProtocolError as e:
                await _handle(e.replies, sub, sink, item_of, control(), heard)
                raise
            await _handle(pushes, sub, sink, item_of, control(), heard)
        raise ConnectionError(f"{peer} closed the connection")
    except BaseException as e:
        sub.fail(e)
        raise


async def _handle(
    pushes: list,
    sub: _Reading,
    sink: Sink,
    item_of: Callable[[bytes, bytes], Event | None],
    control: bytes,
    heard: Callable[[], None],
) -> None:
    batch = []
    for push in pushes:
        if type(push) is tuple:  # (channel, payload)
            if push[0] != control:
                item = item_of(*push)
                if item is not None:
                    batch.append(item)
            else:
                heard()
        else:
            sub.reply(push)
    if batch:
        await sink(batch)
