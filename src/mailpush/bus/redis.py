"""The Redis bus: channel ``mailpush:SUBSCRIBER``, payload one publish item.

Any mail store in any language publishes with ``PUBLISH mailpush:alice
'{"subscriber":"alice","event":"new_letter","data":{...}}'``. Each mailpush
process subscribes to exactly the channels of the subscribers connected to
it (the dispatcher keeps that set, reference counted and batched), so Redis
routes every event only to the processes that hold its subscriber's tabs.

Publishing goes through coredis (it speaks anyio, so it runs inside
mailpush's Trio loop). Receiving does not: the subscription connection is
read by our own RESP reader (``resp.py``), which parses every message of a
``recv()`` at once and hands them to the dispatcher as one batch; coredis's
pub/sub reader, an await per message, topped out near 10,000 messages a
second on these machines.

Error handling: Redis pub/sub delivers at most once. If the connection
drops, or the stream breaks the protocol or a bound of the parser, the
bus-client task logs it, reconnects with backoff and subscribes again to
every channel it had; events published meanwhile are lost (tabs that need
them re-sync from the mail store). A payload that is not a valid publish
item, or names another subscriber than its channel, is dropped on its own,
counted (``mailpush_bus_bad_items``) and logged at most once a second; the
messages around it are delivered. A publish while Redis is unreachable
raises :class:`~mailpush.errors.BusUnavailable` (the admin API answers 503).
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import coredis
import msgspec
import trio

from ..backoff import Backoff
from ..errors import BusUnavailable, ConfigError, PublishError
from ..items import parse_item_json
from ..log import LogLimiter, get_logger
from .base import Bus, Item, Sink
from .resp import PushParser, RespError, RespProtocolError, command

__all__ = ["RedisBus", "CHANNEL_PREFIX"]

# The channel of a subscriber is this prefix + its id (the external contract).
CHANNEL_PREFIX = "mailpush:"
# Always subscribed, outside the subscriber namespace: a pub/sub connection
# with no channel ends its message stream, and a server with no tab yet has
# none. Messages on it are ignored.
CONTROL_CHANNEL = "mailpush.control"
# Reconnect backoff after the connection to Redis is lost: first wait, cap
# (each wait jittered, see backoff.py).
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
# How long to wait for Redis to acknowledge a SUBSCRIBE or UNSUBSCRIBE (the
# acknowledgement queues behind the messages already on their way). Past it
# the connection's state is unknown: it is dropped and made again.
SUBSCRIBE_ACK_TIMEOUT = 10.0
# How long connecting (and AUTH) may take.
CONNECT_TIMEOUT = 5.0
# Bytes per read of the subscription connection.
RECV_SIZE = 256 * 1024
# Channels per SUBSCRIBE/UNSUBSCRIBE command: one command for a thousand
# tabs arriving at once, small enough to keep the command line short.
CHANNELS_PER_COMMAND = 500

_encode = msgspec.json.Encoder().encode
_CONTROL = CONTROL_CHANNEL.encode()


class _Payload(msgspec.Struct):
    subscriber: str
    event: str
    data: Any


class RedisBus(Bus):
    """The Redis bus (see the module docstring).

    Args:
      url: ``redis://[:PASSWORD@]HOST:PORT/DB``, ``rediss://…`` (TLS) or
        ``unix:///path``.

    Raises:
      ConfigError: a URL that cannot be used.
    """

    routes_by_subscription = True

    def __init__(self, url: str) -> None:
        try:
            self.client = coredis.Redis.from_url(url)
            # TLS as the publishing side has it (ssl_ca_certs=…, ssl_cert_reqs=…
            # and the other coredis URL options): one context for both.
            pool_kwargs = getattr(self.client.connection_pool, "connection_kwargs", {})
            self._address = _Address.parse(url, pool_kwargs.get("ssl_context"))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad --bus URL {_safe(url)!r}: {e}") from None
        self.url = url
        self.log = get_logger()
        self._channels: set[str] = set()  # what we want to be subscribed to
        self._sub: _Subscription | None = None
        self.up = False
        self._bad_log = LogLimiter()

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
                self.log.warning("bus_reconnected", url=_safe(self.url), channels=len(self._channels))

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
                raise ConfigError(f"cannot reach the Redis bus at {_safe(self.url)}: {_describe(lost)}")
            delay = backoff.next()
            self.log.error("bus_lost", url=_safe(self.url), error=_describe(lost), retry_in=round(delay, 3))
            await trio.sleep(delay)

    async def _session(self, sink: Sink, connected) -> None:
        """One subscription connection to Redis: subscribe to every wanted
        channel, then hand the messages to the sink until it fails."""
        async with self.client:  # the publishing side
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await self._address.connect()
            async with stream:
                sub = _Subscription(stream)
                if self._address.password is not None:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await sub.auth(self._address.username, self._address.password)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, sub, sink)
                    # The control channel keeps the connection in subscribed
                    # mode even with no tab here yet.
                    await sub.request(b"SUBSCRIBE", [CONTROL_CHANNEL])
                    for chunk in _chunks(sorted(self._channels)):
                        await sub.request(b"SUBSCRIBE", chunk)
                    self._sub = sub
                    connected()

    async def _read(self, sub: _Subscription, sink: Sink) -> None:
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

    async def _handle(self, pushes: list, sub: _Subscription, sink: Sink) -> None:
        item_of = self._item
        batch = []
        for push in pushes:
            if type(push) is tuple:  # (channel, payload)
                if push[0] != _CONTROL:
                    item = item_of(*push)
                    if item is not None:
                        batch.append(item)
            else:
                sub.reply(push)
        if batch:
            await sink(batch)

    def _item(self, channel: bytes, data: bytes) -> Item | None:
        """The publish item of one message, or None (dropped, counted and
        logged) when it is not one: whatever the payload holds, nothing
        else happens to the session or to the other messages."""
        try:
            sub = channel.decode("utf-8", "replace")[len(CHANNEL_PREFIX) :]
            item = parse_item_json(data)
            if item[0] == sub:
                return item
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
        """PUBLISH each item on its subscriber's channel, in one pipeline.

        Raises:
          BusUnavailable: Redis is not reachable now (the subscription
            session is down, or the publish failed on the wire); the items
            may or may not have been published, the caller retries.
        """
        if not self.up:
            raise BusUnavailable(f"not connected to the Redis bus at {_safe(self.url)}; retry shortly")
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for sub, event, data in items:
                    pipe.publish(CHANNEL_PREFIX + sub, _encode(_Payload(sub, event, data)))
        except (
            coredis.exceptions.RedisError,
            OSError,
            RuntimeError,
            TimeoutError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            anyio.ClosedResourceError,
            anyio.BrokenResourceError,
        ) as e:
            # RuntimeError: coredis's pool closed with the session meanwhile.
            raise BusUnavailable(f"publishing to the Redis bus at {_safe(self.url)} failed: {_describe(e)}") from None

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
            raise BusUnavailable(f"not connected to the Redis bus at {_safe(self.url)}")
        channels = [CHANNEL_PREFIX + s for s in subscribers]
        self._channels.update(channels)  # a reconnect meanwhile subscribes them too
        for chunk in _chunks(channels):
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
            for chunk in _chunks(channels):
                await sub.request(b"UNSUBSCRIBE", chunk)


class _Waiter:
    __slots__ = ("remaining", "done", "error")

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.done = trio.Event()
        self.error: BaseException | None = None


class _Subscription:
    """The subscription connection: commands out, acknowledgements matched.

    Redis answers a SUBSCRIBE or UNSUBSCRIBE of k channels with k pushes,
    in command order, so the waiters form a queue and each counts its own.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._waiters: deque[_Waiter] = deque()
        self._send_lock = trio.Lock()
        self._broken: BaseException | None = None

    async def auth(self, username: str | None, password: str) -> None:
        """AUTH before anything else (the reader is not running yet)."""
        args = (b"AUTH", username, password) if username else (b"AUTH", password)
        await self.stream.send_all(command(*args))
        parser, replies = PushParser(), list[object]()
        while not replies:
            data = await self.stream.receive_some(4096)
            if not data:
                raise ConnectionError("Redis closed the connection")
            replies = parser.feed(data)
        if isinstance(replies[0], RespError):
            raise ConnectionError(f"Redis refused AUTH: {replies[0]}")

    async def request(self, verb: bytes, channels: Sequence[str]) -> None:
        """Send ``verb channels…``; return once Redis acknowledged each."""
        if self._broken is not None:
            raise BusUnavailable(f"the Redis subscription connection failed: {self._broken!r}")
        waiter = _Waiter(len(channels))
        self._waiters.append(waiter)
        async with self._send_lock:
            await self.stream.send_all(command(verb, *channels))
        with trio.move_on_after(SUBSCRIBE_ACK_TIMEOUT):
            await waiter.done.wait()
        if not waiter.done.is_set():
            # The queue of acknowledgements can no longer be trusted: make
            # the connection again (run() reconnects and resubscribes).
            self.fail(TimeoutError(f"no acknowledgement of {verb.decode()} in {SUBSCRIBE_ACK_TIMEOUT:g} s"))
            await self.stream.aclose()
        if waiter.error is not None:
            raise BusUnavailable(f"Redis did not acknowledge {verb.decode()}: {waiter.error}")

    def reply(self, push) -> None:
        """A reply other than a message: acknowledgements and errors."""
        if type(push) is list and push and push[0] in (b"subscribe", b"unsubscribe"):
            if self._waiters:
                head = self._waiters[0]
                head.remaining -= 1
                if head.remaining <= 0:
                    self._waiters.popleft().done.set()
        elif isinstance(push, RespError) and self._waiters:
            head = self._waiters.popleft()  # one error answers the whole command
            head.error = push
            head.done.set()
        # anything else (a pong) needs no answer

    def fail(self, error: BaseException) -> None:
        """The connection is gone: every waiting request fails."""
        if self._broken is None:
            self._broken = error
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.done.set()


def _describe(error: BaseException | None) -> str:
    """An error and what caused it, for a log line or a startup error
    (TLS failures arrive as a bare BrokenResourceError caused by the SSLError)."""
    if error is None:
        return "unknown error"
    text = str(error) or type(error).__name__
    return f"{text}: {_describe(error.__cause__)}" if error.__cause__ is not None else text


class _Address:
    """Where the subscription connection goes, from the --bus URL."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        path: str,
        username: str | None,
        password: str | None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.scheme, self.host, self.port, self.path = scheme, host, port, path
        self.username, self.password = username, password
        self.tls = tls

    @classmethod
    def parse(cls, url: str, tls: ssl.SSLContext | None = None) -> _Address:
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("the scheme must be redis://, rediss:// or unix://")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// needs a socket path, as in unix:///run/redis.sock")
            return cls(scheme, "", 0, parts.path, username, password)
        if scheme == "rediss" and tls is None:
            tls = ssl.create_default_context()
        return cls(scheme, parts.hostname or "127.0.0.1", parts.port or 6379, "", username, password, tls)

    async def connect(self) -> trio.abc.Stream:
        if self.scheme == "unix":
            return await trio.open_unix_socket(self.path)
        stream = await trio.open_tcp_stream(self.host, self.port)
        if self.scheme == "redis":
            return stream
        assert self.tls is not None  # rediss:// always has a context (parse)
        tls = trio.SSLStream(stream, self.tls, server_hostname=self.host)
        await tls.do_handshake()
        return tls


def _chunks(channels: list[str]):
    for i in range(0, len(channels), CHANNELS_PER_COMMAND):
        yield channels[i : i + CHANNELS_PER_COMMAND]


def _safe(url: str) -> str:
    """The URL without a password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest
