"""A real browser: headless Chromium opens the admin demo page, connects as
a subscriber, and shows an event published through the admin API, and not
an event of another subscriber.

Chromium is driven over the DevTools protocol (``Runtime.evaluate`` on the
tab's ``webSocketDebuggerUrl``, with the websockets sync client). The page
is polled in real time: no ``--virtual-time-budget``, which would run the
page's clock ahead of the WebSocket messages (DESIGN.md).

Skipped only when Chromium is not installed *and* this is not CI (``make
test`` installs it through the Makefile's system-deps target); under CI a
missing Chromium fails.
"""

from __future__ import annotations

import json
import time
import urllib.request

from conftest import server_process
from devtools import chromium, open_tab, require_chromium

# After the expected event shows, how long a wrongly routed one would have
# had to show up too (it was published first, on the same in-process bus).
ISOLATION_GRACE = 0.5


def publish(admin: tuple[str, int], item: dict) -> None:
    req = urllib.request.Request(
        f"http://{admin[0]}:{admin[1]}/v1/publish",
        data=json.dumps(item).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202
        assert json.load(r) == {"accepted": 1}


def test_demo_page_in_chromium_receives_its_event_and_only_its_own(tmp_path) -> None:
    require_chromium()
    with server_process("--demo") as (_proc, listen, admin), chromium(tmp_path) as devtools:
        with open_tab(devtools, f"http://{admin[0]}:{admin[1]}/") as tab:
            tab.wait_for("document.readyState === 'complete' && !!document.getElementById('connect')", "the demo page to load")
            # The page runs the browser client from the push port, not code of its own.
            client_url = tab.evaluate("document.getElementById('clienturl').textContent")
            assert client_url == f"http://127.0.0.1:{listen[1]}/v1/client.js"
            tab.evaluate("document.getElementById('subscriber').value = 'alice@example.com'; document.getElementById('filter').value = '*'; document.getElementById('connect').click(); true")
            status = tab.wait_for(
                "(s => s.startsWith('subscribed') ? s : '')(document.getElementById('status').textContent)",
                "the page to subscribe",
            )
            assert status == "subscribed as alice@example.com to *"

            # Bob's event first, then Alice's: once Alice's shows, Bob's had
            # every chance to be (wrongly) delivered before it.
            publish(admin, {"subscriber": "bob@example.com", "event": "new_letter", "data": {"subject": "for-bob-only"}})
            publish(admin, {"subscriber": "alice@example.com", "event": "new_letter", "data": {"subject": "hello-alice"}})
            shown = tab.wait_for(
                "(t => t.includes('hello-alice') ? t : '')(document.getElementById('events').innerText)",
                "Alice's event to show",
            )
            assert "new_letter" in shown
            time.sleep(ISOLATION_GRACE)
            events = tab.evaluate("document.getElementById('events').innerText")
            assert "for-bob-only" not in events
            assert events.count("hello-alice") == 1  # exactly once
            assert "error" not in events
