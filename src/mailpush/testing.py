"""For integration tests of applications built around mailpush (and for
mailpush's own): a fake bus.

:class:`FakeBus` behaves like a network bus (it delivers only what this
process subscribed to) and records every subscribe/unsubscribe call and
every publish, so a test can check the reference counting and inject what
a mail store would publish::

    bus = FakeBus()
    server = mailpush.Server(config, bus)
    await nursery.start(server.serve)
    ...
    bus.inject([("alice", "new_letter", {"id": 1})])

Not imported by the server itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .bus.base import Bus, Item, Sink

__all__ = ["FakeBus"]


class FakeBus(Bus):
    """A bus in memory that routes by subscription, like Redis does."""

    routes_by_subscription = True

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Sequence[Item]](1024)
        self.subscribed: set[str] = set()
        # Every call, in order: ("subscribe" | "unsubscribe", sorted subscribers).
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.published: list[Item] = []
        self._changed = trio.Event()

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: every batch, filtered to what is subscribed."""
        task_status.started()
        async for batch in self._receive:
            routed = [item for item in batch if item[0] in self.subscribed]
            if routed:
                await sink(routed)

    async def publish(self, items: Sequence[Item]) -> None:
        self.published.extend(items)
        await self._send.send(list(items))

    def inject(self, items: Sequence[Item]) -> None:
        """What a mail store publishing on the bus looks like to us."""
        self._send.send_nowait(list(items))

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
