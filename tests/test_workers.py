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
import urllib.error
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
        workers, lines = _listening(proc, 2)
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
        # The supervisor's admin API answers for the group: the connections
        # of both workers summed, and a publish there reaches every tab.
        group = next(json.loads(line)["admin"] for line in lines if b'"supervising"' in line)
        deadline = time.monotonic() + 5
        while metric(group, "mailpush_connections") != len(clients):
            assert time.monotonic() < deadline, metric(group, "mailpush_connections")
            time.sleep(0.05)
        assert metric(workers[0][1], "mailpush_connections") + metric(workers[1][1], "mailpush_connections") == len(clients)
        assert urllib.request.urlopen(f"http://{group}/healthz", timeout=5).status == 200
        body = json.dumps([{"subscriber": s, "event": "via_group"} for s in subs]).encode()
        assert urllib.request.urlopen(urllib.request.Request(f"http://{group}/v1/publish", data=body, method="POST"), timeout=5).status == 202
        for s, ws in zip(subs, clients):
            assert json.loads(ws.recv(timeout=5))["event"] == "via_group"
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


def test_sighup_to_the_process_group_is_ignored():
    # Regression: SIGHUP (a terminal's hangup reaches the whole group) ended
    # the supervisor and its workers silently. The workers run in sessions of
    # their own now: the supervisor gets it, logs it, and all go on.
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
        pids = [json.loads(line)["pid"] for line in lines if b'"listening"' in line]
        os.killpg(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not any(b'"sighup_ignored"' in line for line in lines):
            assert proc.poll() is None, "SIGHUP ended the supervisor"
            assert time.monotonic() < deadline, f"no log line for SIGHUP: {lines}"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None and all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_a_worker_that_dies_is_restarted_alone_and_its_tabs_recover_on_the_other():
    proc = start_workers(admin="127.0.0.1:0", drain="0.5")
    clients = []
    try:
        workers, lines = _listening(proc, 2)
        port = workers[0][0].rsplit(":", 1)[1]
        admin = workers[0][1]
        # Tabs until both workers hold some (SO_REUSEPORT spreads them).
        by_worker: dict[str, list] = {}
        for i in range(40):
            ws = connect(f"ws://127.0.0.1:{port}/v1/ws?token={token(f'r{i}')}", open_timeout=5)
            ws.send('{"type":"subscribe"}')
            answer = json.loads(ws.recv(timeout=5))
            clients.append((f"r{i}", ws, answer))
        publish = lambda subs, n: urllib.request.urlopen(urllib.request.Request(  # noqa: E731
            f"http://{admin}/v1/publish", data=json.dumps([{"subscriber": s, "event": "e", "data": {"n": n}} for s in subs]).encode(),
            method="POST"), timeout=5)
        publish([c[0] for c in clients], 1)
        last = {}
        for sub, ws, _ in clients:
            got = json.loads(ws.recv(timeout=5))
            last[sub] = got["offset"]
        victim = workers[1][2]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(victim):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        survivors, dropped = [], []
        for sub, ws, answer in clients:
            try:
                alive = ws.ping().wait(2)  # the killed worker's tabs are gone
            except Exception:  # noqa: BLE001 - any failure: a tab of the dead worker
                alive = False
            if alive:
                survivors.append((sub, ws))
            else:
                dropped.append((sub, ws, answer))
        assert survivors and dropped, (len(survivors), len(dropped))
        publish([c[0] for c in clients], 2)  # while the dropped tabs are away
        for sub, ws in survivors:
            assert json.loads(ws.recv(timeout=5))["data"] == {"n": 2}  # the other worker never noticed
        for sub, _ws, answer in dropped:  # they come back, to whichever worker, and recover
            ws = connect(f"ws://127.0.0.1:{port}/v1/ws?token={token(sub)}", open_timeout=10)
            ws.send(json.dumps({"type": "subscribe", "since": {"epoch": answer["epoch"], "offset": last[sub]}}))
            back = json.loads(ws.recv(timeout=5))
            assert back["recovered"] is True, back
            assert json.loads(ws.recv(timeout=5))["data"] == {"n": 2}
            ws.close()
        deadline = time.monotonic() + 15  # the dead one is back, and says so
        while not any(b'"worker_died"' in line for line in lines) or sum(b'"listening"' in line for line in lines) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, lines[-5:]
            time.sleep(0.05)
        # The supervisor answers for the group: healthy again, the restart counted.
        group = next(json.loads(line)["admin"] for line in lines if b'"supervising"' in line)
        deadline = time.monotonic() + 10
        while _healthz(group)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert metric(group, "mailpush_worker_restarts_total") == 1 and metric(group, "mailpush_workers_running") == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        for _, ws, _ in clients:
            ws.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _listening(proc, n: int):
    """The first ``n`` workers' (listen, admin, pid) by index, and the log
    lines (read on by a thread)."""
    workers, lines = {}, []
    deadline = time.monotonic() + 20
    while len(workers) < n and time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line, "supervisor exited early"
        lines.append(line)
        rec = json.loads(line)
        if rec["event"] == "listening":
            workers[rec["worker"]] = (rec["listen"], rec["admin"], rec["pid"])
    threading.Thread(target=_drain, args=(proc.stderr, lines), daemon=True).start()
    return workers, lines


def test_workers_stay_up_past_the_supervisors_idle_thread_timeout():
    # Regression (found by the bench's --workers 2 fan-out): the workers were
    # started through trio.lowlevel.open_process, which forks in a worker
    # thread; their PR_SET_PDEATHSIG fired when Trio retired that idle
    # thread (after 10 s), so every worker was drained and restarted every
    # ~10 s, its tabs dropped with 1012.
    proc = start_workers(admin="127.0.0.1:0", drain="1")
    try:
        workers, lines = _listening(proc, 2)
        port = workers[0][0].rsplit(":", 1)[1]
        ws = connect(f"ws://127.0.0.1:{port}/v1/ws?token={token('steady')}", open_timeout=5)
        ws.send('{"type":"subscribe"}')
        assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
        time.sleep(13)  # past Trio's 10 s thread idle timeout
        assert not any(b'"worker_died"' in line for line in lines), [line for line in lines if b"worker_died" in line]
        assert all(_alive(int(w[2])) for w in workers.values())
        ws.send('{"type":"ping"}')
        assert json.loads(ws.recv(timeout=5)) == {"type": "pong"}  # the same connection, never drained
        ws.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _healthz(address: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_supervisor_is_healthy_only_once_every_worker_is_ready():
    # Regression: /healthz on the supervisor said 200 as soon as the worker
    # processes existed, before they had imported mailpush and bound the
    # port, so a load balancer sent connections to a port nobody served.
    proc = start_workers(admin="127.0.0.1:0", drain="1")
    try:
        line = proc.stderr.readline()
        while b'"supervising"' not in line:
            assert line, "supervisor exited early"
            line = proc.stderr.readline()
        group = json.loads(line)["admin"]
        status, body = _healthz(group)  # the workers are still importing
        assert (status, body.strip()) == (503, "worker 0, 1 starting")
        assert metric(group, "mailpush_workers_ready") == 0
        workers, lines = _listening(proc, 2)
        deadline = time.monotonic() + 5
        while _healthz(group)[0] != 200:
            assert time.monotonic() < deadline, _healthz(group)
            time.sleep(0.02)
        assert metric(group, "mailpush_workers_ready") == 2
        for w in (0, 1):
            assert _healthz(workers[w][1])[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
