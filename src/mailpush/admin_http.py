"""HTTP/1.1 for the admin API, sans I/O, on h11.

The admin port sees a handful of clients (a mail store publishing, a
Prometheus scraper, a health probe), so it uses a real, strict HTTP/1.1
implementation rather than a parser of our own: h11 (the state machine of
the HTTP/1.1 connection, no I/O). :class:`AdminConnection` adds what the
admin API needs on top, all limits named:

- the whole request head within :data:`MAX_HEAD` bytes however the bytes
  arrive (h11's incomplete-event bound; 431 beyond);
- bodies up to :data:`MAX_BODY` (413 as soon as a Content-Length or the
  chunks so far say more);
- strict framing: h11 refuses bad or signed chunk sizes, over-long chunk
  lines and conflicting lengths; on top, a repeated ``Content-Length`` and
  a request with both ``Content-Length`` and ``Transfer-Encoding`` (a
  request-smuggling shape) are 400;
- ``Expect: 100-continue`` is answered before the body is read;
- HTTP/1.0 and ``Connection: close`` end the connection after the answer
  (h11's keep-alive rules).

The Trio side (:mod:`mailpush.admin`) feeds received bytes in, takes
:class:`Request` objects out, and sends the bytes of the answers.

Error handling: every fault of the peer raises :class:`AdminHTTPError`
carrying the status to answer with; after it the connection is answered
(when the state allows) and closed. Nothing else escapes :meth:`next`.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import h11

from .errors import AdminHTTPError
from .items import MAX_PUBLISH_BYTES

__all__ = ["MAX_HEAD", "MAX_BODY", "Request", "AdminConnection", "NEED_DATA", "CONTINUE", "CLOSED", "parse_requests"]

# The request line and headers: admin clients send a few short headers;
# 16 KiB is room for a long Authorization and proxies' additions (431).
MAX_HEAD = 16 * 1024
# Largest body: the largest publish body (413 beyond; split the batch).
MAX_BODY = MAX_PUBLISH_BYTES

# What :meth:`AdminConnection.next` returns besides a request.
NEED_DATA = "need-data"  # read more and feed it
CONTINUE = "continue"  # send :meth:`AdminConnection.continue_bytes`, then read on
CLOSED = "closed"  # the peer closed between requests

# h11 takes bare LF for CRLF (RFC 9112 §2.2 allows it), so the raw head is
# read the same way: lines end at LF, the head at the first blank line.
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)")
_HEAD_END = re.compile(rb"\n\r?\n")


class Request:
    """One complete admin request: what the routes need, nothing more."""

    __slots__ = ("method", "path", "query", "headers", "body", "http10")

    def __init__(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes, http10: bool) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers  # lower-case names; a repeated header's last value
        self.body = body
        self.http10 = http10

    def __repr__(self) -> str:
        return f"Request({self.method} {self.path}, {len(self.body)} bytes)"


class AdminConnection:
    """One admin connection's HTTP/1.1 state: bytes in, requests out,
    answers to bytes.

    Call :meth:`receive` with what was read (``b""`` at EOF), then
    :meth:`next` until it returns :data:`NEED_DATA`; answer each
    :class:`Request` with :meth:`respond` before asking for the next one.
    """

    def __init__(self, max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.max_body = max_body
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._head = bytearray()  # the raw bytes of the current head, to check what h11 merges
        self._continue_sent = False

    # -- receiving ------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Bytes of a request have arrived and its answer is not sent yet."""
        return self._request is not None or self._h11.their_state is not h11.IDLE or bool(self._h11.trailing_data[0])

    def receive(self, data: bytes) -> None:
        """Bytes read from the connection; ``b""`` when the peer closed."""
        idle = self._request is None and self._h11.their_state is h11.IDLE
        if idle and data and len(self._head) <= self.max_head:
            self._head += data
        self._h11.receive_data(data)

    def next(self) -> Request | str:
        """The next complete request, or NEED_DATA, CONTINUE or CLOSED.

        Raises:
          AdminHTTPError: the request is malformed or too large; answer it
            with :meth:`error_bytes` and close.
        """
        try:
            return self._next()
        except h11.RemoteProtocolError as e:
            raise AdminHTTPError(e.error_status_hint, _describe(e)) from None

    def _next(self) -> Request | str:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                if (
                    self._request is not None
                    and self._h11.they_are_waiting_for_100_continue
                    and not self._continue_sent
                ):
                    self._continue_sent = True
                    return CONTINUE
                return NEED_DATA
            if type(event) is h11.Request:
                if event.method == b"CONNECT":
                    # A 2xx to CONNECT would switch h11 to a tunnel.
                    raise AdminHTTPError(405, "CONNECT is not supported here", (("Allow", "GET, HEAD, POST"),))
                self._check_head(event)
                self._request = event
            elif type(event) is h11.Data:
                if len(self._body) + len(event.data) > self.max_body:
                    raise AdminHTTPError(413, f"body larger than {self.max_body} bytes: split the batch")
                self._body += event.data
            elif type(event) is h11.EndOfMessage:
                return self._complete()
            elif type(event) is h11.ConnectionClosed:
                return CLOSED
            else:  # PAUSED: the previous answer was not sent
                raise RuntimeError("next() called before the previous request was answered")

    def _check_head(self, event: h11.Request) -> None:
        head = bytes(self._head).lower().lstrip(b"\r\n")  # h11 skips blank lines before a request
        self._head = bytearray()
        found = _HEAD_END.search(head)
        if found is None or found.end() > self.max_head:
            # h11 bounds what it buffers while incomplete; a head that
            # arrived whole in one read is held to the same limit here.
            raise AdminHTTPError(431, f"request head larger than {self.max_head} bytes")
        end = found.end()
        lengths = _CONTENT_LENGTH.findall(head, 0, end)
        if len(lengths) > 1 or any(b"," in v for v in lengths):
            raise AdminHTTPError(400, "more than one Content-Length")
        has_te = any(name == b"transfer-encoding" for name, _ in event.headers)
        if lengths and has_te:
            raise AdminHTTPError(400, "both Content-Length and Transfer-Encoding: send one of them")
        if lengths:
            try:
                n = int(lengths[0].strip() or b"0")
            except ValueError:
                raise AdminHTTPError(400, "Content-Length is not a number") from None
            if n > self.max_body:
                raise AdminHTTPError(413, f"body larger than {self.max_body} bytes: split the batch")

    def _complete(self) -> Request:
        event = self._request
        assert event is not None
        body = bytes(self._body)
        self._body = bytearray()
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        return Request(event.method.decode("latin-1"), path, query, headers, body, event.http_version == b"1.0")

    # -- answering ------------------------------------------------------------

    def continue_bytes(self) -> bytes:
        """The interim ``100 Continue`` a waiting client gets before its body."""
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))

    def respond(self, status: int, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
        """The bytes of the answer to the current request; the connection
        is then ready for the next one (see :attr:`keep_alive`)."""
        fields = [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers]
        data = self._h11.send(h11.Response(status_code=status, headers=fields, reason=_phrase(status)))
        if body and not (self._request is not None and self._request.method == b"HEAD"):
            data += self._h11.send(h11.Data(data=body))
        data += self._h11.send(h11.EndOfMessage())
        self._request = None
        self._continue_sent = False
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            # A pipelined next request may be buffered already: its head
            # starts here.
            self._head = bytearray(self._h11.trailing_data[0][: self.max_head + 1])
        return data

    @property
    def keep_alive(self) -> bool:
        """The connection may carry another request."""
        return self._h11.our_state is h11.IDLE

    def error_bytes(
        self, status: int, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()
    ) -> bytes:
        """An answer after an error, followed by a close; b"" when the
        state of the connection allows no answer (one was already sent)."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""
        fields = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Connection", "close"), *headers]
        try:
            data = self._h11.send(h11.Response(status_code=status, headers=fields, reason=_phrase(status)))
            return data + self._h11.send(h11.Data(data=body)) + self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return b""


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _describe(error: h11.RemoteProtocolError) -> str:
    """h11's message, without the echo of the peer's bytes it sometimes
    carries (a reason is sent back as-is and should stay short)."""
    text = str(error)
    cut = text.find(": bytearray(")
    return (text[:cut] if cut >= 0 else text)[:200]


def parse_requests(data: bytes, max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> list[Request]:
    """Every request in ``data``, as one connection would read them (each
    answered with an empty 200 so the next can follow). For tests and
    fuzzing of the parser.

    Raises:
      AdminHTTPError: as :meth:`AdminConnection.next`.
    """
    conn = AdminConnection(max_head, max_body)
    conn.receive(data)
    conn.receive(b"")
    out: list[Request] = []
    while True:
        got = conn.next()
        if got is CONTINUE:
            conn.continue_bytes()
            continue
        if type(got) is not Request:
            return out
        out.append(got)
        conn.respond(200, "text/plain", b"")
        if not conn.keep_alive:
            return out
