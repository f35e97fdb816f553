"""The Bus interface every bus implements."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol

import trio

from ..history import Position, Replay
from ..items import Item

__all__ = ["Bus", "Event", "Item", "Read", "Sink", "GapHandler"]

# What a bus hands the sink: (subscriber, event name, data, offset, epoch,
# frame). ``offset`` and ``epoch`` are None for an event that bypassed the
# history (a plain Redis PUBLISH); ``frame`` is the event's frame when the
# bus built it already (the embedded bus, for its history), else None.
Event = tuple[str, str, Any, "int | None", "str | None", "bytes | None"]
# Where a bus hands what it receives, one batch a call (awaited: the sink
# checkpoints while delivering a large batch).
Sink = Callable[[Sequence[Event]], Awaitable[None]]
# One history read: (subscriber, epoch, offset): the events after
# ``offset`` of that epoch; epoch None: the position alone.
Read = tuple[str, "str | None", "int | None"]


class GapHandler(Protocol):
    """Called when events may have been lost: for every local subscriber,
    or (``subscribers``) for those only (one shard of a Redis Cluster)."""

    def __call__(self, reason: str, subscribers: Collection[str] | None = None) -> None: ...


class Bus(abc.ABC):
    """A publish/subscribe channel keyed by subscriber id, with a history.

    ``routes_by_subscription``: True when the bus delivers only the
    subscribers this process subscribed to (a real network bus); the
    dispatcher then keeps the bus's subscriptions equal to the set of
    subscribers connected here, with reference counts and batching.

    ``may_lose``: True when the bus can lose events on their way here (a
    network bus that reconnects); it then calls :attr:`on_gap` after each
    reconnection, and the dispatcher brings every local tab up to date
    from the history.
    """

    routes_by_subscription: bool = False
    may_lose: bool = False
    # Items received that could not be used (a malformed payload from
    # another publisher), dropped one by one; exported as
    # mailpush_bus_bad_items together with the dispatcher's own.
    bad_items: int = 0
    # False while the bus is known to be unreachable (publishes get 503).
    up: bool = True
    # Set by the dispatcher: called with a reason when events may have been lost.
    on_gap: GapHandler | None = None
    # True when instances on this bus can count each subscriber's
    # connections together (:meth:`count_connections`).
    shares_connections: bool = False

    @abc.abstractmethod
    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: receive notifications, hand them to ``sink``."""

    @abc.abstractmethod
    async def publish(self, items: Sequence[Item]) -> None:
        """Publish validated items (all of them, or raise), each with the
        next offset of its subscriber's stream.

        Raises:
          BusUnavailable: the bus cannot be reached now.
        """

    @abc.abstractmethod
    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        """Read the history: for each request, its subscriber's position and
        the events after its offset (or why they cannot be had).

        Returns only once every event up to each returned position has been
        handed to the sink (a barrier), so that a caller holding back live
        events can tell exactly which of them the read covers.

        Raises:
          BusUnavailable: the bus cannot be reached now; the caller retries.
        """

    def position_now(self, subscriber: str) -> Position | None:
        """The subscriber's position without waiting, when nothing is on its
        way to the sink (the fast path of a fresh subscribe); None: call
        :meth:`read`."""
        return None

    async def subscribe(self, subscribers: Sequence[str]) -> None:  # noqa: B027 - optional
        """Start receiving events for these subscribers; returns once the bus
        has acknowledged it (events published from then on arrive).

        Raises:
          BusUnavailable: not connected now; the caller retries.
        """

    async def unsubscribe(self, subscribers: Sequence[str]) -> None:  # noqa: B027 - optional
        """Stop receiving events for these subscribers."""

    # True when some subscriber ids cannot be served on this bus
    # (:meth:`check_subscriber` says which).
    restricts_subscribers: bool = False

    def check_subscriber(self, subscriber: str) -> str:
        """Why this bus cannot serve ``subscriber`` ("" when it can)."""
        return ""

    def serving(self) -> bool:
        """Whether this instance is of use now (``/healthz``): the bus
        delivers at least part of the events. By default :attr:`up`."""
        return self.up

    def degraded(self) -> str:
        """Why only part of the events arrive now ("" when all do, or none):
        said by ``/healthz`` beside its 200."""
        return ""

    async def count_connections(
        self, instance: str, counts: Sequence[tuple[str, int, int]], cap: int, lease_ms: int
    ) -> list[int]:
        """The per-subscriber cap across the instances on this bus (only if
        :attr:`shares_connections`): for each (subscriber, kept, wanted),
        store that ``instance`` holds ``kept`` connections of the
        subscriber plus those of the ``wanted`` new ones it may keep, for
        ``lease_ms`` unless renewed, and return how many it may keep.

        Raises:
          BusUnavailable: the bus cannot be reached now; nothing is known.
        """
        raise NotImplementedError

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release the bus's resources."""
