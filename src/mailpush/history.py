"""Event history in memory: the last events of each subscriber, so that a
tab that reconnects can be given what it missed (the embedded bus keeps one
per process; with ``--workers`` the supervisor keeps the one all workers
share). Plain Python, no I/O and no Trio.

Offsets are one counter for the whole history (strictly increasing for
every subscriber, with gaps between a subscriber's events), and the epoch
is one random string per history: a restart makes a new one, so a tab that
comes back with an old epoch is told its history is gone.

Memory is spent only on subscribers that have events: a stream per
subscriber holds its last ``size`` events for ``ttl`` seconds, all streams
together at most ``max_events``. When a stream goes (every event expired, or
evicted to keep the total bound) its last offset is remembered in a bounded
map, so that a tab asking for what came after an older offset is told of
the gap instead of being told nothing happened; beyond that map's bound,
one floor offset stands for every forgotten stream.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from sys import intern
from typing import Any

from .packets import event_frame
from .speedups import C

__all__ = ["History", "Position", "Replay", "Stored", "record"]

# Streams whose last offset is remembered after they go (ints in a dict:
# ~100 bytes each, 10 MB at this bound).
DROPPED_MEMORY = 100_000

# One retained event: (offset, event name, its frame, when it was stored).
Stored = tuple[int, str, bytes, float]


class Position:
    """Where a subscriber's stream stands: its epoch, its top offset, and
    its latest state (the raw JSON of the last publish that carried one)."""

    __slots__ = ("epoch", "offset", "state")

    def __init__(self, epoch: str, offset: int, state: Any = None) -> None:
        self.epoch = epoch
        self.offset = offset
        self.state = state

    def __repr__(self) -> str:
        return f"Position({self.epoch!r}, {self.offset})"


class Replay:
    """The answer to a read: the position, and the events after the asked
    offset (oldest first), or None when history cannot fill the gap (then
    ``reason`` says why)."""

    __slots__ = ("position", "events", "reason")

    def __init__(self, position: Position, events: list[Stored] | None, reason: str = "") -> None:
        self.position = position
        self.events = events
        self.reason = reason


class _Stream:
    __slots__ = ("entries", "floor", "state")

    def __init__(self, floor: int) -> None:
        self.entries: deque[Stored] = deque()
        self.floor = floor  # the highest offset of this subscriber no longer held (0: none lost)
        self.state: Any = None


class History:
    """The streams of every subscriber with events (see the module docstring).

    Args:
      size: events kept per subscriber; 0 keeps none (then every read is a gap).
      ttl: seconds an event is kept.
      max_events: events kept in all streams together.
      clock: seconds, for the TTL (monotonic).
    """

    def __init__(self, size: int, ttl: float, max_events: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self.max_events = max_events
        self.clock = clock
        self.epoch = secrets.token_hex(8)
        self.top = 0  # the last offset given out
        self.events = 0  # events held, all streams
        # In order of their last event (oldest first): expiry and eviction
        # take from the front.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._dropped: OrderedDict[str, int] = OrderedDict()
        self._floor = 0  # stands for every stream forgotten beyond _dropped

    def __len__(self) -> int:
        """Subscribers with a stream."""
        return len(self._streams)

    # -- writing ----------------------------------------------------------------

    def next_offset(self) -> int:
        """The offset of the next event (consumed)."""
        self.top += 1
        return self.top

    def append(
        self, subscriber: str, offset: int, event: str, frame: bytes, state: Any = None, now: float | None = None
    ) -> None:
        """Keep ``frame`` as the subscriber's event at ``offset`` (from
        :meth:`next_offset`), and ``state`` as its latest state if given.

        ``now`` (the clock, read once by the caller for a batch) also says
        the caller expires old streams itself, once per batch
        (:func:`record` does); without it each append does."""
        if not self.size:
            return  # history off: offsets only
        batch = now is not None
        if now is None:
            now = self.clock()
        stream = self._streams.pop(subscriber, None)
        if stream is None:
            stream = _Stream(max(self._dropped.pop(subscriber, 0), self._floor))
        self._streams[subscriber] = stream  # now the newest
        if state is not None:
            stream.state = state
        entries = stream.entries
        entries.append((offset, event, frame, now))
        self.events += 1
        while len(entries) > self.size:
            stream.floor = entries.popleft()[0]
            self.events -= 1
        if not batch:
            self.expire(now)
        while self.events > self.max_events and self._streams:
            self._drop(next(iter(self._streams)))

    def expire(self, now: float | None = None) -> None:
        """Drop the streams whose every event is older than the TTL."""
        now = self.clock() if now is None else now
        cutoff = now - self.ttl
        while self._streams:
            sub, stream = next(iter(self._streams.items()))
            if stream.entries[-1][3] > cutoff:
                return
            self._drop(sub)

    def _drop(self, subscriber: str) -> None:
        stream = self._streams.pop(subscriber)
        self.events -= len(stream.entries)
        self._dropped[subscriber] = stream.entries[-1][0]
        if len(self._dropped) > DROPPED_MEMORY:
            _, forgotten = self._dropped.popitem(last=False)
            self._floor = max(self._floor, forgotten)

    # -- reading ----------------------------------------------------------------

    def position(self, subscriber: str) -> Position:
        """The epoch, the top offset (of the whole history: every later
        event of this subscriber has a higher one) and the latest state."""
        stream = self._streams.get(subscriber)
        return Position(self.epoch, self.top, stream.state if stream is not None else None)

    def read(self, subscriber: str, epoch: str | None, offset: int | None) -> Replay:
        """The subscriber's events after ``offset`` if the history still
        holds every one of them; else the position with the reason.

        ``epoch`` None (or ``offset`` None) asks for the position alone.
        """
        position = self.position(subscriber)
        if epoch is None or offset is None:
            return Replay(position, [])
        if epoch != self.epoch:
            return Replay(position, None, "epoch_changed")
        if offset > self.top:
            return Replay(position, None, "bad_offset")
        if offset == self.top:
            return Replay(position, [])  # nothing at all was published since
        if not self.size:
            return Replay(position, None, "history_off")
        stream = self._streams.get(subscriber)
        if stream is None:
            lost = self._dropped.get(subscriber, self._floor)
            return Replay(position, [] if offset >= lost else None, "" if offset >= lost else "history_gap")
        if offset < stream.floor:
            return Replay(position, None, "history_gap")
        cutoff = self.clock() - self.ttl
        events = [e for e in stream.entries if e[0] > offset]
        if events and events[0][3] <= cutoff:
            return Replay(position, None, "history_gap")  # expired, not yet swept
        return Replay(position, events)


def record(history: History, items: Sequence[tuple[str, str, Any, Any]]) -> list[tuple[str, str, Any, int, str, bytes]]:
    """Publish ``items`` into ``history``: each gets its offset, its frame
    (built once, kept and sent as it is) and, when it carries one, its
    subscriber's new state. Returns them as bus events.

    :meth:`History.append` inlined for the batch (a fan-out publish of
    thousands of items spends its time here): the same steps, with the
    lookups done once, in C when the extension is there
    (:mod:`mailpush.speedups`)."""
    epoch = history.epoch
    now = history.clock()
    top = history.top
    if not history.size:
        out = []
        for sub, event, data, _ in items:
            top += 1
            out.append((sub, event, data, top, epoch, event_frame(sub, event, data, top)))
        history.top = top
        return out
    streams = history._streams
    if type(items) is not list:
        items = list(items)
    args = (items, streams, streams.move_to_end, history._dropped, history._floor, history.size, top, now, epoch)
    if _c_record_loop is not None:
        out, history.top, held = _c_record_loop(*args, history.events, _Stream, event_frame)
    else:
        out, history.top, held = _record_loop(*args, history.events)
    history.events = held
    if held > history.max_events:
        while history.events > history.max_events and streams:
            history._drop(next(iter(streams)))
    history.expire(now)
    return out


def _record_loop(
    items: list[tuple[str, str, Any, Any]],
    streams: OrderedDict[str, _Stream],
    move: Callable[[str], None],
    dropped: OrderedDict[str, int],
    floor: int,
    size: int,
    top: int,
    now: float,
    epoch: str,
    held: int,
) -> tuple[list[tuple[str, str, Any, int, str, bytes]], int, int]:
    """:func:`record`'s loop (its C twin: ``_speedups.record_loop``):
    returns the bus events, the new top offset and the events held."""
    out = []
    get = streams.get
    for sub, event, data, state in items:
        top += 1
        if type(event) is str:
            event = intern(event)  # one string per event name, not one per event kept
        frame = event_frame(sub, event, data, top)
        stream = get(sub)
        if stream is None:
            stream = streams[sub] = _Stream(max(dropped.pop(sub, 0), floor))
        else:
            move(sub)  # now the newest
        if state is not None:
            stream.state = state
        entries = stream.entries
        entries.append((top, event, frame, now))
        if len(entries) > size:
            stream.floor = entries.popleft()[0]
        else:
            held += 1
        out.append((sub, event, data, top, epoch, frame))
    return out, top, held


_c_record_loop = C.record_loop if C is not None else None
