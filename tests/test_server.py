"""Integration: real sockets on 127.0.0.1, the fake bus, two independent
clients (trio-websocket in the test's own loop, websockets in a thread)."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket
from conftest import RawClient, bare, client_frame, close_code, token, ws_url
from websockets.sync.client import connect as sync_connect

from mailpush.testing import FakeBus


async def subscribe(ws, events=None) -> dict:
    packet = {"type": "subscribe"} if events is None else {"type": "subscribe", "events": events}
    await ws.send_message(json.dumps(packet))
    return json.loads(await ws.get_message())


async def no_message(ws, seconds: float = 0.2) -> None:
    with trio.move_on_after(seconds):
        msg = await ws.get_message()
        raise AssertionError(f"unexpected message {msg}")


async def test_every_tab_gets_each_event_once_and_nobody_else(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as a1, trio_websocket.open_websocket_url(
        ws_url(server, tok=token("alice"))
    ) as a2, trio_websocket.open_websocket_url(ws_url(server, tok=token("bob"))) as b:
        for ws, who in ((a1, "alice"), (a2, "alice"), (b, "bob")):
            assert bare(await subscribe(ws)) == {"type": "subscribed", "subscriber": who, "events": ["*"]}
        await bus.wait_until(lambda f: f.subscribed == {"alice", "bob"})
        bus.inject([("alice", "new_letter", {"id": 1}), ("carol", "new_letter", {"id": 2})])
        for ws in (a1, a2):
            assert bare(json.loads(await ws.get_message())) == {"type": "event", "subscriber": "alice", "event": "new_letter", "data": {"id": 1}}
            await no_message(ws, 0.1)
        await no_message(b)
        assert server.stats.delivered == 2
        # The bus was asked for each subscriber exactly once, not per tab.
        assert sorted(s for kind, subs in bus.calls if kind == "subscribe" for s in subs) == ["alice", "bob"]


async def test_event_filter(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        reply = await subscribe(ws, ["new_letter", "folder_changed"])
        assert reply["events"] == ["folder_changed", "new_letter"]
        await bus.wait_until(lambda f: "alice" in f.subscribed)
        bus.inject([("alice", "spam_score", {}), ("alice", "new_letter", {"n": 1})])
        assert json.loads(await ws.get_message())["event"] == "new_letter"
        await no_message(ws)
        # Re-subscribing replaces the filter; ["*"] means everything.
        assert (await subscribe(ws, ["*"]))["events"] == ["*"]
        bus.inject([("alice", "spam_score", {"s": 2})])
        assert json.loads(await ws.get_message())["event"] == "spam_score"


async def test_unsubscribe_and_bus_reference_counting(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as t1:
        await subscribe(t1)
        async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as t2:
            await subscribe(t2)
            await bus.wait_until(lambda f: "alice" in f.subscribed)
            await t1.send_message('{"type":"unsubscribe"}')
            assert json.loads(await t1.get_message()) == {"type": "unsubscribed", "subscriber": "alice"}
            bus.inject([("alice", "new_letter", {})])
            assert json.loads(await t2.get_message())["type"] == "event"
            await no_message(t1)
            assert "alice" in bus.subscribed  # t2 still holds it
        # t2 closed: the last subscribed tab of alice is gone.
        await bus.wait_until(lambda f: "alice" not in f.subscribed)
    assert bus.calls == [("subscribe", ("alice",)), ("unsubscribe", ("alice",))]
    assert len(server.registry) == 0


async def test_websockets_client_in_a_thread(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    url = ws_url(server, tok=token("dave"))
    got = []

    def client(ready: trio.Event, token_: trio.lowlevel.TrioToken):
        with sync_connect(url) as ws:
            ws.send('{"type":"subscribe","events":["new_letter"]}')
            got.append(json.loads(ws.recv(timeout=5)))
            trio.from_thread.run_sync(ready.set, trio_token=token_)
            got.append(json.loads(ws.recv(timeout=5)))
            ws.send('{"type":"ping"}')
            got.append(json.loads(ws.recv(timeout=5)))

    ready = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(trio.to_thread.run_sync, client, ready, trio.lowlevel.current_trio_token())
        await ready.wait()
        await bus.wait_until(lambda f: "dave" in f.subscribed)
        bus.inject([("dave", "new_letter", {"subject": "héllo"})])
    assert [bare(g) for g in got] == [
        {"type": "subscribed", "subscriber": "dave", "events": ["new_letter"]},
        {"type": "event", "subscriber": "dave", "event": "new_letter", "data": {"subject": "héllo"}},
        {"type": "pong"},
    ]


async def test_bad_packets_get_error_packets_then_1008(start_server):
    server = await start_server(max_packet_errors=3)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("eve"))) as ws:
        await ws.send_message("{not json")
        err = json.loads(await ws.get_message())
        assert err["type"] == "error" and err["code"] == "bad_json"
        await ws.send_message('{"type":"dance"}')
        err = json.loads(await ws.get_message())
        assert err["code"] == "unknown_type" and "dance" in err["message"]
        await ws.send_message('{"type":"subscribe","events":"new_letter"}')
        err = json.loads(await ws.get_message())
        assert err["code"] == "bad_field"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1008
        assert "bad packets" in closed.value.reason.reason


@pytest.mark.parametrize("text", ["[", "1e400", "[" * 1200, '{"type":"subscribe","events":[1e400'])
async def test_a_packet_the_typed_decoder_refuses_early_is_an_error_packet(start_server, text):
    # Regression (found by fuzz/targets/fuzz_packets.py): explaining the
    # refusal decoded the text again and raised msgspec's own errors or
    # RecursionError instead of an error packet.
    server = await start_server()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("eve"))) as ws:
        await ws.send_message(text)
        err = json.loads(await ws.get_message())
        assert err["type"] == "error" and err["code"] in ("bad_json", "bad_field")
        await ws.send_message('{"type":"ping"}')
        assert json.loads(await ws.get_message()) == {"type": "pong"}
    assert server.stats.internal_errors == 0


async def test_binary_message_is_an_error_packet(start_server):
    server = await start_server()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("eve"))) as ws:
        await ws.send_message(b"\x00\x01")
        err = json.loads(await ws.get_message())
        assert err["code"] == "binary_unsupported"
        # Still usable afterwards.
        assert (await subscribe(ws))["type"] == "subscribed"


async def test_too_big_message_closes_1009_and_others_unaffected(start_server):
    bus = FakeBus()
    server = await start_server(bus, max_message_size=200)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("frank"))) as good:
        await subscribe(good)
        raw = await trio.to_thread.run_sync(RawClient, server.listen_address)
        head = await trio.to_thread.run_sync(lambda: raw.upgrade("/v1/ws?token=" + token("mallory")))
        assert head.startswith(b"HTTP/1.1 101")
        # Only the header of a 1 MB frame: refused before any payload is sent.
        await trio.to_thread.run_sync(raw.send, bytes((0x81, 0x80 | 127)) + (1 << 20).to_bytes(8, "big") + b"abcd")
        op, payload = await trio.to_thread.run_sync(raw.read_frame)
        assert op == 0x8 and close_code(payload) == 1009
        assert await trio.to_thread.run_sync(raw.read_frame) == (-1, b"")
        raw.close()
        await bus.wait_until(lambda f: "frank" in f.subscribed)
        bus.inject([("frank", "new_letter", {})])
        assert json.loads(await good.get_message())["type"] == "event"


async def test_close_handshake_echoes_code_and_closes_tcp(start_server):
    server = await start_server()
    raw = await trio.to_thread.run_sync(RawClient, server.listen_address)
    head = await trio.to_thread.run_sync(lambda: raw.upgrade("/v1/ws?token=" + token("gina")))
    assert head.startswith(b"HTTP/1.1 101")
    await trio.to_thread.run_sync(raw.send, client_frame(0x9, b"hi") + client_frame(0x8, (4001).to_bytes(2, "big") + b"bye"))
    assert await trio.to_thread.run_sync(raw.read_frame) == (0xA, b"hi")
    op, payload = await trio.to_thread.run_sync(raw.read_frame)
    assert op == 0x8 and close_code(payload) == 4001
    assert await trio.to_thread.run_sync(raw.read_frame) == (-1, b"")
    raw.close()
    with trio.fail_after(2):
        while server.open_sockets:
            await trio.sleep(0.01)


async def test_event_frame_built_once_for_all_tabs(start_server, monkeypatch):
    import mailpush.dispatch as dispatch
    import mailpush.history as history

    calls = []
    real = dispatch.event_frame
    for module in (dispatch, history):  # the history builds it when it keeps it, else the dispatcher
        monkeypatch.setattr(module, "event_frame", lambda *a: calls.append(a) or real(*a))
    bus = FakeBus()
    server = await start_server(bus)
    async with trio.open_nursery() as n:
        tabs = []
        for _ in range(5):
            ws = await trio_websocket.connect_websocket_url(n, ws_url(server, tok=token("henry")))
            await subscribe(ws)
            tabs.append(ws)
        await bus.wait_until(lambda f: "henry" in f.subscribed)
        bus.inject([("henry", "new_letter", {"k": 1})])
        for ws in tabs:
            assert json.loads(await ws.get_message())["data"] == {"k": 1}
            await ws.aclose()
    assert len(calls) == 1


# -- isolation boundaries: a bug ends one connection, never the server ------------


async def test_a_bug_in_a_handshake_is_a_500_for_that_client_only(start_server, monkeypatch):
    from conftest import AsyncRaw

    import mailpush.handshake as hs

    server = await start_server()
    real = hs.parse_request
    monkeypatch.setattr(hs, "parse_request", lambda head: (_ for _ in ()).throw(IndexError("a bug")))
    raw = await AsyncRaw.connect(server.listen_address)
    assert (await raw.upgrade(token("a"))).startswith(b"HTTP/1.1 500")
    monkeypatch.setattr(hs, "parse_request", real)
    assert server.stats.internal_errors == 1 and server.open_sockets == 0
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("b"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        assert json.loads(await ws.get_message())["type"] == "subscribed"


async def test_a_bug_in_packet_handling_ends_that_connection_only(start_server, monkeypatch):
    import mailpush.connection as connection

    server = await start_server()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("a"))) as other:
        await other.send_message('{"type":"subscribe"}')
        await other.get_message()
        real = connection.parse_client_packet
        monkeypatch.setattr(connection, "parse_client_packet", lambda payload: 1 / 0)
        async with trio_websocket.open_websocket_url(ws_url(server, tok=token("b"))) as victim:
            await victim.send_message('{"type":"subscribe"}')
            with pytest.raises(trio_websocket.ConnectionClosed):
                await victim.get_message()
        monkeypatch.setattr(connection, "parse_client_packet", real)
        assert server.stats.internal_errors == 1
        await other.send_message('{"type":"ping"}')
        assert json.loads(await other.get_message())["type"] == "pong"


async def test_a_bug_in_a_keepalive_tick_does_not_stop_keepalive(start_server, autojump_clock):
    server = await start_server(ping_interval=1, pong_timeout=1)

    class Broken:
        @property
        def state(self):
            raise RuntimeError("a bug")

    server.connections.add(Broken())
    await trio.sleep(3)
    assert server.stats.internal_errors >= 1
    server.connections.clear()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("k"))):
        await trio.sleep(3)
        assert server.stats.pings >= 2  # keepalive went on after the failed ticks
