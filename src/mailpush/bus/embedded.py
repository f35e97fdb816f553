"""The in-process bus: publishes from this process's admin API go straight
to this process's bus-client task, one batch per channel message."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .base import Bus, Item, Sink

__all__ = ["EmbeddedBus"]

# Batches in flight between the admin API and the bus-client task. A full
# channel makes publishers wait (backpressure) instead of growing memory.
CHANNEL_BATCHES = 1024


class EmbeddedBus(Bus):
    """Publishes of this process to this process's bus-client task, in
    order, through a bounded memory channel (a full channel makes the
    publisher wait)."""

    routes_by_subscription = False

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Sequence[Item]](CHANNEL_BATCHES)

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: every published batch to the sink, in order.

        Error handling: the sink (the dispatcher) is an isolation boundary
        of its own; nothing here can fail but cancellation.
        """
        task_status.started()
        async for batch in self._receive:
            await sink(batch)

    async def publish(self, items: Sequence[Item]) -> None:
        """Queue one batch for the bus-client task (waits while the channel is full)."""
        await self._send.send(items)
