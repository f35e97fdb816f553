"""Load generator: many WebSocket client connections for almost nothing.

Each client process is one ``select.epoll`` loop over raw non-blocking
sockets. A connection is a file descriptor and an int in a dict (its state);
there is no task, no coroutine and no library object per socket, and the
socket object itself is detached right after ``connect()`` so only the bare
fd stays. A partial frame is kept in a side dict only while it is partial.
That keeps the client far cheaper than any server it measures, so the
numbers are the server's.

The parent drives N such processes (:class:`LoadGen`) over pipes. Each
process binds its sockets to its own 127.0.0.x source addresses with
``IP_BIND_ADDRESS_NO_PORT`` (the port is picked at ``connect()`` time, per
destination, so the ephemeral range is per 4-tuple, not per source address)
and never holds more than :data:`MAX_SOCKETS_PER_PROC` sockets, well under
the 20,000 open files one process may have here.

What a client does, per connection: connect, send the upgrade request
(``GET PATH?token=JWT``, the token minted here with PyJWT for the
connection's own subscriber id), wait for ``101``, optionally send the masked
text frame ``{"type":"subscribe"}`` and wait for the first text frame back
(the ``subscribed`` answer); then it is *open*. Open connections count every
complete data message they receive; answer pings with pongs (servers with a
keepalive close silent clients); answer a close frame and drop the socket.
In latency mode they also parse ``"t":NANOSECONDS`` out of each message and
record ``time.monotonic_ns() - t``; CLOCK_MONOTONIC is system-wide on Linux,
so a publisher in another process can stamp it.

Options for the resource-control scenarios: every token can carry the same
``sub`` (one subscriber with N tabs: the broadcast path); socket options set
before ``connect()`` (a small ``SO_RCVBUF``, an Ethernet-sized
``TCP_MAXSEG``); ``stall``: once open, a connection is never read again (a
client that stopped reading); per-connection outcome times of failed
opens (503, reset, timeout); a ``burst`` command that writes one packet on
every open socket in one loop; per-connection receive tracking; and a
record of every Close frame (time, code, reason) for the drain scenario.

Run standalone for a quick look::

    python bench/loadgen.py --url ws://127.0.0.1:8080/v1/ws --secret S -n 2000

Resource handling: every socket a worker opens is closed by ``close_all``
or when the worker exits; workers exit when their pipe closes (the parent
died) or on ``stop()``; every wait in parent and worker has a deadline.
"""

from __future__ import annotations

import argparse
import array
import errno
import multiprocessing
import multiprocessing.connection
import os
import re
import select
import socket
import sys
import time
from typing import Any

import jwt

# The hard per-process limit here is 20,000 open files and cannot be raised;
# a worker stays at 18,000 sockets so its pipe, epoll fd, stdio and the
# interpreter's own files always fit.
MAX_SOCKETS_PER_PROC = 18_000

# One read drains everything queued on a socket: far more than a burst of
# small events, and a single allocation per readable socket.
RECV_SIZE = 65_536

# Handshakes in flight per worker while opening. Enough to keep a fast
# server busy (2 workers x 256 = 512 outstanding), few enough that the
# accept queue (backlog 4,096 on every server here) never overflows, which
# would turn into dropped SYNs and 1-second retransmits, i.e. measure the
# kernel's retry timer instead of the server.
DEFAULT_WINDOW = 256

# Connects started per turn of the event loop: between turns the worker
# reads what has arrived, so a client's time to its answer is not inflated
# by thousands of other connects started after it (an avalanche starts all
# of them "at once", i.e. as fast as this loop goes).
PUMP_CHUNK = 64

# Each worker spreads its sockets over this many source addresses
# (127.0.W.1 .. 127.0.W.4 for worker W, all on the loopback /8), so even
# without IP_BIND_ADDRESS_NO_PORT no address needs more than ~4,500 ports.
SOURCE_ADDRS_PER_PROC = 4

# A fixed Sec-WebSocket-Key (RFC 6455 §1.3 example) and its accept value:
# servers don't care that every client uses the same nonce, and checking the
# answer is then a bytes search.
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

# Client frames must be masked (RFC 6455 §5.3); an all-zero masking key is a
# valid key and makes masking a no-op, so frames can be prebuilt.
_ZERO_MASK = b"\x00\x00\x00\x00"
SUBSCRIBE_MSG = b'{"type":"subscribe"}'
SUBSCRIBE_FRAME = bytes([0x81, 0x80 | len(SUBSCRIBE_MSG)]) + _ZERO_MASK + SUBSCRIBE_MSG
# The application-level ping browsers send (they cannot send WebSocket pings).
PING_MSG = b'{"type":"ping"}'
PING_PACKET_FRAME = bytes([0x81, 0x80 | len(PING_MSG)]) + _ZERO_MASK + PING_MSG

# Stalled sockets (``stall``) are read once more at the end to see how the
# server left them; each read takes at most this much.
PROBE_RECV = 1 << 20

# Token lifetime: longer than any bench run.
TOKEN_TTL_S = 3600

# Linux socket option (include/uapi/linux/in.h); Python 3.11 lacks the name.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# Connection states (the only per-socket data besides a partial frame).
# _STALLED: open, but never read again (unregistered from epoll).
_CONNECTING, _HANDSHAKE, _SUBSCRIBING, _OPEN, _STALLED = range(5)

_T_RE = re.compile(rb'"t":(\d+)')


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked (zero key) client frame; control payloads are < 126 bytes."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + _ZERO_MASK + payload


_CLOSE_REPLY = _client_frame(0x8, b"\x03\xe8")  # 1000 normal closure


class _Worker:
    """One client process: an epoll loop and a few dicts keyed by fd."""

    def __init__(self, pipe, index: int, host: str, port: int, path: str,
                 secret: str, subscribe: bool, prefix: str, sub: str | None = None,
                 sockopts: tuple = (), stall: bool = False, source_base: int = 0):
        self.pipe = pipe
        self.index = index
        self.dst = (host, port)
        self.host_header = f"{host}:{port}"
        self.path = path
        self.secret = secret
        self.subscribe = subscribe
        self.prefix = prefix
        self.fixed_sub = sub          # every token for this subscriber, if set
        self.sockopts = sockopts      # (level, option, value) set before connect
        self.stall = stall            # open connections are never read again
        self._fixed_token = None
        net = source_base + index + 1
        self.sources = [f"127.0.{net}.{k + 1}" for k in range(SOURCE_ADDRS_PER_PROC)]
        self.ep = select.epoll()
        self.ep.register(pipe.fileno(), select.EPOLLIN)
        self.state: dict[int, int] = {}      # fd -> state
        self.partial: dict[int, bytes] = {}  # fd -> unparsed bytes (rare)
        self.sub_of: dict[int, int] = {}     # fd -> subscriber number
        self.started_ns: dict[int, int] = {} # fd -> connect time, until open
        self.next_sub = 0
        # opening
        self.to_start: list[bytes] = []      # prebuilt requests still to connect
        self.inflight = 0
        self.window = DEFAULT_WINDOW
        self.open_deadline = 0.0
        self.opening = False
        self.batch: dict[str, Any] = {}
        # counters
        self.frames = 0          # data messages since the last arm
        self.first_ns = 0
        self.last_ns = 0
        self.total_frames = 0
        self.last_frame_len = 0
        self.pings = 0
        self.server_closed = 0
        self.close_codes: dict[int, int] = {}
        self.closes: list[tuple[int, int, bytes]] = []  # (time ns, code, reason) per Close frame
        self.errors: dict[str, int] = {}
        self.track: dict[int, int] | None = None  # fd -> messages since arm, when tracking
        # waiting for frames
        self.wait_target = -1
        self.wait_deadline = 0.0
        # latency
        self.lat_on = False
        self.lat_min_t = 0
        self.lat = array.array("q")

    # -- opening -------------------------------------------------------------

    def _name(self, sub: int) -> str:
        return self.fixed_sub if self.fixed_sub is not None else f"{self.prefix}{self.index}-{sub}"

    def _request(self, sub: int) -> bytes:
        name = self._name(sub)
        if self.fixed_sub is not None and self._fixed_token is not None:
            token = self._fixed_token
        else:
            token = jwt.encode({"sub": name, "exp": int(time.time()) + TOKEN_TTL_S},
                               self.secret, algorithm="HS256")
            if self.fixed_sub is not None:
                self._fixed_token = token
        return (f"GET {self.path}?token={token} HTTP/1.1\r\n"
                f"Host: {self.host_header}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {WS_KEY}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode()

    def cmd_open(self, count: int, window: int, timeout: float):
        if len(self.state) + count > MAX_SOCKETS_PER_PROC:
            self.pipe.send(("error", f"worker {self.index}: {len(self.state)}+{count} sockets "
                                     f"would exceed {MAX_SOCKETS_PER_PROC}"))
            return
        # Tokens and request bytes are made before the clock starts.
        first = self.next_sub
        self.next_sub += count
        self.to_start = [self._request(s) for s in range(first + count - 1, first - 1, -1)]
        self.window = window
        self.inflight = 0
        self.opening = True
        self.batch = {"ok": 0, "failed": 0, "errors": {}, "setup_ns": array.array("q"),
                      "fail_ns": {}, "subs": [], "t0": time.monotonic_ns(), "t1": 0, "started": 0, "count": count}
        self.open_deadline = time.monotonic() + timeout
        self._pump()

    def _pump(self):
        for _ in range(PUMP_CHUNK):
            if not self.to_start or self.inflight >= self.window:
                break
            req = self.to_start.pop()
            sub = self.next_sub - len(self.to_start) - 1
            self._connect(sub, req)
        if not self.to_start and not self.batch["started"]:
            self.batch["started"] = time.monotonic_ns()  # the last connect began

    def _connect(self, sub: int, req: bytes):
        now = time.monotonic_ns()
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self._batch_fail(f"socket: {errno.errorcode.get(e.errno, e.errno)}")
            return
        try:
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            for level, opt, value in self.sockopts:
                s.setsockopt(level, opt, value)
            s.bind((self.sources[sub % SOURCE_ADDRS_PER_PROC], 0))
            err = s.connect_ex(self.dst)
        except OSError as e:
            s.close()
            self._batch_fail(f"connect: {errno.errorcode.get(e.errno, e.errno)}")
            return
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self._batch_fail(f"connect: {errno.errorcode.get(err, err)}")
            return
        fd = s.detach()
        self.state[fd] = _CONNECTING
        self.sub_of[fd] = sub
        self.started_ns[fd] = now
        self.partial[fd] = req  # the request waits here until writable
        self.inflight += 1
        self.ep.register(fd, select.EPOLLOUT)

    def _batch_fail(self, reason: str, took_ns: int = 0):
        b = self.batch
        b["failed"] += 1
        b["errors"][reason] = b["errors"].get(reason, 0) + 1
        self.errors[reason] = self.errors.get(reason, 0) + 1
        times = b["fail_ns"].get(reason)
        if times is None:
            times = b["fail_ns"][reason] = array.array("q")
        times.append(took_ns)

    def _fail(self, fd: int, reason: str):
        """A connection died before it was open."""
        started = self.started_ns.get(fd)
        took = time.monotonic_ns() - started if started else 0
        self._drop(fd)
        self.inflight -= 1
        self._batch_fail(reason, took)

    def _drop(self, fd: int):
        st = self.state.pop(fd, None)
        self.partial.pop(fd, None)
        self.sub_of.pop(fd, None)
        self.started_ns.pop(fd, None)
        if self.track is not None:
            self.track.pop(fd, None)
        if st != _STALLED:  # a stalled socket is no longer registered
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
        os.close(fd)

    def _opened(self, fd: int, now: int):
        self.inflight -= 1
        b = self.batch
        b["ok"] += 1
        b["setup_ns"].append(now - self.started_ns.pop(fd))
        b["subs"].append(self._name(self.sub_of[fd]))
        b["t1"] = now
        if self.stall:  # a client that stopped reading: never look at it again
            self.state[fd] = _STALLED
            self.ep.unregister(fd)
        else:
            self.state[fd] = _OPEN

    def _check_open_done(self):
        b = self.batch
        done = b["ok"] + b["failed"] >= b["count"]
        if not done and time.monotonic() < self.open_deadline:
            return
        self.opening = False
        if not done:  # give up on stragglers: close and count them
            for fd in [fd for fd, st in self.state.items() if st != _OPEN]:
                self._fail(fd, "timeout")
            b["failed"] += len(self.to_start)
            if self.to_start:
                b["errors"]["not started"] = len(self.to_start)
            self.to_start = []
        b["setup_ns"] = b["setup_ns"].tobytes()
        b["fail_ns"] = {k: v.tobytes() for k, v in b["fail_ns"].items()}
        self.pipe.send(("opened", b))

    # -- I/O -----------------------------------------------------------------

    def _on_writable(self, fd: int):
        req = self.partial.pop(fd)
        try:
            os.write(fd, req)  # a few hundred bytes on a fresh socket: all of it
        except OSError as e:
            self._fail(fd, f"connect: {errno.errorcode.get(e.errno, e.errno)}")
            return
        self.state[fd] = _HANDSHAKE
        self.ep.modify(fd, select.EPOLLIN)

    def _on_readable(self, fd: int, now: int):
        st = self.state[fd]
        if self.lat_on:
            now = time.monotonic_ns()
        try:
            data = os.read(fd, RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._lost(fd, st, f"read: {errno.errorcode.get(e.errno, e.errno)}")
            return
        if not data:
            self._lost(fd, st, "eof" if st == _OPEN else "eof during handshake")
            return
        rest = self.partial.pop(fd, None)
        if rest:
            data = rest + data
        if st == _HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 16_384:
                    self._fail(fd, "response head too long")
                else:
                    self.partial[fd] = data
                return
            head = data[:end]
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.split(b"\r\n", 1)[0].decode("latin-1")[:60]
                self._fail(fd, f"status: {status}")
                return
            if WS_ACCEPT not in head:
                self._fail(fd, "bad Sec-WebSocket-Accept")
                return
            data = data[end + 4:]
            if self.subscribe:
                try:
                    os.write(fd, SUBSCRIBE_FRAME)
                except OSError as e:
                    self._fail(fd, f"subscribe: {errno.errorcode.get(e.errno, e.errno)}")
                    return
                self.state[fd] = st = _SUBSCRIBING
            else:
                self._opened(fd, now)
                st = _OPEN
                if self.stall:
                    return
            if not data:
                return
        self._frames(fd, st, data, now)

    def _lost(self, fd: int, st: int, reason: str):
        if st == _OPEN:
            self.errors[reason] = self.errors.get(reason, 0) + 1
            self._drop(fd)
        else:
            self._fail(fd, reason)

    def _frames(self, fd: int, st: int, data: bytes, now: int):
        i = 0
        n = len(data)
        count = 0
        while n - i >= 2:
            b0 = data[i]
            ln = data[i + 1] & 0x7F
            h = 2
            if ln == 126:
                if n - i < 4:
                    break
                ln = int.from_bytes(data[i + 2:i + 4], "big")
                h = 4
            elif ln == 127:
                if n - i < 10:
                    break
                ln = int.from_bytes(data[i + 2:i + 10], "big")
                h = 10
            if data[i + 1] & 0x80:  # a masked server frame: protocol error, but skip it
                h += 4
            end = i + h + ln
            if end > n:
                break
            op = b0 & 0x0F
            if op < 3:  # data frame (continuation, text, binary)
                if b0 & 0x80:
                    if st == _SUBSCRIBING:
                        if b"subscribed" not in data[i + h:end]:
                            self._fail(fd, "no subscribed answer")
                            return
                        self._opened(fd, now)
                        st = _OPEN
                        if self.stall:
                            return
                    else:
                        count += 1
                        if self.track is not None:
                            self.track[fd] = self.track.get(fd, 0) + 1
                        self.last_frame_len = end - i
                        if self.lat_on:
                            m = _T_RE.search(data, i + h, end)
                            if m:
                                t = int(m.group(1))
                                if t >= self.lat_min_t:
                                    self.lat.append(now - t)
            elif op == 0x9:  # ping -> pong, same payload
                self.pings += 1
                try:
                    os.write(fd, _client_frame(0xA, data[i + h:end]))
                except OSError:
                    pass
            elif op == 0x8:  # close -> answer and drop
                code = int.from_bytes(data[i + h:i + h + 2], "big") if ln >= 2 else 1005
                self.close_codes[code] = self.close_codes.get(code, 0) + 1
                self.server_closed += 1
                self.closes.append((now, code, bytes(data[i + h + 2:end]) if ln > 2 else b""))
                try:
                    os.write(fd, _CLOSE_REPLY)
                except OSError:
                    pass
                if st == _OPEN:
                    self._drop(fd)
                else:
                    self._fail(fd, f"closed by server ({code}) before open")
                return
            i = end
        if i < n:
            self.partial[fd] = data[i:]
        if count:
            self.frames += count
            self.total_frames += count
            if not self.first_ns:
                self.first_ns = now
            self.last_ns = now

    # -- commands --------------------------------------------------------------

    def cmd(self, msg) -> bool:
        op = msg[0]
        if op == "open":
            self.cmd_open(*msg[1:])
        elif op == "arm":
            self.frames = self.first_ns = self.last_ns = 0
            self.track = {} if len(msg) > 1 and msg[1] else None
            self.pipe.send(("armed", self.open_count()))
        elif op == "burst":
            self.cmd_burst(msg[1])
        elif op == "closes":
            closes, self.closes = self.closes, []
            self.pipe.send(("closes", closes))
        elif op == "probe_stalled":
            self.pipe.send(("probed", self.probe_stalled(msg[1])))
        elif op == "wait":
            self.wait_target = msg[1]
            self.wait_deadline = time.monotonic() + msg[2]
            self._check_wait()
        elif op == "lat_on":
            self.lat = array.array("q")
            self.lat_min_t = msg[1]
            self.lat_on = True
            self.pipe.send(("ok",))
        elif op == "lat_off":
            self.lat_on = False
            self.pipe.send(("lat", self.lat.tobytes()))
            self.lat = array.array("q")
        elif op == "stats":
            self.pipe.send(("stats", self.stats()))
        elif op == "close_all":
            for fd in list(self.state):
                self._drop(fd)
            self.to_start = []
            self.opening = False
            self.pipe.send(("closed", self.stats()))
        elif op == "exit":
            return False
        else:
            self.pipe.send(("error", f"unknown command {op!r}"))
        return True

    def cmd_burst(self, frame: bytes):
        """Write ``frame`` on every open socket in one loop (no reads between)."""
        t0 = time.monotonic_ns()
        sent = failed = 0
        for fd, st in self.state.items():
            if st != _OPEN:
                continue
            try:
                if os.write(fd, frame) == len(frame):
                    sent += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
        self.pipe.send(("burst", {"sent": sent, "failed": failed, "t0": t0,
                                  "t1": time.monotonic_ns()}))

    def probe_stalled(self, timeout: float) -> dict:
        """Read the stalled sockets to the end: how did the server leave them?

        Each is read (everything it holds, frames parsed for a Close) until
        EOF, an error or ``timeout``: "eof" (server closed the TCP connection
        without a Close frame), "close CODE" (a Close frame came), "reset",
        or "open" (still open at the deadline). Every stalled socket is
        closed afterwards."""
        fds = [fd for fd, st in self.state.items() if st == _STALLED]
        out: dict[str, int] = {}
        bytes_read = 0
        if not fds:
            return {"outcomes": out, "bytes": 0, "count": 0}
        ep = select.epoll()
        pending = {}
        for fd in fds:
            ep.register(fd, select.EPOLLIN)
            pending[fd] = b""  # unparsed tail, to find a Close frame
        code_of: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        try:
            while pending and time.monotonic() < deadline:
                for fd, _ev in ep.poll(min(0.1, max(0.0, deadline - time.monotonic())), 4096):
                    if fd not in pending:
                        continue
                    try:
                        data = os.read(fd, PROBE_RECV)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        what = "reset" if e.errno == errno.ECONNRESET else f"error {errno.errorcode.get(e.errno, e.errno)}"
                        if fd in code_of:
                            what = f"close {code_of[fd]}"
                        out[what] = out.get(what, 0) + 1
                        del pending[fd]
                        ep.unregister(fd)
                        continue
                    if not data:
                        what = f"close {code_of[fd]}" if fd in code_of else "eof"
                        out[what] = out.get(what, 0) + 1
                        del pending[fd]
                        ep.unregister(fd)
                        continue
                    bytes_read += len(data)
                    buf = pending[fd] + data
                    i = 0
                    while len(buf) - i >= 2:  # skip whole frames, remember a Close
                        ln = buf[i + 1] & 0x7F
                        h = 2
                        if ln == 126:
                            if len(buf) - i < 4:
                                break
                            ln, h = int.from_bytes(buf[i + 2:i + 4], "big"), 4
                        elif ln == 127:
                            if len(buf) - i < 10:
                                break
                            ln, h = int.from_bytes(buf[i + 2:i + 10], "big"), 10
                        if i + h + ln > len(buf):
                            break
                        if buf[i] & 0x0F == 0x8 and fd not in code_of:
                            code_of[fd] = int.from_bytes(buf[i + h:i + h + 2], "big") if ln >= 2 else 1005
                        i += h + ln
                    pending[fd] = buf[i:]
        finally:
            ep.close()
        if pending:
            out["open"] = len(pending)
        for fd in fds:
            self._drop(fd)
        return {"outcomes": out, "bytes": bytes_read, "count": len(fds)}

    def open_count(self) -> int:
        return sum(1 for st in self.state.values() if st == _OPEN)

    def stats(self) -> dict:
        track = self.track
        return {"open": self.open_count(), "sockets": len(self.state),
                "stalled": sum(1 for st in self.state.values() if st == _STALLED),
                "tracked_with_frames": len(track) if track is not None else 0,
                "tracked_multi": sum(1 for v in track.values() if v > 1) if track is not None else 0,
                "total_frames": self.total_frames, "frames": self.frames,
                "pings": self.pings, "server_closed": self.server_closed,
                "close_codes": dict(self.close_codes), "errors": dict(self.errors),
                "last_frame_len": self.last_frame_len}

    def _check_wait(self):
        if self.wait_target < 0:
            return
        if self.frames >= self.wait_target or time.monotonic() >= self.wait_deadline:
            self.pipe.send(("waited", {"frames": self.frames, "first_ns": self.first_ns,
                                       "last_ns": self.last_ns, "open": self.open_count(),
                                       "last_frame_len": self.last_frame_len,
                                       "with_frames": len(self.track) if self.track is not None else 0}))
            self.wait_target = -1

    def run(self):
        pipe_fd = self.pipe.fileno()
        state = self.state
        EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
        try:
            while True:
                deadlines = []
                if self.opening:
                    deadlines.append(self.open_deadline)
                if self.wait_target >= 0:
                    deadlines.append(self.wait_deadline)
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else -1
                if self.opening and self.to_start and self.inflight < self.window:
                    timeout = 0  # more connects to start: just look at what has arrived
                events = self.ep.poll(timeout, 4096)
                now = time.monotonic_ns()
                for fd, ev in events:
                    if fd == pipe_fd:
                        continue
                    st = state.get(fd)
                    if st is None or st == _STALLED:
                        continue
                    if st == _CONNECTING:
                        if ev & EPOLLOUT:
                            self._on_writable(fd)
                        else:
                            self._fail(fd, "connect: refused or reset")
                    else:
                        self._on_readable(fd, now)
                for fd, ev in events:  # commands after the data that came with them
                    if fd == pipe_fd:
                        try:
                            msg = self.pipe.recv()
                        except (EOFError, OSError):
                            return
                        if not self.cmd(msg):
                            return
                if self.opening:
                    self._pump()
                    self._check_open_done()
                self._check_wait()
        finally:
            for fd in list(state):
                os.close(fd)


def _worker_main(pipe, *args):
    try:
        _Worker(pipe, *args).run()
    except KeyboardInterrupt:
        pass


class LoadGenError(Exception):
    """A worker failed to answer or reported an error."""


class LoadGen:
    """The parent side: several worker processes driven in lockstep.

    Args:
      host, port, path: the WebSocket endpoint (``path`` without query).
      secret: HS256 secret for the tokens (any string for servers that ignore it).
      procs: worker processes; each holds at most MAX_SOCKETS_PER_PROC sockets.
      subscribe: send ``{"type":"subscribe"}`` and wait for the answer before
        counting a connection as open.
      prefix: subscriber ids are ``PREFIX<worker>-<n>``.
      sub: if set, every token names this one subscriber (N tabs of one
        mailbox owner: the server sends one prebuilt frame to all of them).
      sockopts: ``(level, option, value)`` triples set on every socket before
        ``connect()`` (e.g. a small SO_RCVBUF, TCP_MAXSEG).
      stall: once open (subscribed), a connection is never read again: a
        client that stopped reading. ``probe_stalled()`` reads them at the end.
      source_base: workers use source addresses 127.0.(source_base+w+1).x,
        so two LoadGens on one server use disjoint addresses.

    Resource handling: use as a context manager; ``stop()`` closes every
    socket and ends the processes (terminate after a grace period).
    """

    def __init__(self, host: str, port: int, path: str = "/v1/ws", secret: str = "bench",
                 procs: int = 2, subscribe: bool = True, prefix: str = "s", sub: str | None = None,
                 sockopts: tuple = (), stall: bool = False, source_base: int = 0):
        ctx = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        self.open_per_worker = [0] * procs
        self.subscribers: list[str] = []
        self.last_setup_ns = array.array("q")
        self.last_fail_ns: dict[str, array.array] = {}
        for w in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, name=f"loadgen-{w}", daemon=True,
                            args=(child, w, host, port, path, secret, subscribe, prefix,
                                  sub, tuple(sockopts), stall, source_base))
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def capacity(self) -> int:
        return MAX_SOCKETS_PER_PROC * len(self.procs)

    def _all(self, msg, timeout: float) -> list:
        for p in self.pipes:
            p.send(msg)
        return self._gather(timeout)

    def _gather(self, timeout: float, pipes=None) -> list:
        pipes = pipes if pipes is not None else self.pipes
        deadline = time.monotonic() + timeout
        out = [None] * len(pipes)
        waiting = set(range(len(pipes)))
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadGenError(f"workers {sorted(waiting)} did not answer in {timeout:.0f} s")
            ready = multiprocessing.connection.wait([pipes[i] for i in waiting], left)
            for r in ready:
                i = pipes.index(r)
                try:
                    reply = r.recv()
                except EOFError:
                    raise LoadGenError(f"worker {i} died") from None
                if reply[0] == "error":
                    raise LoadGenError(reply[1])
                out[i] = reply
                waiting.discard(i)
        return out

    def open(self, n: int, window: int = DEFAULT_WINDOW, timeout: float = 120.0) -> dict:
        """Open ``n`` more connections as fast as the server takes them.

        Returns ok/failed counts, error reasons, the wall time from the first
        connect to the last connection open and to the last connect started,
        the rate, and setup-time
        percentiles (connect start to open, per connection).
        """
        k = len(self.pipes)
        shares = [n // k + (1 if w < n % k else 0) for w in range(k)]
        for p, share in zip(self.pipes, shares):
            p.send(("open", share, window, timeout))
        replies = self._gather(timeout + 30)
        ok = failed = 0
        errors: dict[str, int] = {}
        fail_ns: dict[str, array.array] = {}
        setup = array.array("q")
        t0s, t1s, starts = [], [], []
        for w, (_, b) in enumerate(replies):
            ok += b["ok"]
            failed += b["failed"]
            self.open_per_worker[w] += b["ok"]
            self.subscribers.extend(b["subs"])
            for k_, v in b["errors"].items():
                errors[k_] = errors.get(k_, 0) + v
            for k_, raw in b["fail_ns"].items():
                fail_ns.setdefault(k_, array.array("q")).frombytes(raw)
            s = array.array("q")
            s.frombytes(b["setup_ns"])
            setup.extend(s)
            if b["count"]:
                t0s.append(b["t0"])
                if b["t1"]:
                    t1s.append(b["t1"])
                if b["started"]:
                    starts.append(b["started"])
        seconds = (max(t1s) - min(t0s)) / 1e9 if t1s and t0s else 0.0
        srt = sorted(setup)
        self.last_setup_ns = setup        # per connection that opened
        self.last_fail_ns = fail_ns       # per failure reason, per connection
        # From the first connect to the last one started (all workers).
        connects_s = (max(starts) - min(t0s)) / 1e9 if starts and t0s else 0.0
        return {"requested": n, "ok": ok, "failed": failed, "errors": errors,
                "seconds": seconds, "connects_seconds": connects_s, "rate": ok / seconds if seconds > 0 else 0.0,
                "setup_ms_p50": _pct(srt, 0.50) / 1e6, "setup_ms_p99": _pct(srt, 0.99) / 1e6,
                "setup_ms_max": (srt[-1] / 1e6) if srt else 0.0}

    def arm(self, track: bool = False) -> list[int]:
        """Reset the per-round frame counters; returns open connections per worker.

        With ``track``, also count messages per connection until the next arm
        (``wait_frames`` then reports how many connections got at least one)."""
        replies = self._all(("arm", track), 10)
        self.open_per_worker = [r[1] for r in replies]
        return self.open_per_worker

    def wait_frames(self, per_worker: list[int], timeout: float) -> dict:
        """Wait until worker w has received ``per_worker[w]`` messages since arm."""
        for p, target in zip(self.pipes, per_worker):
            p.send(("wait", target, timeout))
        replies = [r[1] for r in self._gather(timeout + 10)]
        firsts = [r["first_ns"] for r in replies if r["first_ns"]]
        lasts = [r["last_ns"] for r in replies if r["last_ns"]]
        return {"frames": sum(r["frames"] for r in replies),
                "first_ns": min(firsts) if firsts else 0,
                "last_ns": max(lasts) if lasts else 0,
                "open": sum(r["open"] for r in replies),
                "frame_len": max(r["last_frame_len"] for r in replies),
                "with_frames": sum(r["with_frames"] for r in replies)}

    def latency_on(self, min_t_ns: int = 0):
        self._all(("lat_on", min_t_ns), 10)

    def latency_off(self) -> array.array:
        out = array.array("q")
        for r in self._all(("lat_off",), 30):
            a = array.array("q")
            a.frombytes(r[1])
            out.extend(a)
        return out

    def stats(self) -> dict:
        return _merge([r[1] for r in self._all(("stats",), 10)])

    def burst(self, frame: bytes = PING_PACKET_FRAME) -> dict:
        """Every worker writes ``frame`` once on each of its open sockets, in
        one tight loop; returns sent/failed and the span of the loops (ns)."""
        replies = [r[1] for r in self._all(("burst", frame), 60)]
        return {"sent": sum(r["sent"] for r in replies), "failed": sum(r["failed"] for r in replies),
                "t0": min(r["t0"] for r in replies), "t1": max(r["t1"] for r in replies)}

    def closes(self) -> list[tuple[int, int, bytes]]:
        """Every Close frame received since the last call: (time ns, code, reason)."""
        out = []
        for r in self._all(("closes",), 30):
            out.extend(r[1])
        return out

    def probe_stalled(self, timeout: float = 5.0) -> dict:
        """Read every stalled socket to its end (see ``_Worker.probe_stalled``)."""
        outcomes: dict[str, int] = {}
        total = count = 0
        for r in self._all(("probe_stalled", timeout), timeout + 30):
            for k, v in r[1]["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
            total += r[1]["bytes"]
            count += r[1]["count"]
        return {"outcomes": outcomes, "bytes": total, "count": count}

    def close_all(self) -> dict:
        self.subscribers = []
        self.open_per_worker = [0] * len(self.pipes)
        return _merge([r[1] for r in self._all(("close_all",), 60)])

    def stop(self):
        for p in self.pipes:
            try:
                p.send(("exit",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for p in self.pipes:
            p.close()
        self.pipes = []
        self.procs = []


def _merge(stats: list[dict]) -> dict:
    counted = ("open", "sockets", "stalled", "tracked_with_frames", "tracked_multi", "total_frames",
               "frames", "pings", "server_closed")
    out: dict[str, Any] = dict.fromkeys(counted, 0)
    out.update({"close_codes": {}, "errors": {}, "last_frame_len": 0})
    for s in stats:
        for k in counted:
            out[k] += s[k]
        out["last_frame_len"] = max(out["last_frame_len"], s["last_frame_len"])
        for k in ("close_codes", "errors"):
            for kk, v in s[k].items():
                out[k][kk] = out[k].get(kk, 0) + v
    return out


def _pct(sorted_values, q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def procs_for(n: int, minimum: int = 2) -> int:
    """Worker processes needed for ``n`` sockets (at least ``minimum``)."""
    return max(minimum, -(-n // MAX_SOCKETS_PER_PROC))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="ws://127.0.0.1:8080/v1/ws")
    ap.add_argument("--secret", default=os.environ.get("MAILPUSH_SECRET", "bench"))
    ap.add_argument("-n", type=int, default=1000, help="connections to open")
    ap.add_argument("--procs", type=int, default=0, help="worker processes (default: enough, min 2)")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--no-subscribe", action="store_true")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to hold them open, counting frames")
    a = ap.parse_args(argv)
    rest = a.url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    procs = a.procs or procs_for(a.n)
    with LoadGen(host, int(port), "/" + path, a.secret, procs, not a.no_subscribe) as lg:
        r = lg.open(a.n, a.window)
        print(f"opened {r['ok']}/{a.n} in {r['seconds']:.2f} s = {r['rate']:,.0f} conn/s; "
              f"setup p50 {r['setup_ms_p50']:.1f} ms p99 {r['setup_ms_p99']:.1f} ms; "
              f"failed {r['failed']} {r['errors'] or ''}")
        if a.hold:
            time.sleep(min(a.hold, 3600))
            print("stats:", lg.stats())
    return 0


if __name__ == "__main__":
    sys.exit(main())
