"""Answers subscribes from the bus's history, and brings tabs up to date
after a gap: the "never lose a letter" half of the dispatcher.

A tab's ``subscribed`` answer says where its subscriber's stream stands
(epoch, top offset). A tab that subscribes with ``since`` gets, after the
answer, every event after its offset that it wants, in order, exactly once,
then the live ones; when history cannot fill the gap it gets ``resync``
with the latest state instead. The order of operations makes that exact:

1. the bus already delivers the subscriber's live events here (the
   dispatcher confirms the bus subscription first); while the tab is being
   answered they are held back for it, not sent;
2. the history is read (one read serves every tab of a subscriber that
   resumes at the same moment; reads are batched and bounded in number);
   the bus returns only once every event up to the position it reports has
   reached the dispatcher (a barrier), so each held-back event is either in
   the history read (offset up to the top: dropped) or after it (sent);
3. answer, replay, the held-back events after the top, then live.

A fresh subscribe is the same with nothing to replay; with the embedded bus
and nothing in flight it is answered at once. When a bus that can lose
events (Redis) comes back after an outage, every local tab is taken through
the same steps from where its subscriber stood.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import trio

from .backoff import Backoff
from .errors import BusNotReady, BusUnavailable
from .history import Position, Replay
from .log import LogLimiter, get_logger
from .packets import Since, resync_frame, subscribed_frame

if TYPE_CHECKING:
    from .bus import Bus
    from .metrics import Stats
    from .registry import Registry, Subscription

__all__ = ["Recovery", "RESUME_BATCH", "READS_IN_FLIGHT", "HELD_BACK_MAX"]

# Subscribers whose history is read in one call to the bus: a reconnect
# storm of 15,000 tabs becomes fifteen reads.
RESUME_BATCH = 1000
# Reads in flight at once: enough to overlap Redis round trips, few enough
# that a storm of resumes cannot take the event loop from live traffic.
READS_IN_FLIGHT = 4
# Live events held back for one tab while it is answered; beyond, the tab
# gets a resync (its subscriber is too busy to replay exactly in time).
HELD_BACK_MAX = 1000
# A read that fails (the bus is down) is retried: first wait, cap.
RETRY_FIRST = 0.1
RETRY_MAX = 5.0
# A read refused by a bus that answers but does not serve yet (BusNotReady:
# a Redis Cluster master rejoining says CLUSTERDOWN for ~2 s) is retried
# by one read at a time, the probe, every RETRY_NOT_READY seconds at most
# (jittered), for RETRY_NOT_READY_FOR seconds (then with the backoff
# above); the other reads refused meanwhile wait for the probe to succeed
# (or for their own backoff) and go again at once. Tabs are caught up
# within ~RETRY_NOT_READY of the bus serving, and it gets ~10 retries a
# second, however many reads are pending.
RETRY_NOT_READY = 0.1
RETRY_NOT_READY_FOR = 10.0


class _Resume:
    """A tab being answered: where it stands, and the live events held back
    for it meanwhile."""

    __slots__ = ("since", "answered", "held", "overflow")

    def __init__(self, since: Since | None, answered: bool) -> None:
        self.since = since
        self.answered = answered  # its subscribed went out already (a gap after a bus outage)
        self.held: list[tuple[int | None, bytes]] = []
        self.overflow = False


class Recovery:
    """See the module docstring.

    Args:
      bus: reads the history (``read``, ``position_now``).
      registry: the local tabs of each subscriber.
      stats: counts recovered events and resyncs.
    """

    def __init__(self, bus: Bus, registry: Registry, stats: Stats) -> None:
        self.bus = bus
        self.registry = registry
        self.stats = stats
        self.resuming: dict[Subscription, _Resume] = {}  # read by the dispatcher for each delivery
        self._queue: dict[Subscription, _Resume] = {}
        self._wakeup = trio.Event()
        self._limiter = trio.CapacityLimiter(READS_IN_FLIGHT)
        # Where each local subscriber stands, for buses that can lose events.
        self.positions: dict[str, Position] = {}
        self._track = bus.may_lose
        self._error_log = LogLimiter()
        self._probe: object | None = None  # the read retrying a bus not ready yet
        self._probed = trio.Event()  # set when the probe is done (succeeded, or gave up)

    # -- what the dispatcher asks for ------------------------------------------

    def start(self, conn: Subscription, since: Since | None, *, answered: bool = False) -> None:
        """Answer ``conn`` (or, ``answered``, bring it up to date) from the
        history; live events for it are held back until then."""
        if since is None and not answered:
            position = self.bus.position_now(conn.subscriber)
            if position is not None and conn not in self.resuming:
                self._answer(conn, position, None)
                return
        resume = _Resume(since, answered)
        self.resuming[conn] = resume
        self._queue[conn] = resume
        self._wakeup.set()

    def forget(self, conn: Subscription) -> None:
        """``conn`` unsubscribed or closed: no answer is owed any more."""
        self.resuming.pop(conn, None)
        self._queue.pop(conn, None)

    def hold(self, resume: _Resume, offset: int | None, frame: bytes) -> None:
        """A live event for a tab being answered: keep it for after."""
        if len(resume.held) < HELD_BACK_MAX:
            resume.held.append((offset, frame))
        else:
            resume.overflow = True

    def moved(self, subscriber: str, offset: int, epoch: str | None) -> bool:
        """A live event reached ``subscriber``'s tabs; False if it comes from
        another epoch than the one they have (the bus lost its history)."""
        position = self.positions.get(subscriber)
        if position is None:
            return True
        if epoch is not None and epoch != position.epoch:
            return False
        position.offset = offset
        return True

    def gap(self, reason: str, subscribers: Collection[str] | None = None) -> None:
        """The bus may have lost events (it reconnected after an outage):
        every local tab (or those of ``subscribers``) is brought up to date
        from where it stood."""
        positions = self.positions
        if subscribers is None:
            affected = list(positions.items())
        else:
            affected = [(s, positions[s]) for s in subscribers if s in positions]
        get_logger().warning("bus_gap_recovery", reason=reason, subscribers=len(affected))
        for sub, position in affected:
            for conn in self.registry.get(sub) or ():
                if conn not in self.resuming:  # one being answered is, from its own since, by a read still to come
                    self.start(conn, Since(position.epoch, position.offset), answered=True)

    def epoch_changed(self, subscriber: str) -> None:
        """A live event came from a new epoch: the tabs must resync."""
        position = self.positions.get(subscriber)
        since = Since(position.epoch, position.offset) if position is not None else None
        for conn in self.registry.get(subscriber) or ():
            if conn not in self.resuming:  # as in gap()
                self.start(conn, since, answered=True)

    # -- the task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the queued resumes in batches, a few reads at a time.

        Error handling: a read that fails because the bus is down is
        retried with backoff (the tabs keep waiting, their live events held
        back), or, when the bus answered that it does not serve yet, soon
        after it does (see RETRY_NOT_READY); any other failure of a batch
        (a bug) is logged, and its tabs are answered with a resync rather
        than left waiting. Only cancellation ends this task.
        """
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while self._queue:
                    token = object()  # the read's slot, released by the task that reads
                    await self._limiter.acquire_on_behalf_of(token)
                    nursery.start_soon(self._serve, self._take(), token)

    def _take(self) -> list[tuple[Subscription, _Resume]]:
        """Up to RESUME_BATCH subscribers' worth of queued tabs."""
        batch: list[tuple[Subscription, _Resume]] = []
        subscribers: set[str] = set()
        for conn in list(self._queue):
            if len(subscribers) >= RESUME_BATCH and conn.subscriber not in subscribers:
                break
            subscribers.add(conn.subscriber)
            batch.append((conn, self._queue.pop(conn)))
        return batch

    async def _serve(self, batch: list[tuple[Subscription, _Resume]], token: object) -> None:
        try:
            # One read per subscriber and epoch, from the oldest offset asked:
            # it serves every tab of them in the batch.
            requests: dict[tuple[str, str | None], int | None] = {}
            for conn, resume in batch:
                since = resume.since
                key = (conn.subscriber, since.epoch if since is not None else None)
                offset = since.offset if since is not None else None
                asked = requests.get(key, -1)
                if asked == -1 or (offset is not None and asked is not None and offset < asked):
                    requests[key] = offset
            keys = list(requests)
            replays = await self._read([(sub, epoch, requests[sub, epoch]) for sub, epoch in keys])
            by_key = dict(zip(keys, replays, strict=True))
            for conn, resume in batch:
                if self.resuming.get(conn) is resume:  # still wanted, not superseded
                    since = resume.since
                    self._finish(conn, resume, by_key[conn.subscriber, since.epoch if since is not None else None])
        except Exception:  # noqa: BLE001 - the isolation boundary, see run()
            self.stats.internal_errors += 1
            if n := self._error_log.tick():
                get_logger().exception("resume_failed", count=n, tabs=len(batch))
            for conn, resume in batch:
                if self.resuming.get(conn) is resume:
                    self.resuming.pop(conn, None)
                    conn.send(resync_frame(conn.subscriber, "internal_error", "", 0, None))
        finally:
            self._limiter.release_on_behalf_of(token)

    async def _read(self, requests: Sequence[tuple[str, str | None, int | None]]) -> list[Replay]:
        """The bus's read, retried until it succeeds: with backoff, or, while
        the bus is not ready yet, as the probe or after it (see
        RETRY_NOT_READY)."""
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        me = object()
        probe_since = 0.0
        try:
            while True:
                probed = self._probed  # a probe done from now on wakes this read
                try:
                    return await self.bus.read(requests)
                except BusUnavailable as e:
                    delay = backoff.next()
                    if isinstance(e, BusNotReady):
                        if self._probe is None:
                            self._probe, probe_since = me, trio.current_time()
                    elif self._probe is me:
                        self._probe_done()  # unreachable now: the others try for themselves
                    probing = self._probe is me
                    if probing and trio.current_time() - probe_since < RETRY_NOT_READY_FOR:
                        delay = min(delay, random.uniform(RETRY_NOT_READY / 2, RETRY_NOT_READY))
                    if n := self._error_log.tick():
                        get_logger().warning(
                            "history_read_failed", error=str(e), retry_in=round(delay, 3), probe=probing, count=n
                        )
                    if probing:
                        await trio.sleep(delay)
                    else:
                        with trio.move_on_after(delay):
                            await probed.wait()
        finally:
            if self._probe is me:
                self._probe_done()

    def _probe_done(self) -> None:
        """The probe succeeded (or stopped probing): the reads waiting for it
        go again now (one of them probes, if the bus still is not ready)."""
        self._probe = None
        self._probed.set()
        self._probed = trio.Event()

    # -- answering ----------------------------------------------------------------

    def _finish(self, conn: Subscription, resume: _Resume, replay: Replay) -> None:
        del self.resuming[conn]
        self._answer(conn, replay.position, resume, replay)

    def _answer(
        self, conn: Subscription, position: Position, resume: _Resume | None, replay: Replay | None = None
    ) -> None:
        sub, stats = conn.subscriber, self.stats
        if resume is None and replay is None:
            # A fresh subscribe answered at once (the common case, see
            # start): its ``subscribed`` and its subscriber's position.
            conn.send(subscribed_frame(sub, conn.events, position.epoch, position.offset, None, conn.expires))
            if self._track:
                self._keep(sub, position)
            return
        since = resume.since if resume is not None else None
        events: list | None = [] if replay is None else replay.events
        reason = "" if replay is None else replay.reason
        if since is not None and events is not None and since.epoch != position.epoch:
            events, reason = None, "epoch_changed"
        if resume is not None and resume.overflow:
            events, reason = None, "overflow"
        if since is None and resume is not None and not resume.answered:
            events = []  # a fresh subscribe: nothing to replay
        if resume is None or not resume.answered:
            recovered = None if since is None else events is not None
            conn.send(subscribed_frame(sub, conn.events, position.epoch, position.offset, recovered, conn.expires))
        if since is not None and events is None:
            stats.resyncs[reason or "history_gap"] += 1
            conn.send(resync_frame(sub, reason or "history_gap", position.epoch, position.offset, position.state))
        elif events:
            wanted = conn.events
            for offset, event, frame, _ in events:
                if offset > since.offset and (wanted is None or event in wanted):  # type: ignore[union-attr]
                    conn.send(frame)
                    stats.recovered += 1
        if resume is not None:
            for offset, frame in resume.held:
                if offset is None or offset > position.offset:
                    conn.send(frame)
        if self._track:
            self._keep(sub, position)

    def _keep(self, sub: str, position: Position) -> None:
        """Remember where ``sub``'s tabs stand, unless it knows a later place."""
        known = self.positions.get(sub)
        if known is None or known.epoch != position.epoch or known.offset < position.offset:
            self.positions[sub] = Position(position.epoch, position.offset)

    def left(self, subscriber: str) -> None:
        """The subscriber's last local tab left."""
        self.positions.pop(subscriber, None)
