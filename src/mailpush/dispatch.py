"""The bus-client side of mailpush: events in, frames out, by subscriber id.

:class:`Dispatcher` is the sink the bus-client task hands every received
batch to: it looks each item's subscriber up in the registry, builds the
event's frame once if any local tab wants it, and hands the same bytes to
each of them. It also keeps the bus's subscriptions equal to the set of
subscribers connected here: the first local tab subscribing subscribes the
bus, the last one leaving unsubscribes it, and changes are sent in batches
by one task.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .backoff import Backoff
from .bus import Bus, Event
from .log import LogLimiter, get_logger
from .metrics import Stats
from .packets import Since, event_frame
from .recovery import Recovery
from .registry import Registry, Subscription
from .speedups import C

__all__ = ["Dispatcher"]

# Frames sent between two checkpoints of the bus-client task: ~300 µs of
# sending on these machines, so a 9,000-recipient publish lets the rest of
# the server run every few hundred microseconds instead of stalling ~150 ms.
DELIVERIES_PER_CHECKPOINT = 256
# After a failed subscription change, wait this long before retrying,
# doubling up to RETRY_MAX (seconds).
RETRY_FIRST = 0.1
RETRY_MAX = 5.0
# Subscription changes sent to the bus in one call at most; a reconnect
# avalanche of 15,000 tabs becomes a few dozen bus commands.
SUBSCRIBE_BATCH = 1000


class Dispatcher:
    """Routes what the bus delivers to the local tabs, and keeps the bus's
    subscriptions equal to the subscribers connected here.

    Args:
      registry: subscriber id → its local connections.
      bus: the bus; its ``routes_by_subscription`` says whether it needs
        to be told which subscribers are here.
      stats: counts received, delivered, dropped and bad items.
      sends_in_c: the connection class whose ``send`` the C loop does
        itself (:class:`~mailpush.connection.Connection`: its non-blocking
        ``send()``, a writer started the same way); any other's ``send``
        is called.
    """

    def __init__(self, registry: Registry, bus: Bus, stats: Stats, sends_in_c: type = object) -> None:
        self.registry = registry
        self._sends_in_c = sends_in_c
        self.bus = bus
        self.stats = stats
        self._track = bus.routes_by_subscription
        self._bus_subscribed: set[str] = set()
        self._dirty: set[str] = set()
        # Tabs whose ``subscribed`` answer waits for the bus to acknowledge
        # their subscriber's subscription: subscriber -> {connection: frame}.
        self._pending: dict[str, dict[Subscription, Since | None]] = {}
        self.recovery = Recovery(bus, registry, stats)
        bus.on_gap = self.recovery.gap
        self._wakeup = trio.Event()
        self._bad_log = LogLimiter()

    async def deliver(self, batch: Sequence[Event]) -> None:
        """The sink: route one batch of events to local connections.

        Frames go out synchronously (a non-blocking ``send()`` each), with a
        checkpoint every DELIVERIES_PER_CHECKPOINT of them, so that a large
        batch never holds up accepting, health checks or other connections
        for longer than a few milliseconds. A tab being answered from the
        history (:mod:`mailpush.recovery`) gets its events held back until
        then.

        Error handling: this runs in the bus-client task, which every
        connection depends on, so it is an isolation boundary: an event that
        fails in an unexpected way (a bug, an object the encoder refuses)
        is dropped, counted (``mailpush_bus_bad_items``) and logged at most
        once a second; the rest of the batch and every later one are
        delivered. Only cancellation leaves.
        """
        get = self.registry.get
        stats = self.stats
        pending = self._pending
        recovery = self.recovery
        resuming = recovery.resuming
        track = recovery._track
        stats.received += len(batch)
        budget = DELIVERIES_PER_CHECKPOINT
        delivered = 0
        # The C loop (mailpush.speedups) takes every item it can while no
        # tab waits for its subscription to be acknowledged; the loop below
        # does the rest, one item at a time, the same way.
        run = _c_deliver_run
        subs = self.registry.table
        hooks = (recovery.hold, recovery.moved if track else None, recovery.epoch_changed, event_frame)
        held, k = None, 0  # the tabs of an item the C loop is in the middle of, and the next one's index
        i, n = 0, len(batch)
        try:
            while i < n:
                if run is not None and (held is not None or not pending):
                    i, budget, sent, lost, error, held, k = run(
                        batch, i, subs, budget, self._sends_in_c, pending, resuming, hooks, held, k
                    )
                    delivered += sent
                    stats.dropped += lost
                    if error is not None:  # batch[i - 1] raised: dropped, as below
                        self._bad_item(batch[i - 1], error)
                        continue
                    if budget <= 0:
                        budget = DELIVERIES_PER_CHECKPOINT
                        stats.delivered += delivered
                        delivered = 0
                        await trio.lowlevel.checkpoint()
                        continue
                    if i >= n:
                        break
                    # batch[i] is one the C loop leaves to this one
                item = batch[i]
                i += 1
                try:
                    sub, event, data, offset, epoch, frame = item
                    conns = get(sub)
                    if conns is None:
                        stats.dropped += 1
                        continue
                    if pending and sub in pending:
                        # An event for it came through the bus: its subscription
                        # stands, and the waiting tabs are answered before it.
                        self._confirmed((sub,))
                    if track and offset is not None and not recovery.moved(sub, offset, epoch):
                        recovery.epoch_changed(sub)  # its tabs resync; this event is held for after
                    for conn in conns:
                        events = conn.events
                        if events is None or event in events:
                            if frame is None:
                                frame = event_frame(sub, event, data, offset)
                            if resuming and (resume := resuming.get(conn)) is not None:
                                recovery.hold(resume, offset, frame)
                                continue
                            if conn.send(frame):
                                delivered += 1
                            budget -= 1
                            if not budget:
                                budget = DELIVERIES_PER_CHECKPOINT
                                stats.delivered += delivered
                                delivered = 0
                                await trio.lowlevel.checkpoint()
                except Exception as e:  # noqa: BLE001 - the isolation boundary, see above
                    self._bad_item(item, e)
        finally:
            stats.delivered += delivered

    def _bad_item(self, item: object, error: Exception) -> None:
        self.stats.bad_items += 1
        if n := self._bad_log.tick():
            get_logger().error("bad_bus_item_dropped", count=n, error=repr(error)[:300], item=repr(item)[:300])

    # -- bus subscriptions --------------------------------------------------

    def subscribe(self, conn: Subscription, since: Since | None) -> None:
        """Answer ``conn``'s subscribe once events for its subscriber reach
        this process: at once with a bus that routes everything here or
        whose subscription already stands; otherwise when the bus
        acknowledges it (Redis: the SUBSCRIBE reply). The answer itself
        comes from the history (:class:`~mailpush.recovery.Recovery`), so
        every event after the position it reports reaches the tab, and with
        ``since`` every event it missed, or a resync."""
        sub = conn.subscriber
        if not self._track or sub in self._bus_subscribed:
            self.recovery.start(conn, since)
        else:
            self._pending.setdefault(sub, {})[conn] = since  # a later subscribe replaces the answer

    def unsubscribed(self, conn: Subscription) -> None:
        """``conn`` left its subscription (unsubscribe or close)."""
        self.recovery.forget(conn)
        waiting = self._pending.get(conn.subscriber)
        if waiting is not None:
            waiting.pop(conn, None)

    def _confirmed(self, subscribers: Sequence[str]) -> None:
        """The bus acknowledged these: answer the tabs that wait for it."""
        pending = self._pending
        for sub in subscribers:
            waiting = pending.pop(sub, None)
            if waiting:
                live = set(self.registry.get(sub) or ())
                for conn, since in waiting.items():
                    if conn in live:  # still subscribed (so still open)
                        self.recovery.start(conn, since)

    def changed(self, subscriber: str) -> None:
        """A subscriber got its first or lost its last local connection."""
        if subscriber not in self.registry:
            self.recovery.left(subscriber)
        if self._track:
            self._dirty.add(subscriber)
            self._wakeup.set()

    async def run_subscriptions(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the bus subscribed to exactly the locally connected subscribers.

        Error handling: a failed change (the bus down, or a bug) is logged
        and retried with backoff; the subscribers it concerned stay dirty,
        so the bus ends up matching the registry once it answers again.
        Only cancellation ends this task.
        """
        task_status.started()
        if not self._track:
            return
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            try:
                await self.flush()
            except Exception as e:  # noqa: BLE001 - the bus failed; the server must not
                # Whatever was not done stays dirty and is tried again: the
                # bus ends up matching the registry once it answers again.
                log = get_logger()
                delay = backoff.next()
                log.error("bus_subscription_failed", error=repr(e), retry_in=round(delay, 3), pending=len(self._dirty))
                self._wakeup.set()
                await trio.sleep(delay)
            else:
                backoff.reset()

    async def flush(self) -> None:
        """Send the pending subscription changes to the bus, in batches.

        Raises:
          BusUnavailable: (or the bus's own error) the change could not be
            made; what was not done stays pending.
        """
        while self._dirty:
            dirty, self._dirty = self._dirty, set()
            registry, subscribed = self.registry, self._bus_subscribed
            want = [s for s in dirty if s in registry and s not in subscribed]
            drop = [s for s in dirty if s not in registry]
            for s in drop:
                self._pending.pop(s, None)  # every tab that waited has left
            drop = [s for s in drop if s in subscribed]
            try:
                for i in range(0, len(want), SUBSCRIBE_BATCH):
                    chunk = want[i : i + SUBSCRIBE_BATCH]
                    await self.bus.subscribe(chunk)
                    subscribed.update(chunk)
                    self._confirmed(chunk)
                for i in range(0, len(drop), SUBSCRIBE_BATCH):
                    chunk = drop[i : i + SUBSCRIBE_BATCH]
                    # Not subscribed from the moment the bus is asked: a tab
                    # arriving meanwhile waits for the subscription again.
                    subscribed.difference_update(chunk)
                    try:
                        await self.bus.unsubscribe(chunk)
                    except BaseException:
                        subscribed.update(chunk)  # unknown: unsubscribe again on retry
                        raise
            except BaseException:
                self._dirty |= dirty  # not done: try these again
                raise


_c_deliver_run = C.deliver_run if C is not None else None
