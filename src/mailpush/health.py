"""What a server tells the outside about itself: ``/healthz`` and ``/metrics``.

:class:`Health` reads the server's parts (the books in its
:class:`~mailpush.context.Context`, the accept loop, the bus, the timers,
the dispatcher) and never changes them: a scrape or a probe is a read.
"""

from __future__ import annotations

import attrs
import trio

from .acceptor import Acceptor
from .bus import Bus
from .context import Context
from .metrics import render

__all__ = ["Health", "bus_health"]


def bus_health(bus: Bus) -> tuple[int, str]:
    """/healthz as far as the bus decides it: 503 when it delivers nothing,
    200 saying what is missing when it delivers only part (some Redis
    Cluster masters unreachable), else 200 ok."""
    if not bus.serving():
        return 503, "bus unavailable: events would not arrive"
    if degraded := bus.degraded():
        return 200, f"ok, degraded: {degraded}"
    return 200, "ok"


@attrs.define(slots=True, eq=False)
class Health:
    """The health check and the metrics of one server.

    Args:
      ctx: the server's context (config, stats, registry, dispatcher,
        handshake slots, timers and the books of sockets and connections).
      acceptor: its accept loop (paused while every handshake slot is busy).
      bus: its bus.
    """

    ctx: Context
    acceptor: Acceptor
    bus: Bus

    def status(self, *, own_sockets: int = 0) -> tuple[int, str]:
        """What /healthz answers on both ports: (status, reason).

        Args:
          own_sockets: sockets of the asking probe itself among the open
            sockets (1 on the public port), not counted against the limit
            it asks about.
        """
        ctx = self.ctx
        if ctx.draining:
            return 503, "draining"
        if ctx.sockets - own_sockets >= ctx.config.max_connections:
            return 503, "at connection limit"
        if self.acceptor.paused:
            return 503, "overloaded: all handshake slots busy"
        return bus_health(self.bus)

    async def metrics(self) -> bytes:
        """The Prometheus text of /metrics: the counters and the gauges."""
        return render(self.ctx.stats, self.gauges, self.counters)

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Live values for /metrics."""
        ctx = self.ctx
        return {
            "mailpush_connections": ("Open WebSocket connections", len(ctx.connections)),
            "mailpush_sockets": ("Accepted sockets, handshaking or open", ctx.sockets),
            "mailpush_subscribers": ("Subscribers with at least one subscribed connection here", len(ctx.registry)),
            "mailpush_handshakes_in_progress": (
                "Handshake slots in use (requests being parsed now)",
                ctx.handshakes.borrowed_tokens,
            ),
            "mailpush_draining": ("1 while draining", int(ctx.draining)),
            "mailpush_bus_up": ("1 while the bus is connected (a Redis Cluster: every master)", int(self.bus.up)),
            "mailpush_bus_degraded": (
                "1 while only part of the bus is connected (some Redis Cluster masters)",
                int(bool(self.bus.degraded())),
            ),
            "mailpush_tasks": ("Live Trio tasks in this process", count_tasks()),
            "mailpush_event_loop_lag_seconds": (
                "Worst lateness of the timer task's ticks over the last 15 s",
                ctx.timers.loop_lag(),
            ),
            "mailpush_resuming_tabs": (
                "Tabs being answered from the history now",
                len(ctx.dispatcher.recovery.resuming),
            ),
            **self._bus_gauges(),
        }

    def _bus_gauges(self) -> dict[str, tuple[str, float]]:
        gauges: dict[str, tuple[str, float]] = {}
        history = getattr(self.bus, "history", None)
        if history is not None:  # kept in this process (embedded bus)
            gauges["mailpush_history_events"] = ("Events kept in the history", history.events)
            gauges["mailpush_history_subscribers"] = ("Subscribers with events in the history", len(history))
        lag = getattr(self.bus, "heartbeat_lag", None)
        if lag is not None:
            gauges["mailpush_bus_heartbeat_lag_seconds"] = (
                "Seconds since the last heartbeat came through the bus",
                lag(),
            )
        return gauges

    def counters(self) -> dict[str, tuple[str, float]]:
        """Counters for /metrics kept outside :class:`~mailpush.metrics.Stats`."""
        return {
            "mailpush_bus_bad_items": (
                "Items from the bus dropped as unusable (malformed payload, or delivery failed)",
                self.ctx.stats.bad_items + self.bus.bad_items,
            ),
        }


def count_tasks() -> int:
    """Live tasks of the running Trio loop (a walk of the task tree: a few
    milliseconds at 15,000 connections, for a scrape)."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count
