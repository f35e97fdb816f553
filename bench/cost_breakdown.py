"""Where mailpush's own CPU goes, in one process, without the kernel's or
the load generator's share (issue 14: "where a target is out of reach, say
what the profile shows the remaining cost is").

Per delivered event of a fan-out (one event to each of N subscribers, one
publish body, the embedded bus): CPU of each step the server runs (the
thread's CPU clock around it, ROUNDS publishes, median and min–max of the
rounds):

- ``parse``: the publish body to items (``items.parse_items``);
- ``record``: offsets, frames and the history (``history.record``);
- ``deliver``: the dispatcher's loop and one ``send()`` per tab to a Unix
  socketpair (``Dispatcher.deliver`` and ``Connection.send``, as in the
  server);
- ``send only``: the floor's loop, a prebuilt frame ``send()`` to the
  same sockets: what any Python server pays per delivery, most of it the
  kernel's (``deliver`` pays the same; the difference is the dispatcher's).

Per upgrade: the pure-Python steps of the upgrade path timed over many
calls (CPU µs per call, median of repeats): the request head parse, the
upgrade check, the token lookup and its HS256 check, the 101 answer, and the subscribe packet
that follows (a connection answering it, next to one bare send and
receive).

    .venv/bin/python bench/cost_breakdown.py [--subscribers 8000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
import timeit

import trio

from mailpush import log
from mailpush.auth import Verifier, mint, token_from_request
from mailpush.bus import history_of
from mailpush.bus.embedded import EmbeddedBus
from mailpush.config import Config
from mailpush.connection import Connection
from mailpush.context import Context
from mailpush.dispatch import Dispatcher
from mailpush.frames import Opcode, encode_text
from mailpush.handshake import check_upgrade, parse_request, response_101
from mailpush.history import record
from mailpush.items import parse_items
from mailpush.metrics import Stats
from mailpush.registry import Registry
from mailpush.runner import _tune_gc
from mailpush.server import Server
from mailpush.testing import FakeBus

SECRET = "s" * 32


def _context() -> Context:
    """A server's context (no listening, no keepalive), for real connections."""
    log.configure("warning", "json")
    return Server(Config(secret=SECRET, listen=("127.0.0.1", 0), admin=None, ping_interval=0), EmbeddedBus()).ctx


def _cpu() -> float:
    """This thread's CPU time (user and system, nanosecond clock: getrusage's
    user/system split ticks too coarsely for one publish)."""
    return time.thread_time()


def delivery(n: int, rounds: int) -> dict:
    pairs = [socket.socketpair() for _ in range(n)]
    for a, b in pairs:
        a.setblocking(False)
        b.setblocking(False)
    subs = [f"user{i:06d}" for i in range(n)]
    registry = Registry()
    ctx = _context()
    for (a, _), s in zip(pairs, subs, strict=True):
        registry.add(Connection(a, ctx, s))
    history = history_of(Config(secret=SECRET))
    dispatcher = Dispatcher(registry, FakeBus(), Stats(), Connection)
    bodies = [
        json.dumps(
            [{"subscriber": s, "event": "new_letter", "data": {"n": k}} for s in subs], separators=(",", ":")
        ).encode()
        for k in range(rounds)
    ]
    floor_frame = encode_text(b'{"n":0,"pad":"' + b"x" * 25 + b'"}')  # the floor's 42 bytes
    _tune_gc()  # as the server does at start
    parts: dict[str, list[float]] = {"parse": [], "record": [], "deliver": [], "send only": []}

    def drain() -> None:
        for _, b in pairs:
            try:
                while b.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass

    async def run() -> None:
        for k in range(rounds):
            t0 = _cpu()
            items = parse_items(bodies[k])
            t1 = _cpu()
            batch = record(history, items)
            t2 = _cpu()
            await dispatcher.deliver(batch)
            t3 = _cpu()
            drain()
            t4 = _cpu()
            for a, _ in pairs:
                a.send(floor_frame)
            t5 = _cpu()
            drain()
            for name, dt in (("parse", t1 - t0), ("record", t2 - t1), ("deliver", t3 - t2), ("send only", t5 - t4)):
                parts[name].append(dt / n * 1e6)

    trio.run(run)
    for a, b in pairs:
        a.close()
        b.close()
    return {k: (statistics.median(v), min(v), max(v)) for k, v in parts.items()}


def upgrade(repeat: int = 7, number: int = 20_000) -> dict:
    verifier = Verifier(SECRET)
    tok = mint(SECRET, "user012345", 3600)
    head = (
        f"GET /v1/ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nOrigin: https://mail.example\r\n\r\n"
    ).encode()
    req = parse_request(head)
    verifier.verify_claims(tok)  # its header is remembered, as after the first upgrade
    steps = {
        "parse the request head": lambda: parse_request(head),
        "check the upgrade headers": lambda: check_upgrade(req),
        "find the token": lambda: token_from_request(req),
        "verify the token (HS256)": lambda: verifier.verify_claims(tok),
        "the 101 answer": lambda: response_101(req.key, ""),
    }
    # The subscribe packet that follows the 101: a connection object takes
    # it and answers (history position, ``subscribed`` frame), then is
    # removed; beside it one send and receive of the same sockets alone.
    ctx = _context()
    mask = b"\x01\x02\x03\x04"
    payload = b'{"type":"subscribe"}'
    packet = (
        bytes((0x80 | Opcode.TEXT, 0x80 | len(payload))) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    )
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    def drain() -> None:
        try:
            while b.recv(65536):
                pass
        except BlockingIOError:
            pass

    def subscribe() -> None:
        conn = Connection(a, ctx, "user012345")
        ctx.added(conn)
        conn.on_data(packet)
        ctx.removed(conn)
        drain()

    def send_recv() -> None:
        a.send(b"x" * 60)
        drain()

    steps["a subscribe packet answered (send and receive included)"] = subscribe
    steps["one send and receive alone"] = send_recv
    out = {}
    for name, fn in steps.items():
        times = [t / number * 1e6 for t in timeit.repeat(fn, number=number, repeat=repeat, timer=_cpu)]
        out[name] = (statistics.median(times), min(times), max(times))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=8000, help="tabs of the fan-out (two descriptors each)")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    n = args.subscribers
    print(f"fan-out to {n:,} subscribers, {args.rounds} publishes: CPU µs per delivery, median [min–max]")
    d = delivery(n, args.rounds)
    for name, (med, lo, hi) in d.items():
        print(f"  {name:<10} {med:5.2f} [{lo:.2f}–{hi:.2f}]")
    own = d["parse"][0] + d["record"][0] + d["deliver"][0] - d["send only"][0]
    print(f"  mailpush's own (parse + record + deliver - send only): {own:.2f} µs per delivery")
    print("upgrade steps (pure Python, CPU µs per call, median [min–max])")
    for name, (med, lo, hi) in upgrade().items():
        print(f"  {name:<56} {med:5.2f} [{lo:.2f}–{hi:.2f}]")


if __name__ == "__main__":
    main()
