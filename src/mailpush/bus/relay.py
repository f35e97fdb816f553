"""The embedded bus across worker processes.

With ``--workers N`` each worker is a whole mailpush server on the shared
listen port (SO_REUSEPORT). A tab lands on any worker, and a publish may
arrive at any worker's admin API, so the embedded bus becomes a relay: a
worker sends what it publishes to the supervisor over a Unix socket; the
supervisor gives each event its offset, keeps it in the one history all
workers share (:class:`~mailpush.history.History`: a tab that reconnects to
another worker recovers too), and sends each worker the events of the
subscribers it holds, which its dispatcher delivers to their tabs. A
worker tells the supervisor which subscribers it holds as Redis is told
(subscribe, acknowledged, and unsubscribe, batched by the dispatcher), so
no worker decodes the events of the others' tabs. History reads go to the
supervisor the same way; its answer travels behind every event batch sent
to that worker before it, so it is also the barrier the read promises.

Wire format on the Unix sockets: a 4-byte big-endian length, then one
msgspec MessagePack message (a tagged Struct below). Event data and states
pass through as the bytes of their JSON; events go to the workers as the
frames the supervisor built for its history, so a worker neither parses
an event nor encodes its frame again, it only sends it.
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
    items: list[tuple[str, str, bytes, bytes | None]]  # data and state as JSON; state None: none


class _Events(msgspec.Struct, tag="e"):
    # What the worker's sink takes as it comes (subscriber, event, data
    # (None: the frame has it), offset, epoch, frame).
    events: list[tuple[str, str, None, int, str, bytes]]


class _Read(msgspec.Struct, tag="r"):
    id: int
    reads: list[tuple[str, str | None, int | None]]


class _Subscribe(msgspec.Struct, tag="s"):
    id: int  # answered with an empty _Replays of this id
    subscribers: list[str]


class _Unsubscribe(msgspec.Struct, tag="u"):
    subscribers: list[str]


class _Replay(msgspec.Struct, array_like=True):
    epoch: str
    offset: int
    state: bytes | None  # JSON
    reason: str
    events: list[tuple[int, str, bytes]] | None  # (offset, event, frame)


class _Replays(msgspec.Struct, tag="R"):
    id: int
    replays: list[_Replay]


_Message = _Publish | _Events | _Read | _Replays | _Subscribe | _Unsubscribe
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Message).decode


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


class RelayBus(Bus):
    """A worker's side of the relay."""

    routes_by_subscription = True

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
                    await sink(message.events)
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
        await self._send(_Publish([(s, e, _json(d), None if st is None else _json(st)) for s, e, d, st in items]))

    async def _ask(self, message: _Read | _Subscribe) -> list[_Replay]:
        """Send a message with ``id`` and wait for the _Replays answering it.

        Raises:
          BusUnavailable: the relay is gone.
        """
        waiter: list = [trio.Event(), None]
        self._waiting[message.id] = waiter
        try:
            await self._send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._waiting.pop(message.id, None)
            raise BusUnavailable(f"the supervisor's relay is gone: {e!r}") from None
        await waiter[0].wait()
        if waiter[1] is None:
            raise BusUnavailable("the supervisor's relay closed before answering")
        return waiter[1]

    async def subscribe(self, subscribers: Sequence[str]) -> None:
        """Have the supervisor send this worker the events of these
        subscribers; returns once it has (events published from then on
        arrive here)."""
        await self._ask(_Subscribe(next(self._ids), list(subscribers)))

    async def unsubscribe(self, subscribers: Sequence[str]) -> None:
        try:
            await self._send(_Unsubscribe(list(subscribers)))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise BusUnavailable(f"the supervisor's relay is gone: {e!r}") from None

    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        out = []
        for r in await self._ask(_Read(next(self._ids), list(requests))):
            state = None if r.state is None else msgspec.Raw(r.state)
            events = None if r.events is None else [(o, ev, f, 0.0) for o, ev, f in r.events]
            out.append(Replay(Position(r.epoch, r.offset, state), events, r.reason))
        return out

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


def _json(value: object) -> bytes:
    """The JSON of an event's data or state (already JSON when Raw)."""
    return bytes(value) if isinstance(value, msgspec.Raw) else msgspec.json.encode(value)


class _Outbox:
    """What the supervisor still has to send one worker, in order: filled
    synchronously as the history changes, emptied by one writer task; and
    the subscribers that worker holds."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.subscribers: set[str] = set()
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
        """Each worker gets the events of its subscribers, all before any
        await: the order every worker sees is the history's."""
        wire = [(s, e, None, o, ep, f) for s, e, _, o, ep, f in events]
        for box in self._outboxes.values():
            subs = box.subscribers
            mine = [ev for ev in wire if ev[0] in subs]
            if mine:
                box.put(_framed(_Events(mine)))

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
                    items = [
                        (s, e, msgspec.Raw(d), None if st is None else msgspec.Raw(st)) for s, e, d, st in message.items
                    ]
                    self._broadcast(record(history, items))
                elif type(message) is _Read:
                    replays = [_wire(history.read(*r)) for r in message.reads]
                    outbox.put(_framed(_Replays(message.id, replays)))
                elif type(message) is _Subscribe:
                    outbox.subscribers.update(message.subscribers)
                    outbox.put(_framed(_Replays(message.id, [])))
                elif type(message) is _Unsubscribe:
                    outbox.subscribers.difference_update(message.subscribers)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError, msgspec.MsgspecError):
            pass


def _wire(replay: Replay) -> _Replay:
    p = replay.position
    events = None if replay.events is None else [(o, ev, f) for o, ev, f, _ in replay.events]
    return _Replay(p.epoch, p.offset, None if p.state is None else _json(p.state), replay.reason, events)
