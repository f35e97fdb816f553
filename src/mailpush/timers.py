"""Every timer of the server in one task: handshake deadlines, close
deadlines and keepalive.

No connection has a timer, a cancel scope or a task of its own for time:
deadlines go into queues (the timeout is the same for every connection, so
appending keeps them in order) and :meth:`Timers.run` wakes for whichever
comes first. Keepalive visits the connections in slices spread over the
interval, so pings go out evenly rather than all at once.
"""

from __future__ import annotations

import math
import socket
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Protocol

import trio

from .config import Config
from .frames import CloseCode
from .metrics import Stats

__all__ = [
    "Timers",
    "Keepalive",
    "KEEPALIVE_SLICES",
    "LAG_TOLERANCE",
    "HANDSHAKE_SWEEP_TICK",
    "CLOSE_TIMEOUT",
    "LAG_WINDOW",
    "EXPIRY_GRACE",
    "EXPIRY_ROUND",
]

# How long a connection that we sent a Close may take to answer it (§7.1.1),
# or to take the rest of its queue before it.
CLOSE_TIMEOUT = 5.0
# Keepalive visits connections in this many slices per interval, so pings
# go out spread over the interval rather than all at once.
KEEPALIVE_SLICES = 50
# A keepalive tick later than this (seconds) means the server itself
# stalled: missed pongs of that period are not held against the clients.
LAG_TOLERANCE = 1.0
# Handshake deadlines are checked at most this often: a deadline fires up
# to this late, and an avalanche costs a few wakeups a second, not one each.
HANDSHAKE_SWEEP_TICK = 0.05
# The event-loop lag gauge reports the worst tick lateness over this many
# seconds: a scrape every 10-15 s sees every stall since the last one.
LAG_WINDOW = 15.0
# Token expiry: each round of keepalive also closes, with 4001, the
# connections whose token expired more than EXPIRY_GRACE seconds ago (a
# refresh racing its expiry gets that long). So a connection outlives its
# token by at most one round (--ping-interval, or EXPIRY_ROUND with pings
# off) plus the grace; no timer is kept per connection.
EXPIRY_GRACE = 5.0
EXPIRY_ROUND = 30.0


class Keepalive(Protocol):
    """What keepalive needs of a connection (a
    :class:`~mailpush.connection.Connection` is one)."""

    expires: int  # the token's exp, seconds since 1970; 0: never

    @property
    def is_open(self) -> bool: ...

    @property
    def pong_overdue(self) -> bool: ...

    def ping(self) -> bool: ...

    def close(self, code: int, reason: str = "", *, wait_for_peer: bool = True) -> None: ...

    def abort(self) -> None: ...


class Timers:
    """The timer task and its queues.

    Args:
      config: ``ping_interval``, ``pong_timeout``, ``handshake_timeout``.
      stats: counts pings, pong timeouts and stalls.
      connections: the open connections, visited by keepalive.
      expire_handshake: called with the socket of a handshake past its
        deadline (answers 408 and closes it).
      on_error: called with a task name when a step fails unexpectedly.
      log: a structlog logger.
    """

    def __init__(
        self,
        config: Config,
        stats: Stats,
        connections: Collection[Keepalive],
        expire_handshake: Callable[[socket.socket], None],
        on_error: Callable[[str], None],
        log,
    ) -> None:
        self.config = config
        self.stats = stats
        self.connections = connections
        self._expire = expire_handshake
        self._on_error = on_error
        self.log = log
        # [deadline, socket or None once done] per handshake, in deadline order.
        self._handshakes: deque[list] = deque()
        # (deadline, connection) of closing handshakes, in deadline order.
        self._closing: deque[tuple[float, Keepalive]] = deque()
        self._lags: deque[tuple[float, float]] = deque()  # (when, how late) of recent ticks
        self._wakeup = trio.Event()  # set when an earlier deadline is added

    # -- what connections ask for ---------------------------------------------

    def handshake_deadline(self, sock: socket.socket) -> list:
        """Start ``sock``'s handshake clock; set the returned entry's [1] to
        None once the handshake is over (then nothing fires)."""
        entry = [trio.current_time() + self.config.handshake_timeout, sock]
        if not self._handshakes:
            self._wakeup.set()  # the task may be sleeping for longer
        self._handshakes.append(entry)
        return entry

    def close_deadline(self, conn: Keepalive) -> None:
        """``conn`` is closing; cut it if it is not closed within CLOSE_TIMEOUT."""
        self._closing.append((trio.current_time() + CLOSE_TIMEOUT, conn))

    def loop_lag(self) -> float:
        """How late the keepalive ticks ran at worst over the last LAG_WINDOW
        seconds: the time the event loop was busy elsewhere."""
        cutoff = trio.current_time() - LAG_WINDOW
        lags = self._lags
        while lags and lags[0][0] < cutoff:
            lags.popleft()
        return max((lag for _, lag in lags), default=0.0)

    # -- the task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire deadlines and keepalive ticks until cancelled.

        Every keepalive tick pings one slice of the connections and,
        ``pong_timeout`` later, checks that each of them has sent something
        since (a pong or anything else); those that have not are closed with
        1001. The same visit closes a connection whose token expired (more
        than EXPIRY_GRACE ago) with 4001; with pings off the rounds still
        run, every EXPIRY_ROUND seconds, for that. If a tick comes late by more than LAG_TOLERANCE, the server
        itself stalled: the pending checks are dropped, so no client pays for
        our stall. The same ticks cut closing handshakes past their deadline.

        Error handling: an unexpected error in a step (a bug) is reported to
        ``on_error``; the pending checks of that round are forgotten and the
        next step runs: the timers never stop, and no connection is judged
        on a broken round.
        """
        interval = self.config.ping_interval or EXPIRY_ROUND
        tick = interval / KEEPALIVE_SLICES
        keepalive = _KeepaliveRound(self, interval, tick, pings=bool(self.config.ping_interval))
        next_tick = trio.current_time() + tick
        task_status.started()
        while True:
            now = trio.current_time()
            q = self._handshakes
            sweep_at = q[0][0] if q else now + self.config.handshake_timeout
            wake = min(next_tick, max(sweep_at, now + HANDSHAKE_SWEEP_TICK))
            self._wakeup = trio.Event()
            with trio.move_on_at(wake):
                await self._wakeup.wait()
            now = trio.current_time()
            try:
                self._expire_handshakes(now)
            except Exception:  # noqa: BLE001 - the isolation boundary, see above
                self._on_error("handshake_deadlines")
            if now < next_tick:
                continue
            late = now - next_tick
            next_tick = now + tick
            try:
                self._lags.append((now, late))
                if len(self._lags) > 2 * KEEPALIVE_SLICES:
                    self._lags.popleft()
                while self._closing and self._closing[0][0] <= now:
                    self._closing.popleft()[1].abort()
                keepalive.tick(now, late)
            except Exception:  # noqa: BLE001 - the isolation boundary, see above
                self._on_error("keepalive")
                keepalive.reset()

    def _expire_handshakes(self, now: float) -> None:
        q = self._handshakes
        while q and q[0][0] <= now:
            sock = q.popleft()[1]
            if sock is not None:
                try:
                    self._expire(sock)
                except Exception:  # noqa: BLE001 - one failure must not hold up the rest
                    self._on_error("handshake_deadlines")
                    if sock.fileno() >= 0:  # cut it, waking its task
                        trio.lowlevel.notify_closing(sock)
                        sock.close()


class _KeepaliveRound:
    """Keepalive's state between ticks: the connections still to ping this
    round, and the pings awaiting their check."""

    def __init__(self, timers: Timers, interval: float, tick: float, *, pings: bool = True) -> None:
        self.timers = timers
        self.pings = pings
        self.interval = interval
        self.tick_length = tick
        self.pending: list[Keepalive] = []
        self.per_tick = 1  # connections visited per tick in this round
        self.checks: deque[tuple[float, list[Keepalive]]] = deque()
        self.round_at = trio.current_time()

    def reset(self) -> None:
        self.pending = []
        self.checks.clear()

    def tick(self, now: float, late: float) -> None:
        interval, tick, stats = self.interval, self.tick_length, self.timers.stats
        if late > LAG_TOLERANCE:
            stats.lag_skips += 1
            self.timers.log.warning(
                "keepalive_lag", seconds=round(late, 3), skipped_checks=sum(len(b) for _, b in self.checks)
            )
            self.checks.clear()
            return
        pong_timeout = self.timers.config.pong_timeout
        checks = self.checks
        while checks and checks[0][0] <= now:
            for conn in checks.popleft()[1]:
                if conn.pong_overdue:
                    stats.pong_timeouts += 1
                    conn.close(CloseCode.GOING_AWAY, f"no pong within {pong_timeout:g} s", wait_for_peer=False)
        if not self.pending:
            if now - self.round_at < interval - tick / 2:
                return
            self.pending = list(self.timers.connections)
            self.round_at = now
            # A round's slices are cut from its size at the start, so the
            # round ends within the interval (slicing what is left made
            # each slice smaller than the last: a third of the pings).
            self.per_tick = max(1, math.ceil(len(self.pending) * tick / interval))
        n = self.per_tick
        batch, self.pending = self.pending[-n:], self.pending[:-n]
        expired_before = time.time() - EXPIRY_GRACE
        pings = self.pings
        pinged = []
        for conn in batch:
            if not conn.is_open:
                continue
            if conn.expires and conn.expires <= expired_before:
                stats.token_expiries += 1
                conn.close(CloseCode.TOKEN_EXPIRED, "token expired", wait_for_peer=False)
            elif pings and conn.ping():
                pinged.append(conn)
        if pings:
            stats.pings += len(pinged)
            checks.append((now + pong_timeout, pinged))
