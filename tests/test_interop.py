"""The interop matrix: four independent WebSocket clients against a real
mailpush process (``mailpush serve`` on the embedded bus, loopback only).

The clients: trio-websocket and the ``websockets`` library (each in a
process of its own, tests/interop/py_client.py), Node.js ``ws``
(tests/interop/ws_client.mjs) and headless Chromium (a page's
``new WebSocket``, driven over the DevTools protocol). The three client
processes speak one line protocol (ws_client.mjs's header); the page keeps
the same records in ``window.mp.log``.

Each client, one test id per behaviour:

- the life of a tab: upgrade, subscribe, the events published through the
  admin API (content, order, offsets; a 16-bit and a 64-bit frame length,
  non-ASCII text, a burst in one publish) and nobody else's, the server's keepalive pings answered
  over several ping intervals while the client says nothing else (the
  server sent the pings, closed nothing for a missed pong, and the
  connection still delivers), then a client-initiated close 1000 that the
  server answers with 1000, after which the server holds nothing of it;
- the abnormal end: the client process SIGKILLed (the whole browser for
  Chromium) mid-connection, events still published to it: the server lets
  go of everything (connections, sockets and subscribers gauges, and its
  open file descriptors in /proc/PID/fd, back to their baselines) because
  it saw the peer go, not because keepalive timed it out.

A control (a raw client that never answers pings is closed 1001) shows the
keepalive check can fail. A missing node, ``ws`` package or Chromium fails
the test naming the make target that installs it (``make test`` runs
both): nothing here is skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

import pytest

from conftest import RawClient, _drain, close_code, server_process, token
from devtools import CHROMIUM, chromium_process, open_tab
from test_browser import publish
from test_workers import metric

INTEROP = Path(__file__).parent / "interop"
NODE = shutil.which("node")
NODE_CLIENT = INTEROP / "ws_client.mjs"
PY_CLIENT = INTEROP / "py_client.py"
CLIENTS = ["trio-websocket", "websockets", "node-ws", "chromium"]

# Events published in one request, each a little larger than the last.
BURST = 40
# Keepalive as short as keeps a loaded 2-core machine honest: a pong has
# half a second (a loopback round trip takes well under a millisecond).
PING_INTERVAL = 0.5
PONG_TIMEOUT = 0.5
# The client says nothing for this long: five ping intervals.
SILENCE = 5 * PING_INTERVAL
# Pings the server must have sent in SILENCE (one interval of slack).
MIN_PINGS = 4
# How long one expected message, open or close may take (a loaded machine).
EVENT_TIMEOUT = 10.0
# How long the server may take to let go of a closed or killed client.
RELEASE_TIMEOUT = 5.0
# The descriptor count is "settled" once it has not changed for this long.
FD_SETTLE = 0.2

IDLE = {"mailpush_connections": 0, "mailpush_sockets": 0, "mailpush_subscribers": 0}
CONNECTED = {"mailpush_connections": 1, "mailpush_sockets": 1, "mailpush_subscribers": 1}


# -- the server ------------------------------------------------------------------


class MailpushProcess:
    def __init__(self, proc: subprocess.Popen, listen: tuple[str, int], admin: tuple[str, int]) -> None:
        self.proc = proc
        self.listen = listen
        self.admin_address = admin
        self.admin = f"{admin[0]}:{admin[1]}"

    def url(self, subscriber: str) -> str:
        return f"ws://{self.listen[0]}:{self.listen[1]}/v1/ws?token={token(subscriber)}"

    def metric(self, name: str) -> float:
        """A sample of /metrics; 0 for a labelled counter not yet sampled."""
        try:
            return metric(self.admin, name)
        except StopIteration:
            return 0.0

    def gauges(self) -> dict[str, float]:
        return {name: self.metric(name) for name in IDLE}

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def settled_fds(self) -> int:
        """The open descriptor count once it stops moving (an admin request
        just answered may still hold one for a moment)."""
        deadline = time.monotonic() + RELEASE_TIMEOUT
        last, since = self.fds(), time.monotonic()
        while time.monotonic() - since < FD_SETTLE:
            assert time.monotonic() < deadline, "the server's descriptor count did not settle"
            time.sleep(0.02)
            now = self.fds()
            if now != last:
                last, since = now, time.monotonic()
        return last

    def log_tail(self) -> str:
        return b"".join(self.proc.log_lines[-10:]).decode(errors="replace")  # type: ignore[attr-defined]


@pytest.fixture
def server():
    with server_process("--ping-interval", str(PING_INTERVAL), "--pong-timeout", str(PONG_TIMEOUT)) as (
        proc,
        listen,
        admin,
    ):
        yield MailpushProcess(proc, listen, admin)


def wait_until(condition, what: str, timeout: float = RELEASE_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def publish_event(server: MailpushProcess, subscriber: str, event: str, data: dict) -> None:
    publish(server.admin_address, {"subscriber": subscriber, "event": event, "data": data})


def publish_items(server: MailpushProcess, items: list[dict]) -> None:
    """Publish ``items`` in one request (a JSON array)."""
    req = urllib.request.Request(f"http://{server.admin}/v1/publish", data=json.dumps(items).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202
        assert json.load(r) == {"accepted": len(items)}


# -- the clients -----------------------------------------------------------------


class LineClient:
    """A client process speaking ws_client.mjs's line protocol."""

    def __init__(self, kind: str, cmd: list[str]) -> None:
        self.kind = kind
        self.pings = 0  # server pings the client reported (only node's ws can)
        self.stderr: list[bytes] = []
        self.records: queue.Queue[dict] = queue.Queue()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=_drain, args=(self.proc.stderr, self.stderr), daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                try:
                    self.records.put(json.loads(line))
                except ValueError:
                    self.records.put({"kind": "garbage", "line": line.decode(errors="replace")})
        except (OSError, ValueError):
            pass  # closed by shutdown()
        self.records.put({"kind": "exit"})

    def _poll(self, timeout: float) -> dict | None:
        try:
            return self.records.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None

    def _command(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()

    def send(self, text: str) -> None:
        self._command({"send": text})

    def start_close(self, code: int) -> None:
        self._command({"close": code})

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait(10)

    def exited(self) -> int:
        return self.proc.wait(EVENT_TIMEOUT)

    def diagnostics(self) -> str:
        return f"exit status {self.proc.poll()}, stderr: {b''.join(self.stderr).decode(errors='replace')[-1500:]}"

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                f.close()


# The page's client: the same records as ws_client.mjs, kept in window.mp.log.
PAGE_CLIENT = """
window.mp = {log: [], ws: new WebSocket(%s)};
mp.ws.onopen = () => mp.log.push({kind: "open"});
mp.ws.onmessage = (m) => mp.log.push(typeof m.data === "string"
  ? {kind: "message", binary: false, text: m.data} : {kind: "message", binary: true, text: null});
mp.ws.onerror = () => mp.log.push({kind: "error", message: "error event"});
mp.ws.onclose = (e) => mp.log.push({kind: "close", code: e.code, reason: e.reason, wasClean: e.wasClean});
true
"""


class BrowserClient:
    """Headless Chromium: an about:blank page whose JS opens the WebSocket."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.kind = "chromium"
        self.pings = 0  # a page cannot see pings (the browser answers them)
        self.stack = contextlib.ExitStack()
        self.proc, devtools = self.stack.enter_context(chromium_process(tmp_path))
        self.tab = self.stack.enter_context(open_tab(devtools, "about:blank"))
        self.tab.evaluate(PAGE_CLIENT % json.dumps(url))
        self.seen = 0
        self.buffered: deque[dict] = deque()
        self.killed = False

    def _poll(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while not self.buffered:
            new = json.loads(self.tab.evaluate(f"JSON.stringify(mp.log.slice({self.seen}))"))
            self.seen += len(new)
            self.buffered.extend(new)
            if self.buffered or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return self.buffered.popleft() if self.buffered else None

    def send(self, text: str) -> None:
        self.tab.evaluate(f"mp.ws.send({json.dumps(text)}); true")

    def start_close(self, code: int) -> None:
        self.tab.evaluate(f"mp.ws.close({code}); true")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the browser and every process of it
        self.proc.wait(10)
        self.killed = True

    def exited(self) -> int:
        return 0  # the page outlives its WebSocket

    def diagnostics(self) -> str:
        if self.killed:
            return "the browser was killed"
        return "page log: " + self.tab.evaluate("JSON.stringify(mp.log)")

    def shutdown(self) -> None:
        try:
            self.stack.close()
        except Exception:
            # After a kill the DevTools socket is gone: nothing left to close.
            if not self.killed:
                raise


Client = LineClient | BrowserClient


def next_record(client: Client, timeout: float = EVENT_TIMEOUT) -> dict:
    """The client's next record but pings (counted in ``client.pings``)."""
    deadline = time.monotonic() + timeout
    while True:
        record = client._poll(deadline - time.monotonic())
        if record is None:
            raise AssertionError(f"{client.kind}: nothing within {timeout} s; {client.diagnostics()}")
        if record["kind"] == "ping":
            client.pings += 1
            continue
        return record


def records_for(client: Client, seconds: float) -> list[dict]:
    """Everything but pings the client reports within ``seconds``."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        record = client._poll(min(left, 0.1))
        if record is None:
            continue
        if record["kind"] == "ping":
            client.pings += 1
        else:
            got.append(record)
    return got


def expect_open(client: Client) -> None:
    record = next_record(client)
    assert record == {"kind": "open"}, f"{client.kind}: {record}; {client.diagnostics()}"


def expect_packet(client: Client) -> dict:
    record = next_record(client)
    assert record["kind"] == "message" and not record["binary"], f"{client.kind}: {record}"
    return json.loads(record["text"])


def require(kind: str) -> None:
    """A missing client fails the test, naming what installs it."""
    if kind == "node-ws":
        if NODE is None:
            pytest.fail(
                "node (Node.js) is not installed: run `make system-deps` and `make node-deps` (make test runs"
                " both; where system-deps does not provide node: apt-get install nodejs npm)"
            )
        if not (INTEROP / "node_modules" / "ws").is_dir():
            pytest.fail(
                "the Node.js ws package is not installed in tests/interop: run `make node-deps` (make test runs it)"
            )
    elif kind == "chromium" and CHROMIUM is None:
        pytest.fail("chromium is not installed: run `make system-deps` (make test runs it)")


@pytest.fixture
def start_client(tmp_path):
    """``start_client(kind, url)`` → a connected-or-connecting client; every
    one is shut down (killed if still running) after the test."""
    started: list[Client] = []

    def start(kind: str, url: str) -> Client:
        require(kind)
        if kind == "node-ws":
            client: Client = LineClient(kind, [NODE, str(NODE_CLIENT), url])
        elif kind == "chromium":
            client = BrowserClient(tmp_path, url)
        else:
            client = LineClient(kind, [sys.executable, str(PY_CLIENT), kind, url])
        started.append(client)
        return client

    yield start
    for client in started:
        client.shutdown()


# What this matrix checks of an event (the offsets separately); other
# fields are the protocol tests' business.
EVENT_FIELDS = ("type", "subscriber", "event", "data")


def pick(packet: dict, *keys: str) -> dict:
    return {k: packet.get(k) for k in keys}


def connect_and_subscribe(server: MailpushProcess, client: Client, subscriber: str) -> dict:
    expect_open(client)
    wait_until(lambda: server.metric("mailpush_connections") == 1, "the server to count the connection")
    client.send(json.dumps({"type": "subscribe"}))
    reply = expect_packet(client)
    expected = {"type": "subscribed", "subscriber": subscriber, "events": ["*"]}
    assert pick(reply, *expected) == expected
    assert server.gauges() == CONNECTED
    return reply


# -- the matrix ------------------------------------------------------------------


@pytest.mark.parametrize("kind", CLIENTS)
def test_subscribe_events_pings_and_clean_close(kind, server, start_client) -> None:
    me, other = f"{kind}@example.com", f"not-{kind}@example.com"
    assert server.gauges() == IDLE
    fds = server.settled_fds()
    client = start_client(kind, server.url(me))
    subscribed = connect_and_subscribe(server, client, me)

    # Events, in order, with their content intact; another subscriber's
    # event between them reaches nobody here.
    mine = [
        ("new_letter", {"id": 1, "subject": "héllo ✉ 𝄞", "from": "bob@example.com"}),  # non-ASCII, astral
        ("folder_changed", {"id": 2, "body": "x" * 1000}),  # a 16-bit frame length
        ("new_letter", {"id": 3, "blob": "y" * 70_000}),  # a 64-bit frame length
    ]
    for i, (event, data) in enumerate(mine):
        publish_event(server, me, event, data)
        if i == 0:
            publish_event(server, other, "new_letter", {"id": "not yours"})
    # Then a burst in one publish (a JSON array), in its order.
    burst = [("new_letter", {"id": f"burst-{i}", "pad": "b" * (i * 97)}) for i in range(BURST)]
    publish_items(server, [{"subscriber": me, "event": event, "data": data} for event, data in burst])
    mine += burst
    got = [expect_packet(client) for _ in mine]
    assert [pick(p, *EVENT_FIELDS) for p in got] == [
        {"type": "event", "subscriber": me, "event": event, "data": data} for event, data in mine
    ]
    offsets = [subscribed["offset"]] + [p["offset"] for p in got]
    assert all(a < b for a, b in itertools.pairwise(offsets)), offsets

    # Keepalive: the client says nothing for several ping intervals; the
    # pongs its library or browser answers with are all the server hears.
    pings, pong_timeouts = server.metric("mailpush_pings_total"), server.metric("mailpush_pong_timeouts_total")
    quiet = records_for(client, SILENCE)
    assert quiet == [], f"{kind} got something while silent (another's event, or a close for a missed pong)"
    sent = server.metric("mailpush_pings_total") - pings
    assert sent >= MIN_PINGS, f"the server sent {sent} pings in {SILENCE} s (interval {PING_INTERVAL} s)"
    assert server.metric("mailpush_pong_timeouts_total") == pong_timeouts
    assert server.gauges() == CONNECTED
    if kind == "node-ws":  # the one client that can see them
        assert client.pings >= MIN_PINGS
    # Still alive both ways after the silence.
    publish_event(server, me, "new_letter", {"id": 4})
    expected = {"type": "event", "subscriber": me, "event": "new_letter", "data": {"id": 4}}
    assert pick(expect_packet(client), *EVENT_FIELDS) == expected
    client.send(json.dumps({"type": "ping"}))
    assert expect_packet(client) == {"type": "pong"}

    # A clean close: the client's 1000 is answered with 1000, and the
    # server holds nothing of the connection afterwards.
    closes = server.metric('mailpush_closes_total{code="1000"}')
    client.start_close(1000)
    record = next_record(client)
    assert record["kind"] == "close" and record["code"] == 1000, f"{kind}: {record}"
    if kind == "chromium":
        assert record["wasClean"] is True
    assert client.exited() == 0
    wait_until(lambda: server.gauges() == IDLE, f"the server to let go of the connection: {server.gauges()}")
    assert server.metric('mailpush_closes_total{code="1000"}') == closes + 1
    wait_until(lambda: server.fds() == fds, f"the server's descriptors back at {fds}: {server.fds()}")
    assert server.metric("mailpush_internal_errors_total") == 0, server.log_tail()


@pytest.mark.parametrize("kind", CLIENTS)
def test_killed_client_leaves_nothing_behind(kind, server, start_client) -> None:
    me = f"{kind}@example.com"
    assert server.gauges() == IDLE
    fds = server.settled_fds()
    client = start_client(kind, server.url(me))
    connect_and_subscribe(server, client, me)
    publish_event(server, me, "new_letter", {"id": 1})
    expected = {"type": "event", "subscriber": me, "event": "new_letter", "data": {"id": 1}}
    assert pick(expect_packet(client), *EVENT_FIELDS) == expected
    # The connection is one descriptor of the server's: what must go.
    assert server.settled_fds() == fds + 1
    pong_timeouts = server.metric("mailpush_pong_timeouts_total")

    client.kill()
    # Events still on their way to the dead client: sending them must fail
    # quietly, not hold anything.
    for i in range(2, 5):
        publish_event(server, me, "new_letter", {"id": i, "pad": "z" * 20_000})

    wait_until(lambda: server.gauges() == IDLE, f"the server to let go of the killed client: {server.gauges()}")
    wait_until(lambda: server.fds() == fds, f"the server's descriptors back at {fds}: {server.fds()}")
    # It noticed the peer go; keepalive did not have to time it out.
    assert server.metric("mailpush_pong_timeouts_total") == pong_timeouts
    assert server.metric("mailpush_internal_errors_total") == 0, server.log_tail()
    assert server.proc.poll() is None


def test_control_a_client_that_never_answers_pings_is_closed(server) -> None:
    """The keepalive check above can fail: a raw client that reads but never
    answers the server's pings is closed 1001 within a few ping intervals."""
    raw = RawClient(server.listen)
    try:
        head = raw.upgrade("/v1/ws?token=" + token("mute@example.com"))
        assert head.startswith(b"HTTP/1.1 101")
        wait_until(lambda: server.metric("mailpush_connections") == 1, "the server to count the connection")
        t0, pings = time.monotonic(), 0
        while (frame := raw.read_frame())[0] == 0x9:
            pings += 1
        op, payload = frame
        assert op == 0x8 and close_code(payload) == 1001, frame
        assert pings >= 1 and time.monotonic() - t0 < 3 * (PING_INTERVAL + PONG_TIMEOUT)
        assert server.metric("mailpush_pong_timeouts_total") == 1
        wait_until(lambda: server.gauges() == IDLE, "the server to let go of the mute client")
    finally:
        raw.close()
