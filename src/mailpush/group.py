"""The supervisor's admin API: one health check, one scrape target and one
publish endpoint for a whole ``--workers`` set.

On the ``--admin`` address the supervisor answers ``/healthz`` for the group
(503 while a worker is down or the set drains), ``/metrics`` with every
worker's metrics summed (their event-loop lag: the worst) plus its own
``mailpush_worker_restarts_total``, and publishes: with the embedded bus
straight into the relay it keeps (offsets and history included), with
Redis through a Redis bus of its own. Worker i's own admin API is on the
admin port + 1 + i.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from .bus import Bus, Item, Sink, make_bus
from .bus.base import Read
from .bus.relay import Relay
from .config import Config
from .errors import BusUnavailable
from .health import bus_health
from .history import Replay
from .log import get_logger
from .metrics import Stats

__all__ = ["Group", "RelayPublisher", "admin_request", "merge_metrics", "SCRAPE_TIMEOUT"]

# How long the supervisor waits for one worker's /metrics.
SCRAPE_TIMEOUT = 2.0
# Gauges whose sum means nothing: the group reports the worst.
_WORST = ("mailpush_event_loop_lag_seconds", "mailpush_bus_heartbeat_lag_seconds")


class RelayPublisher(Bus):
    """The supervisor's bus with the embedded bus: publishes go into the
    relay (the history and every worker); it receives nothing itself."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def publish(self, items: Sequence[Item]) -> None:
        self.relay.publish(items)

    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        raise BusUnavailable("the supervisor serves no tabs")


class Group:
    """The set as its admin API sees it (an :class:`mailpush.admin.Server`).

    Args:
      config: the supervisor's options.
      relay: the embedded bus's relay, or None with another bus.
      workers: the admin address of each worker, by index.
      running: the indexes of the workers running now.
      restarts: how many times a worker was restarted.
      ready: the indexes of the running workers that have answered their
        own /healthz with 200 since they started (listening, bus up).
    """

    def __init__(self, config: Config, relay: Relay | None, workers: Callable[[], list[tuple[str, int] | None]],
                 running: Callable[[], set[int]], restarts: Callable[[], int],
                 ready: Callable[[], set[int]]) -> None:  # fmt: skip
        self.config = config
        self.stats = Stats()
        self.bus: Bus = RelayPublisher(relay) if relay is not None else make_bus(config)
        self.log = get_logger()
        self.listen_address: tuple[str, int] | None = config.listen
        self.draining = False
        self._workers = workers
        self._running = running
        self._restarts = restarts
        self._ready = ready

    def health(self) -> tuple[int, str]:
        """200 while every worker runs and has said it is ready; 503 while
        draining, or while one is down or still starting."""
        if self.draining:
            return 503, "draining"
        running = self._running()
        down = sorted(set(range(self.config.workers)) - running)
        if down:
            return 503, f"worker {', '.join(map(str, down))} down, restarting"
        starting = sorted(running - self._ready())
        if starting:
            return 503, f"worker {', '.join(map(str, starting))} starting"
        return bus_health(self.bus)

    async def metrics(self) -> bytes:
        """Every worker's /metrics, summed, and the supervisor's own."""
        texts: list[str] = []
        async with trio.open_nursery() as nursery:
            for address in self._workers():
                if address is not None:
                    nursery.start_soon(self._scrape, address, texts)
        own = [
            ("mailpush_worker_restarts", "counter", "Workers restarted after dying on their own", self._restarts()),
            ("mailpush_workers_running", "gauge", "Workers running now", len(self._running())),
            ("mailpush_workers_ready", "gauge", "Workers whose /healthz said 200", len(self._ready())),
            (
                "mailpush_supervisor_events_published",
                "counter",
                "Events published at the supervisor",
                self.stats.published,
            ),
        ]
        return merge_metrics(texts, own)

    async def _scrape(self, address: tuple[str, int], into: list[str]) -> None:
        request = admin_request(self.config, "/metrics")
        with trio.move_on_after(SCRAPE_TIMEOUT):
            try:
                stream = await trio.open_tcp_stream(*address)
                async with stream:
                    await stream.send_all(request)
                    data = bytearray()
                    while chunk := await stream.receive_some(65536):
                        data += chunk
            except OSError:
                return  # a worker down or restarting: its numbers are missing for this scrape
            head, _, body = bytes(data).partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                into.append(body.decode("utf-8", "replace"))


def admin_request(config: Config, path: str) -> bytes:
    """A GET of ``path`` on a worker's admin API (with the admin token)."""
    headers = f"Authorization: Bearer {config.admin_token}\r\n" if config.admin_token else ""
    return f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode()


def merge_metrics(texts: Sequence[str], own: Sequence[tuple[str, str, str, float]]) -> bytes:
    """Prometheus texts summed sample by sample (same name and labels), the
    lag gauges by their worst; then ``own`` (name, type, help, value)."""
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            kind, doc, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            worst = family.name in _WORST
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen = samples.get(key)
                samples[key] = (
                    sample.value if seen is None else (max(seen, sample.value) if worst else seen + sample.value)
                )
    lines: list[str] = []
    for name, (kind, doc, samples) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in samples.items():
            lines.append(f"{sample_name}{_labels(labels)} {_number(value)}")
    for name, kind, doc, value in own:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{'_total' if kind == 'counter' else ''} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + inner + "}"


def _number(value: Any) -> str:
    return repr(float(value))
