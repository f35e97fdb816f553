"""Counters kept as plain integers on the hot paths, exposed to Prometheus.

``prometheus_client`` counters take a lock on every ``inc()`` (~1 µs), which
on the fan-out path would cost more than the ``send()`` itself; so the
server counts in :class:`Stats` and a custom collector reads the numbers at
scrape time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Stats", "render"]


class Stats:
    """Every counter the server keeps; all plain ints."""

    def __init__(self) -> None:
        self.upgrades = 0
        self.rejections: Counter[str] = Counter()  # by reason label
        self.closes: Counter[int] = Counter()  # close codes sent
        self.published = 0  # events accepted for publishing here
        self.received = 0  # events this process received from the bus
        self.delivered = 0  # frames of events handed to connections
        self.dropped = 0  # events for subscribers not connected here
        self.slow_consumers = 0
        self.pings = 0
        self.pong_timeouts = 0
        self.packet_errors = 0
        self.accept_pauses = 0
        self.lag_skips = 0  # keepalive rounds not judged because the loop stalled
        self.writers = 0  # writer tasks spawned
        self.internal_errors = 0  # unexpected errors caught at a task's isolation boundary
        self.bad_items = 0  # bus items dropped as unusable (bad payload or failed delivery)
        self.recovered = 0  # events replayed from the history to resuming tabs
        self.resyncs: Counter[str] = Counter()  # resync packets sent, by reason
        self.token_expiries = 0  # connections closed with 4001: token expired, not refreshed
        self.refreshes = 0  # tokens renewed in band


Values = Callable[[], dict[str, tuple[str, float]]]


def render(stats: Stats, gauges: Values, counters: Values = dict) -> bytes:
    """Prometheus text exposition of ``stats`` plus the live ``gauges`` and
    the ``counters`` kept outside :class:`Stats` (by the bus, say)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, gauges, counters))
    return generate_latest(registry)


class _Collector(Collector):
    def __init__(self, stats: Stats, gauges: Values, counters: Values) -> None:
        self.stats = stats
        self.gauges = gauges
        self.counters = counters

    def collect(self) -> Iterator:
        s = self.stats
        for name, doc, value in (
            ("mailpush_upgrades", "WebSocket upgrades completed", s.upgrades),
            ("mailpush_events_published", "Events accepted by this process's admin API", s.published),
            ("mailpush_events_received", "Events received from the bus", s.received),
            ("mailpush_events_delivered", "Event frames handed to connections", s.delivered),
            ("mailpush_events_dropped", "Events for subscribers with no connection here", s.dropped),
            ("mailpush_slow_consumers", "Connections closed because their send queue was full", s.slow_consumers),
            ("mailpush_pings", "Keepalive pings sent", s.pings),
            ("mailpush_events_recovered", "Events replayed from the history to resuming tabs", s.recovered),
            ("mailpush_pong_timeouts", "Connections closed for not answering a ping", s.pong_timeouts),
            ("mailpush_packet_errors", "Error packets sent for bad client packets", s.packet_errors),
            ("mailpush_accept_pauses", "Times accepting waited for a handshake slot", s.accept_pauses),
            ("mailpush_keepalive_lag_skips", "Keepalive rounds not judged because the server stalled", s.lag_skips),
            (
                "mailpush_internal_errors",
                "Unexpected errors (bugs) caught at a task's isolation boundary and logged",
                s.internal_errors,
            ),
            ("mailpush_writers", "Writer tasks spawned for sockets that could not take a frame at once", s.writers),
            ("mailpush_token_expiries", "Connections closed because their token expired unrefreshed", s.token_expiries),
            ("mailpush_token_refreshes", "Tokens renewed in band by a refresh packet", s.refreshes),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        rej = CounterMetricFamily("mailpush_rejections", "Handshakes refused, by reason", labels=["reason"])
        for reason, n in sorted(s.rejections.items()):
            rej.add_metric([reason], n)
        yield rej
        resyncs = CounterMetricFamily(
            "mailpush_resyncs", "Resync packets sent (history could not fill a gap), by reason", labels=["reason"]
        )
        for reason, n in sorted(s.resyncs.items()):
            resyncs.add_metric([reason], n)
        yield resyncs
        closes = CounterMetricFamily("mailpush_closes", "Close frames sent, by close code", labels=["code"])
        for code, n in sorted(s.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        for name, (doc, amount) in self.counters().items():
            yield CounterMetricFamily(name, doc, value=amount)
        for name, (doc, amount) in self.gauges().items():
            yield GaugeMetricFamily(name, doc, value=amount)
