"""Shared test helpers: an in-process server on a fake bus, a server in a
subprocess, tokens, and a tiny raw WebSocket client for byte-level tests."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from mailpush import Config, Server
from mailpush.auth import mint
from mailpush.testing import FakeBus
from mailpush.frames import apply_mask

SECRET = "test-secret-" + "s" * 32


def token(sub: str, ttl: float = 3600) -> str:
    return mint(SECRET, sub, ttl)


def make_config(**overrides) -> Config:
    base = dict(listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), secret=SECRET, ping_interval=0)
    base.update(overrides)
    return Config(**base)


# Both ways a server can wait on its connections (--poller): every test of
# an in-process server runs under each, so neither can rot.
POLLERS = ["task", "shared"]


@pytest.fixture(params=POLLERS)
async def start_server(nursery, request):
    """``await start_server(**config)`` → a running Server on a FakeBus,
    once with each poller."""

    async def start(bus=None, **overrides) -> Server:
        overrides.setdefault("poller", request.param)
        server = Server(make_config(**overrides), bus if bus is not None else FakeBus())
        await nursery.start(server.serve)
        return server

    return start


def ws_url(server: Server, path: str = "/v1/ws", tok: str | None = None) -> str:
    host, port = server.listen_address
    url = f"ws://{host}:{port}{path}"
    return url + (f"?token={tok}" if tok else "")


# -- a raw client, for byte-level tests ------------------------------------

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04", rsv: int = 0) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


class RawClient:
    """A blocking socket client used from trio.to_thread or plain tests."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def upgrade(self, path: str = "/v1/ws", extra: str = "") -> bytes:
        self.send(UPGRADE.format(path=path, extra=extra).encode())
        return self.read_head()

    def read_head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    def read_all(self) -> bytes:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            self.buf += chunk
        data, self.buf = self.buf, b""
        return data

    def read_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame; (-1, b"") on EOF."""
        while True:
            if len(self.buf) >= 2:
                n = self.buf[1] & 0x7F
                off = 2
                if n == 126:
                    n = int.from_bytes(self.buf[2:4], "big") if len(self.buf) >= 4 else None
                    off = 4
                elif n == 127:
                    n = int.from_bytes(self.buf[2:10], "big") if len(self.buf) >= 10 else None
                    off = 10
                if n is not None and len(self.buf) >= off + n:
                    op = self.buf[0] & 0x0F
                    payload = self.buf[off : off + n]
                    self.buf = self.buf[off + n :]
                    return op, payload
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                return -1, b""
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class AsyncRaw:
    """A raw client in the test's Trio loop."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, address, rcvbuf: int | None = None) -> AsyncRaw:
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(address)
        return cls(trio.SocketStream(sock))

    async def upgrade(self, tok: str) -> bytes:
        await self.stream.send_all(UPGRADE.format(path="/v1/ws?token=" + tok, extra="").encode())
        return await self.head()

    async def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        return head

    async def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        try:
            while chunk := await self.stream.receive_some(65536):
                self.buf += chunk
        except trio.BrokenResourceError:
            pass
        data, self.buf = self.buf, b""
        return data

    async def eof(self, timeout: float = 30) -> bool:
        """Read until EOF: True if the server closed the connection within
        ``timeout`` seconds (of the test's clock), False if it did not."""
        with trio.move_on_after(timeout):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


# -- a server in a subprocess ------------------------------------------------


@contextlib.contextmanager
def server_process(*args: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, tuple[str, int], tuple[str, int] | None]]:
    """Run ``mailpush serve`` on free ports; yield (process, listen, admin)."""
    cmd = [sys.executable, "-m", "mailpush", "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--secret", SECRET, "--log-format", "json", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    try:
        listen = admin = None
        deadline = time.monotonic() + 20
        lines = []
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "listening":
                h, _, p = rec["listen"].rpartition(":")
                listen = (h, int(p))
                if rec.get("admin"):
                    h, _, p = rec["admin"].rpartition(":")
                    admin = (h, int(p))
                break
        if listen is None:
            proc.kill()
            raise RuntimeError("server did not start: " + b"".join(lines).decode(errors="replace"))
        # Keep reading its log so a chatty server never blocks on a full pipe.
        proc.log_lines = lines  # type: ignore[attr-defined]
        threading.Thread(target=_drain, args=(proc.stderr, lines), daemon=True).start()
        threading.Thread(target=_drain, args=(proc.stdout, []), daemon=True).start()
        yield proc, listen, admin
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for f in (proc.stdout, proc.stderr):
            f.close()


def _drain(f, into: list) -> None:
    try:
        for line in f:
            into.append(line)
    except (OSError, ValueError):
        pass


def b64key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


HISTORY_FIELDS = ("offset", "epoch", "recovered", "expires_at")


def bare(packet: dict) -> dict:
    """A packet without the history's fields (offset, epoch, recovered) and
    the token's expiry (expires_at), for tests about everything else."""
    return {k: v for k, v in packet.items() if k not in HISTORY_FIELDS}

@pytest.fixture(scope="module", params=["c", "python"])
def deliver_loops(request):
    """The module's tests once with the dispatcher's C loop
    (mailpush._speedups) and once with its Python twin: a module opts in
    with ``pytestmark = pytest.mark.usefixtures("deliver_loops")``."""
    from mailpush import dispatch

    saved = dispatch._c_deliver_run
    if request.param == "python":
        dispatch._c_deliver_run = None
    elif saved is None:
        pytest.skip("mailpush._speedups is not built (tests/test_speedups.py says why)")
    yield request.param
    dispatch._c_deliver_run = saved
