"""One WebSocket connection (the article's channel): its state, the send
queue, writers on demand, and what it does with the bytes it receives.

The task that reads for it is :func:`mailpush.reader.serve_socket`; the
upgrade that creates it is :mod:`mailpush.upgrade`. A connection sees its
server only through a :class:`~mailpush.context.Context`.

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

import socket
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

import attrs
import trio

from .errors import AuthError, PacketError, ProtocolError
from .frames import PING_FRAME, CloseCode, Decoder, Opcode, encode_close, encode_frame, parse_close
from .packets import (
    PONG_FRAME,
    Ping,
    Refresh,
    Subscribe,
    error_frame,
    parse_client_packet,
    refreshed_frame,
    unsubscribed_frame,
)
from .speedups import C

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Connection", "OPEN", "CLOSING", "CLOSED", "F_ECHO"]

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
    ctx: Context
    subscriber: str
    events: frozenset[str] | None = None  # event filter; None: all
    decoder: Decoder | None = None  # only while a frame is incomplete
    queue: deque | None = None  # only while a writer runs
    queued: int = 0  # bytes in ``queue``
    state: int = OPEN
    flags: int = 0
    strikes: int = 0  # error packets sent
    expires: int = 0  # the token's exp (seconds since 1970); 0: never

    # -- state ----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Upgraded and not closing: it may be sent events and pings."""
        return self.state == OPEN

    @property
    def pong_overdue(self) -> bool:
        """A keepalive ping is out and nothing has arrived since."""
        return self.state == OPEN and self.flags & (F_PING | F_SEEN) == F_PING

    def ping(self) -> bool:
        """Send a keepalive ping; :attr:`pong_overdue` until the peer sends
        anything. False if it could not be sent."""
        self.flags = (self.flags | F_PING) & ~F_SEEN
        return self.send(PING_FRAME)

    # -- sending ------------------------------------------------------------

    def send(self, frame: bytes) -> bool:
        """Send or queue one frame; False if the connection cannot take it.

        The fast path is one non-blocking ``send()``; a writer task is spawned
        only when the socket cannot take the whole frame now.
        """
        return self.state == OPEN and self._push(frame)

    def _push(self, frame: bytes) -> bool:
        """``send`` without the state check (our own Close frame uses it)."""
        if (queue := self.queue) is not None:
            return self._enqueue(queue, frame)
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
        self.ctx.stats.writers += 1
        self.ctx.spawn(_writer, self, name=_WRITER_TASK)

    def _enqueue(self, queue: deque, frame: bytes) -> bool:
        # The bound is on what waits behind the frame being written (the
        # queue's head): a large event in flight to a client that reads it
        # is not held against the next one. A frame may join an otherwise
        # empty queue whatever its size.
        behind = self.queued - len(queue[0])
        if behind and behind + len(frame) > self.ctx.config.send_queue_bytes:
            # The client stopped reading. Nothing more can reach it, not even
            # a Close frame: drop it so it holds neither memory nor others.
            self.ctx.slow_consumer(self)
            self.abort()
            return False
        queue.append(frame)
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
        self.ctx.stats.closes[code] += 1
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
        self.ctx.timers.close_deadline(self)

    def abort(self) -> None:
        """Close the socket now; wakes the parked reader and any writer."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if (hook := self.ctx.on_close) is None or self.queue is not None:
            # Wake whoever waits on the socket in Trio: its reader task (the
            # default mode), or a writer. With --poller shared and no
            # writer, nothing does (the poller's own set is the hook's).
            _notify_closing(self.sock)
        if hook is not None:
            hook(self)
        self.sock.close()

    # -- receiving ----------------------------------------------------------

    def on_data(self, data: memoryview | bytes) -> None:
        """Handle bytes read from the socket (any number of frames)."""
        self.flags = (self.flags | F_SEEN) & ~F_PING
        dec = self.decoder
        error = None
        if (
            dec is None
            and _c_one_frame is not None
            and (one := _c_one_frame(data, self.ctx.config.max_message_size)) is not None
        ):
            # one small whole frame, read in C as a fresh Decoder reads it
            if one[0] == _TEXT and self.state == OPEN and not self.flags & F_ECHO:
                self._on_packet(one[1])  # a packet (the subscribe): what the loop below would do
                return
            messages = [one]
        else:
            if dec is None:
                dec = Decoder(self.ctx.config.max_message_size)
            try:
                messages = dec.feed(data)
            except ProtocolError as e:
                # Only what is needed: the exception itself would hold this
                # frame through its traceback, and this frame the exception, a
                # cycle only a full collection frees (~16 objects a violation).
                error = (e.code, e.reason)
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
                    self._bad_packet(
                        PacketError(
                            "binary_unsupported", "binary messages are not part of the protocol, send JSON text"
                        )
                    )
            elif opcode == Opcode.PING:
                self.send(encode_frame(Opcode.PONG, payload))
            elif opcode == Opcode.CLOSE:
                self._on_close(payload)
                return
            # PONG: F_SEEN above is all keepalive needs.
            if self.state == CLOSED:
                return
        if error is not None:
            code, reason = error
            self.ctx.log.info("protocol_error", code=code, reason=reason, subscriber=self.subscriber)
            if self.state == OPEN:
                self.close(code, reason, wait_for_peer=False)
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
        ctx = self.ctx
        try:
            packet = parse_client_packet(payload)
        except PacketError as e:
            self._bad_packet(e)
            return
        if type(packet) is Subscribe:
            self.events = packet.events
            if ctx.registry.add(self):
                ctx.dispatcher.changed(self.subscriber)
            ctx.dispatcher.subscribe(self, packet.since)
        elif type(packet) is Ping:
            self.send(PONG_FRAME)
        elif type(packet) is Refresh:
            self._refresh(packet.token)
        else:  # Unsubscribe
            ctx.dispatcher.unsubscribed(self)
            if ctx.registry.remove(self):
                ctx.dispatcher.changed(self.subscriber)
            self.send(unsubscribed_frame(self.subscriber))

    def _refresh(self, token: str) -> None:
        """A new token in band: the same subscriber's, or the connection ends."""
        try:
            subscriber, expires = self.ctx.verifier.verify_claims(token)
        except AuthError as e:
            self._bad_packet(PacketError("bad_token", f"refresh refused: {e.reason}"))
            return
        if subscriber != self.subscriber:
            self._bad_packet(PacketError("wrong_subscriber", "refresh with a token of another subscriber"))
            self.close(CloseCode.POLICY_VIOLATION, "refresh with a token of another subscriber")
            return
        self.expires = expires
        self.ctx.stats.refreshes += 1
        self.send(refreshed_frame(expires))

    def _bad_packet(self, e: PacketError) -> None:
        self.ctx.stats.packet_errors += 1
        self.strikes += 1
        self.send(error_frame(e.code, e.message))
        limit = self.ctx.config.max_packet_errors
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
        conn.ctx.task_failed("writer")
        conn.abort()
        return
    if conn.state == CLOSED:
        return
    conn.queue = None
    conn.queued = 0
    if conn.flags & F_CLOSE_AFTER_FLUSH:
        conn.abort()


_c_one_frame = C.one_frame if C is not None else None
_TEXT = int(Opcode.TEXT)
