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
answers 503; a read is retried). A node that lost the functions (restarted
empty) gets them again on the next session, or at once when a publish is
refused with "Function not found".

``sentinel.py`` runs this bus on whichever master Redis Sentinel names (it
fills in :meth:`RedisBus._locate` and :meth:`RedisBus._check`);
``redis_cluster.py`` is the Redis Cluster bus; what they share is in
``redis_common.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import coredis
import trio

from ..backoff import Backoff
from ..config import Config
from ..errors import BusUnavailable, ConfigError
from ..history import Replay
from .base import Item, Read, Sink
from .redis_common import (
    CONNECT_TIMEOUT,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    LOST,
    RECONNECT_FIRST,
    RECONNECT_MAX,
    RedisBase,
    innermost,
    read_pushes,
)
from .redis_conn import Address, Subscription, chunks, describe, safe

__all__ = ["RedisBus", "CHANNEL_PREFIX", "CONTROL_CHANNEL", "HEARTBEAT_INTERVAL", "HEARTBEAT_TIMEOUT"]

# The channel of a subscriber is this prefix + its id (the external contract).
CHANNEL_PREFIX = "mailpush:"
# Always subscribed, outside the subscriber namespace: a pub/sub connection
# with no channel ends its message stream, and a server with no tab yet has
# none. The heartbeats go here.
CONTROL_CHANNEL = "mailpush.control"

_CONTROL = CONTROL_CHANNEL.encode()
_PREFIX_LEN = len(CHANNEL_PREFIX)


class RedisBus(RedisBase):
    """The Redis bus (see the module docstring).

    Args:
      url: ``redis://[:PASSWORD@]HOST:PORT/DB``, ``rediss://…`` (TLS) or
        ``unix:///path``.
      config: the history options (size, TTL); the defaults without one.

    Raises:
      ConfigError: a URL that cannot be used.
    """

    def __init__(self, url: str, config: Config | None = None) -> None:
        super().__init__(url, config)
        self._channels: set[str] = set()  # what we want to be subscribed to
        self._sub: Subscription | None = None
        self.up = False
        self._heard = 0.0  # when the last heartbeat arrived (trio clock)
        self._wake = trio.Event()  # cuts a reconnect wait short (a new master is known)
        if url.startswith(("redis://", "rediss://", "unix://")):
            try:
                self.client = coredis.Redis.from_url(url)
                # TLS as the publishing side has it (ssl_ca_certs=…, ssl_cert_reqs=…
                # and the other coredis URL options): one context for both.
                pool_kwargs = getattr(self.client.connection_pool, "connection_kwargs", {})
                self._address = Address.parse(url, pool_kwargs.get("ssl_context"))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"bad --bus URL {safe(url)!r}: {e}") from None
        elif type(self) is RedisBus:  # (a subclass, Sentinel, finds its Redis per session)
            raise ConfigError(f"bad --bus URL {safe(url)!r}: the scheme must be redis://, rediss:// or unix://")

    def _subscriber_of(self, channel: bytes) -> str:
        return channel.decode("utf-8", "replace")[_PREFIX_LEN:]

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
            except* LOST as group:
                lost = innermost(group)
            self._sub = None
            self.up = False
            if not started:
                raise ConfigError(f"cannot reach the Redis bus at {safe(self.url)}: {describe(lost)}")
            delay = backoff.next()
            self.log.error("bus_lost", url=safe(self.url), error=describe(lost), retry_in=round(delay, 3))
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _session(self, sink: Sink, connected) -> None:
        """One subscription connection to Redis: load the functions,
        subscribe to every wanted channel, then hand the messages to the
        sink until it fails (or the heartbeats stop)."""
        with trio.fail_after(CONNECT_TIMEOUT):
            await self._locate()
        async with self.client:  # the publishing side
            with trio.fail_after(CONNECT_TIMEOUT):
                await self.client.function_load(self._library, replace=True)
                stream = await self._address.connect()
            async with stream:
                sub = Subscription(stream)
                with trio.fail_after(CONNECT_TIMEOUT):
                    if self._address.password is not None:
                        await sub.auth(self._address.username, self._address.password)
                    await self._check(sub)
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

    async def _locate(self) -> None:
        """Where this session goes (``client`` and ``_address``): the URL's
        Redis; Sentinel asks the sentinels for the master."""

    async def _check(self, sub: Subscription) -> None:
        """A check of the subscription connection before it subscribes
        (Sentinel: that it reached a master)."""

    async def _restart(self, reason: str) -> None:
        """End the current session (it is made again at once, and every
        local tab is then brought up to date)."""
        self._wake.set()
        sub = self._sub
        if sub is not None:
            self.log.warning("bus_restart", url=safe(self.url), reason=reason)
            sub.fail(ConnectionError(reason))
            await sub.stream.aclose()

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
        """The subscription connection's reader (see :func:`read_pushes`)."""
        await read_pushes(sub, sink, self._item, lambda: _CONTROL, self._hear, "Redis")

    def _hear(self) -> None:
        self._heard = trio.current_time()

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
        await self._fcall_publish(items)

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
        replays = await self._fcall_read(requests)
        await sub.request(b"PING", [])
        return replays

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
