"""Fuzz target ``handshake``: the HTTP Upgrade request (mailpush.handshake).

The input is the bytes a client sends before its first frame. The check
does what the server does with them: find the end of the head, parse the
request line and headers, pick the token out of the query and the cookie,
check the upgrade, and build the answer (101 or the refusal).

Checks:

- only :class:`HandshakeError` is raised, with a status the parser and the
  upgrade check may refuse with (400, 405, 426, 431, 505) and a non-empty
  reason, and every refusal can be rendered as a response;
- an accepted request has a key that is the base64 of 16 bytes;
- a NUL, or a CR or LF that is not part of a line's CRLF, inside the head is
  always 400 (RFC 9110 §5.5);
- differential: the end of the head found on the bytes read so far (the
  server calls ``find_head_end`` after every read) only ever changes from
  "not yet" to the one end found on the whole input;
- differential: the C parser (``mailpush._speedups.parse_request``) gives
  the Python parser's Request, or hands the head back (None); it never
  accepts a head the Python parser refuses.
"""

from __future__ import annotations

import base64
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own, rng_for

with atheris.instrument_imports(include=["mailpush.handshake"]):
    from mailpush import handshake as hs
    from mailpush.errors import HandshakeError
    from mailpush.speedups import C

NAME = "handshake"
MAX_LEN = 9000  # past MAX_HEAD_BYTES (8192), so 431 is reachable
REFUSALS = {400, 405, 426, 431, 505}


def handshake(data: bytes):
    """The Request, or the HandshakeError refusing it."""
    try:
        end = hs.find_head_end(data, len(data))
        head = data[:end] if end >= 0 else data + b"\r\n\r\n"
        req = hs.parse_request(head)
        hs.query_param(req.query, "token")
        hs.cookie_value(req.cookie, "mailpush_token")
        hs.check_upgrade(req)
    except HandshakeError as e:
        expect(e.status in REFUSALS, f"refused with status {e.status}: {e.reason}")
        expect(isinstance(e.reason, str) and e.reason, "a refusal without a reason")
        hs.response_error(e)
        return e
    raw = base64.b64decode(req.key, validate=True)
    expect(len(raw) == 16, f"accepted a key of {len(raw)} bytes")
    hs.response_101(req.key)
    return req


def poisoned(head: bytes) -> bool:
    """A NUL, or a CR or LF outside a CRLF pair, somewhere in ``head``."""
    if b"\0" in head:
        return True
    crlf = head.count(b"\r\n")
    return head.count(b"\r") != crlf or head.count(b"\n") != crlf


def c_agrees(head: bytes) -> None:
    """The C parser against the Python one on the same head."""
    if C is None:
        return
    got = C.parse_request(head, hs.Request, hs._FIELDS)
    saved, hs._c_parse_request = hs._c_parse_request, None
    try:
        want, err = own(HandshakeError, hs.parse_request, head)
    finally:
        hs._c_parse_request = saved
    if err is not None:
        expect(got is None, f"C accepted a head Python refuses with {err.status}: {err.reason}")
    elif got is not None:
        for name in hs.Request.__slots__:
            expect(getattr(got, name) == getattr(want, name), f"C and Python differ on {name}")


def check(data: bytes) -> None:
    result = handshake(data)
    whole, whole_err = own(HandshakeError, hs.find_head_end, data, len(data))
    if whole_err is None:
        head = data[:whole] if whole >= 0 else data + b"\r\n\r\n"
        c_agrees(head)
        if poisoned(head):
            expect(isinstance(result, HandshakeError) and result.status == 400, f"NUL/CR/LF in a field: {result!r}")
    # The same data read in steps: a few prefixes, in order.
    rng = rng_for(data)
    seen = -1
    for n in sorted(rng.randint(0, len(data)) for _ in range(6)) + [len(data)]:
        end, err = own(HandshakeError, hs.find_head_end, data, n)
        if err is not None:
            expect(err.status == 431 and whole_err is not None, f"prefix {n}: {err.status} {err.reason}")
            return
        if end >= 0:
            expect(seen in (-1, end), f"prefix {n}: end {end} after {seen}")
            seen = end
    expect(seen == whole, f"the end found in steps ({seen}) is not the whole input's ({whole})")


# Seeds: requests from tests/test_properties.py and tests/test_handshake.py.
KEY = base64.b64encode(b"0123456789abcdef")
_HEADERS = [
    b"Host: push.example",
    b"Upgrade: websocket",
    b"Connection: keep-alive, Upgrade",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 13",
    b"Origin: https://mail.example",
    b"Cookie: a=b; mailpush_token=tok",
    b"Authorization: Bearer tok",
    b"User-Agent: Mozilla/5.0",
]


def _request(line: bytes, headers: list[bytes]) -> bytes:
    return b"\r\n".join([line, *headers]) + b"\r\n\r\n"


SEEDS = {
    "valid": _request(b"GET /v1/ws?token=abc HTTP/1.1", _HEADERS),
    "minimal": _request(b"GET /v1/ws HTTP/1.1", _HEADERS[:5]),
    "plain-get-http10": b"GET /healthz HTTP/1.0\r\n\r\n",
    "post": _request(b"POST /v1/ws HTTP/1.1", _HEADERS[:5]),
    "version-8": _request(b"GET / HTTP/1.1", [*_HEADERS[:4], b"Sec-WebSocket-Version: 8"]),
    "bad-key": _request(b"GET / HTTP/1.1", [*_HEADERS[:3], b"Sec-WebSocket-Key: abc=", _HEADERS[4]]),
    "dup-host": _request(b"GET / HTTP/1.1", [_HEADERS[0], *_HEADERS[:5]]),
    "bare-lf": b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "many-headers": b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n",
    "huge-header": b"GET / HTTP/1.1\r\nHost: " + b"a" * 8300 + b"\r\n\r\n",
    "http2": b"GET / HTTP/2\r\n\r\n",
    "non-ascii-target": b"GET \xff HTTP/1.1\r\n\r\n",
    "quoted-cookie": _request(b"GET /v1/ws?x=1&token=a%20b+c HTTP/1.1", [*_HEADERS[:5], b'Cookie: mailpush_token="q"']),
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
