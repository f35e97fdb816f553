"""The Bus interface every bus implements."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..items import Item

__all__ = ["Bus", "Item", "Sink"]

# Where a bus hands what it receives, one batch a call (awaited: the sink
# checkpoints while delivering a large batch).
Sink = Callable[[Sequence[Item]], Awaitable[None]]


class Bus(abc.ABC):
    """A publish/subscribe channel keyed by subscriber id.

    ``routes_by_subscription``: True when the bus delivers only the
    subscribers this process subscribed to (a real network bus); the
    dispatcher then keeps the bus's subscriptions equal to the set of
    subscribers connected here, with reference counts and batching.
    """

    routes_by_subscription: bool = False
    # Items received that could not be used (a malformed payload from
    # another publisher), dropped one by one; exported as
    # mailpush_bus_bad_items together with the dispatcher's own.
    bad_items: int = 0
    # False while the bus is known to be unreachable (publishes get 503).
    up: bool = True

    @abc.abstractmethod
    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: receive notifications, hand them to ``sink``."""

    @abc.abstractmethod
    async def publish(self, items: Sequence[Item]) -> None:
        """Publish validated items (all of them, or raise)."""

    async def subscribe(self, subscribers: Sequence[str]) -> None:  # noqa: B027 - optional
        """Start receiving events for these subscribers; returns once the bus
        has acknowledged it (events published from then on arrive).

        Raises:
          BusUnavailable: not connected now; the caller retries.
        """

    async def unsubscribe(self, subscribers: Sequence[str]) -> None:  # noqa: B027 - optional
        """Stop receiving events for these subscribers."""

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release the bus's resources."""
