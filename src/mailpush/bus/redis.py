"""The Redis bus: channel ``mailpush:SUBSCRIBER``, payload one publish item,
history in a Redis Stream per subscriber.

A mail store in any language publishes with one command, which gives the
event its offset, keeps it in the subscriber's history and publishes it, in
one atomic step on the Redis side (:mod:`mailpush.bus.redis_functions`)::

    FCALL mailpush_publish 2 mailpush:meta:{alice} mailpush:hist:{alice} \
          alice new_letter '{"id": 42}' ''

(mailpush's own admin API does the same). A plain ``PUBLISH mailpush:alice
'{"subscriber":"alice","event":"new_letter","data":{...}}'`` from an older
publisher is still delivered, without an offset: it is not in the history,
so a tab that was away misses it and no resync tells it.

Each mailpush process subscribes to exactly the channels of the subscribers
connected to it (the dispatcher keeps that set, reference counted and
batched), so Redis routes every event only to the processes that hold its
subscriber's tabs. Publishing and history reads go through coredis (it
speaks anyio, so it runs inside mailpush's Trio loop). Receiving does not:
the subscription connection is read by our own RESP reader (``resp.py``),
which parses every message of a ``recv()`` at once and hands them to the
dispatcher as one batch.

Broker health is correctness: every process publishes a heartbeat on the
control channel every HEARTBEAT_INTERVAL and expects to hear heartbeats on
its subscription connection; when none has arrived for HEARTBEAT_TIMEOUT
while the connection looks up (a Redis that accepts publishes but stopped
delivering), the session is ended and made again.

Error handling: Redis pub/sub delivers at most once. If the connection
drops, the heartbeats stop, or the stream breaks the protocol or a bound of
the parser, the bus-client task logs it, reconnects with backoff and
subscribes again to every channel it had, then reports the gap
(:attr:`on_gap`): every local tab is brought up to date from the history,
or resynced. A payload that is not a valid publish item, or names another
subscriber than its channel, is dropped on its own, counted
(``mailpush_bus_bad_items``) and logged at most once a second; the messages
around it are delivered. A publish or a history read while Redis is
unreachable raises :class:`~mailpush.errors.BusUnavailable` (the admin API
answers 503; a read is retried).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import anyio
import coredis
import msgspec
import trio

from ..backoff import Backoff
from ..config import Config
from ..errors import BusUnavailable, ConfigError, PublishError, RespProtocolError
from ..history import Position, Replay, Stored
from ..items import parse_bus_item
from ..log import LogLimiter, get_logger
from ..packets import event_frame
from .base import Bus, Event, Item, Read, Sink
from .redis_conn import Address, Subscription, chunks, describe, safe
from .redis_functions import PUBLISH, READ, history_key, library, meta_key
from .resp import PushParser

__all__ = ["RedisBus", "CHANNEL_PREFIX", "CONTROL_CHANNEL", "HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT"]

# The channel of a subscriber is this prefix + its id (the external contract).
CHANNEL_PREFIX = "mailpush:"
# Always subscribed, outside the subscriber namespace: a pub/sub connection
# with no channel ends its message stream, and a server with no tab yet has
# none. The heartbeats go here.
CONTROL_CHANNEL = "mailpush.control"
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
# Bytes per read of the subscription connection.
RECV_SIZE = 256 * 1024
# Errors of the publishing side that mean "Redis is not reachable now".
_UNREACHABLE = (
    coredis.exceptions.ConnectionError,
    OSError,
    RuntimeError,  # coredis's pool closed with the session meanwhile
    TimeoutError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)

_encode = msgspec.json.Encoder().encode
_CONTROL = CONTROL_CHANNEL.encode()


def _json(value: object) -> bytes:
    return bytes(value) if isinstance(value, msgspec.Raw) else _encode(value)


class RedisBus(Bus):
    """The Redis bus (see the module docstring).

    Args:
      url: ``redis://[:PASSWORD@]HOST:PORT/DB``, ``rediss://…`` (TLS) or
        ``unix:///path``.
      config: the history options (size, TTL); the defaults without one.

    Raises:
      ConfigError: a URL that cannot be used.
    """

    routes_by_subscription = True
    may_lose = True

    def __init__(self, url: str, config: Config | None = None) -> None:
        try:
            self.client = coredis.Redis.from_url(url)
            # TLS as the publishing side has it (ssl_ca_certs=…, ssl_cert_reqs=…
            # and the other coredis URL options): one context for both.
            pool_kwargs = getattr(self.client.connection_pool, "connection_kwargs", {})
            self._address = Address.parse(url, pool_kwargs.get("ssl_context"))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad --bus URL {safe(url)!r}: {e}") from None
        config = config or Config()
        self.url = url
        self.log = get_logger()
        self._library = library(config.history_size if config.history_ttl else 0, int(config.history_ttl * 1000))
        self._channels: set[str] = set()  # what we want to be subscribed to
        self._sub: Subscription | None = None
        self.up = False
        self._heard = 0.0  # when the last heartbeat arrived (trio clock)
        self._beat = ("hb " + secrets.token_hex(4)).encode()
        self._bad_log = LogLimiter()

    def heartbeat_lag(self) -> float:
        """Seconds since a heartbeat last arrived (0 while none was expected)."""
        return trio.current_time() - self._heard if self.up else 0.0

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: one subscription session after another.

        ``task_status.started()`` once the first session is subscribed.

        Error handling: a failure of the connection (network, TLS, a
        timeout, a stream the parser refuses) ends the session; it is logged
        and a new one is made with backoff. Before the first session is up
        the failure is a :class:`~mailpush.errors.ConfigError` (the server
        does not start). Bad payloads never end a session (see
        :meth:`_item`); anything else is a bug and propagates.
        """
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_MAX)
        started = False

        def connected() -> None:
            nonlocal started
            self.up = True
            backoff.reset()
            if not started:
                started = True
                task_status.started()
            else:
                self.log.warning("bus_reconnected", url=safe(self.url), channels=len(self._channels))
                if self.on_gap is not None:
                    self.on_gap("bus reconnected")  # what was published meanwhile comes from the history

        while True:
            lost: BaseException | None = None
            try:
                await self._session(sink, connected)
            except* (
                coredis.exceptions.ConnectionError,
                TimeoutError,
                trio.TooSlowError,
                OSError,
                RespProtocolError,
                BusUnavailable,
                coredis.exceptions.ResponseError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                anyio.ClosedResourceError,
                anyio.BrokenResourceError,
            ) as group:
                # (coredis may also fail on its own cleanup of a dead connection)
                lost = group.exceptions[0]
                while isinstance(lost, BaseExceptionGroup):
                    lost = lost.exceptions[0]
            self._sub = None
            self.up = False
            if not started:
                raise ConfigError(f"cannot reach the Redis bus at {safe(self.url)}: {describe(lost)}")
            delay = backoff.next()
            self.log.error("bus_lost", url=safe(self.url), error=describe(lost), retry_in=round(delay, 3))
            await trio.sleep(delay)

    async def _session(self, sink: Sink, connected) -> None:
        """One subscription connection to Redis: load the functions,
        subscribe to every wanted channel, then hand the messages to the
        sink until it fails (or the heartbeats stop)."""
        async with self.client:  # the publishing side
            with trio.fail_after(CONNECT_TIMEOUT):
                await self.client.function_load(self._library, replace=True)
                stream = await self._address.connect()
            async with stream:
                sub = Subscription(stream)
                if self._address.password is not None:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await sub.auth(self._address.username, self._address.password)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, sub, sink)
                    # The control channel keeps the connection in subscribed
                    # mode even with no tab here yet.
                    await sub.request(b"SUBSCRIBE", [CONTROL_CHANNEL])
                    for chunk in chunks(sorted(self._channels)):
                        await sub.request(b"SUBSCRIBE", chunk)
                    self._sub = sub
                    self._heard = trio.current_time()
                    nursery.start_soon(self._heartbeat)
                    connected()

    async def _heartbeat(self) -> None:
        """Publish a heartbeat every HEARTBEAT_INTERVAL; end the session
        when none has been heard for HEARTBEAT_TIMEOUT.

        Raises:
          TimeoutError: the bus stopped delivering (or a publish failed,
            its own error): the session ends and is made again.
        """
        while True:
            with trio.fail_after(HEARTBEAT_TIMEOUT):  # a Redis that stopped answering
                await self.client.publish(CONTROL_CHANNEL, self._beat)
            await trio.sleep(HEARTBEAT_INTERVAL)
            silent = trio.current_time() - self._heard
            if silent > HEARTBEAT_TIMEOUT:
                raise TimeoutError(f"no heartbeat through Redis for {silent:.1f} s: it stopped delivering")

    async def _read(self, sub: Subscription, sink: Sink) -> None:
        """Every push of a read is parsed at once; the messages among them
        go to the sink as one batch.

        Error handling: a stream the parser refuses ends the session (the
        replies complete before the fault are handled first); so does the
        peer closing it. Either way waiting requests fail with the cause.
        """
        receive, parser = sub.stream.receive_some, PushParser()
        try:
            while data := await receive(RECV_SIZE):
                try:
                    pushes = parser.feed(data)
                except RespProtocolError as e:
                    await self._handle(e.replies, sub, sink)
                    raise
                await self._handle(pushes, sub, sink)
            raise ConnectionError("Redis closed the connection")
        except BaseException as e:
            sub.fail(e)
            raise

    async def _handle(self, pushes: list, sub: Subscription, sink: Sink) -> None:
        item_of = self._item
        batch = []
        for push in pushes:
            if type(push) is tuple:  # (channel, payload)
                if push[0] != _CONTROL:
                    item = item_of(*push)
                    if item is not None:
                        batch.append(item)
                else:
                    self._heard = trio.current_time()
            else:
                sub.reply(push)
        if batch:
            await sink(batch)

    def _item(self, channel: bytes, data: bytes) -> Event | None:
        """The event of one message, or None (dropped, counted and logged)
        when it is not one: whatever the payload holds, nothing else
        happens to the session or to the other messages."""
        try:
            sub = channel.decode("utf-8", "replace")[len(CHANNEL_PREFIX) :]
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

    async def publish(self, items: Sequence[Item]) -> None:
        """``mailpush_publish`` each item (offset, history and PUBLISH in
        one step on the Redis side), in one pipeline.

        Raises:
          BusUnavailable: Redis is not reachable now (the subscription
            session is down, or the publish failed on the wire); the items
            may or may not have been published, the caller retries.
        """
        if not self.up:
            raise BusUnavailable(f"not connected to the Redis bus at {safe(self.url)}; retry shortly")
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for sub, event, data, state in items:
                    args = [sub, event, _json(data), _json(state) if state is not None else b""]
                    pipe.fcall(PUBLISH, [meta_key(sub), history_key(sub)], args)
        except _UNREACHABLE as e:
            raise BusUnavailable(f"publishing to the Redis bus at {safe(self.url)} failed: {describe(e)}") from None
        except coredis.exceptions.ResponseError as e:
            raise BusUnavailable(f"Redis refused the publish: {e}") from None

    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        """``mailpush_read`` each request in one pipeline, then a PING on
        the subscription connection: its answer comes after every message
        published before the reads (the barrier).

        Raises:
          BusUnavailable: Redis is not reachable now.
        """
        sub = self._sub
        if sub is None or not self.up:
            raise BusUnavailable(f"not connected to the Redis bus at {safe(self.url)}")
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pending = [
                    pipe.fcall(READ, [meta_key(s), history_key(s)], [epoch or "", "" if at is None else str(at)])
                    for s, epoch, at in requests
                ]
            results = [await p for p in pending]
        except _UNREACHABLE as e:
            raise BusUnavailable(f"reading the history from Redis failed: {describe(e)}") from None
        except coredis.exceptions.ResponseError as e:
            raise BusUnavailable(f"Redis refused the history read: {e}") from None
        await sub.request(b"PING", [])
        return [_replay(request[0], result) for request, result in zip(requests, results, strict=True)]

    async def subscribe(self, subscribers: Sequence[str]) -> None:
        """SUBSCRIBE their channels; returns once Redis acknowledged each.

        Raises:
          BusUnavailable: not connected, or the acknowledgement failed.
        """
        sub = self._sub
        if sub is None:
            # Not connected: say so rather than pretend (the tabs' answers
            # wait for the acknowledgement); the dispatcher retries, and the
            # channels are wanted only once subscribed.
            raise BusUnavailable(f"not connected to the Redis bus at {safe(self.url)}")
        channels = [CHANNEL_PREFIX + s for s in subscribers]
        self._channels.update(channels)  # a reconnect meanwhile subscribes them too
        for chunk in chunks(channels):
            await sub.request(b"SUBSCRIBE", chunk)

    async def unsubscribe(self, subscribers: Sequence[str]) -> None:
        """UNSUBSCRIBE their channels (and not subscribe them again on a
        reconnect).

        Raises:
          BusUnavailable: the acknowledgement failed.
        """
        channels = [CHANNEL_PREFIX + s for s in subscribers]
        self._channels.difference_update(channels)
        sub = self._sub
        if sub is not None:  # else: not connected, and not subscribed again on reconnect
            for chunk in chunks(channels):
                await sub.request(b"UNSUBSCRIBE", chunk)


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
