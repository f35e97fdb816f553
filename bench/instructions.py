"""Instructions per operation, counted by callgrind (issue 14: "callgrind
for instruction counts, which are stable on this noisy machine").

CPU times on these shared machines move by 15% between two runs of the
same code; instruction counts do not. They say nothing about the kernel's
share (callgrind sees user space only) or about cache misses, so they do
not replace the bench's CPU per operation: they tell whether a change to
mailpush's own code made it do less, before the bench says by how much it
is faster.

- ``fanout``: instructions per fan-out item in one process, the server's
  steps without the network: a publish body of N items parsed
  (``items.parse_items``), recorded (``history.record``: offsets, frames,
  history) and delivered (``Dispatcher.deliver``, one ``send()`` per tab
  to a Unix socketpair). The program runs twice, with R1 and R2 publishes:
  (Ir(R2) - Ir(R1)) / ((R2 - R1) * N), so start-up and set-up cancel out.
- ``upgrade``: instructions per upgrade in the server itself
  (``--poller shared`` by default): the server runs under callgrind, the
  bench's load generator opens a few connections to warm it, the counters
  are zeroed (``callgrind_control -z``), N connections are opened (HTTP
  upgrade, JWT check, subscribe and its answer), the counters dumped.

``--src DIR`` measures another checkout's ``src`` (its extension built
in place: ``python setup.py build_ext --inplace`` there), to compare two
versions of the code on the same machine.

    .venv/bin/python bench/instructions.py [--only fanout,upgrade] [--src DIR] [--out FILE]

Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

PYTHON = sys.executable
FANOUT_N = 4000
FANOUT_ROUNDS = (2, 6)
UPGRADE_N = 1000
UPGRADE_WARM = 50
# A server under callgrind runs ~50x slower: generous waits.
START_TIMEOUT_S = 120.0
OPEN_TIMEOUT_S = 900.0

# The fan-out pipeline, run as ``python -c`` under callgrind (argv: N, R,
# the most R of any run: every run builds as many bodies, so the set-up is
# the same whatever R).
_FANOUT = """
import json, socket, sys
import trio
from mailpush import log
from mailpush.bus import history_of
from mailpush.bus.embedded import EmbeddedBus
from mailpush.config import Config
from mailpush.connection import Connection
from mailpush.dispatch import Dispatcher
from mailpush.history import record
from mailpush.items import parse_items
from mailpush.metrics import Stats
from mailpush.registry import Registry
from mailpush.runner import _tune_gc
from mailpush.server import Server
from mailpush.testing import FakeBus
n, rounds, most = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
secret = "s" * 32
log.configure("warning", "json")
ctx = Server(Config(secret=secret, listen=("127.0.0.1", 0), admin=None, ping_interval=0), EmbeddedBus()).ctx
registry = Registry()
pairs = []
for i in range(n):
    a, b = socket.socketpair()
    a.setblocking(False)
    pairs.append((a, b))
    registry.add(Connection(a, ctx, f"user{i:06d}"))
history = history_of(Config(secret=secret))
dispatcher = Dispatcher(registry, FakeBus(), Stats(), Connection)
bodies = [
    json.dumps([{"subscriber": f"user{i:06d}", "event": "new_letter", "data": {"n": k}} for i in range(n)],
               separators=(",", ":")).encode()
    for k in range(most)
]
_tune_gc()
async def run():
    for body in bodies[:rounds]:  # a few rounds of ~100-byte frames: the socket buffers hold them, no reading
        await dispatcher.deliver(record(history, parse_items(body)))
trio.run(run)
sent = dispatcher.stats.delivered
assert sent == n * rounds, (sent, n * rounds)
"""


def _valgrind() -> str:
    path = shutil.which("valgrind")
    if not path:
        sys.exit("bench/instructions.py needs valgrind: apt-get install valgrind")
    return path


def _env(src: Path | None) -> dict[str, str]:
    # One hash seed: with a random one, dict probing (and so the count)
    # changes by a percent or two from run to run.
    env = dict(os.environ, PYTHONHASHSEED="0")
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def _total_ir(path: Path) -> int:
    """The ``summary:`` (or ``totals:``) line of a callgrind output file."""
    text = path.read_text()
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if not m:
        raise RuntimeError(f"no instruction total in {path}")
    return int(m.group(1))


def fanout(src: Path | None, n: int) -> dict:
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rounds in FANOUT_ROUNDS:
            out = Path(tmp) / f"fanout.{rounds}"
            subprocess.run(
                [
                    _valgrind(),
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}",
                    PYTHON,
                    "-c",
                    _FANOUT,
                    str(n),
                    str(rounds),
                    str(max(FANOUT_ROUNDS)),
                ],
                env=_env(src),
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            counts[rounds] = _total_ir(out)
    r1, r2 = FANOUT_ROUNDS
    return {
        "n": n,
        "rounds": list(FANOUT_ROUNDS),
        "ir": {str(k): v for k, v in counts.items()},
        "ir_per_item": (counts[r2] - counts[r1]) / ((r2 - r1) * n),
    }


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server under callgrind exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("the server under callgrind did not listen in time")


def _control(control: str, command: str, pid: int) -> None:
    """callgrind_control: -z zeroes the counters, -d dumps them."""
    subprocess.run([control, command, str(pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def upgrade(src: Path | None, n: int, poller: str) -> dict:
    from loadgen import LoadGen
    from servers import SECRET, free_port

    control = shutil.which("callgrind_control")
    if not control:
        sys.exit("bench/instructions.py needs callgrind_control (valgrind's package)")
    port, aport = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "upgrade"
        cmd = [
            _valgrind(),
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            PYTHON,
            "-m",
            "mailpush",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            f"127.0.0.1:{aport}",
            "--secret",
            SECRET,
            "--log-level",
            "warning",
            "--poller",
            poller,
            "--max-connections",
            str(n + UPGRADE_WARM + 100),
        ]
        proc = subprocess.Popen(cmd, env=_env(src), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_listening(port, proc)
            with LoadGen("127.0.0.1", port, "/v1/ws", SECRET, procs=1, subscribe=True) as lg:
                warm = lg.open(UPGRADE_WARM, timeout=OPEN_TIMEOUT_S)
                time.sleep(1)
                _control(control, "-z", proc.pid)
                opened = lg.open(n, timeout=OPEN_TIMEOUT_S)
                time.sleep(1)
                _control(control, "-d", proc.pid)
            if warm["ok"] < UPGRADE_WARM or opened["ok"] < n:
                raise RuntimeError(f"only {opened['ok']}/{n} connections opened: {opened.get('errors')}")
            dumps = sorted(Path(tmp).glob("upgrade.*"))
            if not dumps:
                raise RuntimeError("callgrind wrote no dump")
            ir = _total_ir(dumps[-1])
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return {"n": n, "poller": poller, "ir": ir, "ir_per_upgrade": ir / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="fanout,upgrade", help="comma-separated of fanout,upgrade")
    ap.add_argument("--src", type=Path, help="another checkout's src directory to measure instead")
    ap.add_argument("--fanout-n", type=int, default=FANOUT_N)
    ap.add_argument("--upgrade-n", type=int, default=UPGRADE_N)
    ap.add_argument("--poller", default="shared", choices=("shared", "task"))
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only - {"fanout", "upgrade"}:
        sys.exit(f"--only: unknown {sorted(only - {'fanout', 'upgrade'})}; choose from fanout, upgrade")
    src = args.src.resolve() if args.src else None
    result: dict = {"src": str(src or ROOT / "src"), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "fanout" in only:
        result["fanout"] = fanout(src, args.fanout_n)
        print(
            f"fan-out: {result['fanout']['ir_per_item']:,.0f} instructions per item "
            f"(parse, record, deliver; {args.fanout_n:,} subscribers)",
            flush=True,
        )
    if "upgrade" in only:
        result["upgrade"] = upgrade(src, args.upgrade_n, args.poller)
        print(
            f"upgrade: {result['upgrade']['ir_per_upgrade']:,.0f} instructions per upgrade "
            f"(--poller {args.poller}, JWT and subscribe included)",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
