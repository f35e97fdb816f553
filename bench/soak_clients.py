"""The soak's client processes: loadgen workers that count events per
subscriber, close connections the ways real tabs do, and a process of
malformed clients.

:class:`SoakLoadGen` is a :class:`loadgen.LoadGen` whose workers
(:class:`_SoakWorker`, a :class:`loadgen._Worker`) also

- read the ``"seq":N`` every soak event carries in its data and keep, per
  subscriber, how many events arrived, the last ``seq`` and how many came
  out of order (a duplicate or a reordering), and count events naming a
  subscriber other than the connection's own (the token's ``sub`` is the
  only one a connection may ever receive);
- close their oldest open connections on command (``churn_close``), in
  turn: a clean close (Close 1000 sent, the server's Close awaited), a FIN
  without a Close frame, and an RST (``SO_LINGER`` 0), recording how the
  server answered the clean ones;
- optionally draw subscriber ids from a pool (``name_pool``), so churning
  tabs are the same few hundred users reconnecting, not an ever-growing
  set of ids.

Everything else (connect, upgrade, subscribe, pongs, Close handling, the
pipe protocol, socket bookkeeping) is loadgen's, unchanged.

:class:`Malformed` runs one process that opens a few bad clients a second
(:data:`MALFORMED_KINDS`, each with the answer RFC 6455 and mailpush's
README say it must get) on a small thread pool, and counts per kind how
many got the expected answer, with the first few surprises verbatim.

Resource handling: as loadgen's; every socket a worker opens is closed by
``close_all`` or on exit; the malformed process closes every socket it
opens before its probe returns (each bounded by a timeout), and exits on
``stop()`` or when its pipe closes.
"""

from __future__ import annotations

import array
import multiprocessing
import multiprocessing.connection
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from loadgen import WS_KEY, LoadGen, LoadGenError, _client_frame, _Worker

from mailpush.auth import mint

# -- the counting workers ---------------------------------------------------

# The soak's events carry {"seq": N} in their data (see soak.py); the frame
# also names its subscriber (the external contract's event packet).
_SEQ_RE = re.compile(rb'"seq":(\d+)')
_SUB_RE = re.compile(rb'"subscriber":"([^"]*)"')

# How churned connections are closed, in turn: what tabs do (a page closed
# cleanly, a laptop lid shut, a process killed or a NAT entry dropped).
CLOSE_MODES = ("clean", "fin", "rst")

# How long a clean close waits for the server's Close answer before it is
# counted as unanswered and the socket is dropped; the server's own close
# timeout is 5 s (timers.CLOSE_TIMEOUT), its answer normally takes a ms.
CLEAN_CLOSE_WAIT_S = 5.0

_CLOSE_1000 = _client_frame(0x8, b"\x03\xe8")
_LINGER_RST = struct.pack("ii", 1, 0)
_OPEN = 3  # loadgen's _OPEN connection state


class _SoakWorker(_Worker):
    """A loadgen worker that also counts events per subscriber (see the module docstring)."""

    def __init__(self, pipe, index, host, port, path, secret, subscribe, prefix, sub, sockopts, stall,
                 source_base, name_pool):
        super().__init__(pipe, index, host, port, path, secret, subscribe, prefix, sub, sockopts, stall,
                         source_base)
        self.name_pool = name_pool
        self.seen: dict[str, list[int]] = {}    # subscriber -> [events, last seq, out of order]
        self.foreign = 0                        # events naming another subscriber
        self.closing: dict[int, float] = {}     # fd -> deadline of our clean close
        self.close_outcomes: Counter[str] = Counter()
        self.closed_by_mode: Counter[str] = Counter()
        self.close_turn = 0

    def _name(self, sub: int) -> str:
        return super()._name(sub % self.name_pool if self.name_pool else sub)

    # -- counting -----------------------------------------------------------

    def _frames(self, fd: int, st: int, data: bytes, now: int):
        """Count the soak events among the complete frames of ``data``, then
        let loadgen handle them; a Close answering our own clean close ends
        the connection here (loadgen would answer it with a second Close)."""
        i, n = 0, len(data)
        name = None
        while n - i >= 2:
            b1 = data[i + 1]
            ln, h = b1 & 0x7F, 2
            if ln == 126:
                if n - i < 4:
                    break
                ln, h = int.from_bytes(data[i + 2:i + 4], "big"), 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln, h = int.from_bytes(data[i + 2:i + 10], "big"), 10
            if b1 & 0x80:
                h += 4
            end = i + h + ln
            if end > n:
                break
            op = data[i] & 0x0F
            if op == 0x1:
                m = _SEQ_RE.search(data, i + h, end)
                if m is not None:
                    if name is None:
                        name = self._name(self.sub_of[fd])
                    s = _SUB_RE.search(data, i + h, end)
                    if s is None or s.group(1).decode() != name:
                        self.foreign += 1
                    self._count(name, int(m.group(1)))
            elif op == 0x8:
                if fd in self.closing:
                    if i:
                        super()._frames(fd, st, data[:i], now)
                    code = int.from_bytes(data[i + h:i + h + 2], "big") if ln >= 2 else 1005
                    self.close_outcomes[f"clean: server answered Close {code}"] += 1
                    self._drop(fd)
                    return
                break
            i = end
        super()._frames(fd, st, data, now)

    def _count(self, name: str, seq: int):
        rec = self.seen.get(name)
        if rec is None:
            self.seen[name] = [1, seq, 0]
            return
        rec[0] += 1
        if seq <= rec[1]:
            rec[2] += 1  # a duplicate, or an older event after a newer one
        else:
            rec[1] = seq

    # -- closing --------------------------------------------------------------

    def _lost(self, fd: int, st: int, reason: str):
        if fd in self.closing:
            self.close_outcomes[f"clean: {reason} without a Close"] += 1
            self._drop(fd)
            return
        super()._lost(fd, st, reason)

    def _drop(self, fd: int):
        self.closing.pop(fd, None)
        super()._drop(fd)

    def churn_close(self, names: list[str]) -> dict:
        """Close the open connections of these subscribers, each the next
        way of :data:`CLOSE_MODES`; clean closes that waited too long for
        the server's answer are dropped and counted."""
        now = time.monotonic()
        for fd in [fd for fd, deadline in self.closing.items() if deadline <= now]:
            self.close_outcomes["clean: no answer in time"] += 1
            self._drop(fd)
        wanted = set(names)
        victims = [fd for fd, st in self.state.items()
                   if st == _OPEN and fd not in self.closing and self._name(self.sub_of[fd]) in wanted]
        for fd in victims:
            mode = CLOSE_MODES[self.close_turn % len(CLOSE_MODES)]
            self.close_turn += 1
            self.closed_by_mode[mode] += 1
            if mode == "clean":
                try:
                    os.write(fd, _CLOSE_1000)
                except OSError:
                    self.close_outcomes["clean: write failed"] += 1
                    self._drop(fd)
                    continue
                self.closing[fd] = now + CLEAN_CLOSE_WAIT_S
            else:
                if mode == "rst":
                    s = socket.socket(fileno=fd)
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    finally:
                        s.detach()
                self._drop(fd)
        return {"closed": len(victims), "missing": len(wanted) - len(victims), "closing": len(self.closing)}

    def cmd(self, msg) -> bool:
        op = msg[0]
        if op == "churn_close":
            self.pipe.send(("churn_closed", self.churn_close(msg[1])))
        elif op == "seqs":
            self.pipe.send(("seqs", {"seen": self.seen, "foreign": self.foreign,
                                     "close_outcomes": dict(self.close_outcomes),
                                     "closed_by_mode": dict(self.closed_by_mode)}))
        else:
            return super().cmd(msg)
        return True


def _soak_worker_main(pipe, *args):
    try:
        _SoakWorker(pipe, *args).run()
    except KeyboardInterrupt:
        pass


class SoakLoadGen(LoadGen):
    """A :class:`loadgen.LoadGen` of :class:`_SoakWorker` processes.

    Args (besides LoadGen's): ``name_pool``: subscriber ids are
    ``PREFIX<worker>-<n % name_pool>`` (0: every connection its own id).
    """

    def __init__(self, host: str, port: int, path: str, secret: str, procs: int, prefix: str,
                 source_base: int = 0, name_pool: int = 0):
        # LoadGen.__init__ with this module's worker as the target.
        ctx = multiprocessing.get_context("fork")
        self.prefix = prefix
        self.pipes, self.procs = [], []
        self.open_per_worker = [0] * procs
        self.subscribers: list[str] = []
        self.last_setup_ns = array.array("q")
        self.last_fail_ns: dict[str, array.array] = {}
        for w in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_soak_worker_main, name=f"soak-{prefix}{w}", daemon=True,
                            args=(child, w, host, port, path, secret, True, prefix, None, (), False,
                                  source_base, name_pool))
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def churn_close(self, names: list[str]) -> dict:
        """Close these subscribers' connections (ids name their worker:
        ``PREFIX<worker>-<n>``); clean closes are answered asynchronously."""
        for w, p in enumerate(self.pipes):
            p.send(("churn_close", [n for n in names if n.startswith(f"{self.prefix}{w}-")]))
        replies = [r[1] for r in self._gather(30)]
        return {k: sum(r[k] for r in replies) for k in ("closed", "missing", "closing")}

    def seqs(self) -> dict:
        """Per subscriber (events, last seq, out of order), merged over workers."""
        seen: dict[str, list[int]] = {}
        foreign = 0
        outcomes: Counter[str] = Counter()
        modes: Counter[str] = Counter()
        for _, r in self._all(("seqs",), 60):
            seen.update(r["seen"])  # subscriber ids carry their worker's index: disjoint
            foreign += r["foreign"]
            outcomes.update(r["close_outcomes"])
            modes.update(r["closed_by_mode"])
        return {"seen": seen, "foreign": foreign, "close_outcomes": dict(outcomes), "closed_by_mode": dict(modes)}


# -- malformed clients --------------------------------------------------------

# Each kind of bad client, and the answer it must get (README, "Protocol
# errors"): an HTTP status for bad upgrades, a Close code after the
# upgrade, an error packet (the connection stays open) for a bad packet.
MALFORMED_KINDS = {
    "garbage": "400 (binary junk ending in a blank line)",
    "bad_header": "400 (a header line without a colon)",
    "unmasked": "Close 1002 (an unmasked client frame)",
    "bad_opcode": "Close 1002 (reserved opcode 0x3)",
    "oversized": "Close 1009 (a frame announcing 1 MiB, over --max-message-size)",
    "bad_json": "error packet bad_json, then a clean close",
    "half_upgrade": "408 at the handshake deadline (half an upgrade request, then nothing)",
    "silent": "408 at the handshake deadline (connects, sends nothing)",
}

# Probes in flight at once: the stalling kinds each wait a handshake
# timeout (5 s), so at a few a second about ten are waiting; 32 threads
# leave room for a slow server without queueing the probes' own start.
MALFORMED_THREADS = 32
# Slack on top of the handshake timeout for a stalled probe's 408 (the
# server sweeps deadlines every 50 ms, timers.HANDSHAKE_SWEEP_TICK), and
# for every other probe's answer.
ANSWER_SLACK_S = 1.0
# A 408 earlier than the deadline minus this is a wrong answer too.
EARLY_408_S = 0.1
# Surprises kept verbatim per kind, for the report.
KEEP_SURPRISES = 3
# Malformed clients bind to source addresses 127.0.MALFORMED_NET.x, apart
# from the loadgen workers' (127.0.1.x and up).
MALFORMED_NET = 200
MALFORMED_SOURCES = 4


def _upgrade_request(token: str) -> bytes:
    return (f"GET /v1/ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def _frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the complete unmasked server frames in ``data``."""
    out, i = [], 0
    while len(data) - i >= 2:
        ln, h = data[i + 1] & 0x7F, 2
        if ln == 126:
            ln, h = int.from_bytes(data[i + 2:i + 4], "big"), 4
        elif ln == 127:
            ln, h = int.from_bytes(data[i + 2:i + 10], "big"), 10
        if i + h + ln > len(data):
            break
        out.append((data[i] & 0x0F, data[i + h:i + h + ln]))
        i += h + ln
    return out


class _Probe:
    def __init__(self, host: str, port: int, secret: str, handshake_timeout: float):
        self.host, self.port, self.secret = host, port, secret
        self.handshake_timeout = handshake_timeout
        self.n = 0

    def run(self, kind: str, source: str) -> tuple[bool, str]:
        """One bad client of ``kind``: (got the expected answer, what it got)."""
        self.n += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((source, 0))
            s.settimeout(self.handshake_timeout + ANSWER_SLACK_S)
            s.connect((self.host, self.port))
            return getattr(self, f"_{kind}")(s)
        except OSError as e:
            return False, f"{type(e).__name__}: {e}"
        finally:
            s.close()

    @staticmethod
    def _read_all(s: socket.socket, stop: bytes | None = None) -> bytes:
        """Read until EOF (or until ``stop`` appears); a timeout raises."""
        out = b""
        while stop is None or stop not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out

    def _status(self, s: socket.socket, status: bytes) -> tuple[bool, str]:
        got = self._read_all(s)
        return got.startswith(b"HTTP/1.1 " + status), got[:120].decode("latin-1")

    def _garbage(self, s):
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n")
        return self._status(s, b"400")

    def _bad_header(self, s):
        s.sendall(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade websocket\r\n\r\n")
        return self._status(s, b"400")

    def _stalled(self, s, first: bytes):
        t0 = time.monotonic()
        if first:
            s.sendall(first)
        ok, got = self._status(s, b"408")
        took = time.monotonic() - t0
        if ok and not (self.handshake_timeout - EARLY_408_S <= took <= self.handshake_timeout + ANSWER_SLACK_S):
            return False, f"408 after {took:.2f} s (deadline {self.handshake_timeout:g} s)"
        return ok, got if not ok else f"408 after {took:.2f} s"

    def _half_upgrade(self, s):
        req = _upgrade_request(mint(self.secret, f"malformed-{self.n}", 3600))
        return self._stalled(s, req[: len(req) // 2])

    def _silent(self, s):
        return self._stalled(s, b"")

    def _upgraded(self, s, then: bytes, code: int) -> tuple[bool, str]:
        s.sendall(_upgrade_request(mint(self.secret, f"malformed-{self.n}", 3600)))
        head = self._read_all(s, b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            return False, f"no 101: {head[:80]!r}"
        rest = head.split(b"\r\n\r\n", 1)[1]
        s.sendall(then)
        frames = _frames_of(rest + self._read_all(s))
        closes = [int.from_bytes(p[:2], "big") for op, p in frames if op == 0x8]
        return closes == [code], f"closes {closes}, frames {[(op, p[:60]) for op, p in frames]}"

    def _unmasked(self, s):
        return self._upgraded(s, bytes([0x81, 5]) + b"hello", 1002)

    def _bad_opcode(self, s):
        return self._upgraded(s, _client_frame(0x3, b""), 1002)

    def _oversized(self, s):
        head = bytes([0x81, 0x80 | 127]) + (1 << 20).to_bytes(8, "big") + b"\0\0\0\0"
        return self._upgraded(s, head + b"x" * 1024, 1009)

    def _bad_json(self, s):
        s.sendall(_upgrade_request(mint(self.secret, f"malformed-{self.n}", 3600)))
        got = self._read_all(s, b"\r\n\r\n")
        if not got.startswith(b"HTTP/1.1 101"):
            return False, f"no 101: {got[:80]!r}"
        s.sendall(_client_frame(0x1, b'{"type":"subscribe",'))
        while b'"type":"error"' not in got:
            chunk = s.recv(65536)
            if not chunk:
                return False, f"closed before the error packet: {got[-120:]!r}"
            got += chunk
        if b'"code":"bad_json"' not in got:
            return False, f"error packet without bad_json: {got[-160:]!r}"
        s.sendall(_CLOSE_1000)
        frames = _frames_of(got.split(b"\r\n\r\n", 1)[1] + self._read_all(s))
        closes = [int.from_bytes(p[:2], "big") for op, p in frames if op == 0x8]
        return closes == [1000], f"closes after the error packet {closes}"


def _malformed_main(pipe, host, port, secret, per_s, handshake_timeout):
    probe = _Probe(host, port, secret, handshake_timeout)
    kinds = list(MALFORMED_KINDS)
    sources = [f"127.0.{MALFORMED_NET}.{k + 1}" for k in range(MALFORMED_SOURCES)]
    stats = {k: {"sent": 0, "expected": 0, "surprises": []} for k in kinds}
    lock = threading.Lock()
    pool = ThreadPoolExecutor(MALFORMED_THREADS)
    pending = set()

    def one(kind, source):
        ok, what = probe.run(kind, source)
        with lock:
            st = stats[kind]
            if ok:
                st["expected"] += 1
            elif len(st["surprises"]) < KEEP_SURPRISES:
                st["surprises"].append(what)

    def snapshot(done: bool):
        with lock:
            return {"kinds": {k: dict(v, surprises=list(v["surprises"])) for k, v in stats.items()},
                    "in_flight": sum(1 for f in pending if not f.done()), "done": done}

    period = 1.0 / per_s if per_s > 0 else None
    running = False
    turn = 0
    next_at = time.monotonic()
    try:
        while True:
            timeout = max(0.0, next_at - time.monotonic()) if running and period else None
            if pipe.poll(timeout):
                try:
                    msg = pipe.recv()
                except (EOFError, OSError):
                    return
                if msg[0] == "start":
                    running, next_at = True, time.monotonic()
                    pipe.send(("started",))
                elif msg[0] == "stats":
                    pipe.send(("stats", snapshot(False)))
                elif msg[0] == "stop":  # no new probes; wait for those in flight
                    running = False
                    deadline = time.monotonic() + msg[1]
                    for f in list(pending):
                        try:
                            f.result(max(0.0, deadline - time.monotonic()))
                        except Exception:  # noqa: BLE001 - counted by the snapshot's in_flight
                            pass
                    pipe.send(("stats", snapshot(True)))
                elif msg[0] == "exit":
                    return
                continue
            if running and time.monotonic() >= next_at:
                kind = kinds[turn % len(kinds)]
                with lock:
                    stats[kind]["sent"] += 1
                f = pool.submit(one, kind, sources[turn % len(sources)])
                pending.add(f)
                f.add_done_callback(pending.discard)
                turn += 1
                next_at += period
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class Malformed:
    """The malformed clients' process: ``start()``, ``stats()``, ``stop()``.

    Args:
      per_s: bad clients started per second, the kinds of MALFORMED_KINDS in turn.
      handshake_timeout: the server's ``--handshake-timeout`` (when a 408 is due).
    """

    def __init__(self, host: str, port: int, secret: str, per_s: float, handshake_timeout: float):
        ctx = multiprocessing.get_context("fork")
        self.pipe, child = ctx.Pipe()
        self.handshake_timeout = handshake_timeout
        self.proc = ctx.Process(target=_malformed_main, name="soak-malformed", daemon=True,
                                args=(child, host, port, secret, per_s, handshake_timeout))
        self.proc.start()
        child.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _ask(self, msg, timeout: float):
        self.pipe.send(msg)
        if not self.pipe.poll(timeout):
            raise LoadGenError(f"the malformed clients did not answer {msg[0]!r} in {timeout:.0f} s")
        try:
            return self.pipe.recv()
        except EOFError:
            raise LoadGenError("the malformed clients' process died") from None

    def start(self):
        self._ask(("start",), 10)

    def stats(self) -> dict:
        return self._ask(("stats",), 10)[1]

    def stop(self) -> dict:
        """Start no more; wait for those in flight (each bounded by its timeout)."""
        wait = self.handshake_timeout + ANSWER_SLACK_S + 2
        return self._ask(("stop", wait), wait + 10)[1]

    def close(self):
        try:
            self.pipe.send(("exit",))
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.pipe.close()

