"""One backoff for every retry loop (the dispatcher's subscription changes,
the Redis bus's reconnects).

Each wait doubles up to a cap and is drawn from the upper half of its range
("equal jitter"), so a fleet of gateways that lost the same Redis does not
come back in the same millisecond, and no wait is shorter than half of its
step.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays ``first``, ``2·first`` … up to ``cap`` seconds, jittered.

    Call :meth:`next` for each wait and :meth:`reset` after a success.
    """

    __slots__ = ("first", "cap", "_step")

    def __init__(self, first: float, cap: float) -> None:
        if not 0 < first <= cap:
            raise ValueError("backoff needs 0 < first <= cap")
        self.first = first
        self.cap = cap
        self._step = first

    def next(self) -> float:
        """The next delay (seconds)."""
        step = self._step
        self._step = min(step * 2, self.cap)
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        self._step = self.first
