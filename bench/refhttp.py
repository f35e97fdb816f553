"""What the three reference servers share: constants, the fan-out message,
and a tiny admin HTTP endpoint (one for Trio, one for asyncio).

The admin port is the trigger, the same mechanism for every reference
server (mailpush is triggered through its own admin publish API):

- ``GET /healthz`` -> 200 once the server listens (readiness for run.py);
- ``POST /fanout`` -> send the 40-byte message (or, if the request has a
  body, the body as a text message: the latency scenario's stamped events)
  once to every open connection, answer ``202 {"sent":N}`` when the send
  loop is done;
- ``GET /stats`` -> ``{"connections":N}``.

HTTP/1.1 with keep-alive; only what the bench needs (Content-Length bodies).
"""

from __future__ import annotations

import argparse
import json

# Same listen backlog for every server in the bench: this machine's
# net.core.somaxconn, and what Trio asks for by default (it caps 65535 to
# it). asyncio's default of 100 would drop SYNs under a connection burst and
# measure TCP's 1 s retransmit timer instead of the library.
BACKLOG = 4096

# The fan-out message: a 40-byte text payload (DESIGN.md "40-byte messages").
EVENT_MSG = b'{"type":"event","n":'
EVENT_MSG = (EVENT_MSG + b"0" * (39 - len(EVENT_MSG)) + b"}")
assert len(EVENT_MSG) == 40, len(EVENT_MSG)
EVENT_TEXT = EVENT_MSG.decode()

# What a reference server answers to {"type":"subscribe"}: they accept any
# token, so they do not know a subscriber id.
SUBSCRIBED_MSG = b'{"type":"subscribed","subscriber":"?","events":["*"]}'
SUBSCRIBED_TEXT = SUBSCRIBED_MSG.decode()

# Bound on one admin request head + body; the bench sends a few bytes.
MAX_ADMIN_REQUEST = 65_536


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--listen", default="127.0.0.1:8080", help="WebSocket HOST:PORT")
    ap.add_argument("--admin", default="127.0.0.1:8081", help="trigger HOST:PORT")
    a = ap.parse_args()
    for name in ("listen", "admin"):
        host, _, port = getattr(a, name).rpartition(":")
        setattr(a, name, (host, int(port)))
    return a


def parse_request(buf: bytes):
    """``(method, path, body, rest)`` for one complete request in ``buf``, or
    None if more bytes are needed. Raises ValueError on garbage."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_ADMIN_REQUEST:
            raise ValueError("request head too long")
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    if length > MAX_ADMIN_REQUEST:
        raise ValueError("body too long")
    if len(buf) < end + 4 + length:
        return None
    body = buf[end + 4:end + 4 + length]
    return method, path, body, buf[end + 4 + length:]


def response(status: int, obj) -> bytes:
    body = json.dumps(obj).encode()
    reason = {200: "OK", 202: "Accepted", 404: "Not Found", 400: "Bad Request"}.get(status, "")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def trio_admin(host: str, port: int, fanout, count, task_status=None):
    """Serve the admin endpoint with Trio. ``fanout(body)`` is an async
    function returning how many connections it sent to (an empty body means
    the standard 40-byte message); ``count()`` the open ones."""
    import trio

    async def handle(stream):
        buf = b""
        try:
            while True:
                req = parse_request(buf)
                if req is None:
                    data = await stream.receive_some(65_536)
                    if not data:
                        return
                    buf += data
                    continue
                method, path, body, buf = req
                await stream.send_all(await _dispatch(method, path, body, fanout, count))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    if task_status is not None:
        task_status.started()
    await trio.serve_listeners(handle, listeners)


async def asyncio_admin(host: str, port: int, fanout, count):
    """The same endpoint on asyncio; returns the started asyncio Server."""
    import asyncio

    async def handle(reader, writer):
        buf = b""
        try:
            while True:
                req = parse_request(buf)
                if req is None:
                    data = await reader.read(65_536)
                    if not data:
                        return
                    buf += data
                    continue
                method, path, body, buf = req
                writer.write(await _dispatch(method, path, body, fanout, count))
                await writer.drain()
        except (ConnectionError, ValueError):
            return
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def _dispatch(method: str, path: str, body: bytes, fanout, count) -> bytes:
    if method == "GET" and path == "/healthz":
        return response(200, {"status": "ok"})
    if method == "GET" and path == "/stats":
        return response(200, {"connections": count()})
    if method == "POST" and path == "/fanout":
        return response(202, {"sent": await fanout(body)})
    return response(404, {"error": f"no {method} {path}"})
