"""Where the server's CPU goes under the bench's own load, function by
function, the kernel's included: ``perf`` samples of the server process
while one scenario of the bench runs.

``bench/instructions.py`` counts mailpush's instructions, the same every
run, but sees neither the kernel nor the cache misses; ``py-spy`` sees
Python functions, not the C ones under them. This samples the real server
under the bench's load (``perf record -e cpu-clock -p PID``, a software
clock, so no hardware counters are needed) and reports each native
function's share of the server's samples, user space and kernel apart,
and that share of the server's CPU per operation measured in the same run
(µs per delivery or per upgrade):

- ``fanout`` / ``broadcast``: the samples of the publish rounds only (the
  connections are opened first, unsampled);
- ``upgrade``: the samples of the connections being opened (upgrade, token
  check, subscribe and its answer).

    .venv/bin/python bench/perf_profile.py [--scenario fanout] [--server mailpush_shared] [--rounds 30] [--top 25] [--out FILE]

Any server of the bench can be profiled (``--server picows``), to see
where a peer's time goes beside mailpush's. The server runs on CPU 0, the
load generator on CPU 1. Needs perf (``apt-get install linux-perf``) and
the right to sample another process (root, or
``kernel.perf_event_paranoid`` at most 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scenarios._fanout as fanout_mod  # noqa: E402
from scenarios import PROFILES, Context  # noqa: E402
from scenarios._upgrade import upgrade  # noqa: E402
from servers import SERVERS, Server  # noqa: E402

# Samples per second of CPU time: ~40,000 samples over a 10 s profile.
FREQUENCY = 4000

# "  3.58%  libpython3.11.so.1.0   [.] unicodekeys_lookup_unicode"
_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\S+)\s+\[([.k])\]\s+(.+?)\s*$")


def parse_report(text: str) -> list[dict]:
    """The rows of ``perf report --sort dso,sym --stdio``: share of the
    samples (%), the object, user or kernel, the function."""
    rows = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            pct, dso, kind, sym = m.groups()
            rows.append({"pct": float(pct), "dso": dso, "kernel": kind == "k", "sym": sym})
    return rows


def summarise(rows: list[dict], cpu_us: float | None, top: int) -> dict:
    """User and kernel shares, the top user functions and objects, each
    with its share of the CPU per operation when that is known."""
    user = sum(r["pct"] for r in rows if not r["kernel"])
    kernel = sum(r["pct"] for r in rows if r["kernel"])
    total = user + kernel or 1.0

    def us(pct: float) -> float | None:
        return cpu_us * pct / total if cpu_us else None

    dsos: dict[str, float] = {}
    for r in rows:
        if not r["kernel"]:
            dsos[r["dso"]] = dsos.get(r["dso"], 0.0) + r["pct"]
    return {
        "user_pct": user,
        "kernel_pct": kernel,
        "user_us": us(user),
        "kernel_us": us(kernel),
        "user_functions": [
            {**r, "of_user_pct": 100 * r["pct"] / user if user else 0.0, "us": us(r["pct"])}
            for r in rows if not r["kernel"]
        ][:top],
        "user_objects": sorted(
            ({"dso": d, "pct": p, "us": us(p)} for d, p in dsos.items()), key=lambda x: -x["pct"]
        ),
        "kernel_functions": [{**r, "us": us(r["pct"])} for r in rows if r["kernel"]][:top],
    }


class _Perf:
    """``perf record`` of one process, from start() to stop()."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen | None = None

    def start(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", str(FREQUENCY), "-q", "-o", str(self.out), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attached before the load starts
        if self.proc.poll() is not None:
            raise RuntimeError(f"perf record failed: {self.proc.stderr.read().decode(errors='replace').strip()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)


def profile(scenario: str, server: str, n: int, rounds: int, data: Path) -> dict:
    """Runs the scenario with perf attached to the server for its measured
    part; returns the scenario's result."""
    spec = SERVERS[server]
    perf = _Perf(data)
    ctx_log = Path(tempfile.mkdtemp(prefix="perf_profile_"))
    if scenario == "upgrade":
        profile_ = dataclasses.replace(PROFILES["full"], upgrade_n=n, upgrade_repeats=rounds)
        loadgen = Context.loadgen

        def sampled_loadgen(self, srv, count, **kw):  # the opens are what is measured
            perf.start(srv.proc.pid)
            return loadgen(self, srv, count, **kw)

        Context.loadgen = sampled_loadgen
        try:
            return upgrade(Context(profile_, ctx_log, log=lambda _: None), spec)
        finally:
            Context.loadgen = loadgen
            perf.stop()
    rounds_fn = fanout_mod._fanout_rounds

    def sampled_rounds(ctx, spec_, srv, *a, **kw):  # the rounds only, not the opens before them
        perf.start(srv.proc.pid)
        try:
            return rounds_fn(ctx, spec_, srv, *a, **kw)
        finally:
            perf.stop()

    fanout_mod._fanout_rounds = sampled_rounds
    try:
        if scenario == "fanout":
            profile_ = dataclasses.replace(PROFILES["full"], fanout_n=n, fanout_rounds=rounds)
            return fanout_mod.fanout(Context(profile_, ctx_log, log=lambda _: None), spec)
        profile_ = dataclasses.replace(PROFILES["full"], broadcast_n=n, broadcast_rounds=rounds)
        return fanout_mod.broadcast(Context(profile_, ctx_log, log=lambda _: None), spec)
    finally:
        fanout_mod._fanout_rounds = rounds_fn


def _fmt_us(v: float | None) -> str:
    return f"{v:6.3f}" if v is not None else "     –"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=("fanout", "broadcast", "upgrade"), default="fanout")
    ap.add_argument("--server", default="mailpush_shared", help=f"one of {', '.join(SERVERS)}")
    ap.add_argument("--n", type=int, default=9000, help="connections")
    ap.add_argument("--rounds", type=int, help="publishes (fanout, broadcast: default 30) or repeats (upgrade: 3)")
    ap.add_argument("--top", type=int, default=25, help="functions listed")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("bench/perf_profile.py needs perf: apt-get install linux-perf")
    if args.server not in SERVERS:
        sys.exit(f"--server {args.server}: not a server of the bench ({', '.join(SERVERS)})")
    if SERVERS[args.server].unavailable():
        sys.exit(f"--server {args.server}: {SERVERS[args.server].unavailable()}")
    rounds = args.rounds or (3 if args.scenario == "upgrade" else 30)
    os.sched_setaffinity(0, {1})  # the load generator's core; the server is pinned to CPU 0
    Server.cpus = {0}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        result = profile(args.scenario, args.server, args.n, rounds, data)
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--sort", "dso,sym", "--stdio"],
            capture_output=True, text=True, check=True,
        ).stdout
    op = "upgrade" if args.scenario == "upgrade" else "delivery"
    cpu_us = result.get(f"server_cpu_us_per_{op}")
    summary = summarise(parse_report(report), cpu_us, args.top)
    print(f"{args.server}, {args.scenario}: {result['rate_median']:,.0f}/s, server CPU "
          f"{_fmt_us(cpu_us).strip()} µs per {op}: user {summary['user_pct']:.1f}% of the samples "
          f"({_fmt_us(summary['user_us']).strip()} µs), kernel {summary['kernel_pct']:.1f}% "
          f"({_fmt_us(summary['kernel_us']).strip()} µs)")
    print(f"\n  % samples  % user  µs/{op}  user-space function")
    for r in summary["user_functions"]:
        print(f"   {r['pct']:6.2f}   {r['of_user_pct']:5.1f}   {_fmt_us(r['us'])}  {r['sym']}  ({r['dso']})")
    print(f"\n  % samples  µs/{op}  object (user space)")
    for r in summary["user_objects"]:
        print(f"   {r['pct']:6.2f}   {_fmt_us(r['us'])}  {r['dso']}")
    if args.out:
        args.out.write_text(json.dumps({
            "scenario": args.scenario, "server": args.server, "n": args.n, "rounds": rounds,
            "rate": result["rate_median"], f"server_cpu_us_per_{op}": cpu_us, **summary,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
