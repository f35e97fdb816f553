"""The embedded bus across worker processes.

With ``--workers N`` each worker is a whole mailpush server on the shared
listen port (SO_REUSEPORT). A tab lands on any worker, and a publish may
arrive at any worker's admin API, so the embedded bus becomes a relay: a
worker sends what it publishes to the supervisor over a Unix socket, and the
supervisor sends every batch to every worker, whose dispatcher delivers it to
the tabs it holds.

Wire format on the Unix sockets: a 4-byte big-endian length, then a msgspec
JSON array of ``[subscriber, event, data]`` (data passed through as raw JSON).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

import msgspec
import trio

from .base import Bus, Item, Sink

__all__ = ["RelayBus", "relay", "read_message", "MAX_MESSAGE"]

_LEN = struct.Struct("!I")
# A batch on the relay: the admin API's largest body, with room for framing.
MAX_MESSAGE = 32 * 1024 * 1024

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(list[tuple[str, str, msgspec.Raw]]).decode


def encode_batch(items: Sequence[Item]) -> bytes:
    body = _encode(items)
    return _LEN.pack(len(body)) + body


async def read_message(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """One length-prefixed message, or None at EOF."""
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

    routes_by_subscription = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()

    def _get_stream(self) -> trio.SocketStream:
        if self._stream is None:
            self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
        return self._stream

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task of a worker: batches from the supervisor.

        Error handling: a batch that does not decode is dropped and counted
        (``mailpush_bus_bad_items``), the next one is read. A broken framing
        (a length beyond MAX_MESSAGE) means the stream cannot be trusted:
        the ValueError ends this worker, which its supervisor handles. EOF
        (the supervisor is gone) returns.
        """
        stream = self._get_stream()
        task_status.started()
        buf = bytearray()
        while (msg := await read_message(stream, buf)) is not None:
            try:
                batch = _decode(msg)
            except (msgspec.MsgspecError, RecursionError):
                self.bad_items += 1
                continue
            await sink(batch)

    async def publish(self, items: Sequence[Item]) -> None:
        data = encode_batch(items)
        async with self._send_lock:  # whole messages, never interleaved
            await self._get_stream().send_all(data)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


async def relay(streams: list[trio.SocketStream]) -> None:
    """The supervisor's side: every message from any worker to all workers.

    Returns when every worker has closed its end.
    """
    locks = [trio.Lock() for _ in streams]

    async def broadcast(data: bytes) -> None:
        for stream, lock in zip(streams, locks, strict=False):
            async with lock:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # that worker is gone; the others still get it

    async def pump(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while (msg := await read_message(stream, buf)) is not None:
                await broadcast(_LEN.pack(len(msg)) + msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(pump, stream)
