"""The servers under test: how to start, probe, trigger and stop each one.

Every server runs as its own process group (``start_new_session``) so that
stopping it also stops any worker processes it forked; memory is the sum of
VmRSS over the process and all its descendants.

mailpush runs in its real configuration (``mailpush serve``, embedded bus,
JWT auth, warning-level logs) and is triggered through its admin publish
API, one item per subscriber. The reference servers accept any token and are
triggered by ``POST /fanout`` on their admin port (see refhttp.py).

Some reference servers need a library the bench does not require (picows,
socketify from the ``[bench]`` extra; Node.js and its ``ws`` package from
bench/node): :meth:`ServerSpec.unavailable` says why one cannot run, and
run.py then reports it as skipped with that reason instead of failing. The
Node.js package is installed here, with ``npm ci`` in bench/node, the first
time a run needs it and finds no node_modules.

CPU time of a server is read two ways: :meth:`Server.cpu_s`, the precise
total (scheduler nanoseconds), and :meth:`Server.cpu_times`, user and system
time apart (clock ticks of /proc/PID/stat); a scenario reads both before and
after each measured phase. ``Server.cpus`` (run.py ``--pin``) starts every
server pinned to those CPUs.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

HOST = "127.0.0.1"

# Shared by mailpush and the load generator to sign and check tokens; 32+
# bytes because PyJWT warns about shorter HS256 keys.
SECRET = "mailpush-bench-secret-0123456789abcdef"

# mailpush's --max-connections: above the largest count any scenario opens
# (15,000) and below the 20,000 open files a process may have here.
MAILPUSH_MAX_CONNECTIONS = 19_000

# mailpush spreads closes over --drain-seconds (default 10 s) on SIGTERM;
# stopping a bench server is not the drain scenario, so keep it short.
MAILPUSH_DRAIN_S = 1.0

# Attempts at finding a free port (range); the kernel hands out random
# ephemeral ports, so a clash is rare and a retry solves it.
FREE_PORT_TRIES = 50

# How long a server gets to answer /healthz after start: imports plus
# binding; seconds on a busy 2-core machine, never more.
READY_TIMEOUT_S = 30.0

# SIGTERM grace before the next signal when stopping a reference server.
STOP_GRACE_S = 5.0
# mailpush gets its drain window plus this (its close timeout for the last
# connections' Close handshakes, and interpreter exit).
STOP_SLACK_S = 1.5

# A trigger (fan-out POST, publish batch) must be answered within this.
TRIGGER_TIMEOUT_S = 60.0

# /proc/PID/stat counts utime and stime in these ticks per second.
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The Node.js reference server's package (ws, pinned by its lock file), and
# how long `npm ci` may take there (one small package; seconds normally).
NODE_DIR = BENCH / "node"
NPM_CI_TIMEOUT_S = 300.0
# Checking that a reference server's Python modules import (a subprocess of
# this venv's interpreter, so a broken extension cannot crash the bench).
IMPORT_CHECK_TIMEOUT_S = 60.0


def free_port(consecutive: int = 1) -> int:
    """A port that is free now, and so are the ``consecutive - 1`` above it
    (mailpush --workers N answers for the set on the admin port and puts
    worker i's admin API on the admin port + 1 + i)."""
    for _ in range(FREE_PORT_TRIES):
        held = [socket.socket()]
        try:
            held[0].bind((HOST, 0))
            base = held[0].getsockname()[1]
            for k in range(1, consecutive):
                held.append(socket.socket())
                held[-1].bind((HOST, base + k))
            return base
        except OSError:
            continue
        finally:
            for h in held:
                h.close()
    raise ServerError(f"no {consecutive} consecutive free ports in {FREE_PORT_TRIES} tries")


def mailpush_command() -> list[str] | None:
    """How to run ``mailpush``: the MAILPUSH_BENCH_COMMAND environment
    variable if set (e.g. another version's venv, to compare two in one
    run), else this venv's; None if it is not installed."""
    if os.environ.get("MAILPUSH_BENCH_COMMAND"):
        return shlex.split(os.environ["MAILPUSH_BENCH_COMMAND"])
    exe = Path(sys.executable).parent / "mailpush"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mailpush")
    return [found] if found else None


def mailpush_available() -> str | None:
    """None if mailpush can be benchmarked, else why not."""
    if mailpush_command() is None:
        return "the mailpush command is not installed in this venv"
    if not (ROOT / "src" / "mailpush" / "server.py").exists():
        return "src/mailpush/server.py does not exist yet"
    return None


@cache
def python_modules_available(modules: tuple[str, ...]) -> str | None:
    """None if this venv's interpreter imports every module, else why not
    (checked once per run, in a subprocess)."""
    try:
        p = subprocess.run([sys.executable, "-c", "import " + ", ".join(modules)], capture_output=True,
                           text=True, timeout=IMPORT_CHECK_TIMEOUT_S, cwd=BENCH)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not check for {', '.join(modules)}: {e}"
    if p.returncode == 0:
        return None
    last = (p.stderr.strip().splitlines() or ["exit status " + str(p.returncode)])[-1]
    return f"{last[:200]} (pip install -e '.[bench]')"


def node_command() -> str | None:
    return shutil.which("node")


@cache
def node_available() -> str | None:
    """None if the Node.js reference server can run: ``node`` on PATH and
    bench/node's packages installed, with ``npm ci`` now if they are missing
    (once per run); else why not."""
    if node_command() is None:
        return "node is not installed (Debian: apt-get install nodejs npm)"
    if (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return f"{NODE_DIR.relative_to(ROOT)}/node_modules is missing and npm is not installed"
    print(f"  installing {NODE_DIR.relative_to(ROOT)}'s packages: npm ci", flush=True)
    try:
        p = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                           capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"npm ci in {NODE_DIR.relative_to(ROOT)} failed: {e}"
    if p.returncode != 0:
        last = ((p.stderr or p.stdout).strip().splitlines() or ["?"])[-1]
        return f"npm ci in {NODE_DIR.relative_to(ROOT)} exited with {p.returncode}: {last[:200]}"
    return None


def node_versions() -> dict[str, str]:
    """Node.js's and ws's versions, for the report (empty if not installed)."""
    out = {}
    node = node_command()
    if node:
        try:
            out["Node.js"] = subprocess.run([node, "--version"], capture_output=True, text=True,
                                            timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        out["ws"] = json.loads((NODE_DIR / "node_modules" / "ws" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        pass
    return out


@dataclass
class ServerSpec:
    name: str                 # short key used in results
    label: str                # what the tables call it
    kind: str                 # "mailpush" or "ref"
    script: str = ""          # bench/<script>.py (.mjs for Node.js) for reference servers
    extra_args: list[str] = field(default_factory=list)
    runtime: str = "python"   # reference servers: "python" (this venv) or "node"
    needs: tuple[str, ...] = ()  # Python modules a reference server imports beyond the bench's own
    env: dict[str, str] = field(default_factory=dict)  # added to the server's environment

    def argv(self, port: int, aport: int) -> list[str]:
        if self.kind == "mailpush":
            cmd = mailpush_command() or ["mailpush"]
            return cmd + ["serve", "--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{aport}",
                          "--secret", SECRET, "--log-level", "warning",
                          "--max-connections", str(MAILPUSH_MAX_CONNECTIONS),
                          "--drain-seconds", str(MAILPUSH_DRAIN_S)] + self.extra_args
        if self.runtime == "node":
            cmd = [node_command() or "node", str(BENCH / f"{self.script}.mjs")]
        else:
            cmd = [sys.executable, str(BENCH / f"{self.script}.py")]
        return cmd + ["--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{aport}"] + self.extra_args

    def unavailable(self) -> str | None:
        """None if this server can run here, else why not (run.py reports
        it as skipped with this reason)."""
        if self.kind == "mailpush":
            return mailpush_available()
        if self.runtime == "node":
            return node_available()
        if self.needs:
            return python_modules_available(self.needs)
        return None


# The registry of servers, in table order: mailpush first, the floor last.
# picows, node_ws and socketify are the peers of DESIGN.md's table, each
# optional (skipped with the reason when its library is missing).
SERVERS: dict[str, ServerSpec] = {s.name: s for s in [
    ServerSpec("mailpush", "mailpush", "mailpush"),
    ServerSpec("mailpush_shared", "mailpush --poller shared", "mailpush", extra_args=["--poller", "shared"]),
    # The same server without its C fan-out path (mailpush.speedups): what the C code saves, in one run.
    ServerSpec("mailpush_py", "mailpush, MAILPUSH_SPEEDUPS=0", "mailpush", env={"MAILPUSH_SPEEDUPS": "0"}),
    ServerSpec("mailpush_w2", "mailpush --workers 2", "mailpush", extra_args=["--workers", "2"]),
    ServerSpec("triows", "trio-websocket (task per connection)", "ref", "ref_triows"),
    ServerSpec("websockets", "websockets 17 asyncio, broadcast()", "ref", "ref_websockets"),
    ServerSpec("picows", "picows + uvloop", "ref", "ref_picows", needs=("picows", "uvloop")),
    ServerSpec("node_ws", "Node.js + ws 8", "ref", "ref_node_ws", runtime="node"),
    ServerSpec("socketify", "socketify (uWebSockets), publish()", "ref", "ref_socketify", needs=("socketify",)),
    ServerSpec("floor", "floor: parked Trio task + raw send()", "ref", "ref_floor"),
]}


class ServerError(Exception):
    """A server did not start, answer or stay alive."""


class Server:
    """One running server process (group). Use as a context manager.

    Resource handling: ``stop()`` (also on ``__exit__``) sends SIGTERM to the
    whole process group, then SIGKILL after STOP_GRACE_S; run.py also stops
    every live Server on exit or Ctrl-C through ``Server.live``.
    """

    live: set["Server"] = set()
    notes: set[str] = set()  # odd behaviour seen while stopping, for the report
    # CPUs every server is started on (run.py --pin), None: wherever the
    # scheduler puts it. Set before exec (taskset), so every thread and
    # child the server starts inherits it.
    cpus: set[int] | None = None

    def __init__(self, spec: ServerSpec, log_path: Path, extra_args: list[str] | None = None):
        self.spec = spec
        self.extra_args = extra_args or []
        args = spec.extra_args + self.extra_args
        workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
        admin_ports = workers + 1 if workers > 1 else 1  # the supervisor's, then one per worker
        self.port = free_port()
        self.aport = free_port(admin_ports)
        while self.port in range(self.aport, self.aport + admin_ports):
            self.aport = free_port(admin_ports)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._http: http.client.HTTPConnection | None = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- lifecycle -------------------------------------------------------------

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        argv = self.spec.argv(self.port, self.aport) + self.extra_args
        preexec = None
        if Server.cpus is not None:
            taskset = shutil.which("taskset")
            if taskset:
                argv = [taskset, "-c", ",".join(map(str, sorted(Server.cpus)))] + argv
            else:  # affinity set in the child between fork and exec
                cpus = set(Server.cpus)
                preexec = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.spec.env)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, cwd=ROOT, env=env, preexec_fn=preexec)
        log.close()
        Server.live.add(self)
        deadline = time.monotonic() + READY_TIMEOUT_S
        port = self.port if self.spec.kind == "mailpush" else self.aport
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.spec.name} exited with {self.proc.returncode} "
                                  f"before ready; log: {self.log_tail()}")
            try:
                status, _ = _request(port, "GET", "/healthz", timeout=1.0)
                if status == 200:
                    self._check_affinity()
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServerError(f"{self.spec.name} not ready in {READY_TIMEOUT_S:.0f} s; log: {self.log_tail()}")

    def _check_affinity(self):
        if Server.cpus is not None and self.affinity() != sorted(Server.cpus):
            Server.notes.add(f"{self.spec.name} ({self.log_path.stem}) ran on CPUs {self.affinity()}, "
                             f"not the {sorted(Server.cpus)} it was pinned to")

    def stop(self):
        """SIGTERM; if the process is still there after its grace period, a
        second SIGTERM (mailpush: "stop at once"); then SIGKILL. Anything but
        a clean exit on the first signal is recorded in ``Server.notes``."""
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc is None:
            return
        grace = MAILPUSH_DRAIN_S + STOP_SLACK_S if self.spec.kind == "mailpush" else STOP_GRACE_S
        how = None
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            if not self._wait(grace):
                how = f"did not exit within {grace:.1f} s of SIGTERM"
                self._signal(signal.SIGTERM)
                if not self._wait(STOP_GRACE_S):
                    how += "; nor after a second SIGTERM: killed"
                else:
                    how += "; exited after a second SIGTERM"
        self._signal(signal.SIGKILL)  # whatever is left of the group
        self._wait(STOP_GRACE_S)
        if how:
            Server.notes.add(f"{self.spec.name} ({self.log_path.stem}) {how}")
        self._log_warnings()
        Server.live.discard(self)
        self.proc = None

    def _log_warnings(self):
        """Summarise the warnings and errors the server logged (JSON lines,
        as mailpush writes them) into ``Server.notes``: a loop stall or a
        dropped client during a bench run is a finding, not noise."""
        counts: dict[str, list] = {}
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("level") not in ("warning", "error", "critical"):
                continue
            c = counts.setdefault(f"{rec['level']} {rec.get('event', '?')}", [0, 0.0])
            c[0] += 1
            if isinstance(rec.get("seconds"), (int, float)):
                c[1] = max(c[1], rec["seconds"])
        for what, (n, longest) in sorted(counts.items()):
            extra = f", longest {longest:g} s" if longest else ""
            Server.notes.add(f"{self.spec.name} ({self.log_path.stem}) logged {what} x{n}{extra}")

    def _signal(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait(self, seconds: float) -> bool:
        try:
            self.proc.wait(seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    # -- measurements ------------------------------------------------------------

    def pids(self) -> list[int]:
        """The server process and all its descendants."""
        if self.proc is None:
            return []
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
        return out

    def rss_kb(self) -> int:
        """Sum of VmRSS over the process tree, in KiB (/proc/PID/status)."""
        total = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                            break
            except OSError:
                pass
        return total

    def root_cpu_s(self) -> float:
        """CPU time of the top process alone (the supervisor of ``--workers``),
        as :meth:`cpu_s` measures it."""
        return self.cpu_s(self.pids()[:1])

    def cpu_s(self, pids: list[int] | None = None) -> float:
        """CPU time of the process tree (or of ``pids``) in seconds, at
        nanosecond resolution: the first field of
        /proc/PID/task/TID/schedstat, summed over threads (utime/stime in
        /proc/PID/stat only tick every 10 ms)."""
        total = 0
        for pid in self.pids() if pids is None else pids:
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
                except (OSError, IndexError, ValueError):
                    pass
        return total / 1e9

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU time of the process tree in seconds: utime
        and stime of /proc/PID/stat (all threads of each process), in clock
        ticks, so a difference is exact only to ~10 ms: take it over a whole
        measured phase, not a millisecond."""
        user = system = 0
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                user += int(fields[11])  # field 14 of stat(5); fields[0] is field 3
                system += int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return user / CLK_TCK, system / CLK_TCK

    def cpu_sample(self) -> tuple[float, float, float]:
        """``(total, user, system)`` seconds now; subtract two with
        :func:`cpu_delta`."""
        return (self.cpu_s(), *self.cpu_times())

    def affinity(self) -> list[int] | None:
        """The CPUs the server process may run on (what --pin set)."""
        try:
            return sorted(os.sched_getaffinity(self.proc.pid)) if self.proc else None
        except OSError:
            return None

    # -- triggers ------------------------------------------------------------------

    def admin(self, method: str, path: str, body: bytes = b"",
              timeout: float = TRIGGER_TIMEOUT_S) -> tuple[int, bytes]:
        """One request on a keep-alive connection to the admin port (reconnects
        once if the server closed it)."""
        for attempt in (0, 1):
            if self._http is None:
                self._http = http.client.HTTPConnection(HOST, self.aport, timeout=timeout)
            try:
                headers = {"Content-Type": "application/json"} if body else {}
                self._http.request(method, path, body=body, headers=headers)
                resp = self._http.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self._http.close()
                    self._http = None
                return resp.status, data
            except (http.client.HTTPException, ConnectionError) as e:
                self._http.close()
                self._http = None
                if attempt:
                    raise ServerError(f"admin {method} {path}: {e!r}") from e
        raise AssertionError("unreachable")

    def fanout_body(self, subscribers: list[str], n: int) -> bytes:
        """The trigger body for one fan-out round (built before timing)."""
        if self.spec.kind != "mailpush":
            return b""
        return json.dumps([{"subscriber": s, "event": "new_letter", "data": {"n": n}}
                           for s in subscribers], separators=(",", ":")).encode()

    def trigger_fanout(self, body: bytes) -> tuple[int, bytes]:
        if self.spec.kind == "mailpush":
            return self.admin("POST", "/v1/publish", body)
        return self.admin("POST", "/fanout")


def cpu_delta(before: tuple[float, float, float], after: tuple[float, float, float]) -> dict:
    """Server CPU seconds between two :meth:`Server.cpu_sample` readings:
    ``{"cpu_s", "user_s", "sys_s"}``."""
    return {"cpu_s": after[0] - before[0], "user_s": after[1] - before[1], "sys_s": after[2] - before[2]}


def _request(port: int, method: str, path: str, body: bytes = b"",
             timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stop_all():
    for s in list(Server.live):
        s.stop()
