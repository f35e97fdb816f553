"""Admin HTTP API: publish (one, array, NDJSON, chunked), errors, health,
metrics, token minting, demo page; and the packets module's publish parser."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import msgspec
import pytest
import trio
import trio_websocket
from conftest import AsyncRaw, RawClient, token, ws_url

from mailpush import admin
from mailpush.testing import FakeBus
from mailpush.errors import PublishError
from mailpush.items import parse_items
from mailpush.packets import event_frame


def http(address, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(f"http://{address[0]}:{address[1]}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


async def ahttp(*args, **kw):
    return await trio.to_thread.run_sync(lambda: http(*args, **kw))


async def test_publish_single_array_and_ndjson_reach_the_subscriber(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await ws.get_message()
        await bus.wait_until(lambda f: "alice" in f.subscribed)
        status, body, _ = await ahttp(server.admin_address, "POST", "/v1/publish", b'{"subscriber":"alice","event":"e1","data":{"n":1}}')
        assert (status, json.loads(body)) == (202, {"accepted": 1})
        status, body, _ = await ahttp(server.admin_address, "POST", "/v1/publish", json.dumps([{"subscriber": "alice", "event": "e2"}, {"subscriber": "zed", "event": "e2"}]).encode())
        assert (status, json.loads(body)) == (202, {"accepted": 2})
        nd = b'{"subscriber":"alice","event":"e3"}\n\n{"subscriber":"alice","event":"e4","data":{"x":[1,2]}}\n'
        status, body, _ = await ahttp(server.admin_address, "POST", "/v1/publish", nd, {"Content-Type": "application/x-ndjson"})
        assert (status, json.loads(body)) == (202, {"accepted": 2})
        got = [json.loads(await ws.get_message()) for _ in range(4)]
        assert [(g["event"], g["data"]) for g in got] == [("e1", {"n": 1}), ("e2", {}), ("e3", {}), ("e4", {"x": [1, 2]})]
    assert server.stats.published == 5


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "empty body"),
        (b"{nope", "not valid JSON"),
        (b"[]", "empty array"),
        (b'{"event":"x"}', "'subscriber'"),
        (b'{"subscriber":"a","event":"*"}', "'event'"),
        (b'{"subscriber":"a","event":"x","data":[1]}', "'data' must be a JSON object"),
        (b'[{"subscriber":"a","event":"x"},{"subscriber":"","event":"x"}]', "item 1"),
        (b'{"subscriber":"a","event":"x"}\n{"subscriber":"b"}\n', "line 2"),
        (b'{"subscriber":"a","event":"x"}\nnot json\n', "line 2: not valid JSON"),
    ],
)
async def test_bad_publish_bodies_are_400_and_publish_nothing(start_server, body, needle):
    bus = FakeBus()
    server = await start_server(bus)
    status, resp, _ = await ahttp(server.admin_address, "POST", "/v1/publish", body)
    assert status == 400
    assert needle in json.loads(resp)["error"]
    assert bus.published == []


async def test_chunked_publish_and_keepalive(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    body = b'[{"subscriber":"a","event":"x"},{"subscriber":"b","event":"y"}]'

    def talk():
        s = socket.create_connection(server.admin_address, timeout=5)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 10]), body[i : i + 10]) for i in range(0, len(body), 10)) + b"0\r\n\r\n"
        req = b"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
        s.sendall(req + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1") < 2 or not data.endswith(b"ok\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        return data

    data = await trio.to_thread.run_sync(talk)
    assert data.startswith(b"HTTP/1.1 202") and b'{"accepted":2}' in data
    assert b"HTTP/1.1 200" in data  # second request on the same connection
    assert [i[0] for i in bus.published] == ["a", "b"]


async def test_wrong_method_unknown_path_and_body_limits(start_server):
    server = await start_server()
    status, body, _ = await ahttp(server.admin_address, "GET", "/v1/publish")
    assert status == 405
    status, body, _ = await ahttp(server.admin_address, "GET", "/nope")
    assert status == 404 and "/v1/publish" in json.loads(body)["endpoints"]

    def huge():
        s = socket.create_connection(server.admin_address, timeout=5)
        s.sendall(b"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n\r\n")
        data = s.recv(4096)
        s.close()
        return data

    assert (await trio.to_thread.run_sync(huge)).startswith(b"HTTP/1.1 413")


async def test_health_metrics_token_and_demo_page(start_server):
    server = await start_server(demo=True)
    status, body, _ = await ahttp(server.admin_address, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, body, _ = await ahttp(server.listen_address, "GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, body, _ = await ahttp(server.admin_address, "POST", "/v1/token", b'{"subscriber":"ivy"}')
    tok = json.loads(body)["token"]
    assert status == 200 and server.verifier.verify(tok) == "ivy"
    status, body, _ = await ahttp(server.admin_address, "POST", "/v1/token", b'{"subscriber":""}')
    assert status == 400
    async with trio_websocket.open_websocket_url(ws_url(server, tok=tok)) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await ws.get_message()
        status, body, headers = await ahttp(server.admin_address, "GET", "/metrics")
        text = body.decode()
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert "mailpush_connections 1.0" in text
        assert "mailpush_upgrades_total 1.0" in text
        assert "mailpush_subscribers 1.0" in text
    status, body, _ = await ahttp(server.admin_address, "GET", "/")
    page = body.decode()
    assert status == 200 and "<title>mailpush demo</title>" in page
    assert f"ws://127.0.0.1:{server.listen_address[1]}/v1/ws" in page


async def test_rejections_are_counted_by_reason(start_server):
    server = await start_server()
    status, _, _ = await ahttp(server.listen_address, "GET", "/v1/ws")
    assert status == 426  # a plain GET on the push path: upgrade required
    raw = await trio.to_thread.run_sync(RawClient, server.listen_address)
    head = await trio.to_thread.run_sync(raw.upgrade)
    body = await trio.to_thread.run_sync(raw.read_all)
    raw.close()
    assert head.startswith(b"HTTP/1.1 401") and b"no token" in body and b'WWW-Authenticate: Bearer realm="mailpush"' in head
    assert server.stats.rejections == {"version": 1, "unauthorized": 1}


def plain(items):
    """Items with their data decoded (the fast path keeps it as raw JSON)."""
    return [(s, e, msgspec.json.decode(d) if isinstance(d, msgspec.Raw) else d) for s, e, d, _state in items]


def test_ndjson_without_its_content_type_is_read_as_ndjson_whatever_its_first_item():
    # Regression (found by fuzz/targets/fuzz_items.py): a first item with a
    # field of the wrong type made the body "not valid JSON" instead of
    # being read line by line.
    body = b'{"event":"e","subscriber":1,"subscriber":"a"}\n{"subscriber":"a","event":"e"}'
    assert [(i[0], i[1]) for i in parse_items(body, "")] == [("a", "e"), ("a", "e")]
    assert parse_items(body, "") == parse_items(body, "application/x-ndjson")
    with pytest.raises(PublishError, match="line 1"):
        parse_items(b'{"event":"e","subscriber":1}\n{"subscriber":"a","event":"e"}', "")


def test_parse_items_shapes():
    assert plain(parse_items(b' {"subscriber":"a","event":"b"} ')) == [("a", "b", {})]
    assert plain(parse_items(b'{"subscriber":"a","event":"b","data":null}\n{"subscriber":"c","event":"d","data":{"x":1}}')) == [("a", "b", {}), ("c", "d", {"x": 1})]
    assert plain(parse_items(b'[{"subscriber":"a","event":"b","data":{"y":[1,"z"]},"extra":1}]', "application/json")) == [("a", "b", {"y": [1, "z"]})]
    # The data of a valid item goes out exactly as it came in.
    assert event_frame(*parse_items(b'{"subscriber":"a","event":"b","data":{"k": 1.50}}')[0])[2:] == b'{"type":"event","subscriber":"a","event":"b","data":{"k": 1.50}}'
    with pytest.raises(PublishError, match="item 0"):
        parse_items(b"[1]")


# -- hardening: nothing a client sends stops the server ----------------------

NESTED = b'{"subscriber":"a","event":"e","data":{"x":' + b"[" * 2000 + b"]" * 2000 + b"}}"


async def admin_raw(server):
    return await AsyncRaw.connect(server.admin_address)


async def test_an_idle_admin_connection_is_closed_quietly_and_the_server_goes_on(start_server, autojump_clock):
    # Regression: the idle timeout firing before the first request raised
    # UnboundLocalError, which ended the admin server and the process.
    server = await start_server()
    probe = await admin_raw(server)  # a TCP health probe: connects, sends nothing
    t0 = trio.current_time()
    assert await probe.rest() == b""  # closed without an answer
    assert trio.current_time() - t0 >= admin.IDLE_TIMEOUT
    await probe.stream.aclose()
    # Still serving (a client in the test's own loop: a thread would let the
    # autojump clock run past the server's timeouts while it connects).
    c = await admin_raw(server)
    await c.stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert (await c.head()).startswith(b"HTTP/1.1 200") and await c.rest() == b"ok\n"
    await c.stream.aclose()


async def test_an_idle_keepalive_connection_does_not_replay_its_last_request(start_server, autojump_clock):
    # Regression: when the idle timeout fired after a request, the previous
    # request was handled again: the publish delivered twice, an unasked 202.
    bus = FakeBus()
    server = await start_server(bus)
    c = await admin_raw(server)
    body = b'{"subscriber":"a","event":"once"}'
    await c.stream.send_all(b"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert (await c.head()).startswith(b"HTTP/1.1 202")
    with trio.fail_after(admin.IDLE_TIMEOUT * 3):
        rest = await c.rest()  # waits out the idle timeout, until the server closes
    assert rest == b'{"accepted":1}\n'  # the body of the one answer, nothing after it
    assert [i[1] for i in bus.published] == ["once"]
    await c.stream.aclose()


async def test_deeply_nested_json_is_400_and_the_server_goes_on(start_server):
    # Regression: RecursionError escaped the publish handler and ended the process.
    bus = FakeBus()
    server = await start_server(bus)
    status, resp, _ = await ahttp(server.admin_address, "POST", "/v1/publish", NESTED)
    assert status == 400 and "nested too deeply" in json.loads(resp)["error"]
    for body in (b"[" + NESTED + b"]", NESTED + b"\n" + NESTED):
        status, resp, _ = await ahttp(server.admin_address, "POST", "/v1/publish", body)
        assert status == 400 and "nested too deeply" in json.loads(resp)["error"]
    assert bus.published == []
    status, _, _ = await ahttp(server.admin_address, "POST", "/v1/publish", b'{"subscriber":"a","event":"e"}')
    assert status == 202


@pytest.mark.parametrize(
    "body",
    [
        b'{"subscriber":"alice","event":"e","data":{"x":"\xff\xfe"}}',  # kept raw, sent as it is
        b'{"subscriber":"alice","event":"e","other":"\xc3"}',  # in a field mailpush skips
        b'{"subscriber":"alice","event":"e"}\n{"subscriber":"alice","event":"e","data":{"x":"\xed\xa0\x80"}}',
    ],
)
async def test_a_publish_that_is_not_utf8_is_400_and_reaches_no_tab(start_server, body):
    # Regression: bytes that are not UTF-8 inside 'data' went out in a text
    # frame, which browsers fail with 1007: one publish closed every tab of
    # the subscriber. Found by tests/test_properties.py.
    bus = FakeBus()
    server = await start_server(bus)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        await ws.get_message()
        status, resp, _ = await ahttp(server.admin_address, "POST", "/v1/publish", body)
        assert status == 400 and "not valid UTF-8" in json.loads(resp)["error"]
        assert bus.published == []
        status, _, _ = await ahttp(server.admin_address, "POST", "/v1/publish", b'{"subscriber":"alice","event":"ok"}')
        assert status == 202
        assert json.loads(await ws.get_message())["event"] == "ok"


async def test_metrics_show_live_tasks_and_event_loop_lag(start_server):
    server = await start_server(ping_interval=5)
    status, body, _ = await ahttp(server.admin_address, "GET", "/metrics")
    base = _gauge(body, "mailpush_tasks")
    raws = [await AsyncRaw.connect(server.listen_address) for _ in range(3)]
    for r in raws:
        assert (await r.upgrade(token("t"))).startswith(b"HTTP/1.1 101")
    _, body, _ = await ahttp(server.admin_address, "GET", "/metrics")
    # One parked reader each; with --poller shared, no task per connection.
    assert _gauge(body, "mailpush_tasks") == base + (3 if server.poller is None else 0)
    import time

    await trio.sleep(1)
    # The event loop is blocked for 0.3 s: the timer task, ticking every
    # 5 s / 50 = 0.1 s, runs at least 0.3 - 0.1 = 0.2 s late.
    time.sleep(0.3)
    await trio.sleep(1)
    _, body, _ = await ahttp(server.admin_address, "GET", "/metrics")
    assert _gauge(body, "mailpush_event_loop_lag_seconds") >= 0.15
    for r in raws:
        await r.stream.aclose()


def _gauge(body: bytes, name: str) -> float:
    return float(next(line.split()[1] for line in body.decode().splitlines() if line.startswith(name + " ")))


# -- strict HTTP/1.1 (h11) ------------------------------------------------------


async def admin_exchange(server, data: bytes, *, pieces: int = 1) -> tuple[int, bytes]:
    """Send ``data`` (in ``pieces`` sends) on a fresh admin connection; the
    status and everything the server sent until it closed."""
    c = await admin_raw(server)
    step = max(1, len(data) // pieces)
    with trio.fail_after(10):
        for i in range(0, len(data), step):
            try:
                await c.stream.send_all(data[i : i + step])
            except trio.BrokenResourceError:
                break  # the server answered early and closed
        try:
            await c.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        got = await c.rest()
    await c.stream.aclose()
    return (int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else 0), got


POST = b"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
ITEM = b'{"subscriber":"a","event":"e"}'


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + ITEM + b"\r\n0\r\n\r\n", 400, b"chunk"),
        (POST + b"Transfer-Encoding: chunked\r\n\r\n-1e\r\n" + ITEM + b"\r\n0\r\n\r\n", 400, b"chunk"),
        (POST + b"Transfer-Encoding: chunked\r\n\r\n+1e\r\n" + ITEM + b"\r\n0\r\n\r\n", 400, b"chunk"),
        (POST + b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 40_000 + b"1e\r\n", 400, b"chunk"),
        (POST + b"Content-Length: 30\r\nContent-Length: 30\r\n\r\n" + ITEM, 400, b"more than one Content-Length"),
        (POST + b"Content-Length: 30, 30\r\n\r\n" + ITEM, 400, b"more than one Content-Length"),
        (POST + b"Content-Length: 30\r\nContent-Length: 31\r\n\r\n" + ITEM, 400, b""),
        (POST + b"Content-Length: 30\r\nTransfer-Encoding: chunked\r\n\r\n1e\r\n" + ITEM + b"\r\n0\r\n\r\n", 400, b"both Content-Length and Transfer-Encoding"),
        (POST + b"Content-Length: -1\r\n\r\n", 400, b""),
        (POST + b"X-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 30\r\n\r\n" + ITEM, 431, b"larger than"),
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX: a\x00b\r\n\r\n", 400, b""),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400, b"Host"),
        (b"GARBAGE\r\n\r\n", 400, b""),
        (POST + b"Content-Length: 30\r\n\r\n" + ITEM[:10], 400, b"complete"),
        (b"CONNECT / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, b"CONNECT"),
    ],
    ids=["bad-chunk-size", "signed-chunk-size", "plus-chunk-size", "endless-chunk-line", "duplicate-content-length",
         "listed-content-length", "conflicting-content-length", "length-and-chunked", "negative-length", "huge-head",
         "nul-in-header", "no-host", "garbage", "closed-mid-body", "connect"],
)
async def test_malformed_admin_requests_get_their_status_and_publish_nothing(start_server, data, status, needle):
    bus = FakeBus()
    server = await start_server(bus)
    got, text = await admin_exchange(server, data)
    assert got == status, text[:300]
    assert needle in text and b'"error"' in text
    assert bus.published == []
    ok, _ = await admin_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert ok == 200


LF_POST = b"POST /v1/publish HTTP/1.1\nHost: 127.0.0.1\n"


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (LF_POST + b"Content-Length: 30\r\nContent-Length: 30\r\n\r\n" + ITEM, 400, b"more than one Content-Length"),
        (LF_POST + b"Content-Length: 30\nTransfer-Encoding: chunked\n\n1e\r\n" + ITEM + b"\r\n0\r\n\r\n", 400, b"both"),
        (LF_POST + b"Content-Length: 30\n\n" + ITEM, 202, b"accepted"),
        (b"GET /healthz HTTP/1.1\nHost: 127.0.0.1\n\n\r\nContent-Length: x\r\n\r\n", 200, b"ok"),
    ],
    ids=["duplicate-content-length", "length-and-chunked", "short-head-not-431", "bytes-after-the-head"],
)
async def test_heads_with_bare_lf_line_ends_follow_the_same_rules(start_server, data, status, needle):
    # Regression (found by fuzz/targets/fuzz_admin_http.py): h11 takes bare
    # LF for CRLF, but the duplicate-length check read only CRLF heads: a
    # repeated Content-Length passed, a 15-byte head was 431, and bytes
    # after the head raised ValueError out of the parser.
    bus = FakeBus()
    server = await start_server(bus)
    for pieces in (1, 5):
        got, text = await admin_exchange(server, data, pieces=pieces)
        assert got == status, text[:300]
        assert needle in text
    assert server.stats.internal_errors == 0


async def test_the_head_limit_holds_however_the_bytes_arrive(start_server):
    server = await start_server()
    data = POST + b"X-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 30\r\n\r\n" + ITEM
    for pieces in (1, 7, 400):
        got, _ = await admin_exchange(server, data, pieces=pieces)
        assert got == 431, pieces


async def test_expect_100_continue(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    c = await admin_raw(server)
    await c.stream.send_all(POST + b"Expect: 100-continue\r\nContent-Length: 30\r\n\r\n")
    assert (await c.head()).startswith(b"HTTP/1.1 100 Continue")
    await c.stream.send_all(ITEM)
    assert (await c.head()).startswith(b"HTTP/1.1 202")
    await c.stream.aclose()
    # Too large: refused before the body is sent, never invited.
    got, text = await admin_exchange(server, POST + b"Expect: 100-continue\r\nContent-Length: 999999999\r\n\r\n")
    assert got == 413 and b"100 Continue" not in text
    assert len(bus.published) == 1


async def test_http_1_0_closes_after_the_answer_and_keepalive_carries_on(start_server):
    server = await start_server()
    got, text = await admin_exchange(server, b"GET /healthz HTTP/1.0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n")
    assert got == 200 and text.count(b"HTTP/1.1 200") == 1  # one answer, then the close
    got, text = await admin_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 3 + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert text.count(b"HTTP/1.1 200") == 4


async def test_a_failing_route_is_500_and_the_admin_api_goes_on(start_server, monkeypatch):
    bus = FakeBus()
    server = await start_server(bus)

    async def broken(items):
        raise RuntimeError("a bug in the bus")

    monkeypatch.setattr(bus, "publish", broken)
    status, body, _ = await ahttp(server.admin_address, "POST", "/v1/publish", ITEM)
    assert status == 500 and "internal error" in json.loads(body)["error"]
    assert "a bug" not in body.decode()  # details go to the log, not to the client
    status, _, _ = await ahttp(server.admin_address, "GET", "/healthz")
    assert status == 200


async def test_admin_connections_beyond_the_bound_get_503(start_server, monkeypatch):
    monkeypatch.setattr(admin, "MAX_CLIENTS", 2)
    server = await start_server()
    held = [await admin_raw(server) for _ in range(2)]
    await trio.sleep(0.1)
    got, text = await admin_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert got == 503 and b"Retry-After: 1" in text
    for c in held:
        await c.stream.aclose()
    await trio.sleep(0.1)
    got, _ = await admin_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert got == 200


# -- who may use the admin API ------------------------------------------------

ADMIN_TOKEN = "admin-" + "t" * 32


async def test_the_admin_token_guards_every_endpoint_but_healthz(start_server):
    bus = FakeBus()
    server = await start_server(bus, admin_token=ADMIN_TOKEN)
    for method, path, body in (("POST", "/v1/publish", ITEM), ("GET", "/metrics", None), ("POST", "/v1/token", b'{"subscriber":"a"}'), ("GET", "/", None), ("GET", "/nope", None)):
        status, resp, headers = await ahttp(server.admin_address, method, path, body)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        status, resp, _ = await ahttp(server.admin_address, method, path, body, {"Authorization": "Bearer wrong-token"})
        assert status == 401 and json.loads(resp)["error"] == "wrong admin token", path
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await ahttp(server.admin_address, "POST", "/v1/publish", ITEM, auth))[0] == 202
    assert (await ahttp(server.admin_address, "GET", "/metrics", None, auth))[0] == 200
    status, resp, _ = await ahttp(server.admin_address, "POST", "/v1/token", b'{"subscriber":"a"}', auth)
    assert status == 200 and server.verifier.verify(json.loads(resp)["token"]) == "a"
    assert (await ahttp(server.admin_address, "GET", "/healthz"))[0] == 200
    assert len(bus.published) == 1


async def test_token_minting_exists_only_with_demo_or_an_admin_token(start_server):
    server = await start_server()
    status, body, _ = await ahttp(server.admin_address, "POST", "/v1/token", b'{"subscriber":"a"}')
    assert status == 404 and "/v1/token" not in json.loads(body)["endpoints"]


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}, {"Host": "evil.example:8081"}],
    ids=["foreign-origin", "null-origin", "cross-site", "rebinding-host"],
)
async def test_what_a_web_page_could_send_is_403(start_server, headers):
    bus = FakeBus()
    server = await start_server(bus)
    status, body, _ = await ahttp(server.admin_address, "POST", "/v1/publish", ITEM, {"Content-Type": "text/plain", **headers})
    assert status == 403 and json.loads(body)["error"]
    assert bus.published == []


async def test_the_admin_page_itself_may_publish(start_server):
    bus = FakeBus()
    server = await start_server(bus)
    host = f"127.0.0.1:{server.admin_address[1]}"
    status, _, _ = await ahttp(server.admin_address, "POST", "/v1/publish", ITEM, {"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"})
    assert status == 202 and len(bus.published) == 1


def test_a_non_loopback_admin_address_needs_a_token():
    from conftest import make_config

    from mailpush.errors import ConfigError

    with pytest.raises(ConfigError, match="--admin-token"):
        make_config(admin=("0.0.0.0", 0))
    with pytest.raises(ConfigError, match="at least 16"):
        make_config(admin=("0.0.0.0", 0), admin_token="short")
    assert make_config(admin=("0.0.0.0", 0), admin_token=ADMIN_TOKEN).admin_token == ADMIN_TOKEN
    assert ADMIN_TOKEN not in repr(make_config(admin_token=ADMIN_TOKEN))  # never in a repr


def test_the_cli_refuses_to_start_an_open_admin_api():
    import subprocess
    import sys

    from conftest import SECRET

    proc = subprocess.run([sys.executable, "-m", "mailpush", "serve", "--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0", "--secret", SECRET],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--admin-token" in proc.stderr and "Traceback" not in proc.stderr


# -- the command line's client and publisher ------------------------------------


def test_mailpush_listen_prints_each_event_as_a_json_line():
    import subprocess
    import sys
    import time

    from conftest import SECRET, server_process

    with server_process() as (_, listen, admin):
        cmd = [sys.executable, "-m", "mailpush", "listen", "ann", "--url", f"ws://{listen[0]}:{listen[1]}/v1/ws",
               "--secret", SECRET, "--events", "new_letter", "--count", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while metric_value(admin, "mailpush_subscribers") < 1:  # subscribed
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
                time.sleep(0.05)
            for event, n in (("other", 0), ("new_letter", 1), ("new_letter", 2)):
                body = json.dumps({"subscriber": "ann", "event": event, "data": {"n": n}}).encode()
                assert http(admin, "POST", "/v1/publish", body)[0] == 202
            out, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [{k: v for k, v in line.items() if k != "offset"} for line in lines] == [
        {"type": "event", "subscriber": "ann", "event": "new_letter", "data": {"n": 1}},
        {"type": "event", "subscriber": "ann", "event": "new_letter", "data": {"n": 2}},
    ]
    assert lines[0]["offset"] < lines[1]["offset"]
    assert '"subscribed"' in err


def test_mailpush_listen_with_a_bad_token_says_why():
    import subprocess
    import sys

    from conftest import server_process

    with server_process() as (_, listen, _admin):
        proc = subprocess.run([sys.executable, "-m", "mailpush", "listen", "ann", "--url", f"ws://{listen[0]}:{listen[1]}/v1/ws", "--token", "nope"],
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "refused (401)" in proc.stderr and "Traceback" not in proc.stderr


def metric_value(admin, name: str) -> float:
    _, body, _ = http(admin, "GET", "/metrics")
    return _gauge(body, name)
