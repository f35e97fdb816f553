"""Resource control and lifecycle: admission, the accept pause, handshake
deadline, keepalive and its lag guard, slow consumers, bursts, drain.

Clients here run in the test's own Trio loop (trio streams, trio-websocket)
so that ``autojump_clock`` can skip through the waits: loopback delivery is
complete when ``send()`` returns, so the clock only jumps when every task,
client and server, is really waiting for time.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request

import pytest
import trio
import trio_websocket
from conftest import UPGRADE, AsyncRaw, client_frame, server_process, token, ws_url

import mailpush.acceptor as acceptor_mod
import mailpush.server as server_mod
import mailpush.timers as timers_mod
from mailpush import _trio_compat
from mailpush.testing import FakeBus


async def upgraded_clients(server, n: int, prefix: str) -> list[AsyncRaw]:
    clients = []
    for i in range(n):
        c = await AsyncRaw.connect(server.listen_address)
        assert (await c.upgrade(token(f"{prefix}{i}"))).startswith(b"HTTP/1.1 101")
        clients.append(c)
    return clients


def send_on_all(clients: list[AsyncRaw], frame: bytes) -> None:
    """The same bytes on every socket, without yielding to the server."""
    for c in clients:
        c.stream.socket._sock.send(frame)


async def test_503_at_the_connection_limit_and_health(start_server):
    server = await start_server(max_connections=2)
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("a"))), trio_websocket.open_websocket_url(ws_url(server, tok=token("b"))):
        raw = await AsyncRaw.connect(server.listen_address)
        head = await raw.upgrade(token("c"))
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert server.stats.rejections["full"] == 1
        assert server.health() == (503, "at connection limit")
    with trio.fail_after(2):
        while server.open_sockets:
            await trio.sleep(0.01)
    assert server.health() == (200, "ok")
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("c"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        assert json.loads(await ws.get_message())["type"] == "subscribed"


async def test_accept_waits_for_a_handshake_slot(start_server, autojump_clock):
    server = await start_server(max_handshakes=1, handshake_timeout=3)
    busy = object()  # a handshake being parsed: the only slot is taken
    server.handshakes.acquire_on_behalf_of_nowait(busy)
    second = await AsyncRaw.connect(server.listen_address)
    await second.stream.send_all(UPGRADE.format(path="/v1/ws?token=" + token("x"), extra="").encode())
    third = await AsyncRaw.connect(server.listen_address)
    await trio.sleep(0.5)
    # The second was accepted but waits for a slot; the third is still in the
    # kernel backlog: no task, no handshake state.
    assert server.paused and server.stats.accept_pauses == 1
    assert server.open_sockets == 0  # counted once it has its slot
    assert server.health() == (503, "overloaded: all handshake slots busy")
    server.handshakes.release_on_behalf_of(busy)
    assert (await second.head()).startswith(b"HTTP/1.1 101")
    for c in (second, third):
        await c.stream.aclose()


async def test_a_free_slot_is_not_taken_and_given_back_in_the_shared_mode(start_server, autojump_clock):
    """--poller shared: the poller gives an accepted socket's slot back in
    the same step, so while one is free the acceptor takes none (Trio's
    bookkeeping for nothing); the task mode holds one per handshake. Either
    way the socket upgrades, and nothing is left borrowed."""
    server = await start_server(max_handshakes=4, handshake_timeout=3)
    taken = []
    acquire = server.handshakes.acquire_on_behalf_of_nowait

    def counting(borrower):
        taken.append(borrower)
        acquire(borrower)

    server.handshakes.acquire_on_behalf_of_nowait = counting
    c = await AsyncRaw.connect(server.listen_address)
    assert (await c.upgrade(token("f"))).startswith(b"HTTP/1.1 101")
    assert len(taken) == (0 if server.config.poller == "shared" else 1)
    assert server.handshakes.borrowed_tokens == 0
    await c.stream.aclose()


@pytest.mark.parametrize("on_listener", [True, False])
async def test_every_accepted_socket_has_tcp_nodelay(start_server, monkeypatch, on_listener):
    """Small frames go out at once (no Nagle delay behind an unacked one).
    The server's listener has TCP_NODELAY from before listen(), and Linux
    copies it to each connection; a listener without it (here: turned off)
    makes the acceptor set it on each socket instead."""
    monkeypatch.setattr(server_mod, "NODELAY_ON_LISTENER", on_listener)
    server = await start_server()
    assert server._listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == int(on_listener)
    clients = []
    for i in range(3):
        c = await AsyncRaw.connect(server.listen_address)
        assert (await c.upgrade(token(f"n{i}"))).startswith(b"HTTP/1.1 101")
        clients.append(c)
    socks = [conn.sock for conn in server.ctx.connections]
    assert len(socks) == 3
    assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in socks)
    for c in clients:
        await c.stream.aclose()


async def test_stalled_upgrades_hold_no_handshake_slot(start_server, autojump_clock):
    # Regression: a connection that sent half an upgrade request (or nothing)
    # kept its handshake slot until the deadline: a few hundred of them
    # locked every legitimate client out and /healthz said 503.
    server = await start_server(max_handshakes=4, handshake_timeout=30)
    half = UPGRADE.format(path="/v1/ws?token=" + token("s"), extra="").encode()[:40]
    stalled = []
    for i in range(50):
        c = await AsyncRaw.connect(server.listen_address)
        if i % 2:
            await c.stream.send_all(half)
        stalled.append(c)
    with trio.fail_after(5):  # virtual time: far less than the 30 s deadline
        while server.open_sockets < 50:
            await trio.sleep(0.01)
        await trio.sleep(0.1)
        assert server.handshakes.borrowed_tokens == 0
        assert server.health() == (200, "ok")
        t0 = trio.current_time()
        normal = await AsyncRaw.connect(server.listen_address)
        assert (await normal.upgrade(token("n"))).startswith(b"HTTP/1.1 101")
    assert trio.current_time() - t0 < 0.1
    # Each stalled one still gets its answer at its deadline.
    for c in stalled[:2]:
        assert (await c.head()).startswith(b"HTTP/1.1 408")
    for c in [normal, *stalled]:
        await c.stream.aclose()


async def test_a_saturated_server_sheds_the_backlog_it_cannot_serve_in_time(start_server, autojump_clock, monkeypatch):
    monkeypatch.setattr(acceptor_mod, "SHED_MIN_QUEUE", 3)
    server = await start_server(max_handshakes=1, handshake_timeout=3)
    busy = object()  # the only slot is taken: the server is saturated
    server.handshakes.acquire_on_behalf_of_nowait(busy)
    request = UPGRADE.format(path="/v1/ws?token=" + token("q"), extra="").encode()
    clients = []
    for _ in range(11):  # the first is accepted and waits; ten stay in the backlog
        c = await AsyncRaw.connect(server.listen_address)
        await c.stream.send_all(request)
        clients.append(c)
    t0 = trio.current_time()
    answers = []
    for c in clients:
        with trio.move_on_after(0.1):
            answers.append(await c.head())
            continue
        answers.append(None)
    # No upgrade rate known yet: the backlog keeps SHED_MIN_QUEUE = 3, the
    # other seven are refused at once, the accepted one keeps waiting.
    refused = [a for a in answers if a is not None]
    assert len(refused) == 7 and all(a.startswith(b"HTTP/1.1 503") for a in refused)
    assert trio.current_time() - t0 < 1.2
    assert server.stats.rejections["overloaded"] == 7
    # When the slot frees, the rest are served in turn.
    server.handshakes.release_on_behalf_of(busy)
    for c, a in zip(clients, answers):
        if a is None:
            assert (await c.head()).startswith(b"HTTP/1.1 101")
    for c in clients:
        await c.stream.aclose()


async def test_slowloris_dribble_hits_the_deadline(start_server, autojump_clock):
    server = await start_server(handshake_timeout=2)
    raw = await AsyncRaw.connect(server.listen_address)
    request = UPGRADE.format(path="/v1/ws?token=" + token("s"), extra="").encode()
    t0 = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):
        for byte in request:
            await raw.stream.send_all(bytes((byte,)))
            await trio.sleep(0.25)
    assert 2 <= trio.current_time() - t0 < 2.5
    assert (await raw.head()).startswith(b"HTTP/1.1 408")
    assert server.open_sockets == 0 and server.stats.rejections["timeout"] == 1


async def test_unanswered_pings_close_only_the_dead_client(start_server, autojump_clock):
    server = await start_server(ping_interval=10, pong_timeout=5)
    dead = await AsyncRaw.connect(server.listen_address)
    assert (await dead.upgrade(token("dead"))).startswith(b"HTTP/1.1 101")
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("alive"))) as alive:
        t0 = trio.current_time()
        assert await dead.eof()
        # Pinged in the first round (≤ 10 s), closed 5 s after that ping.
        assert 5 <= trio.current_time() - t0 <= 16
        assert server.stats.pong_timeouts == 1
        await trio.sleep(60)  # six more rounds: the answering client stays
        assert not alive.closed and len(server.connections) == 1
        assert server.stats.pings >= 7


async def test_a_closed_peer_that_never_reads_is_cut_after_the_close_timeout(start_server, autojump_clock):
    bus = FakeBus()
    server = await start_server(bus, ping_interval=10, pong_timeout=5, send_queue_bytes=8 << 20)
    stalled = await AsyncRaw.connect(server.listen_address, rcvbuf=4096)
    assert (await stalled.upgrade(token("st"))).startswith(b"HTTP/1.1 101")
    await stalled.stream.send_all(client_frame(0x1, b'{"type":"subscribe"}'))
    await bus.wait_until(lambda f: "st" in f.subscribed)
    (conn,) = server.connections
    pad = "x" * 50_000
    for _ in range(200):  # until the kernel buffers are full and a queue forms
        if conn.queue is not None:
            break
        bus.inject([("st", "big", {"pad": pad})])
        await trio.sleep(0.01)
    assert conn.queue is not None and conn.queued < 8 << 20
    t0 = trio.current_time()
    # Keepalive closes it (no pong) behind a queue that never drains; the
    # close timeout then cuts it instead of keeping it forever.
    with trio.fail_after(60):
        while server.connections:
            await trio.sleep(0.5)
    assert server.stats.pong_timeouts == 1 and server.stats.slow_consumers == 0
    assert trio.current_time() - t0 <= 10 + 5 + timers_mod.CLOSE_TIMEOUT + 1
    await stalled.stream.aclose()


@pytest.mark.parametrize("guard", [True, False])
async def test_lag_guard_does_not_blame_clients_for_a_server_stall(start_server, autojump_clock, monkeypatch, guard):
    if not guard:
        monkeypatch.setattr(timers_mod, "LAG_TOLERANCE", float("inf"))
    server = await start_server(ping_interval=10, pong_timeout=5)
    raw = await AsyncRaw.connect(server.listen_address)
    assert (await raw.upgrade(token("r"))).startswith(b"HTTP/1.1 101")
    # First round: ping near t=10, check due near t=15. At t=12 the server
    # "stalls" for 20 s: every task wakes up 20 s late.
    await trio.sleep(12)
    assert server.stats.pings == 1
    autojump_clock.jump(20)
    await trio.sleep(0.5)
    if guard:
        assert server.stats.lag_skips >= 1 and server.stats.pong_timeouts == 0
        assert len(server.connections) == 1
        assert await raw.eof()  # really dead: judged on the next round after the stall
        assert server.stats.pong_timeouts == 1
    else:
        assert server.stats.pong_timeouts == 1


async def test_a_large_event_in_flight_is_not_held_against_a_reader(start_server):
    # Regression: the first frame bypassed --send-queue-bytes, and the next
    # small event was counted against it: a healthy reader was dropped.
    bus = FakeBus()
    server = await start_server(bus, send_queue_bytes=65536)
    reader = await AsyncRaw.connect(server.listen_address, rcvbuf=4096)
    assert (await reader.upgrade(token("r"))).startswith(b"HTTP/1.1 101")
    await reader.stream.send_all(client_frame(0x1, b'{"type":"subscribe"}'))
    await bus.wait_until(lambda f: "r" in f.subscribed)
    big = {"pad": "x" * 1_000_000}
    bus.inject([("r", "big", big), ("r", "small", {"n": 1}), ("r", "small", {"n": 2})])
    with trio.fail_after(10):
        while server.stats.delivered < 3:
            await trio.sleep(0.01)
    assert server.stats.slow_consumers == 0
    got = b""
    with trio.fail_after(10):
        while got.count(b'"small"') < 2:
            got += await reader.stream.receive_some(1 << 20)
    assert got.count(b'"big"') == 1 and server.stats.slow_consumers == 0
    # A client that reads nothing is still dropped once the bound fills up
    # behind the large frame.
    bus.inject([("r", "big", big)] * 10 + [("r", "small", {"n": i, "pad": "y" * 1000}) for i in range(100)])
    with trio.fail_after(10):
        while not server.stats.slow_consumers:
            await trio.sleep(0.01)
    await reader.stream.aclose()


async def test_slow_consumer_is_dropped_and_the_fast_one_gets_everything_in_order(start_server):
    bus = FakeBus()
    server = await start_server(bus, send_queue_bytes=65536)
    slow = await AsyncRaw.connect(server.listen_address, rcvbuf=4096)
    assert (await slow.upgrade(token("slow"))).startswith(b"HTTP/1.1 101")
    await slow.stream.send_all(client_frame(0x1, b'{"type":"subscribe"}'))
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("fast")), max_message_size=1 << 20) as fast:
        await fast.send_message('{"type":"subscribe"}')
        await fast.get_message()
        await bus.wait_until(lambda f: f.subscribed == {"slow", "fast"})
        pad = "x" * 2000
        n = 0
        for _batch in range(40):  # 40 × 100 × ~2 KB = 8 MB for each client
            items = []
            for _ in range(100):
                items += [("slow", "new_letter", {"n": n, "pad": pad}), ("fast", "new_letter", {"n": n, "pad": pad})]
                n += 1
            bus.inject(items)
            for i in range(n - 100, n):
                assert json.loads(await fast.get_message())["data"]["n"] == i
    assert server.stats.slow_consumers == 1
    assert await slow.eof()
    assert server.registry.get("slow") is None


async def test_a_burst_is_read_through_the_one_buffer_without_mixing_clients(start_server):
    server = await start_server()
    clients = await upgraded_clients(server, 60, "u")
    # Every socket becomes readable before the server runs again; each
    # client's packet differs, and half of them arrive in two pieces (the
    # decoder keeps the first piece across reads of other connections).
    for i, c in enumerate(clients):
        frame = client_frame(0x1, b'{"type":"subscribe","events":["e%d"]}' % i)
        c.stream.socket._sock.send(frame[: len(frame) // 2] if i % 2 else frame)
    await trio.sleep(0.05)
    for i, c in enumerate(clients):
        if i % 2:
            frame = client_frame(0x1, b'{"type":"subscribe","events":["e%d"]}' % i)
            c.stream.socket._sock.send(frame[len(frame) // 2 :])
    for i, c in enumerate(clients):
        got = await c.stream.receive_some(4096)
        assert b'"subscribed"' in got and b'"events":["e%d"]' % i in got, (i, got)
    assert len(server.registry) == 60 and len(server.ctx.buffer) == server.config.buffer_size
    for c in clients:
        await c.stream.aclose()


async def test_drain_spreads_closes_over_the_window_after_flushing(start_server, autojump_clock):
    bus = FakeBus()
    server = await start_server(bus, drain_seconds=10)
    closes: list[tuple[float, int, str, list]] = []
    t0 = trio.current_time()

    async def tab(i: int, task_status):
        async with trio_websocket.open_websocket_url(ws_url(server, tok=token(f"d{i}"))) as ws:
            await ws.send_message('{"type":"subscribe"}')
            await ws.get_message()
            task_status.started()
            got = []
            try:
                while True:
                    got.append(json.loads(await ws.get_message())["event"])
            except trio_websocket.ConnectionClosed as e:
                closes.append((trio.current_time() - t0, e.reason.code, e.reason.reason, got))

    async with trio.open_nursery() as n:
        for i in range(40):
            await n.start(tab, i)
        await bus.wait_until(lambda f: len(f.subscribed) == 40)
        bus.inject([(f"d{i}", "last_words", {}) for i in range(40)])
        while server.stats.delivered < 40:  # handed to the connections, maybe not yet written
            await trio.sleep(0)
        await server.drain()
    assert len(closes) == 40
    assert all(code == 1012 and "reconnect_after_ms=" in reason and got == ["last_words"] for _, code, reason, got in closes), closes[:3]
    times = sorted(t for t, *_ in closes)
    assert times[0] < 1.0 and times[-1] > 9.0
    # Evenly spread: each 2.5-second quarter of the window has about a quarter.
    quarters = [sum(1 for t in times if q * 2.5 <= t < (q + 1) * 2.5) for q in range(4)]
    assert all(7 <= q <= 13 for q in quarters), quarters
    assert server.health() == (503, "draining")


def test_sigterm_drains_and_exits_zero():
    with server_process("--drain-seconds", "2") as (proc, listen, admin):
        socks = []
        for i in range(10):
            s = socket.create_connection(listen, timeout=5)
            s.sendall(UPGRADE.format(path="/v1/ws?token=" + token(f"t{i}"), extra="").encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 101")
            socks.append(s)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}/healthz", timeout=2)
            raise AssertionError("healthz answered 200 while draining")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and e.read() == b"draining\n"
        with pytest.raises(OSError):
            socket.create_connection(listen, timeout=1)  # no longer accepting
        codes = []
        for s in socks:
            data = s.recv(4096)
            assert data[0] == 0x88, data
            codes.append(int.from_bytes(data[2:4], "big"))
            s.sendall(client_frame(0x8, data[2:4]))  # answer the close
            s.close()
        assert codes == [1012] * 10
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 2 + 3


async def test_trio_wakes_a_bounded_number_of_readers_per_iteration(start_server):
    from trio._core._io_epoll import EpollIOManager

    await start_server()
    assert EpollIOManager.get_events._mailpush_limit == server_mod.MAX_WAKEUPS


async def test_a_burst_larger_than_the_wakeup_bound_is_served(start_server, monkeypatch):
    # The real replacement of get_events, with a bound of 3 instead of 1,024,
    # watched by a spy: 40 readable connections are woken 3 at a most per
    # loop iteration, and every one of them is served.
    # With --poller shared the bound is the poller's batch: the same burst is
    # taken from its epoll set 3 at a time.
    from trio._core._io_epoll import EpollIOManager

    from mailpush import poller as poller_mod

    server = await start_server()
    limited = _trio_compat.limited_get_events(3)
    sizes: list[int] = []

    def spy(self, timeout):
        events = limited(self, timeout)
        sizes.append(len(events))
        return events

    clients = await upgraded_clients(server, 40, "b")
    if server.poller is not None:
        monkeypatch.setattr(poller_mod, "BATCH", 3)
        real = server.poller.epoll

        class SpyEpoll:
            def fileno(self):
                return real.fileno()

            def poll(self, timeout, maxevents):
                events = real.poll(timeout, maxevents)
                sizes.append(len(events))
                return events

            def __getattr__(self, name):
                return getattr(real, name)

        server.poller.epoll = SpyEpoll()
        # the running task holds the real epoll: wake it once so it picks up the spy
        await trio.sleep(0)
    else:
        monkeypatch.setattr(EpollIOManager, "get_events", spy)
    send_on_all(clients, client_frame(0x1, b'{"type":"ping"}'))
    for c in clients:
        with trio.fail_after(5):
            assert b'"pong"' in await c.stream.receive_some(4096)
    monkeypatch.undo()
    assert max(sizes) == 3 and sum(sizes) >= 40
    for c in clients:
        await c.stream.aclose()


def test_sighup_is_ignored_with_a_log_line():
    # Regression: SIGHUP ended the process silently with a nonzero status.
    with server_process("--drain-seconds", "0.5") as (proc, listen, admin):
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not any(b'"sighup_ignored"' in line for line in proc.log_lines):
            assert proc.poll() is None, "SIGHUP ended the server"
            assert time.monotonic() < deadline, "no log line for SIGHUP"
            time.sleep(0.05)
        assert urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}/healthz", timeout=5).status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_protocol_violations_leave_no_cyclic_garbage(start_server):
    # Regression (found by the soak's RSS slope): the ProtocolError kept by
    # on_data held its frame through its traceback and the frame held it, a
    # cycle of ~16 objects per violation that only a full collection frees;
    # with a few hundred thousand long-lived objects those come rarely, so
    # the garbage piled up as an RSS slope.
    import gc

    server = await start_server()
    clients = await upgraded_clients(server, 20, "pv")
    gc.collect()
    gc.disable()
    try:
        send_on_all(clients, bytes([0x81, 2]) + b"hi")  # an unmasked client frame: 1002
        for c in clients:
            assert await c.eof(5)
        with trio.fail_after(5):
            while server.connections:
                await trio.sleep(0.01)
        found = gc.collect()
    finally:
        gc.enable()
    assert server.stats.closes[1002] == 20
    assert found < 20, f"{found} unreachable objects after 20 protocol violations"


async def test_keepalive_pings_every_connection_once_per_interval():
    # Regression (found by bench/capacity.py): each slice of a round was cut
    # from what was left of it, so slices shrank, a round outlasted its
    # interval, and 1,000 connections were pinged about a third as often as
    # asked. Here the keepalive round itself, over three intervals.
    from types import SimpleNamespace

    from mailpush.metrics import Stats
    from mailpush.timers import KEEPALIVE_SLICES, _KeepaliveRound

    class Conn:
        is_open, pong_overdue, expires = True, False, 0

        def __init__(self) -> None:
            self.pings = 0

        def ping(self) -> bool:
            self.pings += 1
            return True

    conns = [Conn() for _ in range(1000)]
    timers = SimpleNamespace(stats=Stats(), connections=conns, config=SimpleNamespace(pong_timeout=100.0), log=None)
    interval = 1.0
    tick = interval / KEEPALIVE_SLICES
    keepalive = _KeepaliveRound(timers, interval, tick)
    now = trio.current_time()
    for i in range(4 * KEEPALIVE_SLICES):  # the first round starts one interval in
        keepalive.tick(now + i * tick, 0.0)
    assert sorted({c.pings for c in conns}) == [3], sorted({c.pings for c in conns})
