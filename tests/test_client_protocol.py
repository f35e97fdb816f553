"""What the browser client needs of the server (issue 12), over real sockets:
the token in the subprotocol (never echoed), refused tokens told in a close
code to mailpush.v1 clients, the token's expiry in ``subscribed`` and
enforced with 4001, refresh in band, drain hints, the SSE fallback with
Last-Event-ID, and /v1/client.js."""

from __future__ import annotations

import json
import time
from importlib import resources

import jwt
import pytest
import trio
import trio_websocket

from conftest import SECRET, RawClient, client_frame, close_code, token, ws_url
from mailpush import timers
from mailpush.frames import Opcode
from mailpush.testing import FakeBus


def sub_protocols(tok: str) -> str:
    return f"Sec-WebSocket-Protocol: mailpush.v1, mailpush.token.{tok}\r\n"


async def raw_upgrade(server, extra: str, path: str = "/v1/ws") -> tuple[RawClient, bytes]:
    def go():
        c = RawClient(server.listen_address)
        return c, c.upgrade(path, extra)

    return await trio.to_thread.run_sync(go)


async def frame(c: RawClient) -> tuple[int, bytes]:
    return await trio.to_thread.run_sync(c.read_frame)


async def packet(c: RawClient) -> dict:
    op, payload = await frame(c)
    while op == Opcode.PING:
        op, payload = await frame(c)
    assert op == Opcode.TEXT, (op, payload)
    return json.loads(payload)


def send_packet(c: RawClient, obj: dict) -> None:
    c.send(client_frame(Opcode.TEXT, json.dumps(obj).encode()))


# -- the token in the subprotocol ----------------------------------------------


async def test_a_token_in_the_subprotocol_is_accepted_and_never_echoed(start_server):
    server = await start_server()
    tok = token("alice")
    c, head = await raw_upgrade(server, sub_protocols(tok))
    assert head.startswith(b"HTTP/1.1 101")
    assert b"\r\nSec-WebSocket-Protocol: mailpush.v1" in head
    assert tok.encode() not in head and b"mailpush.token" not in head
    send_packet(c, {"type": "subscribe"})
    got = await packet(c)
    assert got["type"] == "subscribed" and got["subscriber"] == "alice"
    c.close()


async def test_a_browser_library_connects_with_the_subprotocol(start_server):
    server = await start_server()
    url = ws_url(server)
    async with trio_websocket.open_websocket_url(url, subprotocols=["mailpush.v1", "mailpush.token." + token("bob")]) as ws:
        assert ws.subprotocol == "mailpush.v1"
        await ws.send_message('{"type":"subscribe"}')
        assert json.loads(await ws.get_message())["subscriber"] == "bob"


async def test_a_token_subprotocol_without_mailpush_v1_is_400(start_server):
    server = await start_server()
    c, head = await raw_upgrade(server, f"Sec-WebSocket-Protocol: mailpush.token.{token('alice')}\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"mailpush.v1" in c.buf + head
    c.close()


async def test_no_subprotocol_keeps_the_answer_without_one(start_server):
    server = await start_server()
    c, head = await raw_upgrade(server, "", path="/v1/ws?token=" + token("alice"))
    assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Protocol" not in head
    c.close()


@pytest.mark.parametrize(
    ("tok", "code"),
    [
        (jwt.encode({"sub": "alice", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"), 4001),
        (jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "another-secret-" + "x" * 32, algorithm="HS256"), 4003),
        ("not-a-jwt", 4003),
    ],
)
async def test_a_refused_token_reaches_a_mailpush_v1_client_as_a_close_code(start_server, tok, code):
    # A browser cannot read the status of a refused upgrade; it can read a close code.
    server = await start_server()
    c, head = await raw_upgrade(server, sub_protocols(tok))
    assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Protocol: mailpush.v1" in head
    op, payload = await frame(c)
    assert op == Opcode.CLOSE and close_code(payload) == code
    assert await trio.to_thread.run_sync(c.read_all) == b""  # then the server closes
    assert server.stats.rejections["expired" if code == 4001 else "unauthorized"] == 1
    assert not server.connections


async def test_other_clients_still_get_401(start_server):
    server = await start_server()
    c, head = await raw_upgrade(server, "", path="/v1/ws?token=nope")
    assert head.startswith(b"HTTP/1.1 401")
    c.close()


# -- expiry and refresh -----------------------------------------------------------


async def test_subscribed_carries_the_tokens_expiry(start_server):
    server = await start_server()
    tok = token("alice", ttl=600)
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
    async with trio_websocket.open_websocket_url(ws_url(server, tok=tok)) as ws:
        await ws.send_message('{"type":"subscribe"}')
        assert json.loads(await ws.get_message())["expires_at"] == exp


async def test_an_expired_token_closes_the_connection_with_4001(start_server, monkeypatch):
    monkeypatch.setattr(timers, "EXPIRY_GRACE", 0.0)
    server = await start_server(ping_interval=0.2, pong_timeout=5)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice", ttl=1))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await ws.get_message()
        with trio.fail_after(5):
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
    assert closed.value.reason.code == 4001 and closed.value.reason.reason == "token expired"
    assert server.stats.token_expiries == 1


async def test_expiry_is_enforced_with_keepalive_off_too(start_server, monkeypatch):
    monkeypatch.setattr(timers, "EXPIRY_GRACE", 0.0)
    monkeypatch.setattr(timers, "EXPIRY_ROUND", 0.2)
    server = await start_server(ping_interval=0)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice", ttl=1))) as ws:
        with trio.fail_after(5):
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
    assert closed.value.reason.code == 4001
    assert server.stats.pings == 0


async def test_a_refreshed_token_keeps_the_connection(start_server, monkeypatch):
    monkeypatch.setattr(timers, "EXPIRY_GRACE", 0.0)
    bus = FakeBus()
    server = await start_server(bus, ping_interval=0.2, pong_timeout=5)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice", ttl=1))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await ws.get_message()
        fresh = token("alice", ttl=600)
        await ws.send_message(json.dumps({"type": "refresh", "token": fresh}))
        got = json.loads(await ws.get_message())
        assert got == {"type": "refreshed", "expires_at": jwt.decode(fresh, options={"verify_signature": False})["exp"]}
        await trio.sleep(2.5)  # past the old token's exp and several rounds
        bus.inject([("alice", "still_here", {})])
        assert json.loads(await ws.get_message())["event"] == "still_here"
    assert server.stats.token_expiries == 0 and server.stats.refreshes == 1


async def test_a_refresh_for_another_subscriber_is_an_error_and_close_1008(start_server):
    server = await start_server()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        await ws.send_message(json.dumps({"type": "refresh", "token": token("mallory")}))
        err = json.loads(await ws.get_message())
        assert err["type"] == "error" and err["code"] == "wrong_subscriber"
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    assert closed.value.reason.code == 1008


async def test_a_bad_refresh_token_is_an_error_packet_and_the_connection_stays(start_server):
    server = await start_server()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        for bad in ("junk", jwt.encode({"sub": "alice", "exp": 1}, SECRET, algorithm="HS256")):
            await ws.send_message(json.dumps({"type": "refresh", "token": bad}))
            err = json.loads(await ws.get_message())
            assert err["type"] == "error" and err["code"] == "bad_token"
        await ws.send_message('{"type":"refresh"}')
        assert json.loads(await ws.get_message())["code"] == "bad_field"
        await ws.send_message('{"type":"ping"}')
        assert json.loads(await ws.get_message()) == {"type": "pong"}
    assert server.stats.refreshes == 0


# -- drain hints --------------------------------------------------------------------


async def test_a_drain_tells_each_client_when_to_come_back(start_server, nursery):
    server = await start_server()
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        nursery.start_soon(server.drain, 0.1)
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
    reason = closed.value.reason
    assert reason.code == 1012
    after = int(reason.reason.split("reconnect_after_ms=")[1])
    assert 1000 <= after <= 1000  # a 0.1 s window: the floor of one second


# -- SSE ------------------------------------------------------------------------------


def sse_get(address, path: str, headers: str = "") -> RawClient:
    c = RawClient(address)
    c.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    return c


def sse_messages(c: RawClient, n: int) -> list[dict]:
    """The next ``n`` SSE messages as {field: value} (data lines joined)."""
    out = []
    while len(out) < n:
        while b"\n\n" not in c.buf:
            chunk = c.sock.recv(65536)
            if not chunk:
                raise EOFError(c.buf)
            c.buf += chunk
        block, _, c.buf = c.buf.partition(b"\n\n")
        msg: dict = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            msg[name] = msg[name] + "\n" + value if name in msg and name == "data" else value
        out.append(msg)
    return out


async def test_sse_streams_packets_with_ids_and_resumes_from_last_event_id(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    tok = token("alice")
    c = await trio.to_thread.run_sync(sse_get, server.listen_address, f"/v1/events?token={tok}&events=new_letter,flags")
    head = await trio.to_thread.run_sync(c.read_head)
    assert head.startswith(b"HTTP/1.1 200")
    for h in (b"Content-Type: text/event-stream", b"X-Accel-Buffering: no", b"Cache-Control: no-cache"):
        assert h in head
    retry, subscribed = await trio.to_thread.run_sync(sse_messages, c, 2)
    assert retry == {"retry": "2000"}
    sub = json.loads(subscribed["data"])
    assert sub["type"] == "subscribed" and sub["events"] == ["flags", "new_letter"]
    epoch = sub["epoch"]
    await bus.wait_until(lambda f: "alice" in f.subscribed)
    bus.inject([("alice", "new_letter", {"id": 1}), ("alice", "other", {}), ("alice", "flags", {"id": 2})])
    first, second = await trio.to_thread.run_sync(sse_messages, c, 2)
    assert [json.loads(m["data"])["data"] for m in (first, second)] == [{"id": 1}, {"id": 2}]
    assert first["id"] == f"{epoch}:{json.loads(first['data'])['offset']}"
    last_id = second["id"]
    c.close()
    # Away: two more events; the browser's EventSource comes back with Last-Event-ID.
    bus.inject([("alice", "new_letter", {"id": 3}), ("alice", "new_letter", {"id": 4})])
    c = await trio.to_thread.run_sync(sse_get, server.listen_address, f"/v1/events?token={tok}", f"Last-Event-ID: {last_id}\r\n")
    await trio.to_thread.run_sync(c.read_head)
    _, subscribed, three, four = await trio.to_thread.run_sync(sse_messages, c, 4)
    assert json.loads(subscribed["data"])["recovered"] is True
    assert [json.loads(m["data"])["data"] for m in (three, four)] == [{"id": 3}, {"id": 4}]
    c.close()


async def test_sse_pings_are_comments_and_a_drain_says_when_to_retry(start_server, nursery):
    server = await start_server(ping_interval=0.1, pong_timeout=0.2)
    c = await trio.to_thread.run_sync(sse_get, server.listen_address, f"/v1/events?token={token('alice')}")
    await trio.to_thread.run_sync(c.read_head)
    await trio.to_thread.run_sync(sse_messages, c, 2)  # retry, subscribed
    ping = (await trio.to_thread.run_sync(sse_messages, c, 1))[0]
    assert ping == {"": "ping"}
    await trio.sleep(0.5)  # several pong timeouts: an SSE client is never judged by pongs
    assert len(server.connections) == 1
    nursery.start_soon(server.drain, 0.1)
    while True:
        msg = (await trio.to_thread.run_sync(sse_messages, c, 1))[0]
        if "data" in msg:
            break
    assert int(msg["retry"]) >= 1000
    closing = json.loads(msg["data"])
    assert closing["type"] == "close" and closing["code"] == 1012
    assert await trio.to_thread.run_sync(c.read_all) == b""


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/events", "", b"401"),
        ("/v1/events?token={tok}", "Last-Event-ID: nonsense\r\n", b"400"),
        ("/v1/events?token={tok}&events=" + ",".join(["e"] * 40), "", b"400"),
    ],
)
async def test_sse_refusals(start_server, path, headers, status):
    server = await start_server()
    c = await trio.to_thread.run_sync(sse_get, server.listen_address, path.format(tok=token("alice")), headers)
    head = await trio.to_thread.run_sync(c.read_head)
    assert head.split(b" ")[1] == status
    c.close()


# -- client.js -------------------------------------------------------------------------


async def test_client_js_is_served_as_a_module_another_origin_may_import(start_server):
    server = await start_server()
    c = await trio.to_thread.run_sync(sse_get, server.listen_address, "/v1/client.js", "Origin: https://mail.example\r\n")
    head = await trio.to_thread.run_sync(c.read_head)
    body = await trio.to_thread.run_sync(c.read_all)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Type: text/javascript" in head and b"Access-Control-Allow-Origin: *" in head
    assert b"Cache-Control: public" in head and b"ETag: " in head
    assert body == (resources.files("mailpush") / "client.js").read_bytes()
    assert b"export" in body


# -- the per-subscriber cap (issue 13) ----------------------------------------------------


async def test_a_subscriber_at_its_cap_is_refused_and_others_are_not(start_server):
    server = await start_server(max_connections_per_subscriber=2)
    tok = token("alice")
    async with trio_websocket.open_websocket_url(ws_url(server, tok=tok)) as a1:
        async with trio_websocket.open_websocket_url(ws_url(server, tok=tok)) as a2:
            # A third of alice's: 429 with the reason, or close 4008 for a mailpush.v1 client.
            c, head = await raw_upgrade(server, "", path="/v1/ws?token=" + tok)
            assert head.startswith(b"HTTP/1.1 429") and b"Retry-After: 30" in head
            assert b"2 connections" in await trio.to_thread.run_sync(c.read_all)
            c, head = await raw_upgrade(server, sub_protocols(tok))
            assert head.startswith(b"HTTP/1.1 101")
            op, payload = await frame(c)
            assert op == Opcode.CLOSE and close_code(payload) == 4008
            c.close()
            s = await trio.to_thread.run_sync(sse_get, server.listen_address, f"/v1/events?token={tok}")
            assert (await trio.to_thread.run_sync(s.read_head)).startswith(b"HTTP/1.1 429")
            s.close()
            # Bob is not affected.
            async with trio_websocket.open_websocket_url(ws_url(server, tok=token("bob"))) as b:
                await b.send_message('{"type":"ping"}')
                assert json.loads(await b.get_message()) == {"type": "pong"}
            for ws in (a1, a2):
                await ws.send_message('{"type":"ping"}')
                assert json.loads(await ws.get_message()) == {"type": "pong"}
        # One closed: alice may connect again.
        with trio.fail_after(5):
            while server.ctx.per_subscriber.get("alice") != 1:
                await trio.sleep(0.01)
        async with trio_websocket.open_websocket_url(ws_url(server, tok=tok)) as again:
            await again.send_message('{"type":"ping"}')
            assert json.loads(await again.get_message()) == {"type": "pong"}
    assert server.stats.rejections["per_subscriber_cap"] == 3
    with trio.fail_after(5):
        while server.ctx.per_subscriber:
            await trio.sleep(0.01)


def test_the_cap_option_is_checked():
    from mailpush import Config
    from mailpush.errors import ConfigError

    with pytest.raises(ConfigError, match="max-connections-per-subscriber"):
        Config(secret=SECRET, max_connections_per_subscriber=-1)
