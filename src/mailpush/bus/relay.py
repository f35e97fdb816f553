"""The embedded bus across worker processes.

With ``--workers N`` each worker is a whole mailpush server on the shared
listen port (SO_REUSEPORT). A tab lands on any worker, and a publish may
arrive at any worker's admin API, so the embedded bus becomes a relay: a
worker sends what it publishes to the supervisor over a Unix socket; the
supervisor gives each event its offset, keeps it in the one history all
workers share (:class:`~mailpush.history.History`: a tab that reconnects to
another worker recovers too), and sends every batch to every worker, whose
dispatcher delivers it to the tabs it holds. History reads go to the
supervisor the same way; its answer travels behind every event batch sent
to that worker before it, so it is also the barrier the read promises.

Wire format on the Unix sockets: a 4-byte big-endian length, then one
msgspec JSON message (a tagged Struct below); event data and states pass
through as raw JSON.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections import deque
from collections.abc import Sequence

import msgspec
import trio

from ..errors import BusUnavailable
from ..frames import encode_text
from ..history import History, Position, Replay, record
from ..log import get_logger
from .base import Bus, Item, Read, Sink

__all__ = ["RelayBus", "Relay", "read_message", "MAX_MESSAGE", "OUTBOX_MAX"]

_LEN = struct.Struct("!I")
# A batch on the relay: the admin API's largest body, with room for framing.
MAX_MESSAGE = 32 * 1024 * 1024
# Messages waiting for one worker at most; a worker that falls this far
# behind is stuck, and is cut off (its supervisor then stops the set).
OUTBOX_MAX = 10_000


class _Publish(msgspec.Struct, tag="p"):
    items: list[tuple[str, str, msgspec.Raw, msgspec.Raw]]  # state: raw JSON, "null" for none


class _Events(msgspec.Struct, tag="e"):
    events: list[tuple[str, str, msgspec.Raw, int, str]]


class _Read(msgspec.Struct, tag="r"):
    id: int
    reads: list[tuple[str, str | None, int | None]]


class _Replay(msgspec.Struct, array_like=True):
    epoch: str
    offset: int
    state: msgspec.Raw
    reason: str
    events: list[tuple[int, str, msgspec.Raw]] | None  # (offset, event, the frame's payload)


class _Replays(msgspec.Struct, tag="R"):
    id: int
    replays: list[_Replay]


_Message = _Publish | _Events | _Read | _Replays
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Message).decode
_NULL = msgspec.Raw(b"null")


def _framed(message: _Message) -> bytes:
    body = _encode(message)
    return _LEN.pack(len(body)) + body


async def read_message(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """One length-prefixed message, or None at EOF.

    Raises:
      ValueError: a length beyond MAX_MESSAGE (the stream is broken).
    """
    while True:
        if len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_MESSAGE:
                raise ValueError(f"relay message of {n} bytes exceeds {MAX_MESSAGE}")
            if len(buf) >= 4 + n:
                msg = bytes(buf[4 : 4 + n])
                del buf[: 4 + n]
                return msg
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            return None
        buf += chunk


def _payload(frame: bytes) -> bytes:
    """The JSON of a server text frame (its header is 2, 4 or 10 bytes)."""
    n = frame[1] & 0x7F
    return frame[2 if n < 126 else 4 if n == 126 else 10 :]


class RelayBus(Bus):
    """A worker's side of the relay."""

    routes_by_subscription = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}  # read id -> [Event set on answer, the answer]

    def _get_stream(self) -> trio.SocketStream:
        if self._stream is None:
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
        return self._stream

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task of a worker: event batches and read answers
        from the supervisor, in the order it sent them.

        Error handling: a message that does not decode is dropped and
        counted (``mailpush_bus_bad_items``), the next one is read. A broken
        framing (a length beyond MAX_MESSAGE) means the stream cannot be
        trusted: the ValueError ends this worker, which its supervisor
        handles. EOF (the supervisor is gone) returns; reads still waiting
        then fail.
        """
        stream = self._get_stream()
        task_status.started()
        buf = bytearray()
        try:
            while (msg := await read_message(stream, buf)) is not None:
                try:
                    message = _decode(msg)
                except (msgspec.MsgspecError, RecursionError):
                    self.bad_items += 1
                    continue
                if type(message) is _Events:
                    await sink([(s, e, d, o, ep, None) for s, e, d, o, ep in message.events])
                elif type(message) is _Replays:
                    waiter = self._waiting.pop(message.id, None)
                    if waiter is not None:
                        waiter[1] = message.replays
                        waiter[0].set()
        finally:
            for waiter in self._waiting.values():
                waiter[0].set()  # answer None: the read fails
            self._waiting.clear()

    async def _send(self, message: _Message) -> None:
        async with self._send_lock:  # whole messages, never interleaved
            await self._get_stream().send_all(_framed(message))

    async def publish(self, items: Sequence[Item]) -> None:
        await self._send(_Publish([(s, e, _raw(d), st if st is not None else _NULL) for s, e, d, st in items]))

    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        rid = next(self._ids)
        waiter: list = [trio.Event(), None]
        self._waiting[rid] = waiter
        try:
            await self._send(_Read(rid, list(requests)))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._waiting.pop(rid, None)
            raise BusUnavailable(f"the supervisor's relay is gone: {e!r}") from None
        await waiter[0].wait()
        if waiter[1] is None:
            raise BusUnavailable("the supervisor's relay closed before answering")
        out = []
        for r in waiter[1]:
            state = None if bytes(r.state) == b"null" else r.state
            events = None if r.events is None else [(o, ev, encode_text(bytes(p)), 0.0) for o, ev, p in r.events]
            out.append(Replay(Position(r.epoch, r.offset, state), events, r.reason))
        return out

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


def _raw(data: object) -> msgspec.Raw:
    return data if isinstance(data, msgspec.Raw) else msgspec.Raw(msgspec.json.encode(data))


class _Outbox:
    """What the supervisor still has to send one worker, in order: filled
    synchronously as the history changes, emptied by one writer task."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.queue: deque[bytes] = deque()
        self.ready = trio.Event()
        self.dead = False

    def put(self, data: bytes) -> None:
        if self.dead:
            return
        if len(self.queue) >= OUTBOX_MAX:
            get_logger().error("relay_worker_stuck", queued=len(self.queue))
            self.dead = True
            self.queue.clear()
            return
        self.queue.append(data)
        self.ready.set()

    async def write(self) -> None:
        try:
            while not self.dead:
                await self.ready.wait()
                self.ready = trio.Event()
                while self.queue:
                    await self.stream.send_all(self.queue.popleft())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.dead = True  # that worker is gone; the others still get theirs
        finally:
            if self.dead:
                await self.stream.aclose()


class Relay:
    """The supervisor's side: offsets, the shared history, and every batch
    to every worker attached now; read answers to the worker that asked.
    Workers come and go (a crashed one is restarted and attached again);
    the history stays.
    """

    def __init__(self, history: History) -> None:
        self.history = history
        self._outboxes: dict[int, _Outbox] = {}

    def publish(self, items: Sequence[Item]) -> int:
        """Publish from the supervisor itself (its admin API): offsets,
        history, and the batch to every worker. Returns the count."""
        self._broadcast(record(self.history, items))
        return len(items)

    def _broadcast(self, events: list) -> None:
        batch = _framed(_Events([(s, e, d, o, ep) for s, e, d, o, ep, _ in events]))
        for box in self._outboxes.values():  # all before any await: the order every worker sees
            box.put(batch)

    async def serve(self, slot: int, stream: trio.SocketStream) -> None:
        """Relay for the worker in ``slot`` until its stream ends.

        Error handling: a stream that breaks, or messages that do not
        decode, end this worker's relay (the worker then ends too and is
        restarted by its supervisor); the others go on.
        """
        outbox = self._outboxes[slot] = _Outbox(stream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbox.write)
                await self._pump(stream, outbox)
                outbox.dead = True
                outbox.ready.set()
        finally:
            if self._outboxes.get(slot) is outbox:
                del self._outboxes[slot]

    async def _pump(self, stream: trio.SocketStream, outbox: _Outbox) -> None:
        buf = bytearray()
        history = self.history
        try:
            while (msg := await read_message(stream, buf)) is not None:
                message = _decode(msg)
                if type(message) is _Publish:
                    items = [(s, e, d, None if bytes(st) == b"null" else st) for s, e, d, st in message.items]
                    self._broadcast(record(history, items))
                elif type(message) is _Read:
                    replays = [_wire(history.read(*r)) for r in message.reads]
                    outbox.put(_framed(_Replays(message.id, replays)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError, msgspec.MsgspecError):
            pass


def _wire(replay: Replay) -> _Replay:
    p = replay.position
    events = None if replay.events is None else [(o, ev, msgspec.Raw(_payload(f))) for o, ev, f, _ in replay.events]
    return _Replay(p.epoch, p.offset, p.state if p.state is not None else _NULL, replay.reason, events)
