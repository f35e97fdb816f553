"""The C fan-out path (mailpush._speedups) against its Python twins: every
function gives what the Python code gives, for generated input and for the
cases the C code hands back (strings that need escaping, dicts as data,
tabs that are not plain Connections, full sockets, closed peers).

The extension must be built here: without a C compiler the install falls
back to the Python twins silently, and this suite says so instead."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections import OrderedDict

import msgspec
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_config, server_process, token
from mailpush import dispatch, history, items, packets
from mailpush.bus import EmbeddedBus
from mailpush.connection import CLOSED, Connection
from mailpush.dispatch import DELIVERIES_PER_CHECKPOINT, Dispatcher
from mailpush.frames import encode_text
from mailpush.history import History, record
from mailpush.metrics import Stats
from mailpush.packets import ALL_EVENTS, _encode, _OffsetEvent
from mailpush.recovery import _Resume
from mailpush.registry import Registry
from mailpush.server import Server
from mailpush.speedups import C
from mailpush.testing import FakeBus

pytestmark = pytest.mark.skipif(
    os.environ.get("MAILPUSH_SPEEDUPS", "1").strip() == "0", reason="MAILPUSH_SPEEDUPS=0: the C path is off"
)


def test_the_extension_is_built():
    assert C is not None, (
        "mailpush._speedups is not built: install a C compiler and Python's headers "
        "(gcc, python3-dev; `make system-deps` does) and reinstall (`make venv`)"
    )
    assert packets._c_event_frame is C.event_frame
    assert history._c_record_loop is C.record_loop
    assert dispatch._c_deliver_run is C.deliver_run


# -- event frames ---------------------------------------------------------------

json_objects = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
).map(lambda v: {"v": v})


def python_frame(sub, event, data, offset) -> bytes:
    return encode_text(_encode(_OffsetEvent(sub, event, data, offset)))


@settings(max_examples=400, deadline=None)
@given(
    sub=st.text(max_size=40),
    event=st.text(max_size=20),
    obj=json_objects,
    offset=st.integers(0, 2**70),
    pad=st.integers(0, 70_000),
)
def test_an_event_frame_is_the_one_msgspec_builds(sub, event, obj, offset, pad):
    data = msgspec.Raw(json.dumps({**obj, "pad": "x" * (pad if pad > 60_000 else pad % 300)}).encode())
    got = C.event_frame(sub, event, data, offset)
    want = python_frame(sub, event, data, offset)
    plain = all(0x20 <= ord(c) < 0x80 and c not in '"\\' for c in sub + event)
    if plain and offset < 2**63:
        assert got == want  # the common case is done in C
    else:
        assert got is None or got == want
    assert packets.event_frame(sub, event, data, offset) == want


def test_every_ascii_character_at_every_place_is_judged_as_json_would():
    """build_frame checks eight bytes at a time for characters JSON must
    escape (controls, '"', '\\'): each ASCII character, at each place of
    ids up to 17 long (two words and a padded tail), in the subscriber and
    in the event name, is either done in C exactly as msgspec writes it, or
    left to Python when it needs escaping."""
    raw = msgspec.Raw(b"{}")
    for n in range(1, 18):
        for at in range(n):
            for c in map(chr, range(128)):
                s = "a" * at + c + "b" * (n - at - 1)
                plain = c >= " " and c not in '"\\'
                for sub, event in ((s, "e"), ("u", s)):
                    got = C.event_frame(sub, event, raw, 9)
                    if plain:
                        assert got == python_frame(sub, event, raw, 9), (sub, event)
                    else:
                        assert got is None, (sub, event)


def test_frames_of_every_length_class_and_the_cases_left_to_python():
    for n in (0, 50, 125, 126, 127, 65535, 65536, 70_000):
        data = msgspec.Raw(b'{"p":"' + b"x" * n + b'"}')
        assert C.event_frame("u", "e", data, 7) == python_frame("u", "e", data, 7)
    raw = msgspec.Raw(b"{}")
    assert C.event_frame("u", "e", {"a": 1}, 1) is None  # a dict: msgspec encodes it
    assert C.event_frame('u"', "e", raw, 1) is None  # needs escaping
    assert C.event_frame("é", "e", raw, 1) is None  # not ASCII
    assert C.event_frame("u", "e", raw, None) is None
    assert C.event_frame("u", "e", raw, 2**64) is None


# -- publish items -----------------------------------------------------------------

item_values = st.fixed_dictionaries(
    {"subscriber": st.text(min_size=1, max_size=12), "event": st.sampled_from(["new", "moved", ALL_EVENTS])},
    optional={
        "data": st.one_of(
            st.none(), json_objects, st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)
        ),
        "state": st.one_of(st.none(), st.text(max_size=6), json_objects, st.integers(), st.booleans()),
    },
)


@settings(max_examples=400, deadline=None)
@given(batch=st.lists(item_values, min_size=1, max_size=8))
def test_publish_items_are_the_python_ones(batch):
    try:
        decoded = items._decode_batch(json.dumps(batch).encode())
    except msgspec.ValidationError:
        return  # refused before either loop
    want = items._py_fast_items(decoded)
    got = C.fast_items(decoded, ALL_EVENTS, items._EMPTY)
    if want is None:
        assert got is None
    else:
        assert got == want
        assert all(type(t) is tuple and len(t) == 4 for t in got)


def test_items_of_one_publish_share_each_event_name():
    """An item naming the same event as the one before it shares its string
    (and skips the checks that one passed); another name is its own."""
    body = json.dumps([{"subscriber": f"s{i}", "event": e} for i, e in enumerate(["new", "new", "moved", "new", "new"])])
    got = C.fast_items(items._decode_batch(body.encode()), ALL_EVENTS, items._EMPTY)
    assert [t[1] for t in got] == ["new", "new", "moved", "new", "new"]
    assert got[0][1] is got[1][1] and got[3][1] is got[4][1] and got[2][1] is not got[1][1]
    star = json.dumps([{"subscriber": "a", "event": "new"}, {"subscriber": "b", "event": ALL_EVENTS}])
    assert C.fast_items(items._decode_batch(star.encode()), ALL_EVENTS, items._EMPTY) is None


# -- the history -------------------------------------------------------------------


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_of(h: History) -> tuple:
    return (
        h.top,
        h.events,
        h._floor,
        list(h._dropped.items()),
        [(sub, list(s.entries), s.floor, s.state) for sub, s in h._streams.items()],
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 4),
    max_events=st.integers(1, 12),
    batches=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c", "d", "é", 'q"']),
                st.booleans(),
                st.one_of(st.none(), st.just(msgspec.Raw(b'"s"'))),
            ),
            max_size=10,
        ),
        max_size=8,
    ),
)
def test_recording_in_c_is_recording_in_python(size, max_events, batches):
    clock = Clock()
    fast, slow = History(size, 60, max_events, clock), History(size, 60, max_events, clock)
    slow.epoch = fast.epoch
    for k, batch in enumerate(batches):
        clock.now += 7  # some streams expire (ttl 60) and come back from the dropped map
        batch_items = [
            (sub, f"e{k}", msgspec.Raw(b'{"k":%d}' % k) if raw else {"k": k}, state) for sub, raw, state in batch
        ]
        got = record(fast, batch_items)
        saved, history._c_record_loop = history._c_record_loop, None
        try:
            want = record(slow, tuple(batch_items))  # a tuple too: the loop takes any sequence
        finally:
            history._c_record_loop = saved
        assert got == want
        assert state_of(fast) == state_of(slow)


def test_a_bad_item_is_a_type_error_not_a_crash():
    h = History(4, 60, 100)
    with pytest.raises(TypeError):
        C.record_loop(
            [("a", "e", {})], h._streams, h._streams.move_to_end, OrderedDict(), 0, 4, 0, 1.0, "x", 0, object, None
        )


# -- the dispatcher ---------------------------------------------------------------


async def turns_beside(nursery: trio.Nursery, work) -> int:
    """Await ``work`` (a coroutine) with another task beside it; the turns
    that task got meanwhile (a delivery that never checkpoints gives none)."""
    ticks = 0

    async def beside():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    nursery.start_soon(beside)
    await trio.lowlevel.checkpoint()
    before = ticks
    await work
    return ticks - before


async def deliver_scenario(use_c: bool) -> dict:
    """One fan-out through real Connections on socketpairs: one tab, two
    tabs (one filtered), twenty tabs (the registry's dict), a closed tab, a
    tab whose peer is gone, a tab whose socket fills (a writer takes the
    rest), a subscriber nobody has, an item without its frame, a tab that
    is not a Connection."""
    saved = dispatch._c_deliver_run
    dispatch._c_deliver_run = C.deliver_run if use_c else None
    try:
        async with trio.open_nursery() as nursery:
            ctx = Server(make_config(), EmbeddedBus()).ctx
            ctx.nursery = nursery
            registry = Registry()
            peers: dict[str, socket.socket] = {}
            conns: dict[str, Connection] = {}

            def tab(name: str, sub: str, events=None, sndbuf: int | None = None) -> Connection:
                a, b = socket.socketpair()
                if sndbuf:
                    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                a.setblocking(False)
                b.setblocking(False)
                conn = Connection(a, ctx, sub, events)
                registry.add(conn)
                peers[name], conns[name] = b, conn
                return conn

            class Other:
                subscriber, expires, events = "other", 0, None

                def __init__(self):
                    self.frames = []

                def send(self, frame):
                    self.frames.append(frame)
                    return True

            tab("one", "u1")
            tab("two-all", "u2")
            tab("two-x", "u2", frozenset({"x"}))
            for i in range(20):
                tab(f"many{i}", "crowd")
            for i in range(600):  # more than a checkpoint's worth of one subscriber's tabs
                tab(f"wall{i}", "wall")
            tab("closed", "u3").abort()
            tab("gone", "u4")
            peers["gone"].close()
            tab("full", "u5", sndbuf=4096)
            other = Other()
            registry.add(other)
            stats = Stats()
            d = Dispatcher(registry, FakeBus(), stats, Connection)
            resume = _Resume(None, False)
            d.recovery.resuming[conns["wall7"]] = resume  # being caught up: its frames are held back
            h = History(10, 60, 10_000)
            batch = record(
                h,
                [("u1", "x", msgspec.Raw(b'{"n":1}'), None)]
                + [("u2", e, msgspec.Raw(b'{"n":2}'), None) for e in ("x", "y")]
                + [("crowd", "x", {"n": 3}, None), ("nobody", "x", msgspec.Raw(b"{}"), None)]
                + [("wall", "x", msgspec.Raw(b'{"n":4}'), None), ("wall", "x", msgspec.Raw(b'{"n":5}'), None)]
                + [("u3", "x", msgspec.Raw(b"{}"), None), ("u4", "x", msgspec.Raw(b"{}"), None)]
                + [("u5", "x", msgspec.Raw(b'{"p":"' + b"y" * 3000 + b'"}'), None) for _ in range(15)]
                + [("other", "x", msgspec.Raw(b"{}"), None)],
            )
            batch.insert(1, ("u1", "late", {"n": 0}, 99, h.epoch, None))  # no frame yet
            ran_beside = await turns_beside(nursery, d.deliver(batch))
            writers = ctx.stats.writers
            received = {}
            for name, b in peers.items():
                if name == "gone":
                    continue
                chunks = []
                with trio.move_on_after(5):
                    while True:
                        try:
                            chunk = b.recv(1 << 20)
                        except BlockingIOError:
                            if conns[name].queue is None:
                                break  # all of it (a writer, if any, is done)
                            await trio.sleep(0.001)
                            continue
                        if not chunk:
                            break
                        chunks.append(chunk)
                        await trio.lowlevel.checkpoint()  # a writer may be waiting for room
                received[name] = b"".join(chunks)
            out = {
                "received": received,
                "other": other.frames,
                "counts": (stats.received, stats.delivered, stats.dropped, stats.bad_items),
                "writers": writers,
                "ran_beside": ran_beside,
                "states": {name: c.state for name, c in conns.items()},
                "held": [json.loads(f[2:])["data"] for _, f in resume.held],
            }
            for c in conns.values():
                c.abort()
            nursery.cancel_scope.cancel()
        return out
    finally:
        dispatch._c_deliver_run = saved


async def test_delivering_in_c_is_delivering_in_python():
    fast = await deliver_scenario(True)
    slow = await deliver_scenario(False)

    # the offsets and epochs differ between the two runs: compare frames by their packets
    def packets_of(data: bytes) -> list:
        out, i = [], 0
        while i < len(data):
            n = data[i + 1]
            head = 2 if n < 126 else 4
            if n == 126:
                n = int.from_bytes(data[i + 2 : i + 4], "big")
            p = json.loads(data[i + head : i + head + n])
            p.pop("offset", None)
            out.append(p)
            i += head + n
        return out

    assert {k: packets_of(v) for k, v in fast["received"].items()} == {
        k: packets_of(v) for k, v in slow["received"].items()
    }
    assert fast["counts"] == slow["counts"]
    assert fast["states"] == slow["states"]
    assert fast["writers"] == slow["writers"] >= 1  # the full socket got a writer
    assert len(fast["other"]) == len(slow["other"]) == 1
    got = {k: packets_of(v) for k, v in fast["received"].items()}
    assert [p["event"] for p in got["one"]] == ["x", "late"]
    assert len(got["two-all"]) == 2 and len(got["two-x"]) == 1
    assert all(len(got[f"many{i}"]) == 1 for i in range(20))
    assert got["closed"] == [] and fast["states"]["gone"] == CLOSED
    assert len(got["full"]) == 15 and fast["states"]["full"] != CLOSED
    assert all(len(got[f"wall{i}"]) == (0 if i == 7 else 2) for i in range(600))
    assert fast["held"] == slow["held"] == [{"n": 4}, {"n": 5}]  # the tab being caught up gets them later
    assert fast["ran_beside"] >= 2 and slow["ran_beside"] >= 2  # checkpoints inside the wall's tabs too
    # received: every item; delivered: one (2), two (2 + 1), the crowd, full, other; dropped: nobody
    assert fast["counts"] == (26, 2 + 3 + 20 + 2 * 599 + 15 + 1, 1, 0)


async def test_a_large_fan_out_in_c_lets_the_rest_of_the_server_run():
    async with trio.open_nursery() as nursery:
        ctx = Server(make_config(), EmbeddedBus()).ctx
        ctx.nursery = nursery
        registry, pairs = Registry(), []
        for i in range(4 * DELIVERIES_PER_CHECKPOINT):
            a, b = socket.socketpair()
            a.setblocking(False)
            pairs.append((a, b))
            registry.add(Connection(a, ctx, f"s{i}"))
        batch = record(History(10, 60, 100_000), [(f"s{i}", "x", msgspec.Raw(b"{}"), None) for i in range(len(pairs))])
        stats = Stats()
        ran = await turns_beside(nursery, Dispatcher(registry, FakeBus(), stats, Connection).deliver(batch))
        assert stats.delivered == len(pairs)
        assert ran >= 2  # it ran between the checkpoints
        nursery.cancel_scope.cancel()
    for a, b in pairs:
        a.close()
        b.close()


async def test_a_tab_whose_send_raises_loses_its_item_only():
    class Bad:
        subscriber, expires, events = "bad", 0, None

        def send(self, frame):
            raise RuntimeError("boom")

    class Good:
        subscriber, expires, events = "good", 0, None
        frames: list = []

        def send(self, frame):
            self.frames.append(frame)
            return True

    registry = Registry()
    registry.add(Bad())
    good = Good()
    registry.add(good)
    stats = Stats()
    batch = record(History(10, 60, 100), [(s, "x", msgspec.Raw(b"{}"), None) for s in ("bad", "good", "bad", "good")])
    await Dispatcher(registry, FakeBus(), stats).deliver(batch)
    assert len(good.frames) == 2
    assert (stats.delivered, stats.bad_items) == (2, 2)


# -- the server without it -----------------------------------------------------------


def test_the_server_without_the_extension_delivers_the_same():
    """MAILPUSH_SPEEDUPS=0: the Python twins serve a fan-out end to end."""
    from websockets.sync.client import connect

    env = {**os.environ, "MAILPUSH_SPEEDUPS": "0"}
    with server_process(env=env) as (proc, listen, admin):
        check = subprocess.run(
            [sys.executable, "-c", "from mailpush.speedups import C; print(C)"], env=env, capture_output=True, text=True
        )
        assert check.stdout.strip() == "None"
        host, port = listen
        with contextlib.ExitStack() as stack:
            tabs = [stack.enter_context(connect(f"ws://{host}:{port}/v1/ws?token={token(f'w{i}')}")) for i in range(3)]
            for t in tabs:
                t.send(json.dumps({"type": "subscribe"}))
                assert json.loads(t.recv(timeout=5))["type"] == "subscribed"
            body = json.dumps([{"subscriber": f"w{i}", "event": "new", "data": {"i": i}} for i in range(3)]).encode()
            req = urllib.request.Request(f"http://{admin[0]}:{admin[1]}/v1/publish", data=body, method="POST")
            assert urllib.request.urlopen(req, timeout=5).status == 202
            for i, t in enumerate(tabs):
                p = json.loads(t.recv(timeout=5))
                assert (p["type"], p["subscriber"], p["data"]) == ("event", f"w{i}", {"i": i})


# -- the upgrade request's head -----------------------------------------------------------

_NAMES = [
    b"Host",
    b"host",
    b"Upgrade",
    b"Connection",
    b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version",
    b"Cookie",
    b"Authorization",
    b"Origin",
    b"Sec-WebSocket-Protocol",
    b"Last-Event-ID",
    b"User-Agent",
    b"X-Y",
    b" Host",
    b"Host ",
    b"",
    b"UPGRADE",
    b"x" * 70,
]
_VALUE_BYTES = st.sampled_from(
    [
        b"websocket",
        b"WebSocket",
        b"upgrade",
        b"keep-alive",
        b",",
        b" ",
        b"\t",
        b"\x0b",
        b"a=1",
        b"\xe9",
        b"13",
        b"dGhlIHNhbXBsZSBub25jZQ==",
        b"\r",
        b"\n",
        b"\0",
        b":",
    ]
)
_LINES = st.sampled_from(
    [
        b"GET /v1/ws?token=t HTTP/1.1",
        b"GET / HTTP/1.0",
        b"POST /x HTTP/1.1",
        b"GET  / HTTP/1.1",
        b"GET /a HTTP/2.0",
        b"G@T / HTTP/1.1",
        b"GET x HTTP/1.1",
        b"GET /\x7f HTTP/1.1",
        b"GET / HTTP/1.1 x",
        b" / HTTP/1.1",
        b"GET /?a?b HTTP/1.1",
        b"GET",
    ]
)


@settings(max_examples=1500, deadline=None)
@given(
    line=_LINES,
    headers=st.lists(st.tuples(st.sampled_from(_NAMES), st.lists(_VALUE_BYTES, max_size=4).map(b"".join)), max_size=12),
    sep=st.sampled_from([b": ", b":", b" : ", b""]),
    end=st.sampled_from([b"\r\n\r\n", b"\r\n", b""]),
)
def test_a_request_head_parses_as_the_python_parser_parses_it(line, headers, sep, end):
    from mailpush import handshake as hs
    from mailpush.errors import HandshakeError

    head = b"\r\n".join([line, *(name + sep + value for name, value in headers)]) + end
    got = C.parse_request(head, hs.Request, hs._FIELDS)
    saved, hs._c_parse_request = hs._c_parse_request, None
    try:
        want = hs.parse_request(head)
    except HandshakeError:
        assert got is None  # refused: the Python parser says why
        return
    finally:
        hs._c_parse_request = saved
    plain = all(
        b"\r" not in v and b"\n" not in v and b"\0" not in v and n not in (b"", b" Host", b"Host ") for n, v in headers
    )
    if plain and sep != b"" and line.startswith(b"GET /") and line.count(b" ") == 2:
        assert got is not None  # the common case is done in C (unless a duplicate Host or key sends it back)
    if got is not None:
        assert {k: getattr(got, k) for k in hs.Request.__slots__} == {k: getattr(want, k) for k in hs.Request.__slots__}


def test_a_fields_table_it_cannot_hold_is_looked_up_line_by_line():
    """parse_request keeps the header names of the ``fields`` it is given in
    a table of its own; a dict it cannot hold there (a key that is not
    bytes) is looked up line by line, with the same result, and the next
    call with handshake.py's own dict uses the table again."""
    from mailpush import handshake as hs

    head = (
        b"GET /v1/ws?token=t HTTP/1.1\r\nHOST: a\r\nupgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: a=1\r\nCookie: b=2\r\nX-Other: 1\r\n\r\n"
    )
    fields = lambda r: {k: getattr(r, k) for k in hs.Request.__slots__}  # noqa: E731
    table = fields(C.parse_request(head, hs.Request, hs._FIELDS))
    odd = fields(C.parse_request(head, hs.Request, {**hs._FIELDS, "not bytes": 1 << 20}))
    assert odd == table and table["cookie"] == "a=1; b=2" and table["upgrade"] and table["connection_upgrade"]
    assert fields(C.parse_request(head, hs.Request, hs._FIELDS)) == table


def test_the_header_bits_are_handshake_pys():
    from mailpush import handshake as hs

    assert (hs._HOST, hs._UPGRADE, hs._CONNECTION, hs._KEY, hs._VERSION) == (1, 2, 4, 8, 16)
    assert (hs._COOKIE, hs._AUTHORIZATION, hs._ORIGIN, hs._PROTOCOL, hs._LAST_EVENT_ID) == (32, 64, 128, 256, 512)
    assert set(hs._FIELDS.values()) == {1 << k for k in range(10)}
    assert hs._c_parse_request is C.parse_request


# -- one small frame from the browser ---------------------------------------------------


def _frame(b0: int, b1: int, mask: bytes, payload: bytes) -> bytes:
    return bytes((b0, b1)) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


@settings(max_examples=2000, deadline=None)
@given(
    b0=st.one_of(
        st.sampled_from([0x81, 0x82, 0x88, 0x89, 0x8A, 0x01, 0x80, 0x83, 0x8B, 0xC1, 0x91]), st.integers(0, 255)
    ),
    masked=st.booleans(),
    payload=st.one_of(
        st.binary(max_size=130),
        st.text(max_size=40).map(str.encode),
        st.sampled_from([b'{"type":"subscribe"}', b"\xc3\x28", b"\xed\xa0\x80", b"\x03\xe8"]),
    ),
    length_delta=st.sampled_from([0, 0, 0, 1, -1]),
    tail=st.sampled_from([b"", b"", b"\x81"]),
    max_size=st.sampled_from([65536, 10]),
)
def test_one_small_frame_reads_as_a_fresh_decoder_reads_it(b0, masked, payload, length_delta, tail, max_size):
    from mailpush.errors import ProtocolError
    from mailpush.frames import Decoder

    n = max(0, min(127, len(payload) + length_delta))
    data = _frame(b0, (0x80 if masked else 0) | n, b"\x11\x22\x33\x44", payload) + tail
    got = C.one_frame(data, max_size)
    dec = Decoder(max_size)
    try:
        want = dec.feed(data)
    except ProtocolError:
        assert got is None  # the decoder raises the close code
        return
    if got is not None:
        assert [got] == want and dec.idle
    if want and dec.idle and len(want) == 1 and len(data) <= 131 and data[1] & 0x7F <= 125:
        assert got == want[0]  # the common case is done in C
    assert C.one_frame(memoryview(data), max_size) == got  # the shared poller's buffer


def test_the_history_keeps_one_string_per_event_name():
    """Each kept event holds its name: one string for all of them (interned),
    not one per event (~64 bytes each), in C and in Python."""
    for c_loop in (C.record_loop, None):
        saved, history._c_record_loop = history._c_record_loop, c_loop
        try:
            h = History(100, 600, 10_000)
            for k in range(3):
                body = json.dumps([{"subscriber": f"s{i}", "event": "new_letter", "data": {"k": k}} for i in range(50)])
                record(h, items.parse_items(body.encode()))
            names = {id(e[1]) for s in h._streams.values() for e in s.entries}
            assert len(names) == 1 and h.events == 150
        finally:
            history._c_record_loop = saved


# -- no references kept ------------------------------------------------------------------


def test_the_c_functions_keep_nothing_behind():
    """Thousands of calls of every C function (the common cases and the
    ones handed back) leave no memory behind: a reference kept by mistake
    is at least one small object a call (3,000 calls: 96 KB or more)."""
    import gc
    import tracemalloc

    from mailpush import handshake as hs

    head = (
        b"GET /v1/ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Cookie: a=1\r\nCookie: b=2\r\n\r\n"
    )
    duplicate = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    subscribe = _frame(0x81, 0x80 | 20, b"\x01\x02\x03\x04", b'{"type":"subscribe"}')
    bad_utf8 = _frame(0x81, 0x82, b"\x01\x02\x03\x04", b"\xc3\x28")
    body = json.dumps([{"subscriber": f"s{i}", "event": "e", "data": {"i": i}, "state": "x"} for i in range(20)])
    h = History(3, 600, 50)  # its bounds are hit: streams dropped, entries popped

    def calls() -> None:
        C.parse_request(head, hs.Request, hs._FIELDS)
        C.parse_request(duplicate, hs.Request, hs._FIELDS)
        C.one_frame(subscribe, 65536)
        C.one_frame(bad_utf8, 65536)
        C.one_frame(memoryview(subscribe), 65536)
        C.fast_items(items._decode_batch(body.encode()), ALL_EVENTS, items._EMPTY)
        C.event_frame("u", "e", msgspec.Raw(b"{}"), 5)
        C.event_frame('u"', "e", msgspec.Raw(b"{}"), 5)
        record(h, items.parse_items(body.encode()))

    for _ in range(300):
        calls()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            calls()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept over 3,000 rounds"


async def test_delivering_in_c_keeps_nothing_behind():
    """The dispatcher's C loop over thousands of batches (filters, a
    subscriber's many tabs with checkpoints among them, frames built on the
    way, nobody's events) leaves no memory behind."""
    import gc
    import tracemalloc

    async with trio.open_nursery() as nursery:
        ctx = Server(make_config(), EmbeddedBus()).ctx
        ctx.nursery = nursery
        registry, peers = Registry(), []
        for i in range(40):
            a, b = socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            peers.append((a, b))
            registry.add(Connection(a, ctx, "wall" if i >= 5 else f"u{i}", frozenset({"x"}) if i == 1 else None))
        d = Dispatcher(registry, FakeBus(), Stats(), Connection)
        h = History(3, 600, 1000)
        raw = msgspec.Raw(b"{}")
        batch_items = [("u0", "x", raw, None), ("u1", "y", raw, None), ("nobody", "x", raw, None)]
        batch_items += [("wall", "x", raw, None)] * 10  # 350 sends: checkpoints in the middle of the wall's tabs

        async def rounds(n: int) -> None:
            for _ in range(n):
                batch = record(h, batch_items)
                batch.append(("u0", "late", {"k": 1}, None, None, None))  # its frame built in the loop
                await d.deliver(batch)
                for _, b in peers:
                    with contextlib.suppress(BlockingIOError):
                        while b.recv(1 << 16):
                            pass

        await rounds(200)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await rounds(2000)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 64 * 1024, f"{grown} bytes kept over 2,000 batches"
        for a, b in peers:
            a.close()
            b.close()
        nursery.cancel_scope.cancel()
