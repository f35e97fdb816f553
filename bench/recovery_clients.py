"""Tabs that must not lose a letter, for bench/recovery.py: client processes
in which every connection is a browser tab that resumes.

Each tab is its own subscriber (``PREFIX<worker>-<k>``). It connects (to
one of a list of addresses), upgrades with its own token, subscribes, and
remembers the epoch and offset of the last event it got (or of its fresh
``subscribed``, or of a ``resync``); whenever its connection ends, however
it ends, it connects again and subscribes with them as ``since``. After a
``subscribed`` with ``recovered: true`` the missed events follow, so the
position moves only with them. The publisher numbers each subscriber's
events ``"q": 1, 2, …`` in their data; a tab counts, AnyCable-style, what
it got: events, distinct ``q`` (a ``q`` seen before is a duplicate, one
below the highest seen is out of order), ``resync`` packets and their
reasons, how its connections ended and its answers (fresh, recovered, not
recovered). ``missing = published - distinct`` and ``duplicated = got -
distinct``, per tab, are worked out once the parent says how many were
published for each. Each tab also keeps when each distinct ``q`` first
came (``report(detail=True)``), for a publisher that counts by which ``q``
were acknowledged rather than how many.

A tab whose connection ended either tries again at once with a jitter
(``auto``: up to RECONNECT_JITTER_S, doubling while attempts fail, at
most RECONNECT_MAX_S) or waits for the parent's ``go`` (``hold``: "the
tabs were away while events were published, then all resume at once").
Each attempt goes to the next address of the list (a client-side
failover list; with one address, a load balancer or a shared port, it is
always that one). At most WINDOW handshakes per process are in flight, so
a resume storm does not overflow the server's accept queue.

Like loadgen.py: one ``select.epoll`` loop per process over raw
non-blocking sockets, no task or library object per tab, sockets bound to
127.0.x.y source addresses with ``IP_BIND_ADDRESS_NO_PORT``; a process
holds at most loadgen.MAX_SOCKETS_PER_PROC tabs.

Resource handling: every socket is closed when its tab's connection ends,
on ``exit`` and when the process ends; processes exit when their pipe
closes (the parent died) or on ``stop()``; every wait has a deadline.
"""

from __future__ import annotations

import errno
import heapq
import multiprocessing
import multiprocessing.connection
import os
import random
import select
import socket
import time
from collections import Counter, deque

import jwt
import msgspec

from loadgen import IP_BIND_ADDRESS_NO_PORT, MAX_SOCKETS_PER_PROC, SOURCE_ADDRS_PER_PROC, WS_ACCEPT, WS_KEY

# A lost tab's first attempt comes after a random wait up to this (s), the
# next ones after up to twice the previous wait, at most RECONNECT_MAX_S:
# browsers spread their reconnects too, and a refused attempt (no server
# behind the balancer yet) is not retried in a tight loop.
RECONNECT_JITTER_S = 0.1
RECONNECT_MAX_S = 2.0
# Handshakes in flight per process (as loadgen's window: the accept queue
# holds 4,096 here, so a few processes times this never overflow it).
WINDOW = 256
# A handshake (connect to subscribed answer) that takes longer is given up
# and tried again.
HANDSHAKE_TIMEOUT_S = 10.0
# One read drains what is queued on a socket.
RECV_SIZE = 65_536
TOKEN_TTL_S = 3600

_ZERO_MASK = b"\x00\x00\x00\x00"
_WAIT, _CONNECTING, _HANDSHAKE, _SUBSCRIBING, _OPEN = range(5)
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked (zero key) client frame."""
    n = len(payload)
    head = bytes([0x80 | opcode, 0x80 | n]) if n < 126 else bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + _ZERO_MASK + payload


_CLOSE_REPLY = _frame(0x8, b"\x03\xe8")
_FRESH = _frame(0x1, b'{"type":"subscribe"}')


class _Process:
    """One client process: its tabs in lists indexed by tab number."""

    def __init__(
        self,
        pipe,
        index: int,
        count: int,
        targets: list,
        spread: bool,
        path: str,
        secret: str,
        prefix: str,
        source_base: int,
    ):
        self.pipe = pipe
        self.index = index
        self.n = count
        self.targets = targets
        self.names = [f"{prefix}{index}-{k}" for k in range(count)]
        exp = int(time.time()) + TOKEN_TTL_S
        self.requests = []  # prebuilt upgrade requests, one per (tab, target)
        for name in self.names:
            tok = jwt.encode({"sub": name, "exp": exp}, secret, algorithm="HS256")
            self.requests.append(
                [
                    (
                        f"GET {path}?token={tok} HTTP/1.1\r\nHost: {h}:{p}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n"
                    ).encode()
                    for h, p in targets
                ]
            )
        net = source_base + index + 1
        self.sources = [f"127.0.{net}.{k + 1}" for k in range(SOURCE_ADDRS_PER_PROC)]
        self.ep = select.epoll()
        self.ep.register(pipe.fileno(), select.EPOLLIN)
        self.auto = True
        # per tab
        self.fd = [-1] * count
        self.st = [_WAIT] * count
        self.target = [(k % len(targets)) if spread else 0 for k in range(count)]
        self.epoch: list[str | None] = [None] * count
        self.offset = [0] * count
        self.fails = [0] * count  # attempts since the last open
        self.started = [0] * count  # ns, start of the current attempt
        self.got = [0] * count  # events
        self.uniq = [0] * count  # distinct q
        self.top = [0] * count  # highest q
        self.seen = [bytearray(16) for _ in range(count)]
        self.dups = [0] * count
        self.disorder = [0] * count
        self.resyncs = [0] * count
        self.recovered_ns = [0] * count  # the last recovered answer
        self.done_ns = [0] * count  # when uniq reached expected (after expect)
        self.connects = [0] * count  # connections opened (subscribed answered)
        self.arrivals: list[list[tuple[int, int]]] = [[] for _ in range(count)]  # (q, ns) of each first sight
        # per fd
        self.tab_of: dict[int, int] = {}
        self.partial: dict[int, bytes] = {}
        # totals
        self.answers: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()  # resync reasons
        self.ended: Counter[str] = Counter()  # how connections ended or failed
        self.packets: Counter[str] = Counter()  # other packets (error, ...)
        self.timers: list[tuple[float, int]] = []  # (due, tab) reconnects
        self.ready: deque[int] = deque()  # tabs due, waiting for a window slot
        self.inflight = 0
        # commands waiting for a condition
        self.open_wait: float | None = None
        self.expected: list[int] | None = None
        self.expect_deadline = 0.0
        self.expect_reply = False

    # -- connecting --------------------------------------------------------------

    def _schedule(self, k: int, now: float) -> None:
        if not self.auto:
            return
        wait = min(RECONNECT_MAX_S, RECONNECT_JITTER_S * (2 ** min(self.fails[k], 8)))
        heapq.heappush(self.timers, (now + random.uniform(0, wait), k))

    def _pump(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            self.ready.append(heapq.heappop(timers)[1])
        while self.ready and self.inflight < WINDOW:
            k = self.ready.popleft()
            if self.st[k] == _WAIT:
                self._connect(k)

    def _connect(self, k: int) -> None:
        self.started[k] = time.monotonic_ns()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((self.sources[k % SOURCE_ADDRS_PER_PROC], 0))
            err = s.connect_ex(self.targets[self.target[k]])
        except OSError as e:
            s.close()
            self._failed(k, f"connect {errno.errorcode.get(e.errno, e.errno)}")
            return
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._failed(k, f"connect {errno.errorcode.get(err, err)}")
            return
        fd = s.detach()
        self.fd[k] = fd
        self.tab_of[fd] = k
        self.st[k] = _CONNECTING
        self.inflight += 1
        self.ep.register(fd, select.EPOLLOUT)

    def _failed(self, k: int, why: str) -> None:
        """The tab has no connection now (any state): count, and try again."""
        self.ended[why] += 1
        fd = self.fd[k]
        if fd >= 0:
            if self.st[k] in (_CONNECTING, _HANDSHAKE, _SUBSCRIBING):
                self.inflight -= 1
            self.tab_of.pop(fd, None)
            self.partial.pop(fd, None)
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            os.close(fd)
            self.fd[k] = -1
        if self.st[k] != _OPEN:
            self.fails[k] += 1
        self.st[k] = _WAIT
        self.target[k] = (self.target[k] + 1) % len(self.targets)
        self._schedule(k, time.monotonic())

    def _subscribe_frame(self, k: int) -> bytes:
        epoch = self.epoch[k]
        if epoch is None:
            return _FRESH
        return _frame(0x1, _encode({"type": "subscribe", "since": {"epoch": epoch, "offset": self.offset[k]}}))

    # -- I/O -----------------------------------------------------------------------

    def _writable(self, fd: int, k: int) -> None:
        try:
            os.write(fd, self.requests[k][self.target[k]])
        except OSError as e:
            self._failed(k, f"connect {errno.errorcode.get(e.errno, e.errno)}")
            return
        self.st[k] = _HANDSHAKE
        self.ep.modify(fd, select.EPOLLIN)

    def _readable(self, fd: int, k: int, now: int) -> None:
        try:
            data = os.read(fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._failed(k, f"read {errno.errorcode.get(e.errno, e.errno)}")
            return
        if not data:
            self._failed(k, "eof" if self.st[k] == _OPEN else "eof before subscribed")
            return
        rest = self.partial.pop(fd, None)
        if rest:
            data = rest + data
        if self.st[k] == _HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.partial[fd] = data
                return
            head = data[:end]
            if not head.startswith(b"HTTP/1.1 101") or WS_ACCEPT not in head:
                self._failed(k, "status " + head.split(b"\r\n", 1)[0].decode("latin-1")[9:12])
                return
            try:
                os.write(fd, self._subscribe_frame(k))
            except OSError as e:
                self._failed(k, f"subscribe {errno.errorcode.get(e.errno, e.errno)}")
                return
            self.st[k] = _SUBSCRIBING
            data = data[end + 4 :]
        self._frames(fd, k, data, now)

    def _frames(self, fd: int, k: int, data: bytes, now: int) -> None:
        i, n = 0, len(data)
        while n - i >= 2:
            ln, h = data[i + 1] & 0x7F, 2
            if ln == 126:
                if n - i < 4:
                    break
                ln, h = int.from_bytes(data[i + 2 : i + 4], "big"), 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln, h = int.from_bytes(data[i + 2 : i + 10], "big"), 10
            end = i + h + ln
            if end > n:
                break
            op = data[i] & 0x0F
            if op == 0x1:
                self._packet(k, _decode(data[i + h : end]), now)
            elif op == 0x9:
                try:
                    os.write(fd, _frame(0xA, data[i + h : end]))
                except OSError:
                    pass
            elif op == 0x8:
                code = int.from_bytes(data[i + h : i + h + 2], "big") if ln >= 2 else 1005
                try:
                    os.write(fd, _CLOSE_REPLY)
                except OSError:
                    pass
                self._failed(k, f"close {code}")
                return
            i = end
        if i < n:
            self.partial[fd] = data[i:]

    def _packet(self, k: int, p: dict, now: int) -> None:
        kind = p.get("type")
        if kind == "event":
            q = p["data"]["q"]
            self.offset[k] = p["offset"]
            self.got[k] += 1
            seen = self.seen[k]
            if q >= len(seen):
                seen.extend(bytes(q - len(seen) + 64))
            if seen[q]:
                self.dups[k] += 1
            else:
                seen[q] = 1
                self.uniq[k] += 1
                self.arrivals[k].append((q, now))
                if q < self.top[k]:
                    self.disorder[k] += 1
                self.top[k] = max(self.top[k], q)
                exp = self.expected
                if exp is not None and self.uniq[k] >= exp[k] and not self.done_ns[k]:
                    self.done_ns[k] = now
        elif kind == "subscribed":
            recovered = p.get("recovered")
            if self.st[k] == _SUBSCRIBING:
                self.st[k] = _OPEN
                self.inflight -= 1
                self.fails[k] = 0
                self.connects[k] += 1
            if recovered is None:
                self.answers["fresh"] += 1
                self.epoch[k], self.offset[k] = p["epoch"], p["offset"]
            elif recovered:
                self.answers["recovered"] += 1
                self.recovered_ns[k] = now
            else:
                self.answers["not recovered"] += 1
        elif kind == "resync":
            self.resyncs[k] += 1
            self.reasons[p.get("reason", "?")] += 1
            self.epoch[k], self.offset[k] = p["epoch"], p["offset"]
        elif kind != "pong":
            self.packets[str(kind)] += 1

    # -- commands ------------------------------------------------------------------

    def _cmd(self, msg) -> bool:
        op = msg[0]
        if op == "open":  # every tab connects now; reply once all are subscribed (or the deadline)
            now = time.monotonic()
            for k in range(self.n):
                if self.st[k] == _WAIT:
                    self.ready.append(k)
            self.open_wait = now + msg[1]
        elif op == "auto":  # lost tabs reconnect by themselves (True) or wait for go (False)
            self.auto = msg[1]
            self.pipe.send(("ok", None))
        elif op == "go":  # every waiting tab connects now (resume storm)
            for k in range(self.n):
                if self.st[k] == _WAIT:
                    self.ready.append(k)
            self.pipe.send(("ok", None))
        elif op == "expect":  # reply once every tab has this many distinct events (or the deadline)
            self.expected = msg[1]
            self.expect_deadline = time.monotonic() + msg[2]
            self.done_ns = [0] * self.n
            for k in range(self.n):
                if self.uniq[k] >= self.expected[k]:
                    self.done_ns[k] = 1  # already there
            self.expect_reply = True
        elif op == "state":
            self.pipe.send(
                (
                    "state",
                    {
                        "open": sum(1 for s in self.st if s == _OPEN),
                        "waiting": sum(1 for s in self.st if s == _WAIT),
                        "ended": dict(self.ended),
                    },
                )
            )
        elif op == "report":
            self.pipe.send(("report", self._report(msg[1], len(msg) > 2 and msg[2])))
        elif op == "exit":
            return False
        return True

    def _check_waits(self) -> None:
        now = time.monotonic()
        if self.open_wait is not None:
            opened = sum(1 for s in self.st if s == _OPEN)
            if opened == self.n or now > self.open_wait:
                self.open_wait = None
                self.pipe.send(("opened", {"ok": opened, "failed": self.n - opened, "ended": dict(self.ended)}))
        if self.expect_reply and (all(self.done_ns) or now > self.expect_deadline):
            self.expect_reply = False
            self.pipe.send(("expected", sum(1 for d in self.done_ns if d)))

    def _report(self, expected: list[int] | None, detail: bool = False) -> dict:
        missing = [max(0, e - u) for e, u in zip(expected, self.uniq, strict=True)] if expected else None
        dups = [g - u for g, u in zip(self.got, self.uniq, strict=True)]
        return {
            "names": self.names,
            "got": self.got,
            "uniq": self.uniq,
            "missing": missing,
            "duplicated": dups,
            "disorder": self.disorder,
            "resyncs": self.resyncs,
            "connects": self.connects,
            "recovered_ns": self.recovered_ns,
            "done_ns": self.done_ns,
            "answers": dict(self.answers),
            "reasons": dict(self.reasons),
            "ended": dict(self.ended),
            "packets": dict(self.packets),
            "open": sum(1 for s in self.st if s == _OPEN),
            "arrivals": self.arrivals if detail else None,
        }

    def run(self) -> None:
        pipe_fd = self.pipe.fileno()
        tab_of, st = self.tab_of, self.st
        try:
            while True:
                now = time.monotonic()
                self._pump(now)
                timeout = 0.05
                if self.timers:
                    timeout = max(0.0, min(timeout, self.timers[0][0] - now))
                events = self.ep.poll(timeout, 4096)
                now_ns = time.monotonic_ns()
                command = False
                for fd, ev in events:
                    if fd == pipe_fd:
                        command = True
                        continue
                    k = tab_of.get(fd)
                    if k is None:
                        continue
                    if st[k] == _CONNECTING:
                        if ev & select.EPOLLOUT and not ev & (select.EPOLLERR | select.EPOLLHUP):
                            self._writable(fd, k)
                        else:
                            self._failed(k, "connect refused")
                    else:
                        self._readable(fd, k, now_ns)
                if command:
                    try:
                        msg = self.pipe.recv()
                    except (EOFError, OSError):
                        return
                    if not self._cmd(msg):
                        return
                self._expire(now_ns)
                self._check_waits()
        finally:
            for fd in list(tab_of):
                os.close(fd)

    def _expire(self, now_ns: int) -> None:
        """Handshakes that took too long are given up (and tried again)."""
        if not self.inflight:
            return
        limit = now_ns - int(HANDSHAKE_TIMEOUT_S * 1e9)
        for _fd, k in list(self.tab_of.items()):
            if self.st[k] in (_CONNECTING, _HANDSHAKE, _SUBSCRIBING) and self.started[k] < limit:
                self._failed(k, "handshake timeout")


def _main(pipe, *args) -> None:
    try:
        _Process(pipe, *args).run()
    except KeyboardInterrupt:
        pass


class TabsError(Exception):
    """A client process did not answer, or died."""


class Tabs:
    """The parent side: ``tabs`` tabs over ``procs`` processes.

    Args:
      targets: (host, port) addresses; a tab starts on one (``spread``:
        tab k on address k mod len, else all on the first) and moves to the
        next after each connection that ends.
      secret: the HS256 secret of the server's tokens.
      prefix: subscriber ids are ``PREFIX<process>-<k>``.
      source_base: processes bind 127.0.(source_base+p+1).x.

    Resource handling: a context manager; ``stop()`` ends the processes
    (terminate after a grace period), which close their sockets.
    """

    def __init__(
        self,
        tabs: int,
        procs: int,
        targets: list[tuple[str, int]],
        secret: str,
        *,
        spread: bool = False,
        path: str = "/v1/ws",
        prefix: str = "r",
        source_base: int = 40,
    ):
        if -(-tabs // procs) > MAX_SOCKETS_PER_PROC:
            raise TabsError(f"{tabs} tabs need more than {procs} processes")
        ctx = multiprocessing.get_context("fork")
        self.counts = [tabs // procs + (1 if p < tabs % procs else 0) for p in range(procs)]
        self.names = [f"{prefix}{p}-{k}" for p, c in enumerate(self.counts) for k in range(c)]
        self.pipes, self.procs = [], []
        self._kept: list[dict[str, list]] = [{} for _ in self.counts]
        for p, count in enumerate(self.counts):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_main,
                name=f"tabs-{p}",
                daemon=True,
                args=(child, p, count, list(targets), spread, path, secret, prefix, source_base),
            )
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _send(self, msgs: list) -> None:
        for pipe, msg in zip(self.pipes, msgs, strict=True):
            pipe.send(msg)

    def _gather(self, tag: str, timeout: float) -> list:
        """Each process's next reply tagged ``tag`` (replies with other tags
        that come first are kept for their own gather)."""
        deadline = time.monotonic() + timeout
        out: list = [None] * len(self.pipes)
        waiting = set()
        for i in range(len(self.pipes)):
            kept = self._kept[i].get(tag)
            if kept:
                out[i] = kept.pop(0)
            else:
                waiting.add(i)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TabsError(f"client processes {sorted(waiting)} did not answer {tag!r} in {timeout:.0f} s")
            for r in multiprocessing.connection.wait([self.pipes[i] for i in waiting], left):
                i = self.pipes.index(r)
                try:
                    got, payload = r.recv()
                except EOFError:
                    raise TabsError(f"client process {i} died") from None
                if got == tag:
                    out[i] = payload
                    waiting.discard(i)
                else:
                    self._kept[i].setdefault(got, []).append(payload)
        return out

    def _all(self, msgs: list, tag: str, timeout: float) -> list:
        self._send(msgs)
        return self._gather(tag, timeout)

    def _split(self, per_tab: list[int]) -> list[list[int]]:
        out, at = [], 0
        for c in self.counts:
            out.append(per_tab[at : at + c])
            at += c
        return out

    def open(self, timeout: float = 120.0) -> dict:
        """Every tab connects and subscribes fresh; waits until all are."""
        replies = self._all([("open", timeout)] * len(self.pipes), "opened", timeout + 30)
        ended: Counter[str] = Counter()
        for r in replies:
            ended.update(r["ended"])
        return {"ok": sum(r["ok"] for r in replies), "failed": sum(r["failed"] for r in replies), "ended": dict(ended)}

    def auto(self, on: bool) -> None:
        self._all([("auto", on)] * len(self.pipes), "ok", 10)

    def go(self) -> None:
        """Every tab that waits (see ``auto``) connects now."""
        self._all([("go",)] * len(self.pipes), "ok", 10)

    def state(self) -> dict:
        replies = self._all([("state",)] * len(self.pipes), "state", 10)
        return {"open": sum(r["open"] for r in replies), "waiting": sum(r["waiting"] for r in replies)}

    def expect(self, per_tab: list[int], timeout: float, meanwhile=None) -> int:
        """Wait until every tab has ``per_tab[i]`` distinct events (tabs in
        ``names`` order), calling ``meanwhile()`` first (each tab's time to
        get there is timed from when this was asked: see ``report``);
        returns how many tabs have them."""
        self._send([("expect", part, timeout) for part in self._split(per_tab)])
        if meanwhile is not None:
            meanwhile()
        return sum(self._gather("expected", timeout + 30))

    def report(self, per_tab: list[int] | None = None, detail: bool = False) -> dict:
        """Every tab's counts (lists in ``names`` order) and the totals;
        ``detail``: also ``arrivals``, each tab's (q, monotonic ns) of every
        distinct q, in the order they came."""
        parts = self._split(per_tab) if per_tab is not None else [None] * len(self.pipes)
        replies = self._all([("report", part, detail) for part in parts], "report", 60)
        out: dict = {}
        for key in (
            "names",
            "got",
            "uniq",
            "missing",
            "duplicated",
            "disorder",
            "resyncs",
            "connects",
            "recovered_ns",
            "done_ns",
            "arrivals",
        ):
            out[key] = [v for r in replies for v in (r[key] or [])]
        for key in ("answers", "reasons", "ended", "packets"):
            total: Counter[str] = Counter()
            for r in replies:
                total.update(r[key])
            out[key] = dict(total)
        out["open"] = sum(r["open"] for r in replies)
        return out

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("exit",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()
        self.pipes, self.procs = [], []
