"""Resume after a reconnect, and resync when history cannot fill the gap
(mailpush.recovery): the property that a tab gets every event after where
it stood, in order, exactly once, whatever the interleaving of live events
and the history read; then the contract over real WebSockets on the
embedded bus, and the recovery after a bus outage on the fake bus."""

from __future__ import annotations

import json
import random

import msgspec
import pytest
import trio
import trio.testing
import trio_websocket
from conftest import token, ws_url
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpush.bus import EmbeddedBus
from mailpush.dispatch import Dispatcher
from mailpush.errors import BusNotReady, BusUnavailable
from mailpush.history import History
from mailpush.metrics import Stats
from mailpush.packets import Since
from mailpush.registry import Registry
from mailpush.testing import FakeBus

# Every test here once with the dispatcher's C loop and once with its Python twin.
pytestmark = pytest.mark.usefixtures("deliver_loops")


class Tab:
    """Stands in for a Connection: what the dispatcher and recovery touch."""

    def __init__(self, subscriber: str, events=None) -> None:
        self.subscriber = subscriber
        self.expires = 0
        self.events = events
        self.packets: list[dict] = []

    def send(self, frame: bytes) -> bool:
        self.packets.append(json.loads(frame[2:] if frame[1] < 126 else frame[4:]))
        return True

    def offsets(self) -> list[int]:
        return [p["offset"] for p in self.packets if p["type"] == "event"]

    def start(self) -> int:
        """Where the tab stands once answered: the offset of its subscribed
        answer, or of its resync if it got one."""
        last = [p for p in self.packets if p["type"] in ("subscribed", "resync") and "offset" in p]
        return last[-1]["offset"]


# -- the property ----------------------------------------------------------------

step = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 6)),
    st.tuples(st.just("tab"), st.booleans()),  # True: resume from a previous tab's last offset
    st.tuples(st.just("leave"), st.integers(0, 10)),
    st.tuples(st.just("yield"), st.integers(1, 4)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=30), st.integers(2, 12), st.randoms(use_true_random=False))
def test_every_event_after_the_start_arrives_once_and_in_order(steps, size, rnd):
    trio.run(_scenario, steps, size, rnd)


async def _scenario(steps, size: int, rnd: random.Random) -> None:
    bus = FakeBus(History(size, 3600, 100_000))
    registry = Registry()
    d = Dispatcher(registry, bus, Stats())
    tabs: list[Tab] = []
    gone: list[Tab] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run, d.deliver)
        await nursery.start(d.run_subscriptions)
        await nursery.start(d.recovery.run)
        for kind, arg in steps:
            if kind == "publish":
                nursery.start_soon(bus.publish, [("s", "e", {"n": i}, None) for i in range(arg)])
            elif kind == "tab":
                since = None
                answered = [t for t in tabs + gone if t.packets]
                if arg and answered:
                    old = rnd.choice(answered)
                    seen = old.offsets()
                    since = Since(bus.history.epoch, max(seen) if seen else old.start())
                tab = Tab("s")
                tab.since = since
                registry.add(tab)
                d.changed("s")
                d.subscribe(tab, since)
                tabs.append(tab)
            elif kind == "leave" and tabs:
                tab = tabs.pop(arg % len(tabs))
                d.unsubscribed(tab)
                if registry.remove(tab):
                    d.changed("s")
                gone.append(tab)
            else:
                for _ in range(arg):
                    await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    top = bus.history.top
    for tab in tabs + gone:
        seen = tab.offsets()
        assert seen == sorted(set(seen)), f"out of order or twice: {seen}"
        if not tab.packets:
            assert tab in gone  # left before its answer
            continue
        assert tab.packets[0]["type"] == "subscribed"
        resynced = any(p["type"] == "resync" for p in tab.packets)
        since = tab.since
        if since is not None and not resynced:
            assert tab.packets[0]["recovered"] is True
            start = since.offset
        else:
            start = tab.start()
        assert all(o > start for o in seen), (start, seen)
        if tab in tabs:  # still there at the end: it has everything after its start
            assert seen == list(range(start + 1, top + 1)), (start, top, seen, tab.packets)


# -- the contract over WebSockets, embedded bus --------------------------------------


async def publish(server, sub: str, n: int, state=None, event="new_letter") -> None:
    await server.bus.publish([(sub, event, {"n": i}, state) for i in range(n)])


async def recv(ws) -> dict:
    with trio.fail_after(5):
        return json.loads(await ws.get_message())


async def test_a_tab_that_comes_back_gets_what_it_missed_then_live(start_server):
    server = await start_server(EmbeddedBus(History(100, 600, 10_000)))
    url = ws_url(server, tok=token("ann"))
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message('{"type":"subscribe"}')
        first = await recv(ws)
        assert first["type"] == "subscribed" and "recovered" not in first
        epoch = first["epoch"]
        await publish(server, "ann", 2)
        seen = [(await recv(ws))["offset"] for _ in range(2)]
    await publish(server, "ann", 5)  # while the tab is away
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "since": {"epoch": epoch, "offset": seen[-1]}}))
        answer = await recv(ws)
        assert answer["type"] == "subscribed" and answer["recovered"] is True and answer["epoch"] == epoch
        missed = [await recv(ws) for _ in range(5)]
        assert [m["data"]["n"] for m in missed] == [0, 1, 2, 3, 4]
        assert [m["offset"] for m in missed] == list(range(seen[-1] + 1, seen[-1] + 6))
        assert answer["offset"] == missed[-1]["offset"]
        await publish(server, "ann", 1)
        live = await recv(ws)
        assert live["offset"] == missed[-1]["offset"] + 1  # no gap, no duplicate
    assert server.stats.recovered == 5


async def test_more_than_the_history_holds_is_a_resync_with_the_latest_state(start_server):
    server = await start_server(EmbeddedBus(History(3, 600, 10_000)))
    url = ws_url(server, tok=token("bo"))
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message('{"type":"subscribe"}')
        first = await recv(ws)
    await publish(server, "bo", 5, state=msgspec.Raw(b'"jmap-state-9"'))
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "since": {"epoch": first["epoch"], "offset": first["offset"]}}))
        answer = await recv(ws)
        assert answer["type"] == "subscribed" and answer["recovered"] is False
        resync = await recv(ws)
        assert resync == {"type": "resync", "subscriber": "bo", "reason": "history_gap", "epoch": first["epoch"],
                          "offset": answer["offset"], "state": "jmap-state-9"}
        await publish(server, "bo", 1)
        assert (await recv(ws))["offset"] == answer["offset"] + 1
    assert server.stats.resyncs["history_gap"] == 1


@pytest.mark.parametrize(("since", "reason"), [({"epoch": "from-a-restart", "offset": 1}, "epoch_changed"),
                                               ({"epoch": "EPOCH", "offset": 10**9}, "bad_offset")])
async def test_an_unknown_position_is_a_resync(start_server, since, reason):
    server = await start_server(EmbeddedBus(History(10, 600, 10_000)))
    since = dict(since, epoch=server.bus.history.epoch) if since["epoch"] == "EPOCH" else since
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("cy"))) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "since": since}))
        assert (await recv(ws))["recovered"] is False
        resync = await recv(ws)
        assert resync["type"] == "resync" and resync["reason"] == reason


async def test_with_history_off_since_always_resyncs(start_server):
    server = await start_server(EmbeddedBus(History(0, 600, 10_000)))
    await publish(server, "di", 2)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("di"))) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "since": {"epoch": server.bus.history.epoch, "offset": 1}}))
        assert (await recv(ws))["recovered"] is False
        assert (await recv(ws))["reason"] == "history_off"


async def test_the_filter_applies_to_the_replay(start_server):
    server = await start_server(EmbeddedBus(History(100, 600, 10_000)))
    epoch = server.bus.history.epoch
    await publish(server, "ed", 2, event="other")
    await publish(server, "ed", 2)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("ed"))) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "events": ["new_letter"], "since": {"epoch": epoch, "offset": 0}}))
        assert (await recv(ws))["recovered"] is True
        got = [await recv(ws) for _ in range(2)]
        assert [g["event"] for g in got] == ["new_letter"] * 2 and [g["offset"] for g in got] == [3, 4]


async def test_a_bad_since_is_an_error_packet(start_server):
    server = await start_server()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("fi"))) as ws:
        await ws.send_message('{"type":"subscribe","since":{"epoch":"e","offset":-1}}')
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == "bad_field" and "since" in err["message"]


# -- a bus that loses events (the fake, like Redis) -------------------------------------


async def test_after_an_outage_every_tab_is_brought_up_to_date(start_server):
    bus = FakeBus(History(100, 600, 10_000), may_lose=True)
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("gus"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await recv(ws)
        await bus.wait_until(lambda f: "gus" in f.subscribed)
        bus.inject([("gus", "new_letter", {"n": 0})])
        before = (await recv(ws))["offset"]
        bus.lose(True)
        bus.inject([("gus", "new_letter", {"n": i}) for i in (1, 2, 3)])  # lost on their way
        await trio.testing.wait_all_tasks_blocked()
        bus.lose(False)  # the bus reconnects and reports the gap
        got = [await recv(ws) for _ in range(3)]
        assert [g["data"]["n"] for g in got] == [1, 2, 3] and got[0]["offset"] == before + 1
        bus.inject([("gus", "new_letter", {"n": 4})])
        assert (await recv(ws))["data"]["n"] == 4


async def test_an_event_from_a_new_epoch_resyncs_the_tabs(start_server):
    bus = FakeBus(History(100, 600, 10_000), may_lose=True)
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("hal"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        old = (await recv(ws))["epoch"]
        await bus.wait_until(lambda f: "hal" in f.subscribed)
        bus.history = History(100, 600, 10_000)  # the bus lost its history: a new epoch
        bus.inject([("hal", "new_letter", {"n": 1})])
        resync = await recv(ws)
        assert resync["type"] == "resync" and resync["reason"] == "epoch_changed" and resync["epoch"] != old
        bus.inject([("hal", "new_letter", {"n": 2})])
        assert (await recv(ws))["data"]["n"] == 2


async def test_an_event_without_an_offset_is_delivered_as_it_is(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("ida"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await recv(ws)
        await bus.wait_until(lambda f: "ida" in f.subscribed)
        bus.inject_unrecorded([("ida", "new_letter", {"n": 1})])
        got = await recv(ws)
        assert got["data"] == {"n": 1} and "offset" not in got
    assert server is not None


# -- a bus that answers but does not serve yet (a Redis Cluster master rejoining) --------


class NotServingUntil(FakeBus):
    """Refuses every history read with ``error`` (a round trip of 10 ms)
    until ``ready_at``, like a restarted Redis Cluster master's CLUSTERDOWN
    for its first ~2 s; ``refused`` holds the time of each refusal."""

    def __init__(self, error: type[BusUnavailable]) -> None:
        super().__init__(History(100, 600, 10_000), may_lose=True)
        self.error = error
        self.ready_at = float("-inf")
        self.refused: list[float] = []

    async def read(self, requests):
        await trio.sleep(0.01)
        if trio.current_time() < self.ready_at:
            self.refused.append(trio.current_time())
            raise self.error("The cluster is down")
        return await super().read(requests)


class TimedTab(Tab):
    def __init__(self, subscriber: str) -> None:
        super().__init__(subscriber)
        self.caught_up_at: float | None = None

    def send(self, frame: bytes) -> bool:
        super().send(frame)
        if self.packets[-1]["type"] == "event" and self.caught_up_at is None:
            self.caught_up_at = trio.current_time()
        return True


async def _catch_up_after_not_serving(error: type[BusUnavailable]) -> tuple[list[float], list[float], float]:
    """Four subscribers' tabs miss an event; their catch-up reads start
    50 ms apart (four reads in flight) while the bus refuses reads for 2 s.
    Returns when each tab got its event, the refusals, and when the bus
    served again (virtual time)."""
    bus = NotServingUntil(error)
    registry = Registry()
    d = Dispatcher(registry, bus, Stats())
    tabs = [TimedTab(f"s{i}") for i in range(4)]
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run, d.deliver)
        await nursery.start(d.run_subscriptions)
        await nursery.start(d.recovery.run)
        for tab in tabs:
            registry.add(tab)
            d.changed(tab.subscriber)
            d.subscribe(tab, None)
        await trio.testing.wait_all_tasks_blocked()
        assert all(t.packets and t.packets[0]["type"] == "subscribed" for t in tabs)
        bus.lose(True)
        bus.inject([(t.subscriber, "new_letter", {"n": 1}) for t in tabs])  # lost on its way
        await trio.testing.wait_all_tasks_blocked()
        bus._losing = False  # the shard's subscriptions are back; its history not yet
        bus.ready_at = trio.current_time() + 2.0
        for tab in tabs:
            d.recovery.gap("shard reconnected", [tab.subscriber])
            await trio.sleep(0.05)
        with trio.fail_after(30):
            while not all(t.caught_up_at for t in tabs):
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    for tab in tabs:
        assert [(p["type"], p["data"]) for p in tab.packets[1:]] == [("event", {"n": 1})]
    return [t.caught_up_at for t in tabs], bus.refused, bus.ready_at


async def test_reads_refused_by_a_bus_not_ready_yet_go_again_soon_after_it_is(autojump_clock):
    """Each tab is caught up within ~0.1 s of the bus serving (with the
    plain backoff it came up to a second later: by then the backoff was at
    0.4-0.8 s, plus the read), yet the pending reads together retry about
    ten times a second, not each of them: one read probes, the others wait
    for it."""
    caught_up, refused, ready_at = await _catch_up_after_not_serving(BusNotReady)
    late = [t - ready_at for t in caught_up]
    assert all(0 <= x <= 0.15 for x in late), late
    # The last second refused: the probe's ≤ 17 (a read of 10 ms, then
    # 50-100 ms), the three others' backoff ≤ 3; each read retrying every
    # 0.1 s for itself would be ~45.
    settled = [t for t in refused if ready_at - 1.0 <= t < ready_at]
    assert len(settled) <= 24, len(settled)


async def test_reads_failing_because_the_bus_is_down_keep_their_backoff(autojump_clock):
    """Not every failure is "not ready yet": an unreachable bus gets the
    backoff (a few retries a second, each read for itself)."""
    caught_up, refused, ready_at = await _catch_up_after_not_serving(BusUnavailable)
    settled = [t for t in refused if ready_at - 1.0 <= t < ready_at]
    assert len(settled) <= 3 * 4, len(settled)
    assert all(t >= ready_at for t in caught_up)
