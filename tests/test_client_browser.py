"""The browser client (clients/js/mailpush.js) in a real browser: headless
Chromium against a real ``mailpush serve`` subprocess.

The test pages come from a loopback origin of their own (a small HTTP
server thread here), and import the client cross-origin from the server
under test, ``import { connect } from "http://127.0.0.1:PORT/v1/client.js"``:
a page that runs at all proves the script's MIME type and CORS headers.
Each page records what its client emits (``event``, ``resync``, ``state``,
``error``, ``retry``) in ``window.rec``, read with ``Runtime.evaluate``. Its
token function fetches ``/token`` from the page server, which mints one with
the test secret (``ttl`` seconds) and keeps every token it minted.

- one subscriber's three tabs in one browser share exactly one WebSocket
  (``mailpush_connections`` and ``mailpush_upgrades`` at the admin API) and
  each tab gets every event once, in order;
- the leader tab closed while events are being published: another tab
  takes over within about a second, and the remaining tabs get every event
  once; then with the last follower's JavaScript paused (the debugger)
  while the leader closes, events published with no connection at all come
  back from the history when it takes over (``mailpush_events_recovered``);
- the server SIGKILLed and started again on the same port: three
  independent clients (a browser context each) retry with jittered delays,
  not at one instant, reconnect, get ``resync`` ``epoch_changed`` (the
  embedded history is gone) and then receive again;
- a token living 4 s is renewed in band (``mailpush_token_refreshes``
  rises, ``mailpush_upgrades`` does not) and the connection outlives the
  first token's expiry plus the server's grace, while a control tab with a
  fixed 4 s token is closed 4001 in that same window;
- with the WebSocket endpoint refusing upgrades (404), the client falls
  back to Server-Sent Events (state ``fallback``) and still receives.

Nothing is skipped: a missing Chromium fails, naming ``make system-deps``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import signal
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from websockets.sync.client import connect as ws_connect

from conftest import server_process, token
from devtools import CHROMIUM, PAGE_TIMEOUT, Tab, chromium_process
from mailpush.timers import EXPIRY_GRACE
from test_browser import publish

# The takeover after the leader tab closes takes well under a second; this
# allows for a loaded 2-core machine.
TAKEOVER_LIMIT = 1.5
# After the expected events arrived, how long a duplicate would have had
# to show up.
SETTLE = 0.4
# The restart test's first backoff step (ms): the first retry waits
# random(0, RESTART_DELAY) ms. Three clients retrying within
# JITTER_MIN_SPREAD ms of each other by chance: about 3 * (5/1000)^2.
RESTART_DELAY = 1000
JITTER_MIN_SPREAD = 5.0
# The refresh test: the tokens' lifetime and the server's keepalive round
# (the round that also closes expired connections).
TOKEN_TTL = 4
PING_INTERVAL = 0.5


def _fail_without_chromium() -> str:
    if not CHROMIUM:
        pytest.fail("chromium is not installed; `make system-deps` installs it (apt-get install chromium)")
    return CHROMIUM


# -- the pages' origin -----------------------------------------------------------

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mailpush client under test</title>
<script>
window.rec = [];
window.pageErrors = [];
addEventListener("error", (e) => pageErrors.push(String(e.message)));
addEventListener("unhandledrejection", (e) => pageErrors.push(String(e.reason)));
</script>
<script type="module">
import { connect } from "%(client)s";
const cfg = %(cfg)s;
const token = cfg.token || (async () => {
  const r = await fetch("/token?" + new URLSearchParams({sub: cfg.sub, ttl: cfg.ttl}));
  if (!r.ok) throw new Error("token endpoint answered " + r.status);
  return r.text();
});
window.push = connect({...cfg.options, token});
for (const type of ["event", "resync", "state", "error", "retry"])
  push.on(type, (p) => rec.push({type, at: Date.now(), p}));
</script>
</head><body>mailpush client under test</body></html>
"""


class PageServer:
    """The pages' own origin: ``/page?c=<json>`` (a test page importing the
    client from the ``port`` in the config) and ``/token?sub=S&ttl=T`` (a
    token minted with the test secret; every one is kept in ``minted``)."""

    def __init__(self) -> None:
        self.minted: list[tuple[str, str]] = []  # (subscriber, token)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/page":
                    cfg = json.loads(q["c"])
                    body = PAGE % {
                        "client": f"http://127.0.0.1:{cfg['port']}/v1/client.js",
                        "cfg": json.dumps(cfg).replace("</", "<\\/"),
                    }
                    self._answer(200, "text/html; charset=utf-8", body)
                elif url.path == "/token":
                    tok = token(q["sub"], float(q.get("ttl") or 3600))
                    with outer.lock:
                        outer.minted.append((q["sub"], tok))
                    self._answer(200, "text/plain", tok)
                else:
                    self._answer(404, "text/plain", "no such page\n")

            def _answer(self, status: int, ctype: str, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, server_port: int, sub: str, ttl: float = 3600, fixed_token: str | None = None, **options) -> str:
        options.setdefault("url", f"ws://127.0.0.1:{server_port}/v1/ws")
        cfg = {"port": server_port, "sub": sub, "ttl": ttl, "token": fixed_token, "options": options}
        return f"http://127.0.0.1:{self.port}/page?" + urllib.parse.urlencode({"c": json.dumps(cfg)})

    def tokens_for(self, sub: str) -> list[str]:
        with self.lock:
            return [t for s, t in self.minted if s == sub]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the browser ------------------------------------------------------------------


def cdp(session, method: str, params: dict):
    """One DevTools command on ``session`` (its ``ws`` and ``ids``); events
    arriving meanwhile are skipped."""
    msg_id = next(session.ids)
    session.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
    while True:
        reply = json.loads(session.ws.recv(timeout=10))
        if reply.get("id") == msg_id:
            break
    if "error" in reply:
        raise RuntimeError(f"{method}: {reply['error']}")
    return reply["result"]


class Browser:
    """The browser-level DevTools session: browser contexts (each as
    separate as another profile: its own Web Locks and BroadcastChannels)
    and targets (tabs) in them."""

    def __init__(self, devtools: str, ws) -> None:
        self.devtools = devtools
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        return cdp(self, method, params)

    @contextlib.contextmanager
    def context(self):
        """A fresh browser context; leaving the block closes its tabs' DevTools
        sockets and disposes of it and its tabs."""
        ctx = BrowserContext(self, self.call("Target.createBrowserContext")["browserContextId"])
        try:
            with ctx.stack:
                yield ctx
        finally:
            with contextlib.suppress(Exception):
                self.call("Target.disposeBrowserContext", browserContextId=ctx.id)

    def close_target(self, page: Page) -> None:
        self.call("Target.closeTarget", targetId=page.target)


class BrowserContext:
    def __init__(self, browser: Browser, context_id: str) -> None:
        self.browser = browser
        self.id = context_id
        self.stack = contextlib.ExitStack()

    def open(self, url: str) -> Page:
        """A new tab on ``url``, and a DevTools session on it."""
        target = self.browser.call("Target.createTarget", url=url, browserContextId=self.id)["targetId"]
        page_ws = f"ws://{self.browser.devtools}/devtools/page/{target}"
        ws = self.stack.enter_context(ws_connect(page_ws, max_size=None, open_timeout=10))
        return Page(ws, target)

    def open_tabs(self, url: str, n: int) -> list[Page]:
        """``n`` tabs on ``url``, each with its client open."""
        tabs = [self.open(url) for _ in range(n)]
        for tab in tabs:
            tab.wait_open()
        return tabs


class Page(Tab):
    """A test page: its client's records and state."""

    def __init__(self, ws, target: str) -> None:
        super().__init__(ws)
        self.target = target

    def send(self, method: str, **params):
        return cdp(self, method, params)

    def wait_open(self, state: str = "open") -> None:
        """Wait for the module to have imported the client, and for the
        client to reach ``state``."""
        deadline = time.monotonic() + PAGE_TIMEOUT
        while not self.evaluate("!!window.push"):
            if time.monotonic() > deadline:
                info = self.evaluate(
                    "JSON.stringify({url: location.href, ready: document.readyState, errors: window.pageErrors})"
                )
                raise AssertionError(f"the page never ran its module (client.js not imported cross-origin?): {info}")
            time.sleep(0.05)
        try:
            wait_until(lambda: self.state == state, f"the client to be {state!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; its records: {self.rec()}"[:3000]) from None

    def rec(self, type_: str | None = None) -> list[dict]:
        rec = json.loads(self.evaluate("JSON.stringify(window.rec)"))
        return [r for r in rec if type_ is None or r["type"] == type_]

    def events(self) -> list[tuple[int, int]]:
        """(offset, data.n) of every event this tab's client emitted."""
        return [(r["p"]["offset"], r["p"]["data"]["n"]) for r in self.rec("event")]

    @property
    def state(self) -> str:
        return self.evaluate("push.state")

    @property
    def leader(self) -> bool:
        return self.evaluate("push.leader")

    @property
    def position(self) -> dict | None:
        return self.evaluate("push.position")

    def errors(self) -> list:
        return self.evaluate("window.pageErrors")


# -- helpers ----------------------------------------------------------------------


def metrics(admin: tuple[str, int]) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_until(condition, what: str, timeout: float = PAGE_TIMEOUT, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def send_events(admin: tuple[str, int], sub: str, numbers) -> None:
    for n in numbers:
        publish(admin, {"subscriber": sub, "event": "new_letter", "data": {"n": n}})


def claims(jwt: str) -> dict:
    body = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def expect_events(pages: list[Page], expected: list[tuple[int, int]], what: str) -> None:
    """Every page got exactly ``expected`` (offset, n), in order: waits for
    them, then SETTLE longer for a duplicate or a stray one."""
    for page in pages:
        wait_until(lambda p=page: len(p.events()) >= len(expected), f"{what}: {len(expected)} events in a tab")
    time.sleep(SETTLE)
    for i, page in enumerate(pages):
        assert page.events() == expected, f"{what}: tab {i} got {page.events()}"
        assert page.errors() == [], page.errors()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _fail_without_chromium()
    with chromium_process(tmp_path_factory.mktemp("chromium")) as (_proc, devtools):
        with urllib.request.urlopen(f"http://{devtools}/json/version", timeout=10) as r:
            url = json.load(r)["webSocketDebuggerUrl"]
        with ws_connect(url, max_size=None, open_timeout=10) as ws:
            yield Browser(devtools, ws)


@pytest.fixture(scope="module")
def pages():
    server = PageServer()
    try:
        yield server
    finally:
        server.close()


# -- the tests ----------------------------------------------------------------------


def test_three_tabs_share_one_websocket_and_each_gets_every_event_once(browser, pages):
    sub = "alice@example.com"
    with server_process() as (_proc, listen, admin), browser.context() as ctx:
        tabs = ctx.open_tabs(pages.url(listen[1], sub), 3)
        # The pages' origin is not the server's: the import was cross-origin.
        assert {t.evaluate("location.origin") for t in tabs} == {f"http://127.0.0.1:{pages.port}"}
        m = metrics(admin)
        assert (m["mailpush_connections"], m["mailpush_upgrades_total"]) == (1, 1), m
        assert sorted(t.leader for t in tabs) == [False, False, True]

        send_events(admin, sub, range(1, 6))
        send_events(admin, "bob@example.com", [99])  # nobody here's
        expect_events(tabs, [(n, n) for n in range(1, 6)], "three tabs")
        m = metrics(admin)
        assert (m["mailpush_connections"], m["mailpush_upgrades_total"]) == (1, 1), m
        # One socket: the server sent each event once, not once per tab.
        assert m["mailpush_events_delivered_total"] == 5, m


def test_the_leader_tab_closes_and_another_takes_over_losing_nothing(browser, pages):
    sub = "carol@example.com"
    with server_process() as (_proc, listen, admin), browser.context() as ctx:
        tabs = ctx.open_tabs(pages.url(listen[1], sub), 3)
        send_events(admin, sub, range(1, 4))
        expect_events(tabs, [(n, n) for n in range(1, 4)], "before the takeover")

        # 1. The leader closes while a publisher keeps going (every 50 ms).
        leaders = [t for t in tabs if t.leader]
        assert len(leaders) == 1
        leader = leaders[0]
        rest = [t for t in tabs if t is not leader]
        stop = threading.Event()
        sent: list[int] = []

        def publisher() -> None:
            for n in itertools.count(4):
                if stop.is_set():
                    return
                send_events(admin, sub, [n])
                sent.append(n)
                time.sleep(0.05)

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        try:
            time.sleep(0.2)
            closed_at = time.monotonic()
            browser.close_target(leader)
            wait_until(
                lambda: (m := metrics(admin))["mailpush_upgrades_total"] == 2 and m["mailpush_connections"] == 1,
                "another tab's socket to replace the leader's",
                timeout=5,
                every=0.01,
            )
            takeover = time.monotonic() - closed_at
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join(5)
        assert takeover < TAKEOVER_LIMIT, f"the takeover took {takeover:.2f} s"
        assert sorted(t.leader for t in rest) == [False, True]
        assert len(sent) >= 8, sent
        expected = [(n, n) for n in range(1, sent[-1] + 1)]
        expect_events(rest, expected, "across the takeover")
        assert [t.state for t in rest] == ["open", "open"]

        # 2. No connection at all while events are published: the follower's
        # JavaScript is paused (the debugger) while the new leader closes; it
        # takes over when it runs again, resuming from the last offset it saw.
        new_leader = next(t for t in rest if t.leader)
        follower = next(t for t in rest if not t.leader)
        recovered_before = metrics(admin)["mailpush_events_recovered_total"]
        follower.send("Debugger.enable")
        follower.send("Debugger.pause")
        browser.close_target(new_leader)
        wait_until(lambda: metrics(admin)["mailpush_connections"] == 0, "the leader's socket to close", timeout=5)
        last = sent[-1]
        gap = [last + 1, last + 2, last + 3]
        send_events(admin, sub, gap)
        time.sleep(0.2)
        assert metrics(admin)["mailpush_connections"] == 0, "the paused tab connected"
        follower.send("Debugger.resume")
        follower.send("Debugger.disable")
        wait_until(lambda: metrics(admin)["mailpush_connections"] == 1, "the follower to take over", timeout=5)
        expected += [(n, n) for n in gap]
        expect_events([follower], expected, "the gap, from the history")
        m = metrics(admin)
        assert m["mailpush_events_recovered_total"] - recovered_before == len(gap), m
        send_events(admin, sub, [last + 4])
        expect_events([follower], [*expected, (last + 4, last + 4)], "after the gap")
        assert follower.leader
        m = metrics(admin)
        assert m["mailpush_events_recovered_total"] - recovered_before == len(gap), m
        assert m["mailpush_upgrades_total"] == 3, m
        assert follower.rec("resync") == []


def test_a_restarted_server_is_reconnected_to_with_jitter_and_resyncs(browser, pages):
    sub = "dave@example.com"
    with contextlib.ExitStack() as stack:
        proc, listen, admin = stack.enter_context(server_process())
        port = listen[1]
        url = pages.url(port, sub, delay=RESTART_DELAY, maxDelay=2 * RESTART_DELAY)
        # Three independent clients: a browser context each.
        clients = [stack.enter_context(browser.context()).open(url) for _ in range(3)]
        for c in clients:
            c.wait_open()
        assert metrics(admin)["mailpush_connections"] == 3
        assert all(c.leader for c in clients)  # nothing shared across contexts
        send_events(admin, sub, [1, 2])
        expect_events(clients, [(1, 1), (2, 2)], "before the restart")
        old_epoch = clients[0].position["epoch"]
        assert [c.position for c in clients] == [{"epoch": old_epoch, "offset": 2}] * 3

        killed_at = time.time() * 1000
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        _proc, listen2, admin2 = stack.enter_context(server_process("--listen", f"127.0.0.1:{port}"))
        assert listen2 == listen

        for c in clients:
            wait_until(lambda c=c: c.rec("resync") and c.state == "open", "each client's resync", timeout=10)
        wait_until(lambda: metrics(admin2)["mailpush_connections"] == 3, "three clients on the new server", timeout=5)

        delays, reopened = [], []
        for i, c in enumerate(clients):
            rec = c.rec()
            retries = [r for r in rec if r["type"] == "retry" and r["at"] >= killed_at]
            assert retries, f"client {i} recorded no retry: {rec}"
            first = retries[0]["p"]
            assert first["code"] == 1006, rec
            assert 0 <= first["delay"] < RESTART_DELAY, rec  # full jitter: random(0, delay)
            delays.append(first["delay"])
            opens = [r["at"] for r in rec if r["type"] == "state" and r["p"] == "open" and r["at"] >= killed_at]
            assert len(opens) == 1, rec
            reopened.append(opens[0])
            # The last attempt waited the delay it announced (a ms of rounding).
            assert opens[0] >= retries[-1]["at"] + retries[-1]["p"]["delay"] - 1, rec
            resyncs = [r["p"] for r in rec if r["type"] == "resync"]
            assert len(resyncs) == 1, rec
            assert resyncs[0]["reason"] == "epoch_changed", resyncs
            assert resyncs[0]["epoch"] != old_epoch, resyncs
        assert max(delays) - min(delays) > JITTER_MIN_SPREAD, f"the first retries were not jittered: {delays}"
        assert max(reopened) - min(reopened) > JITTER_MIN_SPREAD, f"the clients reconnected at one instant: {reopened}"

        send_events(admin2, sub, [3, 4])
        # The new epoch's offsets start again from 1: the clients took the new
        # epoch's position instead of dropping them as already seen.
        expect_events(clients, [(1, 1), (2, 2), (1, 3), (2, 4)], "after the restart")
        new_epoch = clients[0].position["epoch"]
        assert new_epoch != old_epoch
        assert [c.position for c in clients] == [{"epoch": new_epoch, "offset": 2}] * 3


def test_a_short_lived_token_is_refreshed_in_band_without_a_reconnect(browser, pages):
    sub, control_sub = "erin@example.com", "frank@example.com"
    with server_process("--ping-interval", str(PING_INTERVAL)) as (_proc, listen, admin), browser.context() as ctx:
        tab = ctx.open(pages.url(listen[1], sub, ttl=TOKEN_TTL))
        # The control: the same lifetime, but a fixed token, never renewed.
        control = ctx.open(pages.url(listen[1], control_sub, fixed_token=token(control_sub, TOKEN_TTL)))
        tab.wait_open()
        control.wait_open()
        m = metrics(admin)
        assert (m["mailpush_connections"], m["mailpush_upgrades_total"]) == (2, 2), m
        first_exp = claims(pages.tokens_for(sub)[0])["exp"]
        assert first_exp - time.time() <= TOKEN_TTL

        # Past the first token's exp, the grace and two keepalive rounds.
        end = first_exp + EXPIRY_GRACE + 2 * PING_INTERVAL
        wait_until(lambda: time.time() > end, "the first token's end", timeout=15, every=0.2)
        wait_until(lambda: control.rec("retry"), "the control to be closed", timeout=5)

        assert tab.rec("retry") == [] and tab.rec("error") == [], tab.rec()
        assert [r["p"] for r in tab.rec("state")] == ["open"], tab.rec()
        assert tab.state == "open"
        m = metrics(admin)
        assert m["mailpush_token_expiries_total"] == 1, m  # the control, and only it
        assert m["mailpush_token_refreshes_total"] >= 2, m
        assert m["mailpush_upgrades_total"] == 2, m  # nobody reconnected
        assert m["mailpush_pings_total"] > 0 and m["mailpush_pong_timeouts_total"] == 0, m
        assert m["mailpush_connections"] == 1, m
        assert len(pages.tokens_for(sub)) >= 3
        control_rec = control.rec()
        assert control.rec("retry")[0]["p"]["code"] == 4001, control_rec
        assert any(r["p"]["code"] == 4001 for r in control.rec("error")), control_rec

        send_events(admin, sub, [1])
        expect_events([tab], [(1, 1)], "after the refreshes")


def test_websockets_blocked_falls_back_to_sse_and_still_receives(browser, pages):
    sub = "grace@example.com"
    with server_process() as (_proc, listen, admin), browser.context() as ctx:
        base = f"127.0.0.1:{listen[1]}"
        tab = ctx.open(
            pages.url(listen[1], sub, url=f"ws://{base}/v1/nope", sseUrl=f"http://{base}/v1/events", delay=100)
        )
        tab.wait_open("fallback")
        m = metrics(admin)
        assert m['mailpush_rejections_total{reason="not_found"}'] == 3, m
        assert m["mailpush_connections"] == 1, m  # the event stream
        assert [r["p"]["code"] for r in tab.rec("retry")] == [1006, 1006, 1006], tab.rec()
        assert [r["p"] for r in tab.rec("state")] == ["fallback"], tab.rec()

        send_events(admin, sub, range(1, 4))
        expect_events([tab], [(1, 1), (2, 2), (3, 3)], "over SSE")
        assert tab.state == "fallback"
