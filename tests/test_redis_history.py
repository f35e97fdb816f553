"""The Redis bus's history against a real redis-server: a mail store
publishing with FCALL, resume from the Redis Stream, a plain PUBLISH
without an offset, and the faults: Redis restarted with its data (AOF),
Redis paused past the heartbeat timeout. (Redis restarted empty, which
makes a new epoch, is in test_redis.py.)"""

from __future__ import annotations

import json
import os
import signal

import coredis
import pytest
import trio
import trio_websocket
from conftest import token, ws_url
from test_admin import ahttp
from test_redis import REDIS, RedisServer, free_port, subscribed, wait_channels

from mailpush import Config
from mailpush.bus.redis import HEARTBEAT_TIMEOUT, RedisBus
from mailpush.bus.redis_functions import history_key, meta_key

pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS) and not os.environ.get("CI"),
    reason="redis-server not installed (make test installs it; in CI this test must run)",
)


@pytest.fixture
def redis():
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


def bus_for(redis, **options) -> RedisBus:
    return RedisBus(redis.url, Config(bus=redis.url, secret="s" * 32, **options))


async def fcall(url: str, sub: str, event: str, data: dict, state: str = "") -> int:
    """What a mail store in any language does: one FCALL."""
    client = coredis.Redis.from_url(url)
    async with client:
        return await client.fcall("mailpush_publish", [meta_key(sub), history_key(sub)], [sub, event, json.dumps(data), state])


async def recv(ws, timeout: float = 10) -> dict:
    with trio.fail_after(timeout):
        return json.loads(await ws.get_message())


async def test_a_mail_store_publishes_with_fcall_and_a_tab_resumes_from_the_stream(start_server, redis):
    server = await start_server(bus_for(redis))
    url = ws_url(server, tok=token("ann"))
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message('{"type":"subscribe"}')
        first = await recv(ws)
        assert first["type"] == "subscribed" and first["offset"] == 0
        assert await fcall(redis.url, "ann", "new_letter", {"n": 1}) == 1
        live = await recv(ws)
        assert (live["offset"], live["data"]) == (1, {"n": 1})
    for n in (2, 3, 4):  # while the tab is away
        await fcall(redis.url, "ann", "new_letter", {"n": n}, json.dumps(f"state-{n}"))
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "since": {"epoch": first["epoch"], "offset": 1}}))
        answer = await recv(ws)
        assert answer["recovered"] is True and answer["offset"] == 4 and answer["epoch"] == first["epoch"]
        assert [(await recv(ws))["data"]["n"] for _ in range(3)] == [2, 3, 4]
        await server.bus.publish([("ann", "new_letter", {"n": 5}, None)])  # the admin API's way
        assert (await recv(ws))["offset"] == 5


async def test_a_gap_the_stream_no_longer_holds_is_a_resync_with_the_state(start_server, redis):
    server = await start_server(bus_for(redis, history_size=2))
    url = ws_url(server, tok=token("bo"))
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message('{"type":"subscribe"}')
        first = await recv(ws)
    for n in range(4):
        await fcall(redis.url, "bo", "new_letter", {"n": n}, json.dumps({"jmap": n}))
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "since": {"epoch": first["epoch"], "offset": 0}}))
        assert (await recv(ws))["recovered"] is False
        resync = await recv(ws)
        assert resync["reason"] == "history_gap" and resync["offset"] == 4 and resync["state"] == {"jmap": 3}


async def test_a_plain_publish_is_delivered_without_an_offset(start_server, redis):
    server = await start_server(bus_for(redis))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("cy"))) as ws:
        await subscribed(ws)
        await wait_channels(redis.url, {"mailpush:cy"})
        client = coredis.Redis.from_url(redis.url)
        async with client:
            await client.publish("mailpush:cy", '{"subscriber":"cy","event":"old_style","data":{"n":1}}')
        got = await recv(ws)
        assert got["event"] == "old_style" and "offset" not in got


async def test_redis_restarted_with_its_data_loses_nothing(start_server, redis, tmp_path):
    redis.stop()
    durable = RedisServer(redis.port, "--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    durable.start()
    try:
        server = await start_server(bus_for(durable))
        async with trio_websocket.open_websocket_url(ws_url(server, tok=token("dee"))) as ws:
            await ws.send_message('{"type":"subscribe"}')
            first = await recv(ws)
            await fcall(durable.url, "dee", "new_letter", {"n": 1})
            assert (await recv(ws))["offset"] == 1
            durable.proc.send_signal(signal.SIGTERM)  # a clean restart: the AOF is complete
            durable.proc.wait(10)
            durable.start()
            # Published as soon as Redis is back, very likely before mailpush
            # has reconnected: missed live, recovered from the stream.
            await fcall(durable.url, "dee", "new_letter", {"n": 2})
            got = await recv(ws, 20)
            assert (got["type"], got["offset"], got["data"]) == ("event", 2, {"n": 2})  # no resync: the epoch survived
            await fcall(durable.url, "dee", "new_letter", {"n": 3})
            assert (await recv(ws))["offset"] == 3  # exactly once: 2 did not come twice
            assert first["epoch"] == (await server.bus.read([("dee", None, None)]))[0].position.epoch
    finally:
        durable.stop()


async def test_a_paused_redis_is_noticed_by_the_heartbeat_and_recovered(start_server, redis):
    server = await start_server(bus_for(redis))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("eve"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await recv(ws)
        await fcall(redis.url, "eve", "new_letter", {"n": 1})
        assert (await recv(ws))["offset"] == 1
        redis.proc.send_signal(signal.SIGSTOP)  # connections stay up; nothing is answered
        try:
            with trio.fail_after(HEARTBEAT_TIMEOUT + 8):
                while True:
                    status, body, _ = await ahttp(server.admin_address, "GET", "/healthz")
                    if status == 503:
                        break
                    await trio.sleep(0.2)
            assert b"bus unavailable" in body
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        await fcall(redis.url, "eve", "new_letter", {"n": 2})  # before mailpush has its session back
        got = await recv(ws, 30)
        assert (got["type"], got["offset"]) == ("event", 2)
        with trio.fail_after(20):
            while (await ahttp(server.admin_address, "GET", "/healthz"))[0] != 200:
                await trio.sleep(0.2)


async def test_a_publish_to_a_paused_redis_is_503_within_the_publish_timeout(start_server, redis, monkeypatch):
    # Regression: with Redis paused (connections up, nothing answered) a
    # publish waited on coredis with no bound, holding the admin request
    # until the client gave up.
    from mailpush import admin

    monkeypatch.setattr(admin, "PUBLISH_TIMEOUT", 1.0)
    server = await start_server(bus_for(redis))
    body = json.dumps({"subscriber": "eve", "event": "new_letter"}).encode()
    assert (await ahttp(server.admin_address, "POST", "/v1/publish", body))[0] == 202
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = trio.current_time()
        status, answer, headers = await ahttp(server.admin_address, "POST", "/v1/publish", body)
        took = trio.current_time() - t0
    finally:
        redis.proc.send_signal(signal.SIGCONT)
    assert status == 503 and headers.get("Retry-After") == "1", answer
    assert b"did not answer within 1 s" in answer
    assert took < 4
    assert (await ahttp(server.admin_address, "GET", "/healthz"))[0] in (200, 503)
