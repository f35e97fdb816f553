"""The accept loop: admission bounded by the handshake slots, load shedding.

As in the article, a connection is accepted only when a handshake slot is
free (a ``trio.CapacityLimiter``); while every slot is busy, further
connections wait in the kernel's backlog, not in tasks. If no slot frees
within ACCEPT_SLOT_WAIT (the article's ``pool.ScheduleTimeout(1ms, …)``),
the server is saturated: the connections in the backlog beyond what the
recent upgrade rate serves within QUEUE_BUDGET get a fast 503 now, before
the accept queue overflows and the kernel starts dropping SYNs. At the
connection limit every new connection gets a 503 at once. Refusals are
answered on bare descriptors (:mod:`mailpush.rawsock`).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .handshake import response_text
from .rawsock import accept_fd, refuse_fd, socket_for

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Acceptor", "ACCEPT_BATCH", "ACCEPT_SLOT_WAIT", "QUEUE_BUDGET", "SHED_MIN_QUEUE", "SHED_BATCH"]

# Accepts in one go before going back to the scheduler, so a connection
# avalanche cannot starve the connections already open.
ACCEPT_BATCH = 64
# After EMFILE/ENFILE, or an unexpected error, wait this long before
# accepting again (a file descriptor must be freed first; retrying at once
# would spin).
ACCEPT_ERROR_PAUSE = 0.1
# When every handshake slot is busy, how long the accept loop waits for one
# before it looks at the backlog (the article's ScheduleTimeout(1ms)).
ACCEPT_SLOT_WAIT = 0.001
# A connection should be upgraded or refused within a second (issue target):
# the backlog may hold what the recent upgrade rate serves in half of that;
# the rest gets a 503 at once. At least SHED_MIN_QUEUE stay: half a second
# at 2,000 upgrades/s, a safe floor for one process here (which does
# 3,500–5,000/s), for a cold start that has no rate yet. At most SHED_BATCH
# are refused per look (then the loop yields to the handshakes in progress).
QUEUE_BUDGET = 0.5
SHED_MIN_QUEUE = 1024
SHED_BATCH = 1024
# The upgrade rate is sampled at most this often (seconds).
RATE_SAMPLE = 0.25

# One name shared by every connection task (Trio would build a new string
# per task otherwise: 80 bytes of each idle connection).
_CONNECTION_TASK = "mailpush.connection"

_RESPONSE_FULL = response_text(503, "server at its connection limit, retry shortly\n", (("Retry-After", "1"),))
_RESPONSE_BUSY = response_text(503, "server overloaded, retry shortly\n", (("Retry-After", "1"),))

Start = Callable[["Context", socket.socket, object], Awaitable[None]]


class Acceptor:
    """Accepts connections for ``ctx`` and starts ``start(ctx, sock, slot)``
    for each in ``ctx.nursery`` or, given ``handoff``, hands each to
    ``handoff(sock, slot)`` (``--poller shared``: no task per connection;
    ``slot`` None when none was taken, see ``_accept_some``).

    :attr:`paused` is True while the loop waits for a handshake slot (the
    server is saturated: /healthz says so).
    """

    def __init__(
        self, ctx: Context, start: Start, handoff: Callable[[socket.socket, object | None], None] | None = None
    ) -> None:
        self.ctx = ctx
        self.start = start
        self.handoff = handoff
        self.paused = False
        self._seq = 0
        self._rate: float | None = None  # upgrades/s, see _upgrade_rate
        self._rate_at = 0.0
        self._rate_upgrades = 0

    async def run(self, listener: socket.socket) -> None:
        """Accept until the listener is closed (drain) or ``ctx.draining``.

        Resource handling: an accepted descriptor belongs to this loop
        until its task is started (or it is refused); the task owns it then.

        Error handling: EMFILE and the like pause accepting briefly; a
        client gone before its accept is skipped; an unexpected error (a
        bug) is reported to ``ctx.task_failed`` and accepting resumes after
        ACCEPT_ERROR_PAUSE.
        """
        while not self.ctx.draining:
            try:
                await self._accept_some(listener)
            except trio.ClosedResourceError:
                return  # the listener was closed by drain
            except Exception:  # noqa: BLE001 - the isolation boundary, see above
                self.ctx.task_failed("accept")
                await trio.sleep(ACCEPT_ERROR_PAUSE)

    async def _accept_some(self, listener: socket.socket) -> None:
        ctx = self.ctx
        limiter = ctx.handshakes
        nursery = ctx.nursery
        assert nursery is not None
        max_conns = ctx.config.max_connections
        stats = ctx.stats
        family = int(listener.family)
        # Each socket needs TCP_NODELAY of its own unless it has it already
        # from the listener (see _accepted_have_nodelay).
        own_nodelay = not _accepted_have_nodelay(listener)
        while not ctx.draining:
            await trio.lowlevel.wait_readable(listener)
            # Before taking more: refuse what cannot be served in time.
            self._shed(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    fd = accept_fd(listener)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        ctx.log.warning("accept_failed", error=e.strerror)
                        await trio.sleep(ACCEPT_ERROR_PAUSE)
                        break
                    continue  # ECONNABORTED and the like: that client is gone
                if ctx.sockets >= max_conns:
                    stats.rejections["full"] += 1
                    refuse_fd(fd, _RESPONSE_FULL)
                    continue
                sock = socket_for(family, fd)
                # --poller shared takes a slot only when none is free, to
                # wait for one as the task mode does: otherwise the poller
                # would give it back in the same step, with nothing in
                # between, and taking it would change nothing (but ~100
                # bytecodes of Trio's bookkeeping per upgrade).
                slot: int | None = None
                if self.handoff is None or not limiter.available_tokens:
                    self._seq += 1
                    slot = self._seq
                    try:
                        limiter.acquire_on_behalf_of_nowait(slot)
                    except trio.WouldBlock:
                        await self._wait_saturated(listener, sock, slot)
                if own_nodelay:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ctx.sockets += 1
                if self.handoff is not None:
                    self.handoff(sock, slot)
                else:
                    nursery.start_soon(self.start, ctx, sock, slot, name=_CONNECTION_TASK)

    async def _wait_saturated(self, listener: socket.socket, sock: socket.socket, slot: int) -> None:
        """Every handshake slot is busy: the server is saturated
        (:attr:`paused`) until ``slot`` is had for ``sock``, which is
        closed if the wait is cancelled."""
        self.ctx.stats.accept_pauses += 1
        self.paused = True
        try:
            await self._wait_for_slot(listener, slot)
        except BaseException:
            sock.close()
            raise
        finally:
            self.paused = False

    async def _wait_for_slot(self, listener: socket.socket, slot: int) -> None:
        """Wait for a handshake slot, shedding what cannot be served in time.

        A slot usually frees within ACCEPT_SLOT_WAIT. If not, the
        connections still in the kernel backlog are counted (TCP_INFO on the
        listener), and those beyond what the recent upgrade rate can serve
        within QUEUE_BUDGET get the cheap 503 now instead of a long wait; the
        rest stay in the backlog, untouched, until slots free up.
        """
        with trio.move_on_after(ACCEPT_SLOT_WAIT):
            await self.ctx.handshakes.acquire_on_behalf_of(slot)
            return
        self._shed(listener)
        await self.ctx.handshakes.acquire_on_behalf_of(slot)

    def _shed(self, listener: socket.socket) -> None:
        """Refuse (fast 503) what the backlog holds beyond QUEUE_BUDGET's worth."""
        allowed = max(SHED_MIN_QUEUE, int(self._upgrade_rate() * QUEUE_BUDGET))
        depth = backlog_depth(listener)
        rejections = self.ctx.stats.rejections
        for _ in range(min(depth - allowed, SHED_BATCH)):
            try:
                fd = accept_fd(listener)
            except OSError:
                break
            rejections["overloaded"] += 1
            refuse_fd(fd, _RESPONSE_BUSY)

    def _upgrade_rate(self) -> float:
        """Upgrades per second lately (an exponentially weighted average)."""
        now = trio.current_time()
        dt = now - self._rate_at
        if dt >= RATE_SAMPLE:
            upgrades = self.ctx.stats.upgrades
            rate = (upgrades - self._rate_upgrades) / dt
            self._rate = rate if self._rate is None else (self._rate + rate) / 2
            self._rate_at = now
            self._rate_upgrades = upgrades
        return self._rate or 0.0


def _accepted_have_nodelay(listener: socket.socket) -> bool:
    """The sockets ``listener`` accepts have TCP_NODELAY from the start:
    Linux copies a listener's options to the connections it accepts, and
    the server's listener has it from before ``listen()``
    (``Server._bind``), so each upgrade is spared one system call. False
    elsewhere, or for a listener without it: then each socket gets it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except OSError:
        return False


_TCP_INFO_SIZE = 104
_TCPI_UNACKED = struct.Struct("=I")  # at offset 24 of struct tcp_info


def backlog_depth(listener: socket.socket) -> int:
    """Connections waiting in the listener's accept queue (Linux: for a
    listening socket, tcp_info.tcpi_unacked is the accept queue length)."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return 0
    return _TCPI_UNACKED.unpack_from(info, 24)[0] if len(info) >= 28 else 0
