"""Deployed behind a real TCP load balancer (HAProxy, mode tcp), configured
by the deployment kit's own file, deploy/haproxy.cfg.

Two mailpush processes behind HAProxy with an HTTP health check on the public
port's /healthz. Draining one takes it out of the balancer: its clients are
closed with 1012, reconnect through HAProxy and all land on the other one,
which keeps delivering. Needs Debian's haproxy (``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import bare, server_process, token
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DEPLOY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"

pytestmark = pytest.mark.skipif(
    not os.path.exists(HAPROXY) and not os.environ.get("CI"),
    reason="haproxy not installed (make test installs it; in CI this test must run)",
)

CONFIG = """
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend push
    bind 127.0.0.1:{port}
    default_backend mailpush
backend mailpush
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz
    http-check expect status 200
    server a 127.0.0.1:{a} check inter 100ms fall 1 rise 2
    server b 127.0.0.1:{b} check inter 100ms fall 1 rise 2
"""


def start_haproxy(port: int, a: int, b: int) -> subprocess.Popen:
    """HAProxy on deploy/haproxy.cfg in front of two local instances, with
    the test's addresses, a file budget this machine allows and fast checks."""
    env = {
        **os.environ,
        "MAILPUSH_LB_BIND": f"127.0.0.1:{port}",
        "MAILPUSH_NODE1": f"127.0.0.1:{a}",
        "MAILPUSH_NODE2": f"127.0.0.1:{b}",
        "MAILPUSH_LB_MAXCONN": "2000",
        "MAILPUSH_CHECK_INTER": "100ms",
    }
    return subprocess.Popen([HAPROXY, "-db", "-f", str(DEPLOY_CONFIG)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def test_the_deployment_config_is_valid_haproxy():
    out = subprocess.run([HAPROXY, "-c", "-f", str(DEPLOY_CONFIG)], capture_output=True, text=True, env={**os.environ, "MAILPUSH_LB_MAXCONN": "2000"})
    assert out.returncode == 0, out.stdout + out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(address, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def publish(admin, items) -> None:
    req = urllib.request.Request(f"http://{admin[0]}:{admin[1]}/v1/publish", data=json.dumps(items).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 202


def connections(admin) -> int:
    _, text = get(admin, "/metrics")
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith("mailpush_connections "))))


def open_client(port: int, sub: str):
    ws = connect(f"ws://127.0.0.1:{port}/v1/ws?token={token(sub)}", open_timeout=5, legacy=True)
    ws.send('{"type":"subscribe"}')
    assert json.loads(ws.recv(timeout=5))["type"] == "subscribed"
    return ws


def test_drain_moves_clients_to_the_other_instance(tmp_path):
    with server_process("--drain-seconds", "1") as (proc_a, listen_a, admin_a), server_process() as (proc_b, listen_b, admin_b):
        port = free_port()
        lb = start_haproxy(port, listen_a[1], listen_b[1])
        clients = []
        try:
            deadline = time.monotonic() + 10
            while True:  # up once both health checks passed twice
                try:
                    clients.append(open_client(port, "probe"))
                    break
                except (OSError, WebSocketException):  # no server up yet: haproxy closes
                    assert time.monotonic() < deadline, "haproxy did not come up"
                    time.sleep(0.1)
            clients.pop().close()
            time.sleep(0.5)
            subs = [f"user{i}" for i in range(10)]
            clients = [open_client(port, s) for s in subs]
            on_a, on_b = connections(admin_a), connections(admin_b)
            assert on_a + on_b == 10 and on_a >= 3 and on_b >= 3, (on_a, on_b)  # round robin

            # With the embedded bus each instance only knows its own tabs:
            # publish to both, and every tab gets its event exactly once.
            items = [{"subscriber": s, "event": "new_letter", "data": {"n": 1}} for s in subs]
            publish(admin_a, items)
            publish(admin_b, items)
            for s, ws in zip(subs, clients):
                assert bare(json.loads(ws.recv(timeout=5))) == {"type": "event", "subscriber": s, "event": "new_letter", "data": {"n": 1}}

            t0 = time.monotonic()
            proc_a.send_signal(signal.SIGTERM)
            assert proc_a.wait(10) == 0
            assert time.monotonic() - t0 < 1 + 2  # the drain window and a margin
            time.sleep(0.2)
            codes = [ws.close_code for ws in clients]
            assert codes.count(1012) == on_a and codes.count(None) == on_b, codes
            assert all("reconnect_after_ms=" in ws.close_reason for ws in clients if ws.close_code)
            # HAProxy saw a's health check fail: reconnects all go to b.
            clients = [ws if ws.close_code is None else open_client(port, s) for s, ws in zip(subs, clients)]
            assert connections(admin_b) == 10
            publish(admin_b, [{"subscriber": s, "event": "after_drain"} for s in subs])
            for ws in clients:
                assert json.loads(ws.recv(timeout=5))["event"] == "after_drain"
        finally:
            for ws in clients:
                ws.close()
            lb.kill()
            lb.wait(5)
            lb.stderr.close()
