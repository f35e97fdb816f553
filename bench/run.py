"""`make bench`: every scenario, every server, one run, one report.

    .venv/bin/python bench/run.py            # full: ~9 min -> bench/RESULTS.md, bench/results/
    .venv/bin/python bench/run.py --quick    # 2,000 connections: ~1.5 min -> bench/results/quick/
    .venv/bin/python bench/run.py --tiny --out DIR   # 50 connections: the smoke test

Options: ``--only memory,fanout`` (scenarios), ``--servers mailpush,floor``;
``--repeat N`` runs every scenario N times on each server (the servers in a
rotated order each time) and reports the median of the runs with their
min–max; ``--pin`` pins every server to CPU 0 and the load generator (this
process and its worker processes) to CPU 1, so that the scheduler's choice
of cores does not decide a ratio.
Each scenario prints its table as it finishes and writes ``<out>/<name>.json``;
at the end report.py renders RESULTS.md and the plots from those files.
Exit status 1 if any server failed a scenario (a skipped server, e.g.
mailpush before it exists, or a peer whose library is not installed, is not
a failure).

Resource handling: every server is its own process group, stopped when its
scenario ends and again (all of them) on exit, Ctrl-C or SIGTERM; the load
generator's processes end with their scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import report
from loadgen import MAX_SOCKETS_PER_PROC
from scenarios import PROFILES, SCENARIOS, Context
from servers import BENCH, ROOT, SERVERS, Server, node_versions, stop_all

# Where each profile writes when --out is not given. The full run's files
# are the ones README links to; quick runs go aside so they never overwrite
# them; tiny runs (the smoke test) must name a directory.
DEFAULT_OUT = {"full": BENCH / "results", "quick": BENCH / "results" / "quick"}
DEFAULT_MD = {"full": BENCH / "RESULTS.md"}

# What each profile is meant to take on this 2-core machine (issue 5); the
# run prints a warning when it goes over, so drift gets noticed.
TIME_BUDGET_S = {"full": 15 * 60, "quick": 3 * 60, "tiny": 60}

# Before a run, the machine's CPU use is sampled this long; above
# BUSY_WARN cores in use by others, the report says the numbers are skewed.
BUSY_SAMPLE_S = 2.0
BUSY_WARN = 0.2

# Packages whose versions go into the report.
PACKAGES = ["trio", "trio-websocket", "wsproto", "websockets", "picows", "aiofastnet", "uvloop", "socketify",
            "pyjwt", "msgspec", "h11", "matplotlib", "mailpush"]

# --pin: the server's CPU, and the load generator's (this process, whose
# forked worker processes inherit it).
PIN_SERVER_CPU = 0
PIN_LOADGEN_CPU = 1


def machine_facts(nproc: int | None = None) -> dict:
    """Facts about the machine for the report; ``nproc`` defaults to the CPUs this process may use."""
    nproc = len(os.sched_getaffinity(0)) if nproc is None else nproc
    facts = {"CPUs (nproc)": nproc}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    facts["CPU model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    facts["memory (MemTotal)"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    facts["kernel"] = platform.release()
    facts["Python"] = platform.python_version()
    versions = []
    for p in PACKAGES:
        try:
            versions.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    facts["packages"] = ", ".join(versions)
    node = node_versions()
    if node:
        facts["Node.js (bench/node)"] = ", ".join(f"{k} {v}" for k, v in node.items())
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        facts["mailpush commit"] = (rev or "none yet") + (" + uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    facts["open files per process (hard limit)"] = _nofile()
    return facts


def cpu_busy(seconds: float = BUSY_SAMPLE_S) -> float:
    """Cores in use machine-wide over ``seconds`` (/proc/stat), e.g. 0.9 =
    most of one core: someone else's work skews every number of a run."""
    def sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + vals[4]  # idle + iowait
        return sum(vals) - idle, sum(vals)
    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / (t1 - t0) * os.cpu_count() if t1 > t0 else 0.0


def _nofile() -> str:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"{soft} soft / {hard} hard"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="mailpush benchmarks")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2,000 connections, under 3 minutes")
    size.add_argument("--tiny", action="store_true", help="50 connections, for the smoke test")
    ap.add_argument("--out", type=Path, help="directory for JSON, plots, logs (and RESULTS.md)")
    ap.add_argument("--only", default="", help=f"comma-separated scenarios of {','.join(SCENARIOS)}")
    ap.add_argument("--servers", default="", help=f"comma-separated servers of {','.join(SERVERS)}")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run each scenario N times per server; report the median and min–max")
    ap.add_argument("--pin", action="store_true",
                    help=f"pin servers to CPU {PIN_SERVER_CPU}, the load generator to CPU {PIN_LOADGEN_CPU}")
    a = ap.parse_args(argv)
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")

    profile = PROFILES["quick" if a.quick else "tiny" if a.tiny else "full"]
    if a.out is None and profile.name not in DEFAULT_OUT:
        ap.error("--tiny needs --out DIR (it must not overwrite bench/results)")
    out = (a.out or DEFAULT_OUT[profile.name]).resolve()
    md_path = DEFAULT_MD.get(profile.name) if a.out is None else None
    md_path = md_path or out / "RESULTS.md"
    only = [s for s in a.only.split(",") if s] or list(SCENARIOS)
    servers = [s for s in a.servers.split(",") if s] or list(SERVERS)
    for s in only:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    for s in servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}")

    nproc = len(os.sched_getaffinity(0))
    pin = None
    if a.pin:
        if not {PIN_SERVER_CPU, PIN_LOADGEN_CPU} <= os.sched_getaffinity(0):
            ap.error(f"--pin needs CPUs {PIN_SERVER_CPU} and {PIN_LOADGEN_CPU}; "
                     f"this process may use {sorted(os.sched_getaffinity(0))}")
        os.sched_setaffinity(0, {PIN_LOADGEN_CPU})  # before any worker or thread starts: they inherit it
        Server.cpus = {PIN_SERVER_CPU}
        pin = {"server_cpus": [PIN_SERVER_CPU], "loadgen_cpus": [PIN_LOADGEN_CPU]}

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.json"), *out.glob("*.png"), *out.glob("logs/*.log")]:  # only this run's
        old.unlink()
    ctx = Context(profile, out)
    signal.signal(signal.SIGTERM, _sigterm)
    began = time.monotonic()
    failed = False
    notes = []
    args = argv if argv is not None else sys.argv[1:]
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    command = shlex.join([python, "bench/run.py"] + args)
    make = {(): "make bench", ("--quick",): "make bench-quick"}.get(tuple(args))
    busy_before = cpu_busy()
    if busy_before > BUSY_WARN:
        notes.append(f"the machine was not idle: {busy_before:.2f} cores busy before the run started "
                     "(other processes share these 2 cores; absolute numbers are lower than on a quiet machine)")
        print(f"warning: {notes[-1]}")
    print(f"profile {profile.name}: {asdict(profile)}")
    if a.repeat > 1:
        print(f"every scenario {a.repeat} times per server, medians")
    if pin:
        print(f"pinned: servers on CPU {PIN_SERVER_CPU}, load generator on CPU {PIN_LOADGEN_CPU}")
    print(f"writing to {out}")
    try:
        for name in only:
            sc = SCENARIOS[name]
            t0 = time.monotonic()
            print(f"\n== {sc.title} ({name})", flush=True)
            results, runs, orders = {}, {}, []
            for server in servers:
                if server not in sc.servers:
                    continue
                why = SERVERS[server].unavailable()
                if why:
                    print(f"  {server}: skipped, {why}")
                    results[server] = {"skipped": why}
                else:
                    results[server] = None  # table order; filled in below
                    runs[server] = []
            active = list(runs)
            for k in range(a.repeat):
                # Each repetition starts one server later: no server always
                # runs first (on a machine still quiet) or last.
                order = active[k % len(active):] + active[:k % len(active)] if active else []
                orders.append(order)
                if a.repeat > 1:
                    print(f"  -- run {k + 1}/{a.repeat}: {', '.join(order)}", flush=True)
                for server in order:
                    if results[server] is not None:  # failed or skipped itself in an earlier run
                        continue
                    try:
                        r = sc.fn(ctx, SERVERS[server])
                        if "skipped" in r:
                            results[server] = r
                        else:
                            runs[server].append(r)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # record, report, go on with the next server
                        failed = True
                        tb = traceback.format_exc()
                        print(f"  {server}: FAILED {type(e).__name__}: {e}\n{tb}", flush=True)
                        results[server] = {"error": f"{type(e).__name__}: {e}", "traceback": tb}
                        notes.append(f"{name} / {server}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    finally:
                        stop_all()
            for server in active:
                if results[server] is None:
                    results[server] = sc.combined(runs[server])
            print("\n".join(sc.report(results)), flush=True)
            (out / f"{name}.json").write_text(json.dumps({
                "scenario": name, "title": sc.title, "profile": asdict(profile),
                "seconds": time.monotonic() - t0, "repeat": a.repeat, "orders": orders,
                "pin": pin, "results": results}, indent=1))
    finally:
        stop_all()
    seconds = time.monotonic() - began
    notes += sorted(Server.notes)
    budget = TIME_BUDGET_S[profile.name]
    if seconds > budget:
        notes.append(f"this run took {seconds / 60:.1f} min, over its {budget / 60:.0f} min budget")
    procs = max(profile.client_procs, 1)
    facts = machine_facts(nproc)
    facts["load before the run"] = f"{busy_before:.2f} cores busy (sampled {BUSY_SAMPLE_S:g} s)"
    with open("/proc/loadavg") as f:
        facts["load average at the end (1/5/15 min)"] = " ".join(f.read().split()[:3])
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "profile": profile.name, "seconds": seconds, "command": command, "make": make,
            "machine": facts, "notes": notes, "repeat": a.repeat, "pin": pin,
            "client": {"procs_note": f"{procs}+ worker processes (one more per "
                                     f"{MAX_SOCKETS_PER_PROC:,} sockets)"}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    md = report.write(out, md_path, meta)
    print(f"\n{profile.name} run took {seconds:.0f} s; report: {md}")
    return 1 if failed else 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
