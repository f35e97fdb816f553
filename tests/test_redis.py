"""The Redis bus against a real redis-server (Debian's; ``make test``
installs it): routing by channel ``mailpush:SUBSCRIBER`` across processes,
subscriptions that follow the tabs, foreign publishers, bad payloads, and
surviving a Redis restart."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import coredis
import pytest
import trio
import trio_websocket
from conftest import bare, server_process, token, ws_url

from mailpush.bus.redis import CONTROL_CHANNEL, RedisBus
from mailpush.errors import ConfigError

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"

pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS) and not os.environ.get("CI"),
    reason="redis-server not installed (make test installs it; in CI this test must run)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS, *([] if "--tls-port" in self.extra else ["--port", str(self.port)]),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def redis():
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


async def channels(url: str) -> set[str]:
    client = coredis.Redis.from_url(url, decode_responses=True)
    async with client:
        return set(await client.pubsub_channels())


async def redis_publish(url: str, channel: str, payload: str | bytes) -> int:
    client = coredis.Redis.from_url(url)
    async with client:
        return await client.publish(channel, payload)


async def subscribed(ws) -> None:
    await ws.send_message('{"type":"subscribe"}')
    assert json.loads(await ws.get_message())["type"] == "subscribed"


async def wait_channels(url: str, want: set[str]) -> None:
    with trio.fail_after(5):
        while await channels(url) != want | {CONTROL_CHANNEL}:
            await trio.sleep(0.02)


async def test_channels_follow_the_tabs_and_foreign_publishers_reach_them(start_server, redis):
    server = await start_server(RedisBus(redis.url))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as a1:
        await subscribed(a1)
        async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as a2:
            await subscribed(a2)
            await wait_channels(redis.url, {"mailpush:alice"})
            # A mail store in any language: a plain PUBLISH with one item.
            assert await redis_publish(redis.url, "mailpush:alice", '{"subscriber":"alice","event":"new_letter","data":{"id":7}}') == 1
            for ws in (a1, a2):
                assert bare(json.loads(await ws.get_message())) == {"type": "event", "subscriber": "alice", "event": "new_letter", "data": {"id": 7}}
            # Bad payloads are dropped, the connection and the bus go on.
            await redis_publish(redis.url, "mailpush:alice", "not json")
            await redis_publish(redis.url, "mailpush:alice", '{"subscriber":"mallory","event":"x"}')
            await redis_publish(redis.url, "mailpush:alice", '{"subscriber":"alice","event":"ok"}')
            assert json.loads(await a1.get_message())["event"] == "ok"
            assert server.bus.bad_items == 2
        await wait_channels(redis.url, {"mailpush:alice"})  # a1 still holds it
    await wait_channels(redis.url, set())  # the last tab left


def test_two_processes_each_get_only_their_subscribers(redis):
    from websockets.sync.client import connect

    with server_process("--bus", redis.url) as (_, la, aa), server_process("--bus", redis.url) as (_, lb, _ab):
        with connect(f"ws://127.0.0.1:{la[1]}/v1/ws?token={token('ann')}") as wa, connect(f"ws://127.0.0.1:{lb[1]}/v1/ws?token={token('ben')}") as wb:
            for ws in (wa, wb):
                ws.send('{"type":"subscribe"}')
                assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
            deadline = time.monotonic() + 5
            while trio.run(channels, redis.url) != {"mailpush:ann", "mailpush:ben", CONTROL_CHANNEL}:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # Published at a's admin API, delivered by b for ben.
            body = json.dumps([{"subscriber": "ann", "event": "e", "data": {"n": 1}}, {"subscriber": "ben", "event": "e", "data": {"n": 2}}]).encode()
            req = urllib.request.Request(f"http://{aa[0]}:{aa[1]}/v1/publish", data=body, method="POST")
            assert urllib.request.urlopen(req, timeout=5).status == 202
            assert json.loads(wa.recv(timeout=5))["data"] == {"n": 1}
            assert json.loads(wb.recv(timeout=5))["data"] == {"n": 2}
            with pytest.raises(TimeoutError):
                wa.recv(timeout=0.3)


async def test_survives_a_redis_restart(start_server, redis):
    server = await start_server(RedisBus(redis.url))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("carl"))) as ws:
        await subscribed(ws)
        await wait_channels(redis.url, {"mailpush:carl"})
        redis.stop()
        with trio.fail_after(5):
            while server.bus.up:
                await trio.sleep(0.02)
        redis.start()
        await wait_channels(redis.url, {"mailpush:carl"})  # subscribed again
        assert server.bus.up
        # This Redis came back empty: its history (and epoch) is gone, and the
        # tab is told so before anything else.
        with trio.fail_after(10):
            resync = json.loads(await ws.get_message())
        assert resync["type"] == "resync" and resync["reason"] == "epoch_changed"
        await redis_publish(redis.url, "mailpush:carl", '{"subscriber":"carl","event":"back"}')
        assert json.loads(await ws.get_message())["event"] == "back"


def startup_error(bus_url: str) -> str:
    """``mailpush serve --bus bus_url`` must fail at startup with exit code 2:
    its message."""
    from conftest import SECRET

    proc = subprocess.run(
        [sys.executable, "-m", "mailpush", "serve", "--listen", "127.0.0.1:0", "--admin", "off", "--secret", SECRET, "--bus", bus_url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stderr


def test_unreachable_redis_at_startup_is_a_clear_error():
    port = free_port()
    assert f"cannot reach the Redis bus at redis://127.0.0.1:{port}/0" in startup_error(f"redis://127.0.0.1:{port}/0")


async def _delay_pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    """Forward src → dst, each chunk ``delay`` late, in order (and close dst at EOF)."""
    send, receive = trio.open_memory_channel(math.inf)

    async def forward():
        async for at, chunk in receive:
            await trio.sleep_until(at)
            await dst.send_all(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forward)
        with send:
            while chunk := await src.receive_some(65536):
                send.send_nowait((trio.current_time() + delay, chunk))


async def latency_proxy(nursery, port: int, delay: float) -> int:
    """A TCP proxy to 127.0.0.1:``port`` adding ``delay`` seconds each way
    (Redis across a slow network); returns its own port."""

    async def serve(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", port)
        async with client, upstream, trio.open_nursery() as n:
            n.start_soon(_delay_pump, client, upstream, delay)
            n.start_soon(_delay_pump, upstream, client, delay)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_an_event_published_as_soon_as_subscribed_arrives_is_delivered(start_server, redis, nursery):
    """``subscribed`` comes after Redis acknowledged the SUBSCRIBE: a mail
    store that publishes the moment a tab is subscribed loses nothing, even
    when mailpush reaches Redis across 50 ms of network each way."""
    proxy = await latency_proxy(nursery, redis.port, 0.05)
    server = await start_server(RedisBus(f"redis://127.0.0.1:{proxy}/0"))
    publisher = coredis.Redis.from_url(redis.url)  # the mail store: next to Redis
    async with publisher:
        for i in range(5):  # fresh subscribers: each needs its own SUBSCRIBE
            async with trio_websocket.open_websocket_url(ws_url(server, tok=token(f"fresh{i}"))) as ws:
                await subscribed(ws)
                assert await publisher.publish(f"mailpush:fresh{i}", f'{{"subscriber":"fresh{i}","event":"first"}}') == 1
                with trio.fail_after(5):
                    assert json.loads(await ws.get_message())["event"] == "first"


async def test_a_tab_subscribing_during_an_outage_is_answered_when_redis_is_back(start_server, redis):
    server = await start_server(RedisBus(redis.url))
    redis.stop()
    with trio.fail_after(5):
        while server.bus.up:
            await trio.sleep(0.02)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("dora"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        with trio.move_on_after(0.5):
            await ws.get_message()
            pytest.fail("answered subscribed while Redis was down")
        redis.start()
        with trio.fail_after(10):
            assert json.loads(await ws.get_message())["type"] == "subscribed"
        assert await redis_publish(redis.url, "mailpush:dora", '{"subscriber":"dora","event":"here"}') == 1
        assert json.loads(await ws.get_message())["event"] == "here"


@pytest.fixture
def secured_redis(tmp_path):
    """A Redis with a password, listening on a unix socket too."""
    server = RedisServer(free_port(), "--requirepass", "s3cret", "--unixsocket", str(tmp_path / "redis.sock"))
    server.start()
    server.socket = str(tmp_path / "redis.sock")
    yield server
    server.stop()


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_a_password_and_a_unix_socket(start_server, secured_redis, where):
    url = f"redis://:s3cret@127.0.0.1:{secured_redis.port}/0" if where == "tcp" else f"unix://:s3cret@{secured_redis.socket}"
    server = await start_server(RedisBus(url))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("eve"))) as ws:
        await subscribed(ws)
        await server.bus.publish([("eve", "locked", {"n": 1}, None)])  # through coredis, same URL
        assert bare(json.loads(await ws.get_message())) == {"type": "event", "subscriber": "eve", "event": "locked", "data": {"n": 1}}


def test_a_wrong_password_is_a_clear_error_at_startup(secured_redis):
    err = startup_error(f"redis://:wrong@127.0.0.1:{secured_redis.port}/0")
    assert "cannot reach the Redis bus at redis://***@127.0.0.1" in err and "invalid username-password pair" in err
    assert "wrong" not in err  # the password is not logged


def test_an_unknown_bus_url_scheme_is_a_clear_error():
    with pytest.raises(ConfigError, match="scheme must be redis://, rediss:// or unix://"):
        RedisBus("redis+sentinel://127.0.0.1/0")


def self_signed_cert(directory):
    """A certificate for 127.0.0.1 and its key, in ``directory``: (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_redis(tmp_path):
    """A Redis speaking only TLS, with a self-signed certificate for 127.0.0.1."""
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    server = RedisServer(port, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file",
                         str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    server.start()
    server.cert = str(cert)
    yield server
    server.stop()


async def test_tls_with_the_certificate_verified(start_server, tls_redis):
    url = (f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.cert}"
           "&ssl_cert_reqs=required&ssl_check_hostname=true")
    server = await start_server(RedisBus(url))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("tia"))) as ws:
        await subscribed(ws)
        await server.bus.publish([("tia", "sealed", {}, None)])
        assert json.loads(await ws.get_message())["event"] == "sealed"


def test_tls_with_an_unknown_certificate_is_refused(tls_redis):
    err = startup_error(f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_cert_reqs=required")
    assert "cannot reach the Redis bus" in err and "CERTIFICATE_VERIFY_FAILED" in err


# -- hardening: no payload, outage or stream stops the server ------------------

NESTED = '{"subscriber":"alice","event":"e","data":{"x":' + "[" * 2000 + "]" * 2000 + "}}"


async def test_a_deeply_nested_payload_is_dropped_and_the_bus_goes_on(start_server, redis):
    # Regression: RecursionError escaped the bus reader and ended the process.
    server = await start_server(RedisBus(redis.url))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        await subscribed(ws)
        await wait_channels(redis.url, {"mailpush:alice"})
        await redis_publish(redis.url, "mailpush:alice", NESTED)
        await redis_publish(redis.url, "mailpush:alice", '{"subscriber":"alice","event":"after"}')
        assert json.loads(await ws.get_message())["event"] == "after"
        assert server.bus.bad_items == 1 and server.bus.up


async def test_a_payload_that_is_not_utf8_is_dropped_and_the_tab_stays(start_server, redis):
    # Regression: a payload with bytes that are not UTF-8 in its data went
    # out in a text frame, and the browser closed the tab with 1007.
    server = await start_server(RedisBus(redis.url))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alice"))) as ws:
        await subscribed(ws)
        await wait_channels(redis.url, {"mailpush:alice"})
        await redis_publish(redis.url, "mailpush:alice", b'{"subscriber":"alice","event":"e","data":{"x":"\xff"}}')
        await redis_publish(redis.url, "mailpush:alice", '{"subscriber":"alice","event":"after"}')
        assert json.loads(await ws.get_message())["event"] == "after"
        assert server.bus.bad_items == 1 and server.bus.up


async def test_publishing_while_redis_is_down_is_503_and_the_server_goes_on(start_server, redis):
    # Regression: coredis's "Connection pool is not initialized" escaped the
    # publish handler and ended the process.
    from test_admin import ahttp

    server = await start_server(RedisBus(redis.url))
    redis.stop()
    with trio.fail_after(5):
        while server.bus.up:
            await trio.sleep(0.02)
    status, body, headers = await ahttp(server.admin_address, "POST", "/v1/publish", b'{"subscriber":"a","event":"e"}')
    assert status == 503 and headers["Retry-After"] == "1"
    assert "bus is unavailable" in json.loads(body)["error"]
    status, body, _ = await ahttp(server.admin_address, "GET", "/healthz")
    assert status == 503 and b"bus unavailable" in body  # events would not arrive: send tabs elsewhere
    redis.start()
    with trio.fail_after(10):
        while not server.bus.up:
            await trio.sleep(0.05)
    status, _, _ = await ahttp(server.admin_address, "POST", "/v1/publish", b'{"subscriber":"a","event":"e"}')
    assert status == 202


class HostileRedis:
    """A stand-in for Redis that speaks just enough of it (HELLO, FUNCTION
    LOAD, PUBLISH to the subscribers of a channel, SUBSCRIBE, PING), and,
    once the server is up, sends ``junk`` on the first subscription
    connection only; later connections behave. Only a fake can break the
    protocol this way; everything else here is real."""

    HELLO = (b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n"
             b"$2\r\nid\r\n:1\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n*0\r\n")

    def __init__(self, junk: bytes) -> None:
        import threading

        self.junk = junk
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0  # subscription connections made
        self._socks: list[socket.socket] = []
        self._subscribers: dict[bytes, list[socket.socket]] = {}
        self._lock = threading.Lock()
        self.go = threading.Event()  # set once the server is listening
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self._socks.append(sock)
            threading.Thread(target=self._talk, args=(sock,), daemon=True).start()

    def _talk(self, sock: socket.socket) -> None:
        from mailpush.bus.resp import PushParser, command

        parser = PushParser()
        try:
            while chunk := sock.recv(65536):
                for cmd in parser.feed(chunk):
                    verb = cmd[0].upper()
                    if verb == b"HELLO":
                        sock.sendall(self.HELLO)
                    elif verb == b"FUNCTION":
                        sock.sendall(b"$8\r\nmailpush\r\n")
                    elif verb == b"PUBLISH":
                        with self._lock:
                            targets = list(self._subscribers.get(cmd[1], ()))
                        push = command(b"message", cmd[1], cmd[2])
                        for target in targets:
                            target.sendall(push)
                        sock.sendall(b":%d\r\n" % len(targets))
                    elif verb == b"SUBSCRIBE":
                        first = False
                        with self._lock:
                            for channel in cmd[1:]:
                                self._subscribers.setdefault(channel, []).append(sock)
                            if cmd[1] == b"mailpush.control":
                                self.connections += 1
                                first = self.connections == 1
                        for n, channel in enumerate(cmd[1:], 1):
                            sock.sendall(b"*3\r\n$9\r\nsubscribe\r\n" + b"$%d\r\n%s\r\n:%d\r\n" % (len(channel), channel, n))
                        if first:
                            self.go.wait(30)
                            sock.sendall(self.junk)
                    elif verb == b"PING":
                        sock.sendall(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
                    else:
                        sock.sendall(b"+OK\r\n")
        except OSError:
            pass
        finally:
            with self._lock:
                for socks in self._subscribers.values():
                    if sock in socks:
                        socks.remove(sock)

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            s.close()


@pytest.mark.parametrize(
    "junk",
    [
        # -42 points the parser back at the start of this very push
        pytest.param(b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$-42\r\n" + b"x" * 64, id="negative-bulk-length"),
        pytest.param(b"*1\r\n" * 5000, id="nested-arrays"),
        # far beyond any publish item, and the rest of the stream never completes it
        pytest.param(b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$60000000\r\n" + b"x" * 64, id="absurd-bulk-length"),
        pytest.param(b"+" + b"a" * 200_000, id="endless-line"),
    ],
)
def test_a_hostile_subscription_stream_ends_that_connection_not_the_process(junk):
    # Regressions: a negative length looped at 100% CPU growing memory; deep
    # nesting raised RecursionError; an absurd length silently swallowed every
    # later message while mailpush_bus_up read 1.
    fake = HostileRedis(junk)
    try:
        with server_process("--bus", f"redis://127.0.0.1:{fake.port}/0") as (proc, _, admin):
            fake.go.set()
            deadline = time.monotonic() + 15
            while fake.connections < 2:  # the bad session ended; a new one was made
                assert proc.poll() is None, "the server died"
                assert time.monotonic() < deadline, "no reconnect after the hostile stream"
                time.sleep(0.05)
            while True:
                metrics = urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}/metrics", timeout=5).read().decode()
                if "mailpush_bus_up 1.0" in metrics:
                    break
                assert time.monotonic() < deadline, "the bus did not come back up"
                time.sleep(0.05)
            assert proc.poll() is None
            lost = [json.loads(line) for line in proc.log_lines if b'"bus_lost"' in line]
            assert lost and lost[0]["level"] == "error", proc.log_lines
    finally:
        fake.close()
