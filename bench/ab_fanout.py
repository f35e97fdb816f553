"""Two versions of mailpush's fan-out, alternated: which one is faster on a
machine whose speed drifts by 15% from one run to the next.

``bench/run.py`` measures each server in turn, so a slow spell of the
machine can land on one version and not the other. This runs the same
fan-out (one event to each of N subscribers, one publish of N items, the
server on CPU 0 and the load generator on CPU 1) for the work tree and
for another checkout's ``src`` (``--base``; its extension built in place:
``python setup.py build_ext --inplace`` there) in pairs, base then work
tree, each pair a fresh server of each, and reports every pair and the
medians: deliveries/s (median of the rounds) and the server's user and
system CPU per delivery (all rounds together).

    .venv/bin/python bench/ab_fanout.py --base /tmp/base/src [--server mailpush_shared] [--pairs 6] [--rounds 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scenarios import PROFILES, Context  # noqa: E402
from scenarios._fanout import fanout  # noqa: E402
from servers import SERVERS, Server, ServerSpec  # noqa: E402


def one(spec: ServerSpec, n: int, rounds: int, out: Path) -> dict:
    """The bench's own fan-out scenario (a fresh server, n subscribed
    connections, ``rounds`` publishes): deliveries/s (median of the rounds)
    and the server's user and system CPU per delivery (all rounds)."""
    profile = dataclasses.replace(PROFILES["full"], fanout_n=n, fanout_rounds=rounds)
    result = fanout(Context(profile, out, log=lambda _: None), spec)
    if result["missing"]:
        raise RuntimeError(f"{result['missing']:,} deliveries missing")
    return {
        "rate": result["rate_median"],
        "user_us": result["server_user_us_per_delivery"],
        "sys_us": result["server_sys_us_per_delivery"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the other checkout's src directory")
    ap.add_argument("--server", default="mailpush_shared", help="mailpush or mailpush_shared")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--n", type=int, default=9000)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    if args.server not in ("mailpush", "mailpush_shared"):
        sys.exit("--server: mailpush or mailpush_shared")
    if not (args.base / "mailpush" / "__init__.py").is_file():
        sys.exit(f"--base {args.base}: no mailpush package there (give a checkout's src directory)")
    os.sched_setaffinity(0, {1})  # the load generator's core; the servers are pinned to CPU 0
    Server.cpus = {0}
    work = SERVERS[args.server]
    base = dataclasses.replace(work, name=f"{work.name}_base", env={**work.env, "PYTHONPATH": str(args.base.resolve())})
    logs = Path(tempfile.mkdtemp(prefix="ab_fanout_"))  # the servers' logs
    pairs = []
    for k in range(args.pairs):
        pair = {label: one(spec, args.n, args.rounds, logs) for label, spec in (("base", base), ("work", work))}
        pairs.append(pair)
        b, w = pair["base"], pair["work"]
        print(
            f"pair {k + 1}: base {b['rate']:,.0f}/s user {b['user_us']:.2f} sys {b['sys_us']:.2f} µs | "
            f"work tree {w['rate']:,.0f}/s user {w['user_us']:.2f} sys {w['sys_us']:.2f} µs",
            flush=True,
        )
    summary = {}
    for label in ("base", "work"):
        summary[label] = {key: statistics.median(p[label][key] for p in pairs) for key in ("rate", "user_us", "sys_us")}
    # (CPU time ticks every 10 ms: a run too small to tick has no ratio)
    ratios = {
        key: statistics.median([p["work"][key] / p["base"][key] for p in pairs if p["base"][key]] or [float("nan")])
        for key in ("rate", "user_us", "sys_us")
    }
    print(
        f"medians: base {summary['base']['rate']:,.0f}/s user {summary['base']['user_us']:.2f} µs, "
        f"work tree {summary['work']['rate']:,.0f}/s user {summary['work']['user_us']:.2f} µs; "
        f"pairwise work/base: rate {ratios['rate']:.2f}, user {ratios['user_us']:.2f}, sys {ratios['sys_us']:.2f}"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "server": args.server,
                    "base": str(args.base),
                    "n": args.n,
                    "rounds": args.rounds,
                    "pairs": pairs,
                    "medians": summary,
                    "pairwise_ratio_median": ratios,
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
