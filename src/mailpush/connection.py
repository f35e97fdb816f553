"""One WebSocket connection: the parked reader, the send queue, writers on demand.

Each accepted socket gets exactly one task, :func:`serve_socket`. It reads
the upgrade request, answers it, and then parks on
``trio.lowlevel.wait_readable`` holding no buffer. When bytes arrive it
borrows a buffer from the :class:`~mailpush.pool.Pool`, reads, handles the
packets, and gives the buffer back before parking again.

Sending is synchronous: :meth:`Connection.send` tries a non-blocking
``send()`` first, and only when the socket cannot take the whole frame does
it queue the rest and spawn a writer task, which exits as soon as the queue
is drained. An idle connection is this one parked task, a plain socket and a
:class:`Connection` of a few fields; the frame decoder and the send queue
exist only while they hold something.

Error handling: a peer that breaks RFC 6455 gets the close code of the
:class:`~mailpush.errors.ProtocolError`; a bad packet gets an ``error``
packet, and after ``max_packet_errors`` of them close 1008; a socket error
ends the connection quietly. None of them touches another connection.
"""

from __future__ import annotations

import errno
import socket
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

import attrs
import trio

from . import handshake as hs
from .auth import token_from_request
from .errors import HandshakeError, PacketError, ProtocolError
from .log import LogLimiter
from .frames import CloseCode, Decoder, Opcode, encode_close, encode_frame, parse_close
from .packets import PONG_FRAME, Ping, Subscribe, error_frame, parse_client_packet, subscribed_frame, unsubscribed_frame

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Connection", "serve_socket", "expire_handshake", "OPEN", "CLOSING", "CLOSED"]

# Connection states.
OPEN = 0
CLOSING = 1  # our Close frame is out (or queued); waiting for the peer's
CLOSED = 2  # socket closed

# Flag bits.
F_SEEN = 1  # something arrived since the keepalive last looked
F_PING = 2  # a ping is out and unanswered
F_ECHO = 4  # the test echo endpoint
F_CLOSE_AFTER_FLUSH = 8  # close the socket once the queue is written

# sendmsg() buffers per call; Linux's IOV_MAX is 1024, a few dozen frames per
# syscall is where batching stops paying.
_SENDMSG_BUFFERS = 64

_WRITER_TASK = "mailpush.writer"

_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable
_notify_closing = trio.lowlevel.notify_closing


@attrs.define(slots=True, eq=False, weakref_slot=False)
class Connection:
    """The per-connection state: only what an idle connection needs."""

    sock: socket.socket
    server: Server
    subscriber: str
    events: frozenset[str] | None = None  # event filter; None: all
    decoder: Decoder | None = None  # only while a frame is incomplete
    queue: deque | None = None  # only while a writer runs
    queued: int = 0  # bytes in ``queue``
    state: int = OPEN
    flags: int = 0
    strikes: int = 0  # error packets sent

    # -- sending ------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Send or queue one frame; False if the connection cannot take it.

        The fast path is one non-blocking ``send()``; a writer task is spawned
        only when the socket cannot take the whole frame now.
        """
        return self.state == OPEN and self._push(frame)

    def _push(self, frame: bytes) -> bool:
        """``send`` without the state check (our own Close frame uses it)."""
        if self.queue is not None:
            return self._enqueue(frame)
        try:
            n = self.sock.send(frame)
        except BlockingIOError:
            n = 0
        except OSError:
            self.abort()
            return False
        if n < len(frame):
            self._start_writer(frame, n)
        return True

    def _start_writer(self, frame: bytes, sent: int) -> None:
        self.queue = deque((memoryview(frame)[sent:],))
        self.queued = len(frame) - sent
        self.server.stats.writers += 1
        self.server.connections_nursery.start_soon(_writer, self, name=_WRITER_TASK)

    def _enqueue(self, frame: bytes) -> bool:
        # The bound is on what waits behind the frame being written (the
        # queue's head): a large event in flight to a client that reads it
        # is not held against the next one. A frame may join an otherwise
        # empty queue whatever its size.
        behind = self.queued - len(self.queue[0])
        if behind and behind + len(frame) > self.server.config.send_queue_bytes:
            # The client stopped reading. Nothing more can reach it, not even
            # a Close frame: drop it so it holds neither memory nor others.
            self.server.slow_consumer(self)
            self.abort()
            return False
        self.queue.append(frame)
        self.queued += len(frame)
        return True

    # -- closing ------------------------------------------------------------

    def close(self, code: int, reason: str = "", *, wait_for_peer: bool = True) -> None:
        """Start the closing handshake with ``code`` (§7.1.2).

        Frames already queued go out first. With ``wait_for_peer`` the socket
        stays open for the peer's Close (bounded by the server's close
        timeout); otherwise it is closed once our Close frame is written.
        """
        if self.state != OPEN:
            return
        self.state = CLOSING
        self.server.stats.closes[code] += 1
        if not wait_for_peer:
            self.flags |= F_CLOSE_AFTER_FLUSH
        self._push(encode_close(code, reason))
        if self.state == CLOSED:
            return
        if not wait_for_peer and self.queue is None:
            self.abort()
            return
        # Waiting for the peer's Close, or for a queue a dead peer may never
        # drain: either way bounded by the server's close timeout.
        self.server.closing(self)

    def abort(self) -> None:
        """Close the socket now; wakes the parked reader and any writer."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        _notify_closing(self.sock)
        self.sock.close()

    # -- receiving ----------------------------------------------------------

    def on_data(self, data: memoryview | bytes) -> None:
        """Handle bytes read from the socket (any number of frames)."""
        self.flags = (self.flags | F_SEEN) & ~F_PING
        dec = self.decoder
        if dec is None:
            dec = Decoder(self.server.config.max_message_size)
        error = None
        try:
            messages = dec.feed(data)
        except ProtocolError as e:
            error = e
            messages = e.messages
            self.decoder = None
        else:
            self.decoder = None if dec.idle else dec
        for opcode, payload in messages:
            if opcode == Opcode.TEXT or opcode == Opcode.BINARY:
                if self.state != OPEN:
                    continue  # §5.5.1: data after our Close is discarded
                if self.flags & F_ECHO:
                    self.send(encode_frame(opcode, payload))
                elif opcode == Opcode.TEXT:
                    self._on_packet(payload)
                else:
                    self._bad_packet(PacketError("binary_unsupported", "binary messages are not part of the protocol, send JSON text"))
            elif opcode == Opcode.PING:
                self.send(encode_frame(Opcode.PONG, payload))
            elif opcode == Opcode.CLOSE:
                self._on_close(payload)
                return
            # PONG: F_SEEN above is all keepalive needs.
            if self.state == CLOSED:
                return
        if error is not None:
            self.server.log.info("protocol_error", code=error.code, reason=error.reason, subscriber=self.subscriber)
            if self.state == OPEN:
                self.close(error.code, error.reason, wait_for_peer=False)
            else:
                self.abort()

    def _on_close(self, payload: bytes) -> None:
        try:
            code, _ = parse_close(payload)
        except ProtocolError as e:
            code = e.code
        else:
            if code == CloseCode.NO_STATUS:
                code = CloseCode.NORMAL
        if self.state == OPEN:
            # Echo the code and close the TCP connection after it (§5.5.1, §7.1.1).
            self.close(code, wait_for_peer=False)
        else:
            self.abort()  # the answer to our own Close

    def _on_packet(self, payload: bytes) -> None:
        server = self.server
        try:
            packet = parse_client_packet(payload)
        except PacketError as e:
            self._bad_packet(e)
            return
        if type(packet) is Subscribe:
            self.events = packet.events
            if server.registry.add(self):
                server.dispatcher.changed(self.subscriber)
            server.dispatcher.confirm(self, subscribed_frame(self.subscriber, packet.events))
        elif type(packet) is Ping:
            self.send(PONG_FRAME)
        else:  # Unsubscribe
            if server.registry.remove(self):
                server.dispatcher.changed(self.subscriber)
            self.send(unsubscribed_frame(self.subscriber))

    def _bad_packet(self, e: PacketError) -> None:
        self.server.stats.packet_errors += 1
        self.strikes += 1
        self.send(error_frame(e.code, e.message))
        limit = self.server.config.max_packet_errors
        if self.strikes >= limit:
            self.close(CloseCode.POLICY_VIOLATION, f"more than {limit - 1} bad packets")


async def _writer(conn: Connection) -> None:
    """Drain ``conn.queue`` as the socket takes it, then exit."""
    sock = conn.sock
    q = conn.queue
    try:
        while q and conn.state != CLOSED:
            await _wait_writable(sock)
            try:
                n = sock.sendmsg(list(islice(q, _SENDMSG_BUFFERS)))
            except BlockingIOError:
                continue
            except OSError:
                conn.abort()
                return
            conn.queued -= n
            while n:
                head = q[0]
                if n >= len(head):
                    n -= len(head)
                    q.popleft()
                else:
                    q[0] = memoryview(head)[n:]
                    n = 0
    except trio.ClosedResourceError:
        return
    except Exception:  # noqa: BLE001
        # The isolation boundary: a bug here ends this connection, not the server.
        conn.server._task_failed("writer")
        conn.abort()
        return
    if conn.state == CLOSED:
        return
    conn.queue = None
    conn.queued = 0
    if conn.flags & F_CLOSE_AFTER_FLUSH:
        conn.abort()


_refuse_log = LogLimiter()
_RESPONSE_500 = hs.response_text(500, "internal error; the server logged it\n")


def _refuse(server: Server, sock: socket.socket, err: HandshakeError, reason_label: str) -> None:
    server.stats.rejections[reason_label] += 1
    if n := _refuse_log.tick():  # a flood of bad requests is one line a second
        server.log.warning("handshake_refused", status=err.status, reason=err.reason, count=n)
    _send_and_close(sock, hs.response_error(err))


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    """Best-effort send of a small response, then close (FIN); wakes any
    task parked on the socket."""
    if sock.fileno() < 0:
        return  # closed already
    try:
        sock.send(data)
    except OSError:
        pass
    _notify_closing(sock)
    sock.close()


# Rejection reasons by HTTP status, for the metrics label.
_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method", 408: "timeout", 426: "version", 431: "too_large", 503: "overloaded", 505: "http_version"}


async def _handshake(server: Server, sock: socket.socket, slot: object) -> tuple[Connection | None, bytes]:
    """Read and answer the upgrade request.

    A handshake slot is held only while there are bytes to parse: the
    accept loop took one for the first read; whenever the socket has
    nothing more to read, the slot goes back before waiting, and a slot is
    taken again when bytes arrive. A connection that stalls in the middle
    of its request (or sends nothing) holds a parked task and a socket, no
    slot, until its handshake deadline.

    Returns the new connection (or None when refused or closed, the socket
    then closed) and any bytes the client sent after the request head.
    """
    limiter = server.handshakes
    held = True
    data = b""
    try:
        while True:
            try:
                chunk = sock.recv(hs.MAX_HEAD_BYTES + 1 - len(data))
            except BlockingIOError:
                if held:
                    limiter.release_on_behalf_of(slot)
                    held = False
                await _wait_readable(sock)
                try:
                    limiter.acquire_on_behalf_of_nowait(slot)
                except trio.WouldBlock:
                    await limiter.acquire_on_behalf_of(slot)
                held = True
                continue
            except OSError:
                sock.close()
                return None, b""
            if not chunk:  # closed before finishing: costs nothing lasting
                sock.close()
                return None, b""
            data = chunk if not data else data + chunk
            try:
                end = hs.find_head_end(data, len(data))
            except HandshakeError as e:
                _refuse(server, sock, e, _REASONS[e.status])
                return None, b""
            if end >= 0:
                break
        try:
            req = hs.parse_request(data[:end])
            conn = _upgrade(server, sock, req)
        except HandshakeError as e:
            _refuse(server, sock, e, _REASONS.get(e.status, str(e.status)))
            return None, b""
        if conn is None:
            return None, b""
        return conn, data[end:]
    finally:
        if held:
            limiter.release_on_behalf_of(slot)


def _upgrade(server: Server, sock: socket.socket, req: hs.Request) -> Connection | None:
    config = server.config
    if not req.wants_websocket:
        if req.path == "/healthz" and req.method in ("GET", "HEAD"):
            status, body = server.health(own_sockets=1)
            _send_and_close(sock, hs.response_text(status, body + "\n"))
            return None
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
    if server.draining:
        raise HandshakeError(503, "server is draining, reconnect to another instance", (("Retry-After", "1"),))
    subscriber = "" if flags else server.verifier.verify(token_from_request(req))
    try:
        sock.send(hs.response_101(req.key))
    except OSError:
        sock.close()
        return None
    conn = Connection(sock, server, subscriber)
    conn.flags = flags
    return conn


async def _open(server: Server, sock: socket.socket, slot: object) -> tuple[Connection | None, bytes]:
    """The handshake, under the server's handshake deadline.

    No cancel scope or timer per connection: the deadline goes into the
    server's queue, and its sweeper answers 408 and closes the socket if the
    handshake is still going by then (which wakes us here).
    """
    entry = [trio.current_time() + server.config.handshake_timeout, sock]
    server.handshake_deadlines.append(entry)
    try:
        return await _handshake(server, sock, slot)
    except trio.ClosedResourceError:
        return None, b""  # expired: the sweeper answered and closed it
    finally:
        entry[1] = None


def expire_handshake(server: Server, sock: socket.socket) -> None:
    """Called by the server's sweeper for a handshake past its deadline."""
    _refuse(server, sock, HandshakeError(408, f"handshake not finished within {server.config.handshake_timeout:g} s"), "timeout")


async def serve_socket(server: Server, sock: socket.socket, slot: object) -> None:
    """The one task of a connection, from accept to close.

    Kept small on purpose: this coroutine's frame is what every idle
    connection holds (with Trio's wait_readable chain below it).

    Resource handling: the socket is this task's from the accept loop on;
    it is closed on every way out, and the connection is removed from the
    server's books.

    Error handling: this is the isolation boundary of one connection. A
    client's protocol faults get their close code or HTTP status (see the
    module docstring); socket errors end it quietly; an unexpected error
    (a bug) in the handshake is answered 500, after it ends the connection,
    and either way is logged and counted (``mailpush_internal_errors``),
    never reaching the other connections or the server.
    """
    try:
        conn, rest = await _open(server, sock, slot)
    except Exception:  # noqa: BLE001 - the isolation boundary: a bug in a handshake ends that one
        server._task_failed("handshake")
        _send_and_close(sock, _RESPONSE_500)
        conn = None
    if conn is None:
        server.open_sockets -= 1
        return
    server.added(conn)
    try:
        if rest:
            conn.on_data(rest)
        del rest
        pool = server.pool
        wait_readable = server.wait_readable
        while conn.state != CLOSED:
            await wait_readable(sock)
            buf = pool.try_acquire() or await pool.acquire()
            try:
                n = sock.recv_into(buf)
                if n:
                    conn.on_data(memoryview(buf)[:n])
                else:
                    break  # EOF: the peer is gone
            except BlockingIOError:
                pass
            finally:
                pool.release(buf)
            del buf
    except trio.ClosedResourceError:
        pass
    except OSError as e:
        if e.errno not in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, errno.ETIMEDOUT):
            server.log.warning("socket_error", error=str(e))
    except Exception:  # noqa: BLE001
        # The isolation boundary: a bug here ends this connection, not the server.
        server._task_failed("connection")
    finally:
        conn.abort()
        server.removed(conn)
