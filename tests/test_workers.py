"""``--workers N``: several processes on one port, the embedded bus relayed
between them, one signal drains them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from conftest import SECRET, _drain, bare, token
from websockets.sync.client import connect


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def metric(admin: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def start_workers(admin: str, drain: str) -> subprocess.Popen:
    """A supervisor with two workers; its JSON log on the stderr pipe."""
    cmd = [sys.executable, "-m", "mailpush", "serve", "--workers", "2", "--listen", "127.0.0.1:0", "--admin", admin,
           "--secret", SECRET, "--log-format", "json", "--drain-seconds", drain]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE)


def test_two_workers_share_the_port_and_every_publish_reaches_every_tab():
    proc = start_workers(admin="127.0.0.1:0", drain="1")
    clients = []
    try:
        workers = {}
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "supervisor exited early"
            rec = json.loads(line)
            if rec["event"] == "listening":
                workers[rec["worker"]] = (rec["listen"], rec["admin"])
        threading.Thread(target=_drain, args=(proc.stderr, []), daemon=True).start()
        assert workers[0][0] == workers[1][0]  # one port
        assert workers[0][1] != workers[1][1]  # an admin API each
        port = workers[0][0].rsplit(":", 1)[1]
        subs = [f"w{i}" for i in range(24)]
        for s in subs:
            ws = connect(f"ws://127.0.0.1:{port}/v1/ws?token={token(s)}", open_timeout=5, legacy=True)
            ws.send('{"type":"subscribe"}')
            assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
            clients.append(ws)
        per_worker = [metric(workers[w][1], "mailpush_connections") for w in (0, 1)]
        assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker  # the kernel spread them
        # A publish at either worker reaches the tabs on both.
        for w in (0, 1):
            body = json.dumps([{"subscriber": s, "event": f"via{w}"} for s in subs]).encode()
            req = urllib.request.Request(f"http://{workers[w][1]}/v1/publish", data=body, method="POST")
            assert urllib.request.urlopen(req, timeout=5).status == 202
            for s, ws in zip(subs, clients):
                assert bare(json.loads(ws.recv(timeout=5))) == {"type": "event", "subscriber": s, "event": f"via{w}", "data": {}}
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 1 + 3
        assert all(ws.close_code == 1012 for ws in clients)
    finally:
        for ws in clients:
            ws.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_drain_when_the_supervisor_is_killed():
    proc = start_workers(admin="off", drain="0.5")
    pids = []
    try:
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            rec = json.loads(proc.stderr.readline())
            if rec["event"] == "listening":
                pids.append(rec["pid"])
        threading.Thread(target=_drain, args=(proc.stderr, []), daemon=True).start()
        proc.kill()  # SIGKILL: the supervisor cannot pass anything on
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids):
            assert time.monotonic() < deadline, "workers outlived their supervisor"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sighup_to_the_process_group_is_ignored_by_every_process():
    # Regression: SIGHUP (a terminal's hangup reaches the whole group) ended
    # the supervisor and its workers silently.
    cmd = [sys.executable, "-m", "mailpush", "serve", "--workers", "2", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
           "--secret", SECRET, "--log-format", "json", "--drain-seconds", "0.5"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, start_new_session=True)
    lines: list[bytes] = []
    try:
        listening = 0
        while listening < 2:
            line = proc.stderr.readline()
            assert line, "supervisor exited early"
            lines.append(line)
            listening += json.loads(line)["event"] == "listening"
        threading.Thread(target=_drain, args=(proc.stderr, lines), daemon=True).start()
        os.killpg(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while sum(b'"sighup_ignored"' in line for line in lines) < 3:  # supervisor and both workers
            assert proc.poll() is None, "SIGHUP ended the supervisor"
            assert time.monotonic() < deadline, f"not every process logged SIGHUP: {lines}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
