"""The Redis bus: channel ``mailpush:SUBSCRIBER``, payload one publish item.

Any mail store in any language publishes with ``PUBLISH mailpush:alice
'{"subscriber":"alice","event":"new_letter","data":{...}}'``. Each mailpush
process subscribes to exactly the channels of the subscribers connected to
it (the dispatcher keeps that set, reference counted and batched), so Redis
routes every event only to the processes that hold its subscriber's tabs.

coredis speaks anyio, so it runs inside mailpush's Trio loop.

Error handling: Redis pub/sub delivers at most once. If the connection
drops, the bus-client task logs it, reconnects with backoff and subscribes
again to every channel it had; events published meanwhile are lost (tabs
that need them re-sync from the mail store). A payload that is not a valid
publish item, or names another subscriber than its channel, is dropped and
logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import coredis
from coredis.retry import NoRetryPolicy
import msgspec
import trio

from ..errors import BusUnavailable, ConfigError, PublishError
from ..log import get_logger
from ..packets import parse_item_json
from .base import Bus, Item, Sink

__all__ = ["RedisBus", "CHANNEL_PREFIX"]

# The channel of a subscriber is this prefix + its id (the external contract).
CHANNEL_PREFIX = "mailpush:"
# Always subscribed, outside the subscriber namespace: a pub/sub connection
# with no channel ends its message stream, and a server with no tab yet has
# none. Messages on it are ignored.
CONTROL_CHANNEL = "mailpush.control"
# Reconnect backoff after the connection to Redis is lost: first wait, cap.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
# How long coredis waits for Redis to acknowledge a SUBSCRIBE. Under a heavy
# event stream the acknowledgement queues behind the messages (its default,
# 1 s, was exceeded at 10,000 events/s); a late one is not a failure.
SUBSCRIBE_ACK_TIMEOUT = 10.0
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
    routes_by_subscription = True

    def __init__(self, url: str) -> None:
        try:
            self.client = coredis.Redis.from_url(url)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad --bus URL {url!r}: {e}") from None
        self.url = url
        self.log = get_logger()
        self._channels: set[str] = set()  # what we want to be subscribed to
        self._pubsub = None
        self.up = False
        self.dropped = 0  # bad payloads

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        delay = RECONNECT_FIRST
        started = False

        def connected() -> None:
            nonlocal started, delay
            self.up = True
            delay = RECONNECT_FIRST
            if not started:
                started = True
                task_status.started()
            else:
                self.log.warning("bus_reconnected", url=_safe(self.url), channels=len(self._channels))

        while True:
            lost: BaseException | None = None
            try:
                await self._session(sink, connected)
            except* (coredis.exceptions.ConnectionError, TimeoutError, OSError, anyio.ClosedResourceError, anyio.BrokenResourceError) as group:
                # (coredis may also fail on its own cleanup of a dead connection)
                lost = group.exceptions[0]
                while isinstance(lost, BaseExceptionGroup):
                    lost = lost.exceptions[0]
            self._pubsub = None
            self.up = False
            if not started:
                raise ConfigError(f"cannot reach the Redis bus at {_safe(self.url)}: {lost}")
            self.log.error("bus_lost", url=_safe(self.url), error=str(lost), retry_in=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _session(self, sink: Sink, connected) -> None:
        """One connection to Redis: subscribe to every wanted channel, then
        hand each message to the sink until the connection fails."""
        async with self.client:
            # No retries inside coredis: run() reconnects, so the outage is
            # logged and visible (mailpush_bus_up).
            async with self.client.pubsub(
                channels=[CONTROL_CHANNEL], retry_policy=NoRetryPolicy(), subscription_timeout=SUBSCRIBE_ACK_TIMEOUT
            ) as pubsub:
                for chunk in _chunks(sorted(self._channels)):
                    await pubsub.subscribe(*chunk)
                self._pubsub = pubsub
                connected()
                async for message in pubsub:
                    if message["type"] == "message" and message["channel"] != _CONTROL:
                        item = self._item(message["channel"], message["data"])
                        if item is not None:
                            await sink((item,))
        raise coredis.exceptions.ConnectionError("the subscription stream ended")

    def _item(self, channel: bytes, data: bytes) -> Item | None:
        sub = channel.decode("utf-8", "replace")[len(CHANNEL_PREFIX) :]
        try:
            item = parse_item_json(data)
        except PublishError as e:
            self.dropped += 1
            self.log.warning("bus_bad_payload", channel=channel.decode("utf-8", "replace")[:300], reason=str(e))
            return None
        if item[0] != sub:
            self.dropped += 1
            self.log.warning("bus_bad_payload", channel=channel.decode("utf-8", "replace")[:300], reason=f"payload names subscriber {item[0][:100]!r}, not the channel's")
            return None
        return item

    async def publish(self, items: Sequence[Item]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for sub, event, data in items:
                pipe.publish(CHANNEL_PREFIX + sub, _encode(_Payload(sub, event, data)))

    async def subscribe(self, subscribers: Sequence[str]) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            # Not connected: say so rather than pretend (the tabs' answers
            # wait for the acknowledgement); the dispatcher retries, and the
            # channels are wanted only once subscribed.
            raise BusUnavailable(f"not connected to the Redis bus at {_safe(self.url)}")
        channels = [CHANNEL_PREFIX + s for s in subscribers]
        self._channels.update(channels)  # a reconnect meanwhile subscribes them too
        for chunk in _chunks(channels):
            await pubsub.subscribe(*chunk)

    async def unsubscribe(self, subscribers: Sequence[str]) -> None:
        channels = [CHANNEL_PREFIX + s for s in subscribers]
        self._channels.difference_update(channels)
        if self._pubsub is not None:
            for chunk in _chunks(channels):
                await self._pubsub.unsubscribe(*chunk)


def _chunks(channels: list[str]):
    for i in range(0, len(channels), CHANNELS_PER_COMMAND):
        yield channels[i : i + CHANNELS_PER_COMMAND]


def _safe(url: str) -> str:
    """The URL without a password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest
