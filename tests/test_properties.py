"""Property tests for every parser that reads bytes from outside: the
upgrade request, WebSocket frames, client packets, publish bodies and the
Redis push stream.

One rule for all of them: whatever arrives, the parser returns or raises its
own error (HandshakeError, ProtocolError, PacketError, PublishError,
RespProtocolError), and returns soon. Anything else (RecursionError,
ValueError, IndexError, UnicodeError, MemoryError, a loop that never ends)
fails the test. Inputs are arbitrary bytes and, more usefully, near-valid
inputs built from valid ones and then broken in the ways a hostile peer
would break them. Beside that rule, the invariants each parser promises:
the same stream fed whole or in any pieces gives the same result, the RESP
parser holds a bounded remainder, accepted publish items obey the item rules
and become an event frame that carries them.

No sockets and no Trio: plain bytes in, results out.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import struct
from datetime import timedelta
from decimal import Decimal

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailpush import handshake as hs
from mailpush.bus import resp
from mailpush.bus.resp import PushParser
from mailpush.errors import HandshakeError, PacketError, ProtocolError, PublishError, RespError, RespProtocolError
from mailpush.frames import Decoder, Opcode
from mailpush.items import parse_item_json, parse_items
from mailpush.packets import ALL_EVENTS, MAX_EVENT_LEN, MAX_FILTER_EVENTS, MAX_SUBSCRIBER_LEN, Ping, Subscribe
from mailpush.packets import Unsubscribe, event_frame, parse_client_packet

# Budget: 2 shared cores, and the whole file should run in well under 30 s.
# Inputs are small; the big ones (deep nesting, huge numbers) come as
# explicit examples and as sampled constants.
PROPS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# For "returns in bounded time": a generous per-example deadline (a parse
# of these inputs takes microseconds; a second means something is wrong).
TIMED = settings(PROPS, deadline=timedelta(seconds=1))

# A call that runs longer than this is a hang (an infinite loop never
# returns, so hypothesis's deadline alone would never see it).
HANG_SECONDS = 5.0


# -- the harness ------------------------------------------------------------------------------


class Hang(BaseException):
    """A parser call ran past HANG_SECONDS (BaseException: no ``except
    Exception`` inside the code under test can swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float = HANG_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(error: type[BaseException], fn, *args):
    """``(result, None)`` or ``(None, the parser's own error)``; any other
    exception, or running past HANG_SECONDS, propagates and fails the test."""
    with time_limit():
        try:
            return fn(*args), None
        except error as e:
            return None, e


def test_the_harness_lets_foreign_errors_and_hangs_through() -> None:
    # The property tests below are only as good as outcome(): it must not
    # swallow anything but the named error, nor wait forever.
    assert outcome(ValueError, int, "x")[1] is not None
    with pytest.raises(ValueError):
        outcome(PublishError, int, "x")
    with pytest.raises(RecursionError):
        outcome(PublishError, json.loads, "[" * 100_000)

    def spin():
        while True:
            pass

    with pytest.raises(Hang), time_limit(0.2):
        outcome(PublishError, spin)


# -- JSON text, valid and hostile, as bytes ----------------------------------------------------

DEEP = 2000  # deeper than the interpreter's recursion limit (1000)
TEN_TO_5000 = b"1" + b"0" * 5000  # 10**5000 written as digits (str() of it would refuse)

# Scalars no well-behaved publisher sends, each a classic way to break a
# JSON stack: numbers out of every float and int range, lone and reversed
# surrogates in escapes, NUL, raw non-ASCII and invalid UTF-8, literals
# JSON does not have, truncated tokens.
HOSTILE_SCALARS = [
    b"1e400",
    b"-1e400",
    b"1e-400",
    TEN_TO_5000,
    b"-" + TEN_TO_5000,
    b"18446744073709551616",
    b"-9223372036854775809",
    b"0." + b"0" * 500 + b"1",
    b'"\\ud800"',
    b'"\\udfff"',
    b'"\\ud800x"',
    b'"\\udc00\\ud800"',
    b'"\\ud800\\udc00"',  # a valid pair, for contrast
    b'"\\u0000"',
    b'"\\uZZZZ"',
    '"é€😀"'.encode(),
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',  # a surrogate encoded as UTF-8
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"01",
    b"1.",
    b".5",
    b"-",
    b"tru",
    b'"unterminated',
    b"\x00",
]


def json_str(s: str, ascii_only: bool = False) -> bytes:
    return json.dumps(s, ensure_ascii=ascii_only).encode("utf-8")


json_strings = st.builds(json_str, st.text(max_size=12), st.booleans())
json_scalars = st.one_of(
    st.just(b"null"),
    st.sampled_from([b"true", b"false"]),
    st.integers().map(lambda i: str(i).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
    json_strings,
    st.sampled_from(HOSTILE_SCALARS),
)
# Keys drawn from a small set, so objects often repeat a key.
json_keys = st.one_of(st.sampled_from(["subscriber", "event", "data", "state", "type", "events", "a"]), st.text(max_size=4))
separators = st.sampled_from([b",", b", ", b" ,\t"])


def _array(parts: tuple[list[bytes], bytes]) -> bytes:
    items, sep = parts
    return b"[" + sep.join(items) + b"]"


def _object(parts: tuple[list[tuple[str, bytes]], bytes]) -> bytes:
    pairs, sep = parts
    return b"{" + sep.join(json_str(k) + b":" + v for k, v in pairs) + b"}"


json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.tuples(st.lists(children, max_size=4), separators).map(_array),
        st.tuples(st.lists(st.tuples(json_keys, children), max_size=4), separators).map(_object),
    ),
    max_leaves=12,
)
json_objects = st.tuples(st.lists(st.tuples(json_keys, json_values), max_size=4), separators).map(_object)

DEEP_ARRAY = b"[" * DEEP + b"]" * DEEP
DEEP_OBJECT = b'{"a":' * DEEP + b"1" + b"}" * DEEP
UNCLOSED = b"[" * 100_000


def canon(text: bytes | str):
    """JSON → Python for comparisons, exact for every number (Decimal, so
    10**5000 and 1e400 compare too); JSON's grammar has no NaN/Infinity."""

    def no_constants(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_int=Decimal, parse_float=Decimal, parse_constant=no_constants)


# -- the upgrade request ---------------------------------------------------------------------

KEY = base64.b64encode(b"0123456789abcdef")
REQUEST_LINE = b"GET /v1/ws?token=abc HTTP/1.1"
HEADERS = [
    (b"Host", b"push.example"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"keep-alive, Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Origin", b"https://mail.example"),
    (b"Cookie", b"a=b; mailpush_token=tok"),
    (b"Authorization", b"Bearer tok"),
    (b"User-Agent", b"Mozilla/5.0"),
]
# Statuses parse_request and check_upgrade may refuse with (the rest come
# from the server: 401, 403, 404, 408, 503).
REFUSALS = {400, 405, 426, 431, 505}


def render(request_line: bytes, headers: list[tuple[bytes, bytes]], sep: bytes = b": ") -> bytes:
    return b"\r\n".join([request_line, *(k + sep + v for k, v in headers)]) + b"\r\n\r\n"


def handshake(data: bytes):
    """What the server does with bytes off a socket: find the head, parse
    it, check the upgrade. Returns the Request, or the HandshakeError."""
    try:
        end = hs.find_head_end(data, len(data))
        head = data[:end] if end >= 0 else data + b"\r\n\r\n"
        req = hs.parse_request(head)
        hs.query_param(req.query, "token")
        hs.cookie_value(req.cookie, "mailpush_token")
        hs.check_upgrade(req)
    except HandshakeError as e:
        assert e.status in REFUSALS, (e.status, e.reason)
        assert isinstance(e.reason, str) and e.reason
        hs.response_error(e)  # every refusal can be answered
        return e
    # Accepted: the key is what the client sent and can be answered.
    assert len(base64.b64decode(req.key, validate=True)) == 16
    hs.response_101(req.key)
    return req


def run_handshake(data: bytes):
    with time_limit():
        return handshake(data)


def test_the_valid_request_is_accepted_and_copied_exactly() -> None:
    req = run_handshake(render(REQUEST_LINE, HEADERS))
    assert isinstance(req, hs.Request)
    assert (req.method, req.path, req.query) == ("GET", "/v1/ws", "token=abc")
    assert req.key == KEY.decode() and req.origin == "https://mail.example"
    assert hs.cookie_value(req.cookie, "mailpush_token") == "tok"


@given(st.binary(max_size=600))
@example(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n")
@example(b"GET / HTTP/1.1\r\nHost: " + b"a" * 9000 + b"\r\n\r\n")
@example(b"\r\n\r\n")
@example(b"GET \xff HTTP/1.1\r\n\r\n")
@PROPS
def test_arbitrary_bytes_get_only_handshake_errors(data: bytes) -> None:
    run_handshake(data)


POISON = [b"\x00", b"\r", b"\n"]


@st.composite
def poisoned_requests(draw) -> bytes:
    """A valid request with one NUL, CR or LF inside the request line, a
    header name or a header value (anywhere but a line's CRLF)."""
    headers = list(HEADERS)
    char = draw(st.sampled_from(POISON))
    where = draw(st.integers(-1, len(headers) - 1))
    if where < 0:
        i = draw(st.integers(0, len(REQUEST_LINE)))
        return render(REQUEST_LINE[:i] + char + REQUEST_LINE[i:], headers)
    name, value = headers[where]
    if draw(st.booleans()):
        i = draw(st.integers(0, len(value)))
        value = value[:i] + char + value[i:]
    else:
        i = draw(st.integers(0, len(name)))
        name = name[:i] + char + name[i:]
    headers[where] = (name, value)
    return render(REQUEST_LINE, headers)


@given(poisoned_requests())
@PROPS
def test_nul_cr_or_lf_inside_a_field_is_always_400(data: bytes) -> None:
    # RFC 9110 §5.5 and the README: 400, however the rest looks.
    result = run_handshake(data)
    assert isinstance(result, HandshakeError) and result.status == 400, result


non_ascii = st.binary(min_size=1, max_size=8).map(lambda b: bytes(0x80 | c for c in b)) | st.sampled_from(
    ["é".encode(), "€".encode(), "😀".encode(), b"\xff", b"\xc3"]
)


@given(st.sampled_from([b"Origin", b"Cookie", b"Authorization", b"Host", b"User-Agent"]), non_ascii, st.integers(0, 30))
@PROPS
def test_non_ascii_values_are_kept_as_latin_1_not_refused(name: bytes, junk: bytes, at: int) -> None:
    headers = [(k, v[:at] + junk + v[at:] if k == name else v) for k, v in HEADERS]
    value = dict(headers)[name]
    req = run_handshake(render(REQUEST_LINE, headers))
    assert isinstance(req, hs.Request), req
    copied = {b"Origin": req.origin, b"Cookie": req.cookie, b"Authorization": req.authorization}
    if name in copied:
        assert copied[name] == value.decode("latin-1")


@st.composite
def mutated_requests(draw) -> bytes:
    """A valid request broken in one to four ways a client or a scanner
    breaks them: headers dropped, doubled, renamed, given arbitrary values,
    odd separators, junk request lines, bare LF line ends, too many lines,
    a huge value."""
    line = REQUEST_LINE
    headers = list(HEADERS)
    seps = [b": "] * len(headers)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "dup", "value", "name", "sep", "line", "lf", "many", "huge", "case"]))
        i = draw(st.integers(0, len(headers) - 1)) if headers else 0
        if op == "drop" and headers:
            del headers[i], seps[i]
        elif op == "dup" and headers:
            headers.append(headers[i])
            seps.append(b": ")
        elif op == "value" and headers:
            headers[i] = (headers[i][0], draw(st.binary(max_size=24) | st.sampled_from([b"", b" ", b"13 ", b"websocket, x", KEY + b"="])))
        elif op == "name" and headers:
            headers[i] = (draw(st.binary(max_size=10) | st.sampled_from([b"", b" Host", b"Host ", b"HOST", b"sec-websocket-key"])), headers[i][1])
        elif op == "sep" and headers:
            seps[i] = draw(st.sampled_from([b":", b"::", b" : ", b"", b":\t", b"\t:"]))
        elif op == "line":
            method = draw(st.sampled_from([b"GET", b"POST", b"get", b"", b"G\xc3\xa9T", b"HEAD"]))
            target = draw(st.sampled_from([b"/v1/ws", b"/v1/ws?token=%zz", b"*", b"/\xff", b"", b"v1", b"/a b"]))
            version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1 ", b"http/1.1"]))
            line = draw(st.sampled_from([b" ", b"  ", b"\t"])).join([method, target, version])
        elif op == "lf" and headers:
            seps[i] = seps[i]  # the line keeps its separator; its end becomes a bare LF
            headers[i] = (headers[i][0], headers[i][1] + b"\n" + draw(st.sampled_from([b"X: y", b"", b" folded"])))
        elif op == "many":
            n = draw(st.integers(50, 80))
            headers += [(b"X-%d" % k, b"v") for k in range(n)]
            seps += [b": "] * n
        elif op == "huge" and headers:
            headers[i] = (headers[i][0], b"v" * draw(st.integers(8000, 9000)))
        elif op == "case" and headers:
            headers[i] = (headers[i][0].swapcase(), headers[i][1].upper())
    return b"\r\n".join([line, *(k + s + v for (k, v), s in zip(headers, seps))]) + b"\r\n\r\n"


@given(mutated_requests())
@PROPS
def test_mutated_requests_get_only_handshake_errors(data: bytes) -> None:
    result = run_handshake(data)
    end = data.find(b"\r\n\r\n")
    if end + 4 > hs.MAX_HEAD_BYTES:
        assert isinstance(result, HandshakeError) and result.status == 431
    elif data[: end + 4].count(b"\r\n") - 3 > hs.MAX_HEADERS and isinstance(result, HandshakeError):
        assert result.status in (400, 431)


@given(st.one_of(st.just(render(REQUEST_LINE, HEADERS)), mutated_requests()), st.binary(max_size=40))
@PROPS
def test_the_head_end_is_found_the_same_however_the_bytes_arrive(head: bytes, after: bytes) -> None:
    # The server calls find_head_end on what it has read so far, after
    # every read: the answer may only change from "not yet" to the end.
    data = head + after
    whole = outcome(HandshakeError, hs.find_head_end, data, len(data))
    seen_end = -1
    for n in range(len(data) + 1):
        end, err = outcome(HandshakeError, hs.find_head_end, data, n)
        if err is not None:
            assert err.status == 431 and whole[1] is not None
            return
        if end >= 0:
            assert seen_end in (-1, end)
            seen_end = end
            assert data[end - 4 : end] == b"\r\n\r\n" and b"\r\n\r\n" not in data[: end - 1]
        else:
            assert seen_end == -1
    assert whole[0] == seen_end


# -- WebSocket frames --------------------------------------------------------------------------

MAX_MESSAGE = 4096  # the decoder's limit in these tests: small, so 1009 is reachable
CLOSE_CODES = {1002, 1007, 1009}  # what a decoder may close with


def client_frame(opcode: int, payload: bytes, *, fin=True, rsv=0, mask=b"\x5a\xa5\x0f\xf0", form="min", declared=None) -> bytes:
    n = len(payload) if declared is None else declared
    b0 = (0x80 if fin else 0) | rsv | opcode
    m = 0x80 if mask is not None else 0
    if form == "min":
        form = "7" if n < 126 else "16" if n < 65536 else "64"
    if form == "7":
        head = bytes((b0, m | n))
    elif form == "16":
        head = bytes((b0, m | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, m | 127)) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


masks = st.binary(min_size=4, max_size=4)


@st.composite
def frame_specs(draw) -> tuple[list[dict], list[tuple[int, bytes]]]:
    """Valid frames as keyword dicts for client_frame (so that a mutation
    can change one field), and the messages they decode to."""
    specs: list[dict] = []
    expected: list[tuple[int, bytes]] = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "binary", "control"]))
        if kind == "control":
            op = draw(st.sampled_from([Opcode.PING, Opcode.PONG, Opcode.CLOSE]))
            payload = draw(st.binary(max_size=125))
            specs.append(dict(opcode=op, payload=payload, mask=draw(masks)))
            expected.append((op, payload))
            continue
        op = Opcode.TEXT if kind == "text" else Opcode.BINARY
        if draw(st.integers(0, 9)) == 0:
            payload = bytes(range(97, 123)) * draw(st.integers(5, 150))  # 130..3900 bytes: 16-bit lengths
        elif op == Opcode.TEXT:
            payload = draw(st.text(max_size=40)).encode()
        else:
            payload = draw(st.binary(max_size=40))
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)])]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            form = draw(st.sampled_from(["min", "min", "16", "64"]))  # non-minimal lengths are allowed
            specs.append(dict(opcode=op if i == 0 else Opcode.CONTINUATION, payload=piece, fin=last, mask=draw(masks), form=form))
            if not last and draw(st.booleans()):
                ping = draw(st.binary(max_size=10))
                specs.append(dict(opcode=Opcode.PING, payload=ping, mask=draw(masks)))
                expected.append((Opcode.PING, ping))
        expected.append((op, payload))
    return specs, expected


@st.composite
def broken_frame_streams(draw) -> bytes:
    """A valid stream with one to three frames broken: opcode, RSV bits,
    mask, FIN, lengths that lie or break a limit, invalid UTF-8, or a
    stream cut short or followed by junk."""
    specs, _ = draw(frame_specs())
    if not specs:
        specs = [dict(opcode=Opcode.TEXT, payload=b"hello")]
    specs = [dict(s) for s in specs]
    tail = b""
    for _ in range(draw(st.integers(1, 3))):
        s = specs[draw(st.integers(0, len(specs) - 1))]
        op = draw(st.sampled_from(["opcode", "rsv", "unmasked", "fin", "lie", "top_bit", "oversize", "utf8", "big_control", "junk"]))
        if op == "opcode":
            s["opcode"] = draw(st.integers(0, 15))
        elif op == "rsv":
            s["rsv"] = draw(st.sampled_from([0x10, 0x20, 0x40, 0x70]))
        elif op == "unmasked":
            s["mask"] = None
        elif op == "fin":
            s["fin"] = not s.get("fin", True)
        elif op == "lie":
            s["declared"] = max(0, len(s["payload"]) + draw(st.sampled_from([-3, -1, 1, 2, 200, 70000])))
            s["form"] = draw(st.sampled_from(["min", "16", "64"] if s["declared"] < 65536 else ["min", "64"]))
        elif op == "top_bit":
            s["declared"], s["form"] = 2**63 + draw(st.integers(0, 10)), "64"
        elif op == "oversize":
            s["declared"], s["form"] = MAX_MESSAGE + draw(st.sampled_from([1, 100, 2**40])), "64"
        elif op == "utf8":
            s["opcode"] = Opcode.TEXT if s["opcode"] in (Opcode.BINARY, Opcode.TEXT) else s["opcode"]
            i = draw(st.integers(0, len(s["payload"])))
            s["payload"] = s["payload"][:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + s["payload"][i:]
        elif op == "big_control":
            s["opcode"], s["payload"] = draw(st.sampled_from([Opcode.PING, Opcode.CLOSE])), b"x" * 126
        else:
            tail = draw(st.binary(min_size=1, max_size=16))
    data = b"".join(client_frame(**s) for s in specs) + tail
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


def decode(chunks) -> tuple[list[tuple[int, bytes]], tuple[int, str] | None, bool]:
    """(messages, (close code, reason) or None, idle) of a stream fed in
    these chunks; messages before a violation count as decoded."""
    dec = Decoder(MAX_MESSAGE)
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        msgs, err = outcome(ProtocolError, dec.feed, chunk)
        if err is not None:
            assert err.code in CLOSE_CODES, (err.code, err.reason)
            return out + err.messages, (err.code, err.reason), False
        out += msgs
    return out, None, dec.idle


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
@PROPS
def test_arbitrary_bytes_get_only_protocol_errors_however_split(data: bytes, cuts: list[int]) -> None:
    assert decode([data]) == decode(pieces(data, cuts))


@given(frame_specs(), st.lists(st.integers(0, 2**16), max_size=10))
@PROPS
def test_valid_frames_decode_to_their_messages_however_split(stream, cuts) -> None:
    specs, expected = stream
    data = b"".join(client_frame(**s) for s in specs)
    assert decode([data]) == (expected, None, True)
    assert decode(pieces(data, cuts)) == (expected, None, True)


@given(broken_frame_streams(), st.lists(st.integers(0, 2**16), max_size=10))
@PROPS
def test_broken_frames_get_the_same_messages_and_error_however_split(data: bytes, cuts: list[int]) -> None:
    whole = decode([data])
    assert decode(pieces(data, cuts)) == whole
    if len(data) <= 400:
        assert decode([data[i : i + 1] for i in range(len(data))]) == whole  # byte by byte
        for i in range(len(data) + 1):  # and split in two at every point
            assert decode([data[:i], data[i:]]) == whole, i


# -- client packets --------------------------------------------------------------------------


event_names = st.text(min_size=1, max_size=MAX_EVENT_LEN)


@given(st.lists(event_names, max_size=MAX_FILTER_EVENTS), st.sampled_from([b"", b" ", b"\n"]))
@PROPS
def test_valid_subscribes_give_their_filter(events: list[str], ws: bytes) -> None:
    text = ws + b'{"type":"subscribe","events":' + json.dumps(events).encode() + b"}" + ws
    packet = parse_client_packet(text)
    assert type(packet) is Subscribe
    if not events or ALL_EVENTS in events:
        assert packet.events is None
    else:
        assert packet.events == frozenset(events)


def test_the_other_packets_and_their_refusals() -> None:
    assert type(parse_client_packet(b'{"type":"subscribe"}')) is Subscribe
    assert type(parse_client_packet(b'{"type":"unsubscribe"}')) is Unsubscribe
    assert type(parse_client_packet(b'{"type":"ping","extra":[1,{"a":null}]}')) is Ping
    for text, code in [
        (b"not json", "bad_json"),
        (b"[]", "bad_packet"),
        (b'{"events":[]}', "bad_packet"),
        (b'{"type":5}', "bad_field"),
        (b'{"type":"nope"}', "unknown_type"),
        (b'{"type":"subscribe","events":"x"}', "bad_field"),
        (b'{"type":"subscribe","events":[""]}', "bad_field"),
        (b'{"type":"subscribe","events":["' + b"e" * (MAX_EVENT_LEN + 1) + b'"]}', "bad_field"),
        (b'{"type":"subscribe","events":' + json.dumps(["e"] * (MAX_FILTER_EVENTS + 1)).encode() + b"}", "bad_field"),
    ]:
        with pytest.raises(PacketError) as e:
            parse_client_packet(text)
        assert e.value.code == code, text


# -- publish items ---------------------------------------------------------------------------


subscribers = st.one_of(
    st.text(min_size=1, max_size=12).map(json_str),
    st.sampled_from(
        [
            b'"alice@example.com"',
            b'""',
            json_str("a" * MAX_SUBSCRIBER_LEN),
            json_str("a" * (MAX_SUBSCRIBER_LEN + 1)),
            json_str("é" * MAX_SUBSCRIBER_LEN),
            json_str("😀" * MAX_SUBSCRIBER_LEN, ascii_only=True),  # 256 characters as 512 escapes
            b"5",
            b"null",
            b'["a"]',
            b'"\\ud800"',
            b'"a\\u0000b"',
            b'"*"',
        ]
    ),
)
events = st.one_of(
    st.sampled_from([b'"new_letter"', b'"flags"', b'"*"', b'""', json_str("e" * MAX_EVENT_LEN), json_str("e" * (MAX_EVENT_LEN + 1))]),
    st.sampled_from([b"1", b"null", b"{}", b'"\\udfff"', b'"**"']),
    st.text(min_size=1, max_size=8).map(json_str),
)
datas = st.one_of(
    json_objects,
    json_values,
    st.sampled_from(
        [
            b"null",
            b"{}",
            b"[]",
            b'"x"',
            b'{"id":42,"folder":"INBOX"}',
            b'{"x":1e400}',
            b'{"n":' + TEN_TO_5000 + b"}",
            b'{"s":"\\ud800"}',
            b'{"a":1,"a":2}',
            b'{"x":' + DEEP_ARRAY + b"}",
        ]
    ),
)
states = st.one_of(st.sampled_from([b'"s1"', b'{"v":1}', b"null", b"5", b"[]", b'"\\ud800"']), json_values)


@st.composite
def item_texts(draw) -> bytes:
    """A publish item as JSON text: fields valid or not, missing or
    doubled, in any order, with extra fields; sometimes not an object."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    fields = []
    for name, values, presence in [("subscriber", subscribers, 19), ("event", events, 19), ("data", datas, 3), ("state", states, 1)]:
        if draw(st.integers(0, presence)):
            fields.append((json_str(name), draw(values)))
    fields += [(json_str(k), v) for k, v in draw(st.lists(st.tuples(json_keys, json_values), max_size=2))]
    if fields and draw(st.integers(0, 4)) == 0:
        name = draw(st.sampled_from(fields))[0]
        fields.append((name, draw(draw(st.sampled_from([subscribers, events, datas])))))
    fields = draw(st.permutations(fields))
    ws = draw(st.sampled_from([b"", b"", b" ", b"\t", b"\n "]))  # a newline breaks NDJSON, on purpose
    return b"{" + ws + (b"," + ws).join(k + b":" + ws + v for k, v in fields) + ws + b"}"


CONTENT_TYPES = ["", "application/json", "application/x-ndjson", "application/jsonlines; charset=utf-8", "text/plain"]


@st.composite
def publish_bodies(draw) -> tuple[bytes, str]:
    """A publish body as one object, a JSON array or NDJSON (with or
    without blank lines, CRLF or LF), and the content type it is sent with."""
    items = draw(st.lists(item_texts(), max_size=4))
    shape = draw(st.sampled_from(["one", "array", "ndjson"]))
    if shape == "one":
        body = items[0] if items else b""
    elif shape == "array":
        body = b"[" + draw(separators).join(items) + b"]"
    else:
        newline = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
        body = newline.join(items) + draw(st.sampled_from([b"", newline]))
    around = draw(st.sampled_from([b"", b" ", b"\n", b"\r\n\t"]))
    ct = draw(st.sampled_from(CONTENT_TYPES + ["application/x-ndjson"] * (shape == "ndjson") * 2))
    return around + body + around, ct


class CannotSay(Exception):
    """The oracle's JSON library and msgspec disagree on this text (lone
    surrogates, numbers out of range); the oracle makes no claim."""


def oracle_item(obj) -> tuple[str, str, object, object] | None:
    """The documented rules for one item, on Python's view of it; None if
    the item is invalid."""
    if type(obj) is not dict:
        return None
    sub, event, data, state = obj.get("subscriber"), obj.get("event"), obj.get("data"), obj.get("state")
    if type(sub) is not str or not 1 <= len(sub) <= MAX_SUBSCRIBER_LEN:
        return None
    if type(event) is not str or not 1 <= len(event) <= MAX_EVENT_LEN or event == ALL_EVENTS:
        return None
    if data is None:
        data = {}
    if type(data) is not dict:
        return None
    if state is not None and type(state) not in (str, dict):
        return None
    return sub, event, data, state


def oracle_json(text: bytes):
    """Python's reading of ``text``; raises ValueError if it is not JSON
    at all, CannotSay where the two libraries legitimately differ."""
    try:
        value = canon(text.decode("utf-8"))
    except RecursionError:
        raise CannotSay("too deep for the oracle") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise
    try:
        msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        raise CannotSay("msgspec refuses what Python reads") from None
    return value


def oracle(body: bytes, content_type: str):
    """The items parse_items must return for ``body``, or None if it must
    refuse it; CannotSay where no claim is made. Follows the documented
    shapes: NDJSON by content type, else one JSON value (an object or a
    non-empty array of them), else NDJSON if it has several lines."""
    stripped = body.strip()
    if not stripped:
        return None
    ndjson = "ndjson" in content_type or "jsonlines" in content_type
    if not ndjson:
        try:
            value = oracle_json(stripped)
        except ValueError:
            if b"\n" not in stripped:
                return None
            ndjson = True
        else:
            objs = value if type(value) is list else [value]
            items = [oracle_item(o) for o in objs]
            return items if items and None not in items else None
    items = []
    for line in stripped.split(b"\n"):
        if not line.strip():
            continue
        try:
            items.append(oracle_item(oracle_json(line.strip())))
        except ValueError:
            return None
    return items if items and None not in items else None


def python_view(value):
    """An item's data or state (a dict or msgspec.Raw) as canon() reads it."""
    if isinstance(value, msgspec.Raw):
        return canon(bytes(value))
    return canon(msgspec.json.encode(value))


def check_item(item) -> None:
    """One item parse_items returned obeys the item rules, and its event
    frame is a text frame whose payload is JSON carrying exactly it."""
    assert len(item) in (3, 4)  # (subscriber, event, data[, state])
    sub, event, data = item[:3]
    assert type(sub) is str and 1 <= len(sub) <= MAX_SUBSCRIBER_LEN
    assert type(event) is str and 1 <= len(event) <= MAX_EVENT_LEN and event != ALL_EVENTS
    assert type(data) is dict or (type(data) is msgspec.Raw and bytes(data)[:1] == b"{")
    data_view = python_view(data)
    assert type(data_view) is dict
    if len(item) == 4 and item[3] is not None:
        assert type(item[3]) is msgspec.Raw and type(python_view(item[3])) in (str, dict)
    frame = event_frame(sub, event, data)
    assert frame[0] == 0x81  # FIN + text
    n, head = frame[1], 2
    if n == 126:
        (n,), head = struct.unpack_from("!H", frame, 2), 4
    elif n == 127:
        (n,), head = struct.unpack_from("!Q", frame, 2), 10
    payload = frame[head:]
    assert len(payload) == n
    assert canon(payload.decode("utf-8")) == {"type": "event", "subscriber": sub, "event": event, "data": data_view}


def same_item(got, want) -> bool:
    sub, event, data, state = want
    if (got[0], got[1]) != (sub, event) or python_view(got[2]) != data:
        return False
    if len(got) == 4:
        return (got[3] is None and state is None) or (got[3] is not None and python_view(got[3]) == state)
    return True


def check_publish(body: bytes, content_type: str) -> None:
    items, err = outcome(PublishError, parse_items, body, content_type)
    if err is not None:
        assert str(err)  # says what is wrong
    else:
        assert items
        for item in items:
            check_item(item)
    try:
        want = oracle(body, content_type)
    except CannotSay:
        return
    if want is None:
        assert err is not None, f"accepted a body the item rules refuse: {items}"
    else:
        assert err is None, f"refused a valid body: {err}"
        assert len(items) == len(want) and all(same_item(g, w) for g, w in zip(items, want))


NESTED_IN_DATA = b'{"subscriber":"a","event":"e","data":{"x":' + DEEP_ARRAY + b"}}"


@given(publish_bodies())
@example((NESTED_IN_DATA, ""))
@example((NESTED_IN_DATA, "application/x-ndjson"))
@example((b"[" + NESTED_IN_DATA + b"]", ""))
@example((b'{"subscriber":"a","event":"e"}\n' + NESTED_IN_DATA, ""))
@example((b'{"subscriber":"a","event":"e","state":' + DEEP_OBJECT + b"}", ""))
@example((b'{"subscriber":"a","event":"e","data":' + DEEP_OBJECT + b"}", ""))
@example((DEEP_ARRAY, ""))
@example((DEEP_OBJECT, "application/x-ndjson"))
@example((UNCLOSED, ""))
@example((b'{"subscriber":"a","event":"e","data":{"n":' + TEN_TO_5000 + b"}}", ""))
@example((b'{"subscriber":"a","event":"e","data":{"x":1e400}}', ""))
@example((b'{"subscriber":"\\ud800","event":"e"}', ""))
@example((b'{"subscriber":"a","event":"e","subscriber":5}', ""))
@example((b'{"subscriber":"a","event":"e"}\r\n\r\n{"subscriber":"b","event":"f","data":null}\r\n', ""))
@example((b'[{"subscriber":"a","event":"e"},{"subscriber":"a","event":"*"}]', ""))
@example((b"[]", ""))
@PROPS
def test_publish_bodies_get_valid_items_or_a_publish_error(body_ct: tuple[bytes, str]) -> None:
    check_publish(*body_ct)


@given(st.binary(max_size=300), st.sampled_from(CONTENT_TYPES))
@PROPS
def test_arbitrary_bytes_as_a_publish_body(body: bytes, content_type: str) -> None:
    check_publish(body, content_type)


@given(item_texts())
@example(NESTED_IN_DATA)
@example(b'{"subscriber":"a","event":"e","data":{"x":' + b"[" * DEEP + b"}}")
@example(DEEP_ARRAY)
@example(UNCLOSED)
@example(b'{"subscriber":"a","event":"e","data":{"n":-' + TEN_TO_5000 + b"}}")
@PROPS
def test_bus_payloads_parse_like_a_one_item_body(text: bytes) -> None:
    # parse_item_json reads one item off the bus (a Redis payload): the
    # same rules as a publish body of that one item.
    item, err = outcome(PublishError, parse_item_json, text)
    as_body, body_err = outcome(PublishError, parse_items, text, "application/json")
    if err is None:
        check_item(item)
    single_object = text.strip()[:1] == b"{"
    if single_object:
        assert (err is None) == (body_err is None), (err, body_err)
        if err is None:
            assert len(as_body) == 1 and same_item(item, (as_body[0][0], as_body[0][1], python_view(as_body[0][2]), None if len(as_body[0]) < 4 or as_body[0][3] is None else python_view(as_body[0][3])))


# -- the Redis push stream ---------------------------------------------------------------------


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n" + bulk(b"message") + bulk(channel) + bulk(payload)


channels = st.binary(max_size=20).map(lambda b: b"mailpush:" + b)
line_text = st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b)


@st.composite
def valid_pushes(draw) -> tuple[bytes, object]:
    """One valid RESP2 value a subscribed connection receives, and what
    PushParser returns for it (RespError as ("error", text))."""
    kind = draw(st.sampled_from(["message", "message", "message", "ack", "pmessage", "simple", "error", "integer", "null", "pong", "nested"]))
    if kind == "message":
        ch, payload = draw(channels), draw(st.binary(max_size=40) | st.sampled_from([b"", b"\r\n", b"$3\r\n", b'{"subscriber":"a","event":"e"}']))
        return message(ch, payload), (ch, payload)
    if kind == "ack":
        verb, ch, n = draw(st.sampled_from([b"subscribe", b"unsubscribe", b"psubscribe"])), draw(channels), draw(st.integers(0, 10**6))
        return b"*3\r\n" + bulk(verb) + bulk(ch) + b":%d\r\n" % n, [verb, ch, n]
    if kind == "pmessage":
        pat, ch, payload = draw(channels), draw(channels), draw(st.binary(max_size=20))
        return b"*4\r\n" + bulk(b"pmessage") + bulk(pat) + bulk(ch) + bulk(payload), [b"pmessage", pat, ch, payload]
    if kind == "simple":
        text = draw(line_text)
        return b"+" + text + b"\r\n", text
    if kind == "error":
        text = draw(st.text(max_size=20).filter(lambda s: "\r" not in s and "\n" not in s)).encode()
        return b"-ERR " + text + b"\r\n", ("error", "ERR " + text.decode())
    if kind == "integer":
        n = draw(st.integers(-(2**63), 2**63))
        return b":%d\r\n" % n, n
    if kind == "null":
        return draw(st.sampled_from([b"$-1\r\n", b"*-1\r\n"])), None
    if kind == "pong":
        return b"*2\r\n" + bulk(b"pong") + bulk(b""), [b"pong", b""]
    depth = draw(st.integers(1, resp.MAX_DEPTH))
    return b"*1\r\n" * depth + b":7\r\n", _nest(7, depth)


def _nest(value, depth):
    for _ in range(depth):
        value = [value]
    return value


# Pieces that make a stream invalid whatever follows them.
FATAL = [
    b"$-5\r\n",
    b"*-3\r\n",
    b"$-2\r\nxx\r\n",
    b"$99999999999\r\n",
    b"$999999999999999999999\r\n",
    b"$%d\r\n" % (resp.MAX_BULK + 1),
    b"*%d\r\n" % (resp.MAX_ARRAY + 1),
    b"*1\r\n" * (resp.MAX_DEPTH + 1),
    b"*1\r\n" * 5000,
    b"$abc\r\n",
    b"$ 3\r\nabc\r\n",
    b"$+3\r\nabc\r\n",
    b"$1_0\r\n0123456789\r\n",
    b"$\r\n",
    b"*x\r\n",
    b":+1\r\n",
    b":1.5\r\n",
    b":\r\n",
    b"?junk\r\n",
    b"\r\n",
    b"$3\r\nabcXY",  # no CRLF after the bulk string
    b"*3\r\n$7\r\nmessage\r\n$-5\r\nab\r\n",
    b"*3\r\n$7\r\nmessage\r\n$-1\r\n$1\r\nx\r\n",
    b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$-42\r\n" + b"x" * 64,
    b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$-1\r\n",
    b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$99999999999\r\n",
    b"*3\r\n$7\r\nmessage\r\n$1\r\naXY$1\r\nb\r\n",
    b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nbXY",
    b"*3\r\n$7\r\nmessage\r\n:1\r\n",
    b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n:1\r\n",
    b"+" + b"a" * (resp.MAX_LINE + 1),
]


@st.composite
def resp_streams(draw) -> tuple[bytes, list, bool, bool]:
    """Valid pushes mixed with fatal and with merely odd pieces (arbitrary
    bytes, truncated pushes, array headers that swallow what follows).
    Returns (stream, values of the valid pieces before the first other
    one, whether every piece is valid, whether the first other is fatal)."""
    parts: list[bytes] = []
    prefix: list = []
    clean, fatal = True, False
    for _ in range(draw(st.integers(0, 8))):
        choice = draw(st.integers(0, 9))
        if choice < 6:
            data, value = draw(valid_pushes())
            if clean:
                prefix.append(value)
        elif choice < 8:
            data = draw(st.sampled_from(FATAL))
            if clean:
                fatal = True
            clean = False
        else:
            odd = st.one_of(st.binary(max_size=12), valid_pushes().flatmap(lambda p: st.integers(1, len(p[0]) - 1).map(lambda n: p[0][:n])), st.sampled_from([b"*2\r\n", b"$5\r\n", b"*3\r\n$7\r\nmessage\r\n"]))
            data = draw(odd)
            clean = False
        parts.append(data)
    return b"".join(parts), prefix, clean, fatal


def normal(value):
    if isinstance(value, RespError):
        return ("error", str(value))
    if isinstance(value, list):
        return [normal(v) for v in value]
    if isinstance(value, bytearray):
        return bytes(value)
    return value


def push_feed(chunks) -> tuple[list, str | None, int | None]:
    """(replies, error text or None, bytes held at the end, None after an error) of a stream fed
    in these chunks; checks the bound on what is held after every feed."""
    parser = PushParser()
    out: list = []
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        replies, err = outcome(RespProtocolError, parser.feed, chunk)
        if err is not None:
            # After an error the connection is dropped with its parser:
            # what it held then is no part of the contract.
            return out + [normal(r) for r in err.replies], str(err), None
        out += [normal(r) for r in replies]
        assert 0 <= parser.buffered <= min(fed, resp.MAX_REPLY)
    return out, None, parser.buffered


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
@example(b"*1\r\n" * 5000, [])
@example(b"*3\r\n$7\r\nmessage\r\n$-5\r\n" + b"x" * 200, [])
@TIMED
def test_arbitrary_bytes_get_only_resp_protocol_errors_however_split(data: bytes, cuts: list[int]) -> None:
    assert push_feed([data]) == push_feed(pieces(data, cuts))


@given(resp_streams(), st.lists(st.integers(0, 2**16), max_size=10))
@example((b"*1\r\n" * 5000, [], False, True), [7, 4000])
@example((b"*3\r\n$7\r\nmessage\r\n$-5\r\nab\r\n" * 3, [], False, True), [20])
@example((b"$99999999999\r\n", [], False, True), [3])
@TIMED
def test_push_streams_parse_the_same_however_split_and_fail_where_they_must(stream, cuts) -> None:
    data, prefix, clean, fatal = stream
    whole = push_feed([data])
    replies, err, held = whole
    assert push_feed(pieces(data, cuts)) == whole
    if len(data) <= 600:
        assert push_feed([data[i : i + 1] for i in range(len(data))]) == whole  # byte by byte
    assert replies[: len(prefix)] == prefix
    if clean:
        assert (replies, err, held) == (prefix, None, 0)
    if fatal:
        assert err is not None and replies == prefix, (err, replies)


@given(st.lists(valid_pushes(), min_size=1, max_size=20))
@TIMED
def test_valid_pushes_split_at_every_point(pushes) -> None:
    data = b"".join(p for p, _ in pushes)
    want = ([v for _, v in pushes], None, 0)
    for i in range(len(data) + 1):
        assert push_feed([data[:i], data[i:]]) == want, i


def test_the_longest_message_arrives_in_reads_and_the_held_bytes_stay_bounded() -> None:
    # A push at the bulk limit, read 64 KiB at a time (what a socket hands
    # over): it is returned whole, and the parser never holds more than
    # MAX_REPLY while it waits (push_feed checks after every read).
    payload = b"p" * resp.MAX_BULK
    stream = message(b"mailpush:a", payload) + b"+OK\r\n"
    replies, err, held = push_feed(stream[i : i + 65536] for i in range(0, len(stream), 65536))
    assert err is None and held == 0 and len(replies) == 2
    assert replies[0][0] == b"mailpush:a" and replies[0][1] == payload and replies[1] == b"OK"
    # One byte more is refused at its header, before anything is buffered.
    replies, err, held = push_feed([b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$%d\r\n" % (resp.MAX_BULK + 1), b"p" * 65536])
    assert err is not None and "exceeds" in err and replies == []
