"""The in-process bus: publishes from this process's admin API go straight
to this process's bus-client task, one batch per channel message, and into
this process's history (:class:`~mailpush.history.History`), which a
restart loses (a new epoch tells the tabs so)."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..history import History, Position, Replay, record
from .base import Bus, Event, Item, Read, Sink

__all__ = ["EmbeddedBus"]

# Batches in flight between the admin API and the bus-client task. A full
# channel makes publishers wait (backpressure) instead of growing memory.
CHANNEL_BATCHES = 1024


class _Barrier:
    """Put through the channel behind the events before it; set once the
    bus-client task reaches it, so every one of them was delivered."""

    __slots__ = ("passed",)

    def __init__(self) -> None:
        self.passed = trio.Event()


class EmbeddedBus(Bus):
    """Publishes of this process to this process's bus-client task, in
    order, through a bounded memory channel (a full channel makes the
    publisher wait); each event gets its offset and goes into the history
    as it is published.

    Args:
      history: where the events are kept; by default none is kept (every
        resume is a resync), only offsets are given out.
    """

    routes_by_subscription = False

    def __init__(self, history: History | None = None) -> None:
        self.history = history if history is not None else History(0, 0, 0)
        self._send, self._receive = trio.open_memory_channel[Sequence[Event] | _Barrier](CHANNEL_BATCHES)
        # Batches published and not yet delivered (a send to a waiting
        # receiver is in no buffer: the channel's statistics cannot tell).
        self._in_flight = 0

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: every published batch to the sink, in order.

        Error handling: the sink (the dispatcher) is an isolation boundary
        of its own; nothing here can fail but cancellation.
        """
        task_status.started()
        async for batch in self._receive:
            if isinstance(batch, _Barrier):
                batch.passed.set()
                continue
            try:
                await sink(batch)
            finally:
                self._in_flight -= 1

    async def publish(self, items: Sequence[Item]) -> None:
        """Give each item its offset, keep it in the history, and queue the
        batch for the bus-client task (waits while the channel is full)."""
        batch = record(self.history, items)
        self._in_flight += 1
        try:
            await self._send.send(batch)
        except BaseException:
            self._in_flight -= 1
            raise

    def _idle(self) -> bool:
        return not self._in_flight

    def position_now(self, subscriber: str) -> Position | None:
        return self.history.position(subscriber) if self._idle() else None

    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        """Read the history (at once), then wait until every event already
        published has been delivered (a barrier through the channel)."""
        replays = [self.history.read(*request) for request in requests]
        if not self._idle():
            barrier = _Barrier()
            await self._send.send(barrier)
            await barrier.passed.wait()
        return replays
