"""Headless Chromium driven over the DevTools protocol, shared by the tests
that use a real browser as a client (tests/test_browser.py,
tests/test_interop.py).

:func:`chromium` starts the browser with a fresh profile and yields its
DevTools HTTP address (:func:`chromium_process` also the process, for a
test that kills it); :func:`open_tab` opens a page and yields a
:class:`Tab`, whose :meth:`Tab.evaluate` runs ``Runtime.evaluate`` over the
tab's ``webSocketDebuggerUrl`` (with the websockets sync client). Pages are
polled in real time: no ``--virtual-time-budget``, which would run the
page's clock ahead of the WebSocket messages (DESIGN.md).

:func:`require_chromium` is the skip rule: a missing Chromium skips the
test, except under CI (env ``CI`` set), where it fails and names the make
target that installs it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Chromium's first start on a loaded 2-core machine can take several seconds.
BROWSER_START_TIMEOUT = 30
# How long the page gets to reach each state (subscribed, event shown).
PAGE_TIMEOUT = 15


def require_chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; `make test` installs it (make system-deps)")
    pytest.skip("chromium is not installed (apt-get install chromium, or `make system-deps`)")


@contextlib.contextmanager
def chromium(tmp_path: Path):
    """Start headless Chromium; yield its DevTools HTTP address. Leaving the
    block SIGKILLs the browser's whole process group."""
    with chromium_process(tmp_path) as (_proc, devtools):
        yield devtools


@contextlib.contextmanager
def chromium_process(tmp_path: Path):
    """:func:`chromium`, yielding ``(process, DevTools address)``: the
    browser leads its own process group, so ``os.killpg(process.pid,
    signal.SIGKILL)`` kills every Chromium process (a crashed browser)."""
    profile = tmp_path / "profile"
    profile.mkdir()
    log = (tmp_path / "chromium.log").open("wb")
    # Port 0: Chromium picks a free port and writes it to DevToolsActivePort
    # in the profile, so there is no race for a port chosen in advance.
    proc = subprocess.Popen(
        [require_chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: renderers and all are killed with it
    )
    try:
        deadline = time.monotonic() + BROWSER_START_TIMEOUT
        port_file = profile / "DevToolsActivePort"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode}: {(tmp_path / 'chromium.log').read_text(errors='replace')[-2000:]}")
            if port_file.exists() and port_file.read_text().strip():
                port = int(port_file.read_text().split()[0])
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2) as r:
                        json.load(r)
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromium's DevTools endpoint did not come up")
            time.sleep(0.1)
        yield proc, f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


@contextlib.contextmanager
def open_tab(devtools: str, url: str):
    """Open ``url`` in a new tab; yield a :class:`Tab` on it."""
    req = urllib.request.Request(f"http://{devtools}/json/new?{url}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        target = json.load(r)
    with ws_connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
        yield Tab(ws)


class Tab:
    """One page, evaluated over its DevTools WebSocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def evaluate(self, expression: str):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": "Runtime.evaluate", "params": {"expression": expression, "returnByValue": True, "awaitPromise": True}}))
        while True:
            reply = json.loads(self.ws.recv(timeout=10))
            if reply.get("id") == msg_id:
                break  # anything else is an event we did not ask for
        if "error" in reply:
            raise RuntimeError(reply["error"])
        result = reply["result"]
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = PAGE_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.evaluate("JSON.stringify({status: document.getElementById('status')?.textContent, events: document.getElementById('events')?.innerText})")
                raise AssertionError(f"timed out waiting for {what}; page: {state}")
            time.sleep(0.1)
