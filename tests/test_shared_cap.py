"""The per-subscriber cap across instances on one Redis (issue 13): each
subscriber's connections counted on Redis by every instance
(``mailpush_connections``, src/mailpush/shared_cap.py), real redis-server."""

from __future__ import annotations

import json

import coredis
import pytest
import trio
import trio_websocket

from conftest import token, ws_url
from mailpush.bus.redis import RedisBus
from mailpush.bus.redis_functions import CONNECTIONS, connections_key
from mailpush.errors import BusUnavailable
from mailpush.frames import CloseCode
from test_redis import REDIS, RedisServer, free_port, redis  # noqa: F401 - the fixture

CAP = 2


async def refused_across(server, tok: str) -> str:
    """Open a tab the local cap lets in and return the reason of the 4008
    the shared cap closes it with."""
    async with trio_websocket.open_websocket_url(ws_url(server, tok=tok)) as ws:
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as e:
            await ws.get_message()
    assert e.value.reason.code == CloseCode.TOO_MANY_CONNECTIONS
    return e.value.reason.reason


async def alive(ws) -> None:
    await ws.send_message('{"type":"ping"}')
    with trio.fail_after(5):
        assert json.loads(await ws.get_message()) == {"type": "pong"}


async def counted(url: str, subscriber: str) -> int:
    """What Redis holds for the subscriber, all instances summed."""
    client = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        fields = await client.hgetall(connections_key(subscriber))
    return sum(int(v.split()[0]) for v in fields.values())


async def wait_counted(url: str, subscriber: str, n: int) -> None:
    with trio.fail_after(5):
        while await counted(url, subscriber) != n:
            await trio.sleep(0.02)


async def test_two_instances_share_one_subscribers_cap(start_server, redis):  # noqa: F811
    a = await start_server(RedisBus(redis.url), max_connections_per_subscriber=CAP)
    b = await start_server(RedisBus(redis.url), max_connections_per_subscriber=CAP)
    alice = token("alice")
    async with trio_websocket.open_websocket_url(ws_url(a, tok=alice)) as a1:
        await wait_counted(redis.url, "alice", 1)
        async with trio_websocket.open_websocket_url(ws_url(b, tok=alice)) as b1:
            await wait_counted(redis.url, "alice", 2)
            # Each instance holds one of alice's, under its own cap of 2: the
            # third tab, on either, is let in and closed with 4008.
            for server in (a, b):
                assert "2 connections open across instances" in await refused_across(server, alice)
            assert a.stats.rejections["per_subscriber_cap"] + b.stats.rejections["per_subscriber_cap"] == 2
            assert a.stats.closes[4008] == b.stats.closes[4008] == 1
            # The two tabs in place are untouched, and so is everyone else.
            await alive(a1)
            await alive(b1)
            async with trio_websocket.open_websocket_url(ws_url(a, tok=token("bob"))) as bob:
                await alive(bob)
            await wait_counted(redis.url, "alice", 2)
        # b1 closed: its place is free for a tab on the other instance.
        await wait_counted(redis.url, "alice", 1)
        async with trio_websocket.open_websocket_url(ws_url(a, tok=alice)) as a2:
            await trio.sleep(0.3)  # a batch or more: nothing closes it
            await alive(a2)
            await alive(a1)
    await wait_counted(redis.url, "alice", 0)
    client = coredis.Redis.from_url(redis.url)
    async with client:
        assert not await client.exists([connections_key("alice")])  # nothing left behind


async def test_a_dead_instance_counts_until_its_lease_ends(start_server, redis):  # noqa: F811
    server = await start_server(RedisBus(redis.url), max_connections_per_subscriber=CAP)
    alice = token("alice")
    # An instance that held two of alice's tabs and died (no renewal): its
    # lease, here 1.5 s, still counts them.
    client = coredis.Redis.from_url(redis.url)
    async with client:
        assert await client.fcall(CONNECTIONS, [connections_key("alice")], ["ghost", 0, 2, CAP, 1500]) == 2
    await refused_across(server, alice)
    await trio.sleep(1.6)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=alice)) as ws:
        await trio.sleep(0.3)
        await alive(ws)
        await wait_counted(redis.url, "alice", 1)  # the ghost's field is gone


async def test_the_counting_function_on_redis(redis):  # noqa: F811
    """``mailpush_connections`` itself: kept + allowed is stored, others'
    live counts are subtracted from the cap, cap 0 admits everything."""
    bus = RedisBus(redis.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(bus.run, _sink)
        assert await bus.count_connections("a", [("s", 0, 3)], 5, 60_000) == [3]
        assert await bus.count_connections("b", [("s", 0, 4)], 5, 60_000) == [2]
        assert await bus.count_connections("b", [("s", 2, 1)], 5, 60_000) == [0]
        assert await counted(redis.url, "s") == 5
        assert await bus.count_connections("a", [("s", 1, 0)], 5, 60_000) == [0]  # a closed two
        assert await bus.count_connections("b", [("s", 2, 3), ("t", 0, 9)], 5, 60_000) == [2, 5]
        assert await counted(redis.url, "s") == 5
        assert await bus.count_connections("c", [("s", 0, 7)], 0, 60_000) == [7]  # no cap
        for who in ("a", "b", "c"):
            await bus.count_connections(who, [("s", 0, 0), ("t", 0, 0)], 5, 60_000)
        assert await counted(redis.url, "s") == 0
        nursery.cancel_scope.cancel()
    await bus.aclose()


async def _sink(batch) -> None:
    pass


async def test_while_redis_is_down_the_local_cap_holds_and_the_count_follows_later(start_server, redis):  # noqa: F811
    server = await start_server(RedisBus(redis.url), max_connections_per_subscriber=CAP)
    alice = token("alice")
    async with trio_websocket.open_websocket_url(ws_url(server, tok=alice)) as a1:
        await wait_counted(redis.url, "alice", 1)
        redis.stop()
        async with trio_websocket.open_websocket_url(ws_url(server, tok=alice)) as a2:
            await trio.sleep(0.5)
            assert server.ctx.shared_cap.pending == 1  # not counted yet, not refused
            await alive(a2)
            redis.start()
            # Redis came back empty: the tabs here are counted again.
            await wait_counted(redis.url, "alice", 2)
            await alive(a1)
            await alive(a2)


async def test_a_failed_count_is_sent_again(start_server):
    """The flusher keeps what a failed batch carried (no Redis needed: a bus
    that fails the first count)."""
    from mailpush.testing import FakeBus

    class Flaky(FakeBus):
        shares_connections = True
        counts: list = []

        async def count_connections(self, instance, counts, cap, lease_ms):
            self.counts.append(list(counts))
            if len(self.counts) == 1:
                raise BusUnavailable("down")
            return [w if cap - k >= w else max(0, cap - k) for _, k, w in counts]

    bus = Flaky()
    bus.counts = []
    server = await start_server(bus, max_connections_per_subscriber=CAP)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        with trio.fail_after(5):
            while len(bus.counts) < 2:
                await trio.sleep(0.02)
        assert bus.counts[:2] == [[("alice", 0, 1)], [("alice", 0, 1)]]
        await alive(ws)


async def test_echo_connections_have_no_subscriber_and_no_cap(start_server, redis):  # noqa: F811
    """Regression: the echo endpoint's connections (no token, no subscriber)
    were counted as subscriber "" and, across instances, closed with 4008
    past the cap."""
    server = await start_server(RedisBus(redis.url), max_connections_per_subscriber=1, echo_path="/echo")
    async with trio_websocket.open_websocket_url(ws_url(server, path="/echo")) as e1:
        async with trio_websocket.open_websocket_url(ws_url(server, path="/echo")) as e2:
            await trio.sleep(0.3)  # a batch or more
            for ws in (e1, e2):
                await ws.send_message("hello")
                with trio.fail_after(5):
                    assert await ws.get_message() == "hello"
    assert server.stats.closes[4008] == 0 and "" not in server.ctx.per_subscriber
    assert await counted(redis.url, "") == 0


async def test_counting_goes_on_after_the_functions_are_flushed(start_server, redis):  # noqa: F811
    """A Redis that lost mailpush's functions (FUNCTION FLUSH, or restarted
    empty before any publish) gets them loaded again by the next count."""
    server = await start_server(RedisBus(redis.url), max_connections_per_subscriber=CAP)
    client = coredis.Redis.from_url(redis.url)
    async with client:
        await client.function_flush()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))):
        await wait_counted(redis.url, "alice", 1)
