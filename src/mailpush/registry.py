"""Subscriber id → the connections (tabs) subscribed to it in this process.

Most subscribers have one tab, so each entry is a small tuple rebuilt on the
rare add or remove rather than a set per subscriber. ``add`` and ``remove``
report the first and the last local connection of a subscriber: the moments
the bus must be told to subscribe and unsubscribe.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Registry", "Subscription"]


class Subscription(Protocol):
    """What the registry and the dispatcher need of a connection (a
    :class:`~mailpush.connection.Connection` is one)."""

    subscriber: str
    events: frozenset[str] | None  # the event filter; None: all
    expires: int  # when its token expires (seconds since 1970); 0: never

    def send(self, frame: bytes) -> bool: ...


# Up to this many tabs a subscriber's connections are a tuple (small, and
# rebuilt on the rare add or remove); beyond it a dict, so that thousands of
# tabs of one subscriber (a shared inbox on a wall of screens, a benchmark)
# cost O(1) per add and remove instead of a copy of all of them.
SMALL = 16


class Registry:
    """Subscriber id → its connections in this process (see the module
    docstring)."""

    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: dict[str, tuple[Subscription, ...] | dict[Subscription, None]] = {}

    def add(self, conn: Subscription) -> bool:
        """Register ``conn`` under its subscriber; True if it is the first."""
        sub = conn.subscriber
        conns = self._subs.get(sub)
        if conns is None:
            self._subs[sub] = (conn,)
            return True
        if isinstance(conns, dict):
            conns[conn] = None
        elif conn not in conns:
            if len(conns) < SMALL:
                self._subs[sub] = conns + (conn,)
            else:
                self._subs[sub] = dict.fromkeys((*conns, conn))
        return False

    def remove(self, conn: Subscription) -> bool:
        """Forget ``conn``; True if it was its subscriber's last connection."""
        sub = conn.subscriber
        conns = self._subs.get(sub)
        if conns is None or conn not in conns:
            return False
        if isinstance(conns, dict):
            del conns[conn]
            if len(conns) < SMALL // 2:
                self._subs[sub] = tuple(conns)
            return False
        if len(conns) == 1:
            del self._subs[sub]
            return True
        self._subs[sub] = tuple(c for c in conns if c is not conn)
        return False

    def get(self, subscriber: str) -> tuple[Subscription, ...] | None:
        """The subscriber's connections, as a snapshot safe to iterate
        across checkpoints."""
        conns = self._subs.get(subscriber)
        if isinstance(conns, dict):
            return tuple(conns)
        return conns

    @property
    def table(self) -> dict[str, tuple[Subscription, ...] | dict[Subscription, None]]:
        """The mapping itself (read only: the dispatcher's C loop reads a
        subscriber's tabs from it, a tuple, or a dict beyond SMALL)."""
        return self._subs

    def __contains__(self, subscriber: str) -> bool:
        return subscriber in self._subs

    def __len__(self) -> int:
        return len(self._subs)
