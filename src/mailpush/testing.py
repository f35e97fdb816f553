"""For integration tests of applications built around mailpush (and for
mailpush's own): a fake bus.

:class:`FakeBus` behaves like a network bus (it delivers only what this
process subscribed to), keeps a history like the real ones, and records
every subscribe/unsubscribe call and every publish, so a test can check the
reference counting, inject what a mail store would publish, and simulate an
outage that lost events::

    bus = FakeBus()
    server = mailpush.Server(config, bus)
    await nursery.start(server.serve)
    ...
    bus.inject([("alice", "new_letter", {"id": 1})])

Not imported by the server itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from .bus.base import Bus, Event, Item, Read, Sink
from .history import History, Position, Replay, record

__all__ = ["FakeBus"]


class _Barrier:
    __slots__ = ("passed",)

    def __init__(self) -> None:
        self.passed = trio.Event()


class FakeBus(Bus):
    """A bus in memory that routes by subscription, like Redis does.

    Args:
      history: the history it keeps (by default 100 events per subscriber
        for an hour).
      may_lose: behave like a bus that can lose events (then
        :meth:`lose` simulates an outage).
    """

    routes_by_subscription = True

    def __init__(self, history: History | None = None, *, may_lose: bool = False) -> None:
        self.history = history if history is not None else History(100, 3600, 1_000_000)
        self.may_lose = may_lose
        self._send, self._receive = trio.open_memory_channel[Sequence[Event] | _Barrier](1024)
        self.subscribed: set[str] = set()
        # Every call, in order: ("subscribe" | "unsubscribe", sorted subscribers).
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.published: list[Item] = []
        self._changed = trio.Event()
        self._in_flight = 0  # batches sent and not yet delivered
        self._losing = False

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: every batch, filtered to what is subscribed
        (and, during a simulated outage, nothing)."""
        task_status.started()
        async for batch in self._receive:
            if isinstance(batch, _Barrier):
                batch.passed.set()
                continue
            try:
                routed = [e for e in batch if e[0] in self.subscribed and not self._losing]
                if routed:
                    await sink(routed)
            finally:
                self._in_flight -= 1

    async def publish(self, items: Sequence[Item]) -> None:
        self.published.extend(items)
        self._in_flight += 1
        await self._send.send(record(self.history, items))

    def inject(self, items: Sequence[tuple[Any, ...]]) -> None:
        """What a mail store publishing on the bus looks like to us: items
        of (subscriber, event, data[, state]), through the history."""
        full = [(*item, None) if len(item) == 3 else item for item in items]
        self._in_flight += 1
        self._send.send_nowait(record(self.history, full))

    def inject_unrecorded(self, items: Sequence[tuple[str, str, Any]]) -> None:
        """Events that bypass the history (an old publisher's plain PUBLISH)."""
        self._in_flight += 1
        self._send.send_nowait([(sub, event, data, None, None, None) for sub, event, data in items])

    def lose(self, during: bool) -> None:
        """Simulate an outage: while ``during``, published events are lost on
        their way here; when it ends, the bus reports the gap."""
        self._losing = during
        if not during and self.on_gap is not None:
            self.on_gap("fake outage")

    def position_now(self, subscriber: str) -> Position | None:
        return self.history.position(subscriber) if not self._in_flight else None

    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        replays = [self.history.read(*request) for request in requests]
        barrier = _Barrier()
        await self._send.send(barrier)
        await barrier.passed.wait()
        return replays

    async def subscribe(self, subscribers: Sequence[str]) -> None:
        dup = self.subscribed.intersection(subscribers)
        assert not dup, f"subscribed twice: {dup}"
        self.subscribed.update(subscribers)
        self.calls.append(("subscribe", tuple(sorted(subscribers))))
        self._wake()

    async def unsubscribe(self, subscribers: Sequence[str]) -> None:
        missing = set(subscribers) - self.subscribed
        assert not missing, f"unsubscribed without a subscription: {missing}"
        self.subscribed.difference_update(subscribers)
        self.calls.append(("unsubscribe", tuple(sorted(subscribers))))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate) -> None:
        """Wait until ``predicate(self)`` holds after a subscription change."""
        while not predicate(self):
            await self._changed.wait()
