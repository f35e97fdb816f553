"""The article's worker pool: a bounded number of connections processed at
once, each borrowing a read buffer only for as long as it is processed.

A parked reader holds no buffer; when its socket becomes readable it takes a
slot here (``try_acquire`` without a checkpoint, ``acquire`` to wait when
all slots are busy), reads into the slot's buffer, handles the packets and
gives both back. However many connections become readable at once, at most
``size`` buffers exist, so a burst cannot take the memory back.
"""

from __future__ import annotations

import trio

__all__ = ["Pool"]


class Pool:
    """``size`` slots, each lending one ``buffer_size`` bytearray.

    Resource handling: buffers are created on first use and kept for reuse;
    never more than ``size`` of them exist. A slot is held by the task that
    took it (``trio.CapacityLimiter`` semantics) and must be given back by
    the same task with :meth:`release`.
    """

    __slots__ = ("limiter", "buffer_size", "_free", "created", "waits")

    def __init__(self, size: int, buffer_size: int) -> None:
        self.limiter = trio.CapacityLimiter(size)
        self.buffer_size = buffer_size
        self._free: list[bytearray] = []
        self.created = 0  # buffers ever allocated (≤ size)
        self.waits = 0  # times a reader had to wait for a slot

    def try_acquire(self) -> bytearray | None:
        """A buffer if a slot is free right now, else None. No checkpoint."""
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            return None
        return self._take()

    async def acquire(self) -> bytearray:
        """Wait for a free slot and return its buffer."""
        self.waits += 1
        await self.limiter.acquire()
        return self._take()

    def _take(self) -> bytearray:
        if self._free:
            return self._free.pop()
        self.created += 1
        return bytearray(self.buffer_size)

    def release(self, buf: bytearray) -> None:
        self._free.append(buf)
        self.limiter.release()

    @property
    def busy(self) -> int:
        return self.limiter.borrowed_tokens

    @property
    def size(self) -> int:
        return int(self.limiter.total_tokens)
