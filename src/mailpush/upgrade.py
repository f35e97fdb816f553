"""The upgrade: from an accepted socket to an open :class:`Connection`.

The request is read straight off the socket and parsed by the sans-I/O
:mod:`mailpush.handshake`; refusals are answered with their HTTP status and
a one-line reason, ``GET /healthz`` is answered here for load balancers, and
only what the application needs is kept (the subscriber of the token).

A handshake slot (``--max-handshakes``) is held only while the request's
bytes are being parsed, never while waiting for them: a connection that
stalls in the middle of its request holds a parked task and a socket, no
slot (the article's point: no worker waits for I/O).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from . import handshake as hs
from .auth import PROTOCOL, TOKEN_PROTOCOL_PREFIX, offers_protocol, token_from_request
from .connection import F_ECHO, Connection
from .errors import AuthError, HandshakeError
from .frames import CloseCode, encode_close
from .log import LogLimiter
from .sse import CLIENT_JS_PATH, SSE_PATH, client_js_response, open_sse

if TYPE_CHECKING:
    from .context import Context

__all__ = ["open_connection", "answer_head", "expire_handshake", "send_answer", "close_socket", "RESPONSE_500"]

_wait_readable = trio.lowlevel.wait_readable
_notify_closing = trio.lowlevel.notify_closing

_refuse_log = LogLimiter()
RESPONSE_500 = hs.response_text(500, "internal error; the server logged it\n")


def _refuse(ctx: Context, sock: socket.socket, err: HandshakeError, reason_label: str) -> None:
    ctx.stats.rejections[reason_label] += 1
    if n := _refuse_log.tick():  # a flood of bad requests is one line a second
        ctx.log.warning("handshake_refused", status=err.status, reason=err.reason, count=n)
    send_answer(sock, hs.response_error(err))


def send_answer(sock: socket.socket, data: bytes) -> None:
    """Best-effort send of a small response (the socket's owner closes it)."""
    try:
        sock.send(data)
    except OSError:
        pass


def close_socket(sock: socket.socket) -> None:
    """Close ``sock`` (FIN), waking any task parked on it; closed already is fine."""
    if sock.fileno() >= 0:
        _notify_closing(sock)
        sock.close()


# Rejection reasons by HTTP status, for the metrics label.
_REASONS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method",
    408: "timeout",
    426: "version",
    429: "per_subscriber_cap",
    431: "too_large",
    503: "overloaded",
    505: "http_version",
}


def answer_head(ctx: Context, sock: socket.socket, data: bytes) -> tuple[Connection | None, bytes, bool]:
    """Read what ``sock`` has now (one ``recv``) after the ``data`` read
    before, and answer the request once its head is complete. Synchronous:
    the caller holds a handshake slot around it.

    Returns ``(connection, rest, True)`` when done: the new connection
    (which owns the socket from then on) and the bytes the client sent after
    the head, or ``(None, b"", True)`` when refused or gone (the socket is
    still the caller's to close); ``(None, data so far, False)`` when the
    head is not complete yet.
    """
    try:
        chunk = sock.recv(hs.MAX_HEAD_BYTES + 1 - len(data))
    except BlockingIOError:
        return None, data, False
    except OSError:
        return None, b"", True
    if not chunk:  # closed before finishing: costs nothing lasting
        return None, b"", True
    data = chunk if not data else data + chunk
    try:
        end = hs.find_head_end(data, len(data))
        if end < 0:
            return None, data, False
        conn = _upgrade(ctx, sock, hs.parse_request(data[:end]))
    except HandshakeError as e:
        _refuse(ctx, sock, e, _REASONS.get(e.status, str(e.status)))
        return None, b"", True
    return conn, (data[end:] if conn is not None else b""), True


async def _handshake(ctx: Context, sock: socket.socket, slot: object) -> tuple[Connection | None, bytes]:
    """Read and answer the upgrade request.

    A handshake slot is held only while there are bytes to parse: the
    accept loop took one for the first read; whenever the socket has
    nothing more to read, the slot goes back before waiting, and a slot is
    taken again when bytes arrive. A connection that stalls in the middle
    of its request (or sends nothing) holds a parked task and a socket, no
    slot, until its handshake deadline.

    Returns the new connection (or None when refused or gone: the caller
    closes the socket) and any bytes the client sent after the request head.
    """
    limiter = ctx.handshakes
    held = True
    data = b""
    try:
        while True:
            conn, data, done = answer_head(ctx, sock, data)
            if done:
                return conn, data
            if held:
                limiter.release_on_behalf_of(slot)
                held = False
            await _wait_readable(sock)
            try:
                limiter.acquire_on_behalf_of_nowait(slot)
            except trio.WouldBlock:
                await limiter.acquire_on_behalf_of(slot)
            held = True
    finally:
        if held:
            limiter.release_on_behalf_of(slot)


def _upgrade(ctx: Context, sock: socket.socket, req: hs.Request) -> Connection | None:
    config = ctx.config
    if not req.wants_websocket and req.method in ("GET", "HEAD"):
        if req.path == "/healthz":
            status, body = ctx.health(own_sockets=1)
            send_answer(sock, hs.response_text(status, body + "\n"))
            return None
        if req.path == CLIENT_JS_PATH:
            send_answer(sock, client_js_response(req.method == "HEAD"))
            return None
        if req.path == SSE_PATH and req.method == "GET":
            return open_sse(ctx, sock, req)
    flags = 0
    if req.path == config.ws_path:
        pass
    elif config.echo_path is not None and req.path == config.echo_path:
        flags = F_ECHO
    else:
        raise HandshakeError(404, f"no WebSocket endpoint at {req.path[:100]}, connect to {config.ws_path}")
    hs.check_upgrade(req)
    if config.allowed_origins and req.origin not in config.allowed_origins:
        raise HandshakeError(403, f"origin {req.origin[:100] or '(none)'} is not allowed")
    if ctx.draining:
        raise HandshakeError(503, "server is draining, reconnect to another instance", (("Retry-After", "1"),))
    protocol = PROTOCOL if req.protocols and offers_protocol(req) else ""
    if req.protocols and not protocol and TOKEN_PROTOCOL_PREFIX in req.protocols:
        raise HandshakeError(
            400, f"offer subprotocol '{PROTOCOL}' beside '{TOKEN_PROTOCOL_PREFIX}<token>': it is the one answered"
        )
    subscriber, expires = "", 0
    if not flags:
        try:
            subscriber, expires = ctx.verifier.verify_claims(token_from_request(req))
        except AuthError as e:
            if not protocol:
                raise
            _refuse_in_band(ctx, sock, req, e, CloseCode.TOKEN_EXPIRED if e.expired else CloseCode.UNAUTHORIZED)
            return None
        if ctx.subscriber_check is not None and (err := ctx.unservable(subscriber)) is not None:
            if not protocol:
                raise err
            _refuse_in_band(ctx, sock, req, err, CloseCode.UNAUTHORIZED)
            return None
        if ctx.at_subscriber_cap(subscriber):
            err = ctx.subscriber_cap_error()
            if not protocol:
                raise err
            _refuse_in_band(ctx, sock, req, err, CloseCode.TOO_MANY_CONNECTIONS)
            return None
    try:
        sock.send(hs.response_101(req.key, protocol))
    except OSError:
        return None
    return Connection(sock, ctx, subscriber, flags=flags, expires=expires)


def _refuse_in_band(ctx: Context, sock: socket.socket, req: hs.Request, err: HandshakeError, code: int) -> None:
    """Refuse a ``mailpush.v1`` client after the upgrade, with a close code
    (4001 token expired: fetch a new one; 4003 token refused; 4008 too many
    connections of this subscriber): a browser cannot read the status of a
    refused upgrade, only a close code. The socket's owner closes it after
    this."""
    label = "expired" if getattr(err, "expired", False) else _REASONS.get(err.status, str(err.status))
    ctx.stats.rejections[label] += 1
    if n := _refuse_log.tick():
        ctx.log.warning("handshake_refused", status=err.status, reason=err.reason, count=n, in_band=code)
    ctx.stats.closes[code] += 1
    send_answer(sock, hs.response_101(req.key, PROTOCOL) + encode_close(code, err.reason[:120]))


async def open_connection(ctx: Context, sock: socket.socket, slot: object) -> tuple[Connection | None, bytes]:
    """Upgrade ``sock`` under the server's handshake deadline.

    No cancel scope or timer per connection: the deadline goes into the
    timers' queue, and the timer task answers 408 and closes the socket if
    the handshake is still going by then (which wakes us here).

    Args:
      slot: the handshake slot the accept loop took on this one's behalf
        (see :func:`_handshake` for when it is held).

    Returns:
      The new connection, which owns the socket from then on, or None when
      refused or gone (the socket is still the caller's to close); and any
      bytes the client sent after the request head.
    """
    entry = ctx.timers.handshake_deadline(sock)
    try:
        return await _handshake(ctx, sock, slot)
    except trio.ClosedResourceError:
        return None, b""  # expired: the timer task answered and closed it
    finally:
        entry[1] = None


def expire_handshake(ctx: Context, sock: socket.socket) -> None:
    """Called by the timer task for a handshake past its deadline: answer
    408 and close the socket, the one close outside the socket's owner (it
    wakes the handshake wherever it waits: on the socket, which raises,
    or for a slot, after which its next read fails)."""
    _refuse(
        ctx, sock, HandshakeError(408, f"handshake not finished within {ctx.config.handshake_timeout:g} s"), "timeout"
    )
    close_socket(sock)
