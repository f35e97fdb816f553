"""Memory the embedded history spends per kept event (issue 14: the event
name is one interned string, not one per event).

Publishes ROUNDS fan-outs of one event to each of N subscribers into a
History (the server's record path), and reports the bytes tracemalloc sees
allocated per kept event; ``--no-intern`` measures the same with the
Python loop and one string per event, as before.

    .venv/bin/python bench/history_memory.py [--subscribers 9000] [--rounds 20] [--no-intern]
"""

from __future__ import annotations

import argparse
import json
import tracemalloc

from mailpush import history
from mailpush.history import History, record
from mailpush.items import parse_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=9000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-intern", action="store_true", help="the Python loop, one string per kept event")
    args = ap.parse_args()
    n = args.subscribers
    bodies = [
        json.dumps(
            [{"subscriber": f"user{i:06d}", "event": "new_letter", "data": {"n": k}} for i in range(n)],
            separators=(",", ":"),
        ).encode()
        for k in range(args.rounds)
    ]
    if args.no_intern:
        history.intern = lambda s: s  # type: ignore[assignment]
        history._c_record_loop = None
    h = History(100, 3600, 10**8)
    record(h, parse_items(bodies[0]))  # every stream exists before measuring
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for body in bodies[1:]:
        record(h, parse_items(body))
    after = tracemalloc.get_traced_memory()[0]
    kept = (args.rounds - 1) * n
    how = "no interning" if args.no_intern else "interning"
    print(f"{(after - before) / kept:.0f} bytes per kept event ({kept:,} events, {how})")


if __name__ == "__main__":
    main()
