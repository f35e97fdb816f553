"""Two servers, or two versions of one, measured alternately in pairs: which
one is cheaper on a machine whose speed drifts by 15% from one run to the
next.

``bench/run.py`` measures each server in turn, so a slow spell of the
machine can land on one side and not the other. This runs one scenario of
the bench (``--scenario``) for side A, then for side B, each time a fresh
server, ``--pairs`` times, and reports every pair, each side's medians and
the median of the pairwise ratios B/A:

- **fanout**: one event to each of N subscribers (one publish of N items);
  deliveries/s (median of the rounds) and the server's CPU per delivery:
  user and system (all rounds together) and the total (scheduler time,
  median of the rounds);
- **broadcast**: the same, every connection one subscriber's tab, one
  publish item per round (mailpush sends one frame to every tab);
- **upgrade**: N connections opened as fast as the server takes them
  (upgrade, token check, subscribe and its answer), ``--repeats`` times on
  the same server; upgrades/s and the server's CPU per upgrade: user and
  system (all repeats together) and the total (scheduler time, median of
  the repeats).

Side B is the work tree's ``--server``. Side A is either the same server
from another checkout (``--base DIR``: its ``src`` directory, with the
extension built in place: ``python setup.py build_ext --inplace`` there)
or another server of the bench (``--against NAME``, e.g. ``socketify``).
The server runs on CPU 0, the load generator on CPU 1.

    .venv/bin/python bench/ab.py --base /tmp/base/src [--scenario fanout] [--server mailpush_shared] [--pairs 6]
    .venv/bin/python bench/ab.py --against socketify --scenario upgrade [--pairs 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scenarios import PROFILES, Context  # noqa: E402
from scenarios._fanout import broadcast, fanout  # noqa: E402
from scenarios._upgrade import upgrade  # noqa: E402
from servers import SERVERS, Server, ServerSpec  # noqa: E402

# What each scenario reports, in this order: (key, the scenario's result key, format)
KEYS = {
    "fanout": (
        ("rate", "rate_median", "{:,.0f}/s"),
        ("user_us", "server_user_us_per_delivery", "user {:.2f}"),
        ("sys_us", "server_sys_us_per_delivery", "sys {:.2f}"),
        ("cpu_us", "server_cpu_us_per_delivery", "total {:.2f} µs"),
    ),
    "broadcast": (
        ("rate", "rate_median", "{:,.0f}/s"),
        ("user_us", "server_user_us_per_delivery", "user {:.2f}"),
        ("sys_us", "server_sys_us_per_delivery", "sys {:.2f}"),
        ("cpu_us", "server_cpu_us_per_delivery", "total {:.2f} µs"),
    ),
    "upgrade": (
        ("rate", "rate_median", "{:,.0f}/s"),
        ("user_us", "server_user_us_per_upgrade", "user {:.1f}"),
        ("sys_us", "server_sys_us_per_upgrade", "sys {:.1f}"),
        ("cpu_us", "server_cpu_us_per_upgrade", "total {:.1f} µs"),
    ),
}


def one(scenario: str, spec: ServerSpec, n: int, rounds: int, out: Path) -> dict:
    """The bench's own scenario on a fresh server: ``rounds`` publishes to
    ``n`` connections (fanout, broadcast) or ``rounds`` times ``n``
    connections opened (upgrade)."""
    if scenario in ("fanout", "broadcast"):
        if scenario == "fanout":
            profile = dataclasses.replace(PROFILES["full"], fanout_n=n, fanout_rounds=rounds)
            result = fanout(Context(profile, out, log=lambda _: None), spec)
        else:
            profile = dataclasses.replace(PROFILES["full"], broadcast_n=n, broadcast_rounds=rounds)
            result = broadcast(Context(profile, out, log=lambda _: None), spec)
        if result["missing"]:
            raise RuntimeError(f"{spec.name}: {result['missing']:,} deliveries missing")
    else:
        profile = dataclasses.replace(PROFILES["full"], upgrade_n=n, upgrade_repeats=rounds)
        result = upgrade(Context(profile, out, log=lambda _: None), spec)
        if result["failed"] or result["ok_min"] < n:
            raise RuntimeError(f"{spec.name}: {result['failed']:,} upgrades failed, {result['ok_min']:,}/{n:,} opened")
    return {key: result[src] for key, src, _ in KEYS[scenario]}


def _commit() -> str:
    """The work tree's commit (``+`` when it has uncommitted changes)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--", "src") else "")


def _line(scenario: str, r: dict) -> str:
    return " ".join(fmt.format(r[key]) for key, _, fmt in KEYS[scenario])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = ap.add_mutually_exclusive_group(required=True)
    side.add_argument("--base", type=Path, help="side A: this checkout's src directory, same --server")
    side.add_argument("--against", help=f"side A: another server of the bench ({', '.join(SERVERS)})")
    ap.add_argument("--scenario", choices=sorted(KEYS), default="fanout")
    ap.add_argument("--server", default="mailpush_shared", help="side B, the work tree: mailpush or mailpush_shared")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--rounds", type=int, help="publishes (fanout, broadcast: default 15) or repeats (upgrade: 3)")
    ap.add_argument("--n", type=int, default=9000, help="connections")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    if args.server not in ("mailpush", "mailpush_shared"):
        sys.exit("--server: mailpush or mailpush_shared")
    work = SERVERS[args.server]
    if args.base is not None:
        if not (args.base / "mailpush" / "__init__.py").is_file():
            sys.exit(f"--base {args.base}: no mailpush package there (give a checkout's src directory)")
        a = dataclasses.replace(work, name=f"{work.name}_base", env={**work.env, "PYTHONPATH": str(args.base.resolve())})
        labels = ("base", "work")
    else:
        if args.against not in SERVERS:
            sys.exit(f"--against {args.against}: not a server of the bench ({', '.join(SERVERS)})")
        a = SERVERS[args.against]
        if a.unavailable():
            sys.exit(f"--against {args.against}: {a.unavailable()}")
        labels = (args.against, args.server)
    rounds = args.rounds or (3 if args.scenario == "upgrade" else 15)
    os.sched_setaffinity(0, {1})  # the load generator's core; the servers are pinned to CPU 0
    Server.cpus = {0}
    logs = Path(tempfile.mkdtemp(prefix="ab_"))  # the servers' logs
    keys = [key for key, _, _ in KEYS[args.scenario]]
    pairs = []
    for k in range(args.pairs):
        pair = {label: one(args.scenario, spec, args.n, rounds, logs) for label, spec in zip(labels, (a, work))}
        pairs.append(pair)
        print(f"pair {k + 1}: " + " | ".join(f"{label} {_line(args.scenario, pair[label])}" for label in labels),
              flush=True)
    summary = {label: {key: statistics.median(p[label][key] for p in pairs) for key in keys} for label in labels}
    # (CPU time ticks every 10 ms: a run too small to tick has no ratio)
    ratios = {
        key: statistics.median([p[labels[1]][key] / p[labels[0]][key] for p in pairs if p[labels[0]][key]]
                               or [float("nan")])
        for key in keys
    }
    print("medians: " + " | ".join(f"{label} {_line(args.scenario, summary[label])}" for label in labels))
    print(f"pairwise {labels[1]}/{labels[0]}: " + ", ".join(f"{key} {ratios[key]:.3f}" for key in keys))
    if args.out:
        args.out.write_text(json.dumps({
            "scenario": args.scenario, "sides": {"A": labels[0], "B": labels[1]},
            "base": str(args.base) if args.base else None, "server": args.server,
            "mailpush_commit": _commit(), "n": args.n, "rounds": rounds, "pairs": pairs, "medians": summary,
            "pairwise_ratio_median": ratios,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
