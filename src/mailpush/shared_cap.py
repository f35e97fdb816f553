"""The per-subscriber connection cap across instances (``--max-connections-
per-subscriber`` on a bus that :attr:`~mailpush.bus.base.Bus.shares_connections`,
the Redis buses).

Each process caps a subscriber's connections locally at the upgrade, with
no wait (:meth:`Context.at_subscriber_cap`, 429 or close 4008). Across
instances the count lives on the bus: per subscriber, each instance's
count under a lease (``mailpush_connections``, see
:mod:`~mailpush.bus.redis_functions`). The upgrade does not wait for Redis:
a new connection is counted by this task in the next batch (within a few
milliseconds), and one that finds the other instances already hold the
cap is closed with 4008 (``TOO_MANY_CONNECTIONS``), the newest first, the
same code a ``mailpush.v1`` client gets from the local cap.

How exact it is:

- While Redis answers, exact: each decision is atomic on Redis, so two
  instances never both admit the subscriber's last place. A connection over
  the cap is open for one batch (a few ms) before it is closed.
- An instance that dies holds its count until its lease runs out
  (:data:`LEASE_S`): a subscriber may be refused on the others for up to
  that long, never admitted beyond the cap.
- While Redis is unreachable, only the local cap applies; new connections
  are counted once Redis is back, and those over the cap are closed then.
- A Redis that lost its data (restarted empty) is told every instance's
  counts again within :data:`RENEW_S`.
"""

from __future__ import annotations

import os
import secrets
import socket

import trio

from .backoff import Backoff
from .bus import Bus
from .context import Channel, Context
from .errors import BusUnavailable
from .frames import CloseCode
from .log import LogLimiter

__all__ = ["SharedCap", "LEASE_S", "RENEW_S", "BATCH"]

# How long a count stands without renewal: an instance that died stops
# counting this long after its last renewal.
LEASE_S = 90.0
# How often each instance renews the counts of every subscriber it holds
# (one FCALL per subscriber; 18,000 subscribers: 600 a second).
RENEW_S = 30.0
# Subscribers per pipeline: building one holds the event loop (~18 µs each,
# bench/cap_cost.py), so 250 of them are ~5 ms, not a latency spike.
BATCH = 250
# Retry after Redis failed: first wait, cap.
RETRY_FIRST = 0.2
RETRY_MAX = 5.0


class SharedCap:
    """Counts this instance's connections of each subscriber on the bus and
    closes those beyond the cap (see the module docstring).

    The context calls :meth:`opened` and :meth:`closed` (no await); the
    task :meth:`run` sends the changes in batches.
    """

    def __init__(self, ctx: Context, bus: Bus, instance: str | None = None) -> None:
        self.ctx = ctx
        self.bus = bus
        self.cap = ctx.config.max_connections_per_subscriber
        self.instance = instance or f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"
        # New connections not yet counted on the bus, per subscriber, oldest first.
        self._new: dict[str, list[Channel]] = {}
        # Subscribers whose count here changed since it was last sent.
        self._dirty: set[str] = set()
        self._wakeup = trio.Event()
        self._error_log = LogLimiter()

    @property
    def pending(self) -> int:
        """Subscribers whose count is still to be sent."""
        return len(self._dirty)

    def opened(self, conn: Channel) -> None:
        """``conn`` was upgraded: count it in the next batch."""
        self._new.setdefault(conn.subscriber, []).append(conn)
        self._dirty.add(conn.subscriber)
        self._wakeup.set()

    def closed(self, subscriber: str) -> None:
        """One of ``subscriber``'s connections here closed."""
        self._dirty.add(subscriber)
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the counts as they change, and renew them all every
        :data:`RENEW_S`.

        Error handling: a batch that fails (Redis unreachable, or a bug) is
        logged at most once a second (a bug is also counted in
        ``mailpush_internal_errors``) and retried with backoff; what it
        carried stays pending, so the counts on Redis end up right once it
        answers again. Only cancellation ends this task.
        """
        task_status.started()
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        renew_at = trio.current_time() + RENEW_S
        while True:
            with trio.move_on_at(renew_at):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            if trio.current_time() >= renew_at:
                renew_at = trio.current_time() + RENEW_S
                self._dirty.update(self.ctx.per_subscriber)
            try:
                await self.flush()
            except Exception as e:  # noqa: BLE001 - Redis failed; the server must not
                if isinstance(e, BusUnavailable):
                    if n := self._error_log.tick():
                        self.ctx.log.warning("subscriber_cap_unavailable", error=str(e), pending=self.pending, count=n)
                else:
                    self.ctx.task_failed("shared_cap")
                self._wakeup.set()
                await trio.sleep(backoff.next())
            else:
                backoff.reset()

    async def flush(self) -> None:
        """Send every pending count, :data:`BATCH` subscribers a pipeline,
        and close the new connections the bus refuses.

        Raises:
          BusUnavailable: Redis did not answer; the batch is pending again.
        """
        while self._dirty:
            batch = []
            for _ in range(min(BATCH, len(self._dirty))):
                batch.append(self._dirty.pop())
            news = [[c for c in self._new.pop(s, ()) if c.is_open] for s in batch]
            held = self.ctx.per_subscriber
            counts = [(s, max(0, held.get(s, 0) - len(new)), len(new)) for s, new in zip(batch, news, strict=True)]
            try:
                allowed = await self.bus.count_connections(self.instance, counts, self.cap, int(LEASE_S * 1000))
            except BaseException:
                for s, new in zip(batch, news, strict=True):
                    if new:
                        self._new[s] = new + self._new.get(s, [])
                self._dirty.update(batch)
                raise
            for new, n in zip(news, allowed, strict=True):
                for conn in new[n:]:
                    self._refuse(conn)

    def _refuse(self, conn: Channel) -> None:
        """Close a connection the other instances leave no room for."""
        self.ctx.stats.rejections["per_subscriber_cap"] += 1
        conn.close(
            CloseCode.TOO_MANY_CONNECTIONS,
            f"this subscriber has {self.cap} connections open across instances, the most allowed",
        )
