"""Run mailpush with the cyclic GC's collections timed: how many per
generation, their total and longest time, written at exit (issue 14: what
the GC costs a fan-out). Used as the bench's mailpush command::

    GC_OUT=/tmp/gc.txt GC0=10000 \\
    MAILPUSH_BENCH_COMMAND=".venv/bin/python bench/gc_probe.py" \\
    .venv/bin/python bench/run.py --only fanout --servers mailpush_shared --pin --out /tmp/gcx

``GC0``: the first generation's threshold to run with (mailpush's is
runner.GC_THRESHOLDS[0]). The file gets one line:
``{generation: [collections, seconds, longest]} cpu=PROCESS_CPU_SECONDS``.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import time

import mailpush.runner as runner

if "GC0" in os.environ:
    runner.GC_THRESHOLDS = (int(os.environ["GC0"]), *runner.GC_THRESHOLDS[1:])

from mailpush.cli import main

_stats: dict[int, list[float]] = {0: [0, 0.0, 0.0], 1: [0, 0.0, 0.0], 2: [0, 0.0, 0.0]}
_start = [0.0]


def _timed(phase: str, info: dict) -> None:
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    took = time.perf_counter() - _start[0]
    s = _stats[info["generation"]]
    s[0] += 1
    s[1] += took
    s[2] = max(s[2], took)


def _write() -> None:
    with open(os.environ.get("GC_OUT", "/tmp/gc.txt"), "w") as f:
        f.write(f"{_stats!r} cpu={time.process_time():.3f}\n")


gc.callbacks.append(_timed)
atexit.register(_write)
sys.argv[0] = "mailpush"
sys.exit(main())
