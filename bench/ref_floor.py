"""Reference server: the Python floor on Trio.

One bare Trio task per socket, parked in ``trio.lowlevel.wait_readable``
with no buffer, a minimal upgrade (find the key, send 101), and fan-out as
one prebuilt frame and a plain ``sock.send()`` loop with no awaits. No
auth, no subscriptions, no queues, no keepalive: this is what the machine
and the runtime allow, the number mailpush is compared against.

    python bench/ref_floor.py --listen 127.0.0.1:8080 --admin 127.0.0.1:8081
"""

from __future__ import annotations

import base64
import hashlib
import socket

import trio

from refhttp import BACKLOG, EVENT_MSG, SUBSCRIBED_MSG, parse_args, trio_admin

# An upgrade request head larger than this is dropped (browsers send < 2 KB).
MAX_HEAD = 8192
# Bytes read per wakeup; client frames here are tiny control/subscribe frames.
RECV_SIZE = 4096
# Accepts per listener wakeup before yielding to the parked tasks.
ACCEPT_BATCH = 64

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EVENT_FRAME = bytes([0x81, len(EVENT_MSG)]) + EVENT_MSG
SUBSCRIBED_FRAME = bytes([0x81, len(SUBSCRIBED_MSG)]) + SUBSCRIBED_MSG

conns: set[socket.socket] = set()


def _unmask(data: bytes) -> tuple[int, bytes] | None:
    """Opcode and payload of the first (small, masked) client frame."""
    if len(data) < 6:
        return None
    ln = data[1] & 0x7F
    if ln > 125 or len(data) < 6 + ln:
        return None
    mask = data[2:6]
    payload = bytes(b ^ mask[i & 3] for i, b in enumerate(data[6:6 + ln]))
    return data[0] & 0x0F, payload


async def handle(sock: socket.socket):
    try:
        head = b""
        while b"\r\n\r\n" not in head:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            if not data or len(head) + len(data) > MAX_HEAD:
                return
            head += data
        key = b""
        for line in head.split(b"\r\n"):
            if line[:18].lower() == b"sec-websocket-key:":
                key = line[18:].strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        sock.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        del head, key, accept
        conns.add(sock)
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            if not data:
                return
            frame = _unmask(data)
            if frame is None:
                continue
            op, payload = frame
            if op == 0x1 and b'"subscribe"' in payload:
                sock.send(SUBSCRIBED_FRAME)
            elif op == 0x9:
                sock.send(bytes([0x8A, len(payload)]) + payload)
            elif op == 0x8:
                sock.send(b"\x88\x02\x03\xe8")
                return
    except OSError:
        return
    finally:
        conns.discard(sock)
        sock.close()


def _text_frame(payload: bytes) -> bytes:
    if len(payload) < 126:
        return bytes([0x81, len(payload)]) + payload
    return bytes([0x81, 126]) + len(payload).to_bytes(2, "big") + payload  # < 64 KiB here


async def fanout(body: bytes = b"") -> int:
    frame = _text_frame(body) if body else EVENT_FRAME  # built once for all
    sent = 0
    for s in conns:  # no await inside: the set cannot change under us
        try:
            if s.send(frame) == len(frame):
                sent += 1
        except OSError:  # full or dead: a floor does not queue
            pass
    return sent


async def main():
    args = parse_args(__doc__.splitlines()[0])
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(args.listen)
    lsock.listen(BACKLOG)
    lsock.setblocking(False)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio_admin, *args.admin, fanout, lambda: len(conns))
        while True:
            await trio.lowlevel.wait_readable(lsock)
            for _ in range(ACCEPT_BATCH):
                try:
                    s, _ = lsock.accept()
                except BlockingIOError:
                    break
                except OSError:  # EMFILE and friends: back off briefly
                    await trio.sleep(0.01)
                    break
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(handle, s)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
