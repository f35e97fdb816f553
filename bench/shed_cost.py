"""The cost of one fast refusal (accept, read the request, send a 503,
close), two ways: with ``socket.accept()`` and a socket object, and with the
bare descriptors mailpush's acceptor uses (``accept4``, ``os`` calls:
mailpush.rawsock). This is the work a saturated mailpush does for each
connection it sheds, so it bounds how fast it can answer an avalanche.

Each round, for each method: a forked client process opens CONNECTIONS
connections to a fresh listener and sends an upgrade request on each; once
all are in the listen backlog, this process refuses them one after the
other, timing the whole batch (wall clock and this process's CPU); the
client checks that every connection got the 503. Repeated ROUNDS times,
the methods alternating, so drift on a shared machine hits both alike;
medians, with min-max.

    .venv/bin/python bench/shed_cost.py [--connections 3000] [--rounds 3] [--out bench/results/shed_cost.json]

Prints a table and writes bench/results/shed_cost.json (with the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shlex
import signal
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))

from mailpush.handshake import response_text  # noqa: E402
from mailpush.rawsock import accept_fd, refuse_fd  # noqa: E402

# Refusals per method per round: enough that one batch takes tens of
# milliseconds (timer resolution and a single scheduling hiccup vanish in
# the mean), and no more than the kernel's default listen backlog
# (net.core.somaxconn, 4,096), since every client connects before the
# first accept.
CONNECTIONS = 3_000
# Rounds: each gives one number per method; the median of three discards
# one disturbed round on a shared machine.
ROUNDS = 3

# The bytes mailpush's acceptor sends when it sheds a connection
# (acceptor.py, _RESPONSE_BUSY): the same call, so the same bytes.
RESPONSE = response_text(503, "server overloaded, retry shortly\n", (("Retry-After", "1"),))
# What a browser's upgrade request looks like to the refusal: about this
# long (a token of typical length in the query), read and thrown away.
REQUEST = (b"GET /v1/ws?token=" + b"x" * 80 + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

# The listen backlog asked for: the kernel caps it at net.core.somaxconn.
BACKLOG = 65_535
# The client binds its connections to 127.0.3.1 ... 127.0.3.SOURCE_ADDRESSES
# in turn: one loopback address has ~28,000 ephemeral ports, so larger
# --connections would run out of them.
SOURCE_ADDRESSES = 200
# After the client reports every request sent, the time given to the last
# ones to land in their sockets, so that every refusal reads a request.
SETTLE_S = 0.2
# The client waits for its answers in epoll waits of this length, and gives
# up (exit status 1) after CLIENT_TIMEOUT_S: a refusal that never answers
# must end the run, not hang it.
CLIENT_POLL_S = 1.0
CLIENT_TIMEOUT_S = 60.0
# Bytes the client reads of each answer: the whole 503 fits.
ANSWER_BYTES = 4_096


def with_socket_objects(listener: socket.socket) -> None:
    """The refusal as plain ``socket`` code writes it."""
    s, _ = listener.accept()
    s.setblocking(False)
    try:
        s.recv(8192)
    except OSError:
        pass
    try:
        s.send(RESPONSE)
    except OSError:
        pass
    s.close()


def bare_descriptors(listener: socket.socket) -> None:
    """The refusal as mailpush's acceptor does it."""
    refuse_fd(accept_fd(listener), RESPONSE)


# name in the JSON -> (label in the table, one refusal)
METHODS: dict[str, tuple[str, Callable[[socket.socket], None]]] = {
    "socket_objects": ("socket objects (socket.accept)", with_socket_objects),
    "bare_descriptors": ("bare descriptors (mailpush.rawsock)", bare_descriptors),
}


def client(port: int, n: int, ready_w: int) -> int:
    """The forked client: ``n`` connections, a request on each, b"x" on
    ``ready_w`` once all are sent, then read every answer; writes how many
    were the 503 and returns the exit status (0: all answered in time)."""
    ep = select.epoll()
    socks = []
    for i in range(n):
        c = socket.socket()
        c.bind((f"127.0.3.{i % SOURCE_ADDRESSES + 1}", 0))
        c.connect(("127.0.0.1", port))
        c.send(REQUEST)
        c.setblocking(False)
        socks.append(c)
        ep.register(c, select.EPOLLIN)
    os.write(ready_w, b"x")
    got = refused = 0
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while got < n and time.monotonic() < deadline:
        for fd, _ev in ep.poll(CLIENT_POLL_S):
            try:
                answer = os.read(fd, ANSWER_BYTES)
            except OSError:
                answer = b""
            ep.unregister(fd)
            got += 1
            refused += answer.startswith(b"HTTP/1.1 503 ")
    os.write(ready_w, b"%d\n" % refused)
    return 0 if got == n else 1


def one_batch(refuse: Callable[[socket.socket], None], n: int) -> dict:
    """Refuse ``n`` connections waiting in a fresh listener's backlog;
    wall and CPU microseconds per refusal."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(BACKLOG)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the client: it must never return into the caller's code
            try:
                os.close(r)
                status = client(listener.getsockname()[1], n, w)
            except BaseException:  # noqa: BLE001  # whatever it was: shown, then the child's exit status 2
                traceback.print_exc()
                status = 2
            os._exit(status)
        os.close(w)
        try:
            if os.read(r, 1) != b"x":
                raise RuntimeError("the client ended before opening its connections")
            time.sleep(SETTLE_S)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                refuse(listener)
            t1, c1 = time.perf_counter(), time.process_time()
            _, status = os.waitpid(pid, 0)
            pid = 0
            report = b""
            while chunk := os.read(r, 64):
                report += chunk
        finally:
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(r)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the client did not get {n:,} answers within {CLIENT_TIMEOUT_S:g} s")
    return {"wall_us": (t1 - t0) / n * 1e6, "cpu_us": (c1 - c0) / n * 1e6, "answered_503": int(report)}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(n: int, rounds: int) -> dict:
    """Every method once per round, in turn; per method its rounds and the
    median / min / max of each figure."""
    per: dict[str, list[dict]] = {name: [] for name in METHODS}
    for k in range(rounds):
        for name, (label, refuse) in METHODS.items():
            b = one_batch(refuse, n)
            per[name].append(b)
            print(f"  round {k + 1}, {label}: {b['wall_us']:.1f} µs wall, {b['cpu_us']:.1f} µs CPU per refusal; "
                  f"{b['answered_503']:,}/{n:,} got the 503", flush=True)
    return {name: {"label": METHODS[name][0], "rounds": batches,
                   "wall_us": summary([b["wall_us"] for b in batches]),
                   "cpu_us": summary([b["cpu_us"] for b in batches]),
                   "answered_503_min": min(b["answered_503"] for b in batches)}
            for name, batches in per.items()}


def table(methods: dict, n: int) -> list[str]:
    ref = methods["socket_objects"]["cpu_us"]["median"]
    rows = ["| method | µs wall per refusal (median) | min–max | µs CPU per refusal (median) | min–max "
            "| CPU × socket objects | clients that got the 503 (worst round) |",
            "|---|---|---|---|---|---|---|"]
    for m in methods.values():
        wall, cpu = m["wall_us"], m["cpu_us"]
        rows.append(f"| {m['label']} | {wall['median']:.1f} | {wall['min']:.1f}–{wall['max']:.1f} | "
                    f"{cpu['median']:.1f} | {cpu['min']:.1f}–{cpu['max']:.1f} | {cpu['median'] / ref:.2f}× | "
                    f"{m['answered_503_min']:,} of {n:,} |")
    return rows


def command_line() -> str:
    """This run's command, as typed from the repository's root."""
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return shlex.join([python, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=CONNECTIONS, help="refusals per method per round")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "shed_cost.json")
    a = ap.parse_args(argv)
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if not 0 < a.connections <= somaxconn:
        ap.error(f"--connections must be 1 .. {somaxconn:,} (net.core.somaxconn): every client waits in the backlog")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    print(f"{a.connections:,} refusals per method, {a.rounds} rounds", flush=True)
    methods = measure(a.connections, a.rounds)
    print(f"\nOne fast refusal (accept, read, 503, close), {a.connections:,} per round, "
          f"{a.rounds} rounds: median and min–max\n")
    print("\n".join(table(methods, a.connections)))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "command": command_line(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"CPUs (nproc)": len(os.sched_getaffinity(0)), "kernel": platform.release(),
                    "Python": platform.python_version()},
        "connections": a.connections, "rounds": a.rounds, "response_bytes": len(RESPONSE),
        "request_bytes": len(REQUEST), "methods": methods}, indent=1))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
