"""Watching a server while a scenario loads it: RSS, /metrics, /healthz.

Each probe is a daemon thread in the bench process that samples one thing
at a fixed period into a list until ``stop()`` (or its own time limit),
so a scenario can report peaks and latencies of what happened *during*
an avalanche, a burst or a slow-consumer run rather than only after it.
The threads spend their time in syscalls (a /proc read, a socket wait), so
they hardly compete with the scenario's own thread for the GIL.

Resource handling: every probe is a context manager; ``stop()`` sets its
event and joins the thread (each wait inside is bounded by its timeout);
every socket a probe opens is closed before the next sample.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time

# No probe runs longer than this, whatever its caller forgets.
MAX_PROBE_S = 600.0

_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name' or 'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _METRIC_RE.match(line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return out


def metrics_now(host: str, port: int, timeout: float = 10.0) -> dict[str, float]:
    """One scrape of ``GET /metrics`` on an admin port."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        return parse_metrics(resp.read().decode("utf-8", "replace"))
    finally:
        conn.close()


class _Probe:
    period: float

    def __init__(self, period: float, max_s: float):
        self.period = period
        self.max_s = min(max_s, MAX_PROBE_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self.t0 = 0

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self.t0 = time.monotonic_ns()
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def _loop(self):
        end = time.monotonic() + self.max_s
        nxt = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < end:
            self.sample()
            nxt += self.period
            delay = nxt - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                nxt = time.monotonic()  # a slow sample: no catch-up storm

    def sample(self):
        raise NotImplementedError


class RssProbe(_Probe):
    """VmRSS (summed over ``pids``) every ``period`` s, from /proc/PID/statm
    (one short read per process; resident pages are its second field)."""

    def __init__(self, pids: list[int], period: float = 0.002, max_s: float = 120.0):
        super().__init__(period, max_s)
        self.pids = list(pids)
        self.samples: list[tuple[int, int]] = []  # (monotonic ns, RSS KiB)

    def sample(self):
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * _PAGE_KB
            except (OSError, IndexError, ValueError):
                pass
        self.samples.append((time.monotonic_ns(), total))

    def peak(self, since_ns: int = 0, until_ns: int | None = None) -> int:
        vals = [kb for t, kb in self.samples if t >= since_ns and (until_ns is None or t <= until_ns)]
        return max(vals, default=0)


class MetricsProbe(_Probe):
    """``GET /metrics`` on the admin port every ``period`` s; keeps the
    named gauges of every scrape and the last full scrape."""

    def __init__(self, host: str, port: int, names: tuple[str, ...], period: float = 0.05,
                 max_s: float = 120.0, timeout: float = 5.0):
        super().__init__(period, max_s)
        self.host, self.port, self.names, self.timeout = host, port, names, timeout
        self.samples: list[tuple[int, dict[str, float]]] = []
        self.last: dict[str, float] = {}
        self.failures = 0
        self._conn: http.client.HTTPConnection | None = None

    def sample(self):
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._conn.request("GET", "/metrics")
            resp = self._conn.getresponse()
            m = parse_metrics(resp.read().decode("utf-8", "replace"))
        except (OSError, http.client.HTTPException):
            self.failures += 1
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            return
        self.last = m
        self.samples.append((time.monotonic_ns(), {k: m[k] for k in self.names if k in m}))

    def stop(self):
        super().stop()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def peak(self, name: str) -> float | None:
        vals = [s[name] for _, s in self.samples if name in s]
        return max(vals) if vals else None


class HealthProbe(_Probe):
    """A load balancer's health check: a fresh TCP connection and a plain
    ``GET /healthz`` every ``period`` s, each bounded by ``timeout``.
    Records (start ns, latency ms, outcome): the status code as a string,
    or "timeout", "reset", "refused", "error <errno>"."""

    def __init__(self, host: str, port: int, period: float = 0.02, max_s: float = 120.0,
                 timeout: float = 3.0, source: str = "127.0.250.1"):
        super().__init__(period, max_s)
        self.host, self.port, self.timeout, self.source = host, port, timeout, source
        self.samples: list[tuple[int, float, str]] = []
        self._request = (f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         "Connection: close\r\n\r\n").encode()

    def sample(self):
        t0 = time.monotonic_ns()
        outcome = "error"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.bind((self.source, 0))
            s.connect((self.host, self.port))
            s.sendall(self._request)
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                left = self.timeout - (time.monotonic_ns() - t0) / 1e9
                if left <= 0:
                    raise TimeoutError
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
            parts = head.split(b" ", 2)
            outcome = parts[1].decode("ascii", "replace") if len(parts) > 1 and parts[0].startswith(b"HTTP/") else "no status"
        except (TimeoutError, socket.timeout):
            outcome = "timeout"
        except ConnectionRefusedError:
            outcome = "refused"
        except ConnectionResetError:
            outcome = "reset"
        except OSError as e:
            outcome = f"error {e.errno}"
        finally:
            s.close()
        self.samples.append((t0, (time.monotonic_ns() - t0) / 1e6, outcome))
