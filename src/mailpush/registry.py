"""Subscriber id → the connections (tabs) subscribed to it in this process.

Most subscribers have one tab, so each entry is a small tuple rebuilt on the
rare add or remove rather than a set per subscriber. ``add`` and ``remove``
report the first and the last local connection of a subscriber: the moments
the bus must be told to subscribe and unsubscribe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Registry"]


class Registry:
    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: dict[str, tuple[Connection, ...]] = {}

    def add(self, conn: Connection) -> bool:
        """Register ``conn`` under its subscriber; True if it is the first."""
        sub = conn.subscriber
        conns = self._subs.get(sub)
        if conns is None:
            self._subs[sub] = (conn,)
            return True
        if conn not in conns:
            self._subs[sub] = conns + (conn,)
        return False

    def remove(self, conn: Connection) -> bool:
        """Forget ``conn``; True if it was its subscriber's last connection."""
        sub = conn.subscriber
        conns = self._subs.get(sub)
        if conns is None or conn not in conns:
            return False
        if len(conns) == 1:
            del self._subs[sub]
            return True
        self._subs[sub] = tuple(c for c in conns if c is not conn)
        return False

    def get(self, subscriber: str) -> tuple[Connection, ...] | None:
        return self._subs.get(subscriber)

    def __contains__(self, subscriber: str) -> bool:
        return subscriber in self._subs

    def __len__(self) -> int:
        return len(self._subs)
