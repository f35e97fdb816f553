"""Server-Sent Events, the fallback for clients behind proxies that break
WebSockets, and the browser client's own file.

``GET /v1/events`` on the listen address (token from the cookie, ``Authorization:
Bearer`` or the ``token`` query parameter; ``events=a,b`` filters) answers
``text/event-stream`` and then stays open as one more kind of connection:
the same parked reader, the same registry, dispatcher, keepalive, limits and
drain as a WebSocket. Every SSE message's ``data:`` is exactly the JSON
packet a WebSocket would have carried (``subscribed``, ``event``,
``resync``, …); events with an offset carry ``id: EPOCH:OFFSET``, so an
``EventSource`` that reconnects sends ``Last-Event-ID`` and is answered from
the history like a WebSocket subscribe with ``since`` (the client may also
pass ``last_event_id=EPOCH:OFFSET`` in the query). Keepalive pings are
comment lines; the end of a connection is a last ``{"type":"close",...}``
packet (after a ``retry:`` hint on a drain), then the socket closes.

An idle SSE connection costs what an idle WebSocket does: its one parked
task, the socket and a :class:`SSEConnection` (a :class:`Connection` plus
the epoch it was told).

``GET /v1/client.js`` serves the browser client shipped inside the package
(``clients/js/mailpush.js`` in the repository) with a JavaScript MIME type,
caching and CORS headers, so a mail web app on another origin can import it.
"""

from __future__ import annotations

import hashlib
import re
import socket
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import unquote

import attrs
import msgspec

from . import handshake as hs
from .auth import token_from_request
from .connection import CLOSED, CLOSING, F_CLOSE_AFTER_FLUSH, F_SEEN, OPEN, Connection
from .errors import HandshakeError
from .packets import ALL_EVENTS, MAX_EPOCH_LEN, MAX_EVENT_LEN, MAX_FILTER_EVENTS, Since

if TYPE_CHECKING:
    from .context import Context

__all__ = ["SSE_PATH", "CLIENT_JS_PATH", "SSEConnection", "open_sse", "client_js_response", "parse_event_id"]

SSE_PATH = "/v1/events"
CLIENT_JS_PATH = "/v1/client.js"
# What an EventSource waits before reconnecting after the stream ends, in
# ms, unless a drain said otherwise (the browser default is ~3 s).
RETRY_MS = 2000
# How long browsers and proxies may keep client.js (seconds).
CLIENT_JS_MAX_AGE = 300

_PING = b": ping\n\n"
_RECONNECT_HINT = re.compile(r"reconnect_after_ms=(\d+)")


class _Packet(msgspec.Struct):
    """The fields of an outgoing packet that make its SSE ``id``."""

    type: str = ""
    epoch: str | None = None
    offset: int | None = None


_decode_packet = msgspec.json.Decoder(_Packet).decode


@attrs.define(slots=True, eq=False, weakref_slot=False)
class SSEConnection(Connection):
    """A connection that speaks ``text/event-stream`` instead of WebSocket
    frames. The dispatcher, recovery and keepalive hand it the same frames
    as any connection; :meth:`send` turns each into an SSE message."""

    epoch: str = ""  # the stream's epoch, from the subscribed or resync packet

    def send(self, frame: bytes) -> bool:
        """Send one WebSocket frame's packet as an SSE message."""
        return self.state == OPEN and self._push(self._message(frame))

    def ping(self) -> bool:
        """A comment line: keeps proxies from timing the stream out. An SSE
        client cannot answer, so it is never judged by pongs (a dead peer
        shows as a failed or stalled send)."""
        return self.state == OPEN and self._push(_PING)

    def close(self, code: int, reason: str = "", *, wait_for_peer: bool = True) -> None:
        """End the stream: a last ``close`` packet (with a ``retry:`` hint
        when the reason carries ``reconnect_after_ms``), then the socket."""
        if self.state != OPEN:
            return
        self.state = CLOSING
        self.ctx.stats.closes[code] += 1
        self.flags |= F_CLOSE_AFTER_FLUSH
        hint = _RECONNECT_HINT.search(reason)
        retry = b"retry: %d\n" % int(hint.group(1)) if hint else b""
        packet = msgspec.json.encode({"type": "close", "code": int(code), "reason": reason})
        self._push(retry + b"data: " + packet + b"\n\n")
        if self.state != CLOSED and self.queue is None:
            self.abort()
        elif self.state != CLOSED:
            self.ctx.timers.close_deadline(self)

    def on_data(self, data: memoryview | bytes) -> None:
        """An SSE client sends nothing after its request; whatever comes is
        ignored (it still shows the peer is alive)."""
        self.flags |= F_SEEN

    def _message(self, frame: bytes) -> bytes:
        n = frame[1] & 0x7F
        payload = frame[2 + (n == 126) * 2 + (n == 127) * 8 :]
        if frame[0] & 0x0F == 0x9:  # a ping
            return _PING
        head = b""
        packet = _decode_packet(payload)
        if packet.type == "event":
            if packet.offset is not None and self.epoch:
                head = b"id: %s:%d\n" % (self.epoch.encode(), packet.offset)
        elif packet.epoch is not None:  # subscribed, resync: where the stream stands
            self.epoch = packet.epoch
            if packet.offset is not None:
                head = b"id: %s:%d\n" % (packet.epoch.encode(), packet.offset)
        if b"\r" in payload:  # only ever JSON whitespace: one line break, as \n
            payload = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return head + b"data: " + payload.replace(b"\n", b"\ndata: ") + b"\n\n"


def parse_event_id(value: str) -> Since:
    """``EPOCH:OFFSET`` (an SSE ``id``) as the position to resume after.

    Raises:
      HandshakeError: 400, not of that form.
    """
    epoch, colon, offset = value.rpartition(":")
    if not colon or not offset.isdigit() or len(offset) > 19 or len(epoch) > MAX_EPOCH_LEN:
        raise HandshakeError(400, "Last-Event-ID must be EPOCH:OFFSET, as the stream's id lines give it")
    return Since(epoch, int(offset))


def _events_filter(query: str) -> frozenset[str] | None:
    raw = hs.query_param(query, "events")
    if not raw:
        return None
    names = [unquote(n) for n in raw.split(",") if n]
    if len(names) > MAX_FILTER_EVENTS or any(len(n) > MAX_EVENT_LEN for n in names):
        raise HandshakeError(
            400, f"events: at most {MAX_FILTER_EVENTS} comma-separated names of {MAX_EVENT_LEN} characters each"
        )
    return None if not names or ALL_EVENTS in names else frozenset(names)


def open_sse(ctx: Context, sock: socket.socket, req: hs.Request) -> SSEConnection | None:
    """Answer ``GET /v1/events`` and subscribe the new stream.

    Returns the connection (the socket is its own from then on), or None if
    the answer could not be sent (the caller closes the socket).

    Raises:
      HandshakeError: 400 a bad filter or Last-Event-ID, 401 no valid
        token, 403 an origin not allowed, 429 the subscriber at its cap,
        503 draining.
    """
    config = ctx.config
    if config.allowed_origins and req.origin not in config.allowed_origins:
        raise HandshakeError(403, f"origin {req.origin[:100] or '(none)'} is not allowed")
    if ctx.draining:
        raise HandshakeError(503, "server is draining, reconnect to another instance", (("Retry-After", "1"),))
    events = _events_filter(req.query)
    last = req.last_event_id or hs.query_param(req.query, "last_event_id") or ""
    since = parse_event_id(last) if last else None
    subscriber, expires = ctx.verifier.verify_claims(token_from_request(req))
    if (err := ctx.unservable(subscriber)) is not None:
        raise err
    if ctx.at_subscriber_cap(subscriber):
        raise ctx.subscriber_cap_error()
    headers = [
        "HTTP/1.1 200 OK",
        "Content-Type: text/event-stream; charset=utf-8",
        "Cache-Control: no-cache, no-transform",
        "X-Accel-Buffering: no",
    ]
    if req.origin:
        headers += [
            f"Access-Control-Allow-Origin: {req.origin}",
            "Access-Control-Allow-Credentials: true",
            "Vary: Origin",
        ]
    head = ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + b"retry: %d\n\n" % RETRY_MS
    try:
        sock.send(head)
    except OSError:
        return None
    conn = SSEConnection(sock, ctx, subscriber, events=events, expires=expires)
    if ctx.registry.add(conn):
        ctx.dispatcher.changed(subscriber)
    ctx.dispatcher.subscribe(conn, since)
    return conn


_client_js: dict[bool, bytes] = {}


def client_js_response(head_only: bool) -> bytes:
    """The answer to ``GET /v1/client.js`` (404 if the package lacks it)."""
    cached = _client_js.get(head_only)
    if cached is not None:
        return cached
    try:
        body = (resources.files("mailpush") / "client.js").read_bytes()
    except OSError:
        return hs.response_text(404, "client.js is not in this installation\n")
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    answer = hs.response_text(
        200,
        body,
        (
            ("Cache-Control", f"public, max-age={CLIENT_JS_MAX_AGE}"),
            ("ETag", etag),
            ("Access-Control-Allow-Origin", "*"),
            ("X-Content-Type-Options", "nosniff"),
        ),
        content_type="text/javascript; charset=utf-8",
    )
    if head_only:
        answer = answer[: answer.index(b"\r\n\r\n") + 4]
    _client_js[head_only] = answer
    return answer
