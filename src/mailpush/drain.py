"""Drain: every connection closed with 1012 (service restart), spread over
a window so that the clients' reconnects arrive evenly, not as one avalanche.

The server stops accepting first (:meth:`mailpush.server.Server.drain`);
:func:`close_all` then works through the connections it holds.
"""

from __future__ import annotations

import random

import trio

from .context import Context
from .frames import CloseCode

__all__ = ["close_all", "DRAIN_GRACE", "DRAIN_TICK"]

# After the window, how long the last closed peers get to answer their
# Close before the rest are cut; the exit comes within the drain window
# plus this (and a little shutdown work).
DRAIN_GRACE = 1.0
# Closes are issued in ticks of this length, a group per tick.
DRAIN_TICK = 0.01


async def close_all(ctx: Context, seconds: float) -> None:
    """Close every open connection of ``ctx``, spread over ``seconds``.

    Connection i of n (in random order) closes at i/n of the window, with
    1012 and a reconnect delay suggested in its reason
    (``reconnect_after_ms=N``, which mailpush's browser client honours),
    spread over the window too; its queued events go out before the Close frame. Returns
    once every connection is closed, or DRAIN_GRACE after the window; what
    is still open then is cut.

    Error handling: a connection whose close fails (a bug) is reported
    through ``ctx.task_failed`` and cut; the drain goes on.
    """
    conns = list(ctx.connections)
    random.shuffle(conns)
    start = trio.current_time()
    try:
        for i, conn in enumerate(conns):
            at = start + seconds * i / len(conns)
            if at - trio.current_time() > DRAIN_TICK:
                await trio.sleep_until(at)
            try:
                if conn.is_open:
                    delay_ms = round(random.uniform(1.0, max(1.0, seconds)) * 1000)
                    conn.close(CloseCode.SERVICE_RESTART, f"restarting; reconnect_after_ms={delay_ms}")
            except Exception:  # noqa: BLE001 - the isolation boundary, see above
                ctx.task_failed("drain")
                conn.abort()
        with trio.move_on_after(DRAIN_GRACE):
            while ctx.connections:
                await trio.sleep(0.05)
    finally:
        for conn in list(ctx.connections):
            conn.abort()
