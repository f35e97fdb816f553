"""The dispatcher on its own: routing, filters, counts, and that a large
batch lets the rest of the server run while it is delivered."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from mailpush.bus import EmbeddedBus
from mailpush.testing import FakeBus
from mailpush.dispatch import DELIVERIES_PER_CHECKPOINT, Dispatcher
from mailpush.metrics import Stats
from mailpush.registry import Registry

# Every test here once with the dispatcher's C loop and once with its Python twin.
pytestmark = pytest.mark.usefixtures("deliver_loops")


def ev(sub: str, event: str, data, offset=None):
    """A bus event as the sink gets it (no history: no offset)."""
    return (sub, event, data, offset, None, None)


def kinds(tab) -> list[str]:
    """The packet types a tab was sent, in order."""
    return [json.loads(f[2:])["type"] for f in tab.frames]


class Tab:
    """Stands in for a Connection: what the dispatcher touches."""

    def __init__(self, subscriber: str, events=None) -> None:
        self.subscriber = subscriber
        self.expires = 0
        self.events = events
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True


def setup(tabs):
    registry = Registry()
    for t in tabs:
        registry.add(t)
    stats = Stats()
    return Dispatcher(registry, FakeBus(), stats), stats


async def test_routing_filters_and_counts():
    a1, a2, b = Tab("a"), Tab("a", frozenset({"x"})), Tab("b")
    d, stats = setup([a1, a2, b])
    await d.deliver([ev("a", "x", {}), ev("a", "y", {"k": 1}), ev("nobody", "x", {})])
    assert len(a1.frames) == 2 and len(a2.frames) == 1 and not b.frames
    assert a1.frames[0] is a2.frames[0]  # one frame object for both tabs
    assert (stats.received, stats.delivered, stats.dropped) == (3, 3, 1)


async def test_a_large_batch_checkpoints_while_it_is_delivered():
    n = 10 * DELIVERIES_PER_CHECKPOINT
    tabs = [Tab(f"s{i}") for i in range(n)]
    d, stats = setup(tabs)
    others_ran = 0
    done = False

    async def other_task():
        nonlocal others_ran
        while not done:
            others_ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        before = others_ran
        await d.deliver([ev(f"s{i}", "new_letter", {}) for i in range(n)])
        done = True
    assert stats.delivered == n and all(len(t.frames) == 1 for t in tabs)
    # The other task ran between the chunks, not only after the whole batch.
    assert others_ran - before >= n // DELIVERIES_PER_CHECKPOINT - 1


class FlakyBus(FakeBus):
    """Fails the first subscribe, like a bus that timed out."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def subscribe(self, subscribers):
        if self.failures:
            self.failures -= 1
            raise TimeoutError("no acknowledgement")
        await super().subscribe(subscribers)


async def test_a_failing_bus_subscription_is_retried_not_fatal(nursery, autojump_clock):
    registry = Registry()
    bus = FlakyBus()
    d = Dispatcher(registry, bus, Stats())
    await nursery.start(d.run_subscriptions)
    tab = Tab("x")
    registry.add(tab)
    d.changed("x")
    with trio.fail_after(10):
        await bus.wait_until(lambda f: "x" in f.subscribed)
    assert bus.failures == 0 and bus.calls == [("subscribe", ("x",))]


class GatedBus(FakeBus):
    """Acknowledges a subscribe only when the test opens the gate, like a
    network bus whose SUBSCRIBE reply is on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.asked = trio.Event()

    async def subscribe(self, subscribers):
        self.asked.set()
        await self.gate.wait()
        await super().subscribe(subscribers)


async def test_subscribed_is_answered_only_once_the_bus_acknowledges(nursery):
    registry = Registry()
    bus = GatedBus()
    d = Dispatcher(registry, bus, Stats())
    await nursery.start(d.run_subscriptions)
    await nursery.start(d.recovery.run)
    first, leaver = Tab("x"), Tab("x")
    for t in (first, leaver):
        registry.add(t)
        d.subscribe(t, None)
    d.changed("x")
    await bus.asked.wait()
    registry.remove(leaver)  # leaves before the acknowledgement
    d.unsubscribed(leaver)
    await trio.testing.wait_all_tasks_blocked()
    assert first.frames == [] and leaver.frames == []  # the bus has not answered yet
    bus.gate.set()
    await bus.wait_until(lambda f: "x" in f.subscribed)
    await trio.testing.wait_all_tasks_blocked()
    assert kinds(first) == ["subscribed"] and leaver.frames == []
    # Once the subscription stands, another tab is answered at once.
    late = Tab("x")
    registry.add(late)
    d.subscribe(late, None)
    assert kinds(late) == ["subscribed"] and d._pending == {}


async def test_tabs_that_all_leave_before_the_acknowledgement_leave_nothing_behind(nursery, autojump_clock):
    bus = FlakyBus()
    bus.failures = 3  # the bus is down for a while
    d, registry, tab = await waiting_tab(nursery, bus, "y")
    await trio.sleep(0.15)  # one retry failed
    assert tab.frames == [] and "y" in d._pending
    registry.remove(tab)
    d.changed("y")
    await trio.sleep(10)
    assert d._pending == {} and "y" not in bus.subscribed and tab.frames == []


async def test_a_bus_that_routes_everything_here_answers_at_once():
    registry = Registry()
    d = Dispatcher(registry, EmbeddedBus(), Stats())
    tab = Tab("z")
    registry.add(tab)
    d.subscribe(tab, None)
    assert kinds(tab) == ["subscribed"]


async def test_an_event_that_beats_the_acknowledgement_comes_after_subscribed(nursery):
    """The bus's acknowledgement and the first event race to the server: a
    waiting tab still hears ``subscribed`` first."""
    bus = GatedBus()
    d, _registry, tab = await waiting_tab(nursery, bus, "w")
    await bus.asked.wait()
    await d.deliver([ev("w", "new_letter", {})])
    assert kinds(tab) == ["subscribed", "event"] and b"new_letter" in tab.frames[1]
    bus.gate.set()
    await bus.wait_until(lambda f: "w" in f.subscribed)
    await trio.testing.wait_all_tasks_blocked()
    assert len(tab.frames) == 2  # answered once


async def waiting_tab(nursery, bus, name: str):
    """A dispatcher on ``bus`` with its subscription flusher running, and one
    tab of ``name`` waiting for its ``subscribed`` answer."""
    registry = Registry()
    d = Dispatcher(registry, bus, Stats())
    await nursery.start(d.run_subscriptions)
    await nursery.start(d.recovery.run)
    tab = Tab(name)
    registry.add(tab)
    d.subscribe(tab, None)
    d.changed(name)
    return d, registry, tab


def test_the_redis_bus_without_its_extra_is_a_clear_error(monkeypatch):
    import sys

    import pytest

    from mailpush import Config
    from mailpush.bus import make_bus
    from mailpush.errors import ConfigError

    monkeypatch.setitem(sys.modules, "coredis", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "mailpush.bus.redis", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'mailpush\[redis\]'"):
        make_bus(Config(bus="redis://127.0.0.1:6379/0", secret="s" * 32))
