"""Fuzz target ``admin_http``: the admin API's HTTP/1.1 (mailpush.admin_http,
h11 underneath), driven without sockets.

Input: one control byte picking the head and body limits (small ones, so
431 and 413 are reachable with short inputs), then the bytes a client
sends on one admin connection: requests, pipelined or not, with bodies by
Content-Length or chunked.

Checks:

- ``parse_requests`` and an :class:`AdminConnection` driven the way
  mailpush.admin drives it (receive a read, ``next()`` until it needs data,
  answer every request, ``100 Continue`` when asked) return requests or
  raise only :class:`AdminHTTPError`, with a 4xx/5xx status and a message
  (bad chunk sizes, a repeated Content-Length, Content-Length with
  Transfer-Encoding, an over-long head or body, ...);
- every request returned is within the limits: a body of at most
  ``max_body`` bytes, a method, a path;
- the framing rules of the docstring of mailpush.admin_http: a request
  with a repeated Content-Length, or with both Content-Length and
  Transfer-Encoding, is never accepted (400), whatever ends its lines
  (h11 takes a bare LF as a line end too), and 431 is only for a head
  larger than ``max_head``;
- differential: the connection fed in pieces (split points derived from the
  input) returns the same requests as ``parse_requests`` on the whole input,
  and fails exactly when it fails (the status may differ: an over-long head
  can be noticed before or after a malformed line in it).
"""

from __future__ import annotations

import os
import re
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own, pieces, rng_for, split_points

with atheris.instrument_imports(include=["mailpush.admin_http", "h11"]):
    from mailpush.admin_http import CLOSED, CONTINUE, NEED_DATA, AdminConnection, Request, parse_requests
    from mailpush.errors import AdminHTTPError

NAME = "admin_http"
MAX_LEN = 4096
HEADS = (64, 256, 1024, 16 * 1024)
BODIES = (0, 16, 256, 4096)


def summary(requests: list[Request], max_body: int) -> list[tuple]:
    out = []
    for r in requests:
        expect(type(r) is Request, f"returned a {type(r).__name__}")
        expect(len(r.body) <= max_body, f"a body of {len(r.body)} bytes over {max_body}")
        expect(isinstance(r.method, str) and r.method, "a request without a method")
        expect(isinstance(r.path, str) and isinstance(r.query, str), "a request without a path")
        out.append((r.method, r.path, r.query, sorted(r.headers.items()), r.body, r.http10))
    return out


def converse(chunks: list[bytes], max_head: int, max_body: int) -> tuple[list[Request], AdminHTTPError | None]:
    """What mailpush.admin does on a connection: read, take requests,
    answer each, until the peer is done, the connection ends or a request
    is refused. Returns the requests and the refusal (or None)."""
    conn = AdminConnection(max_head, max_body)
    reads = iter([*chunks, b""])  # b"": the peer closed
    out: list[Request] = []
    while True:
        got, err = own(AdminHTTPError, conn.next)
        if err is not None:
            check_error(err)
            return out, err
        if got is CONTINUE:
            conn.continue_bytes()
            continue
        if got is NEED_DATA:
            chunk = next(reads, None)
            if chunk is None:
                return out, None  # closed while a request was incomplete: h11 said nothing more
            conn.receive(chunk)
            continue
        if got is CLOSED:
            return out, None
        expect(type(got) is Request, f"next() returned {got!r}")
        out.append(got)
        conn.respond(200, "text/plain", b"ok")
        if not conn.keep_alive:
            return out, None


def check_error(err: AdminHTTPError) -> None:
    expect(400 <= err.status < 600, f"status {err.status}")
    expect(isinstance(err.message, str) and err.message, "an error without a message")


_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head: a blank line, CRLF or bare LF


def first_head(stream: bytes) -> bytes | None:
    """The first request's head up to its blank line, as h11 finds it."""
    m = _HEAD_END.search(stream)
    return stream[: m.end()] if m else None


def framing_headers(head: bytes) -> list[bytes]:
    """The lower-cased names of the Content-Length and Transfer-Encoding
    fields of a head, read the way h11 splits it into lines."""
    names = [line.rstrip(b"\r").partition(b":")[0].lower() for line in head.split(b"\n")[1:]]
    return [n for n in names if n in (b"content-length", b"transfer-encoding")]


def check(data: bytes) -> None:
    if not data:
        return
    max_head = HEADS[data[0] % len(HEADS)]
    max_body = BODIES[(data[0] >> 2) % len(BODIES)]
    stream = data[1:]
    whole, err = own(AdminHTTPError, parse_requests, stream, max_head, max_body)
    if err is not None:
        check_error(err)
    # The same, taking the requests off a connection the way mailpush.admin does.
    requests, conn_err = converse([stream], max_head, max_body)
    expect((err is None) == (conn_err is None), f"parse_requests: {err!r}; the connection: {conn_err!r}")
    if err is None:
        expect(summary(requests, max_body) == summary(whole, max_body), "parse_requests and the connection differ")
    head = first_head(stream)
    if head is not None and requests:
        framing = framing_headers(head)
        expect(framing.count(b"content-length") <= 1, "accepted a request with a repeated Content-Length")
        expect(len(set(framing)) <= 1, "accepted a request with both Content-Length and Transfer-Encoding")
    if conn_err is not None and conn_err.status == 431 and not requests and head is not None:
        expect(len(head) > max_head, f"a head of {len(head)} bytes refused as larger than {max_head}")
    # In pieces, as reads hand them over.
    split, split_err = converse(pieces(stream, split_points(rng_for(data), len(stream))), max_head, max_body)
    expect((err is None) == (split_err is None), f"whole: {err!r}; in pieces: {split_err!r}")
    if err is None:
        expect(summary(split, max_body) == summary(whole, max_body), "other requests when the bytes arrive in pieces")


def _control(max_head: int, max_body: int) -> bytes:
    return bytes((HEADS.index(max_head) | BODIES.index(max_body) << 2,))


PUBLISH = b'{"subscriber":"a","event":"e"}'
# Seeds: requests from tests/test_admin.py and the README.
SEEDS = {
    "get-healthz": _control(1024, 256) + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    "publish": _control(1024, 256)
    + b"POST /v1/publish HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nContent-Type: application/json\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(PUBLISH)
    + PUBLISH,
    "chunked": _control(1024, 256)
    + b"POST /v1/publish HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(PUBLISH), PUBLISH),
    "pipelined": _control(1024, 256)
    + b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "http10": _control(256, 16) + b"GET / HTTP/1.0\r\n\r\n",
    "expect-100": _control(1024, 256)
    + b"POST /v1/publish HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
    "dup-content-length": _control(1024, 256)
    + b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "cl-and-te": _control(1024, 256)
    + b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk": _control(1024, 256)
    + b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
    "body-too-big": _control(1024, 16) + b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n\r\n" + b"x" * 40,
    "head-too-big": _control(64, 16) + b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 100 + b"\r\n\r\n",
    "http2": _control(1024, 256) + b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
