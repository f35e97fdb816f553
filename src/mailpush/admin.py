"""Admin HTTP: publish, health, metrics, token minting for the demo page, and
the live demo page. Loopback by default: it can publish to anyone.

A small HTTP/1.1 server of its own (keep-alive, Content-Length or chunked
bodies): the admin port sees a handful of clients, not millions, so it uses
Trio streams, a task per client and no framework.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING

import orjson
import trio

from .auth import mint
from .errors import ConfigError, MailpushError, PublishError
from .handshake import response_text
from .metrics import render
from .packets import MAX_SUBSCRIBER_LEN, parse_items

if TYPE_CHECKING:
    from .server import Server

__all__ = ["serve_admin"]

# Request head limit; admin clients send a few headers.
MAX_HEAD = 16_384
# Largest publish body: 100,000 items of ~150 bytes. Bigger batches should
# be split; the limit bounds what one request can make us hold.
MAX_BODY = 16 * 1024 * 1024
# Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 60.0
# Longest token the demo page may ask for (a day).
MAX_TOKEN_TTL = 86_400


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def serve_admin(server: Server, address: tuple[str, int], *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise ConfigError(f"cannot listen on admin address {host}:{port}: {e.strerror}") from None
    bound = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, functools.partial(_client, server), listeners)
        task_status.started(bound)


async def _client(server: Server, stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while True:
            with trio.move_on_after(IDLE_TIMEOUT):
                request = await _read_request(stream, buf)
            if request is None:
                return
            method, path, headers, body = request
            status, ctype, payload = await _route(server, method, path, headers, body)
            keep = headers.get("connection", "").lower() != "close"
            await stream.send_all(response_text(status, payload, close=not keep, content_type=ctype))
            if not keep:
                return
    except _HTTPError as e:
        await _send_error(stream, e.status, e.message)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def _send_error(stream: trio.SocketStream, status: int, message: str) -> None:
    try:
        await stream.send_all(response_text(status, orjson.dumps({"error": message}).decode() + "\n", content_type="application/json"))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _read_more(stream: trio.SocketStream, buf: bytearray) -> bool:
    chunk = await stream.receive_some(65536)
    if not chunk:
        return False
    buf += chunk
    return True


async def _read_request(stream: trio.SocketStream, buf: bytearray) -> tuple[str, str, dict[str, str], bytes] | None:
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) > MAX_HEAD:
            raise _HTTPError(431, f"request head larger than {MAX_HEAD} bytes")
        if not await _read_more(stream, buf):
            if buf:
                raise _HTTPError(400, "connection closed in the middle of a request")
            return None
    head = bytes(buf[:end]).decode("latin-1")
    del buf[: end + 4]
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HTTPError(400, "malformed request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise _HTTPError(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _read_chunked(stream, buf)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _HTTPError(400, "Content-Length is not a number") from None
        if length < 0:
            raise _HTTPError(400, "Content-Length is negative")
        if length > MAX_BODY:
            raise _HTTPError(413, f"body larger than {MAX_BODY} bytes: split the batch")
        while len(buf) < length:
            if not await _read_more(stream, buf):
                raise _HTTPError(400, "connection closed before the whole body arrived")
        body = _take(buf, length)
    return method, target.partition("?")[0], headers, body


def _take(buf: bytearray, n: int) -> bytes:
    """The first ``n`` bytes of ``buf``, removed from it: one copy (a
    publish body can be megabytes; ``bytes(buf[:n])`` would copy twice)."""
    with memoryview(buf) as view, view[:n] as part:
        taken = bytes(part)
    del buf[:n]
    return taken


async def _read_chunked(stream: trio.SocketStream, buf: bytearray) -> bytes:
    body = bytearray()
    while True:
        while (i := buf.find(b"\r\n")) < 0:
            if not await _read_more(stream, buf):
                raise _HTTPError(400, "connection closed inside a chunked body")
        try:
            size = int(bytes(buf[:i]).split(b";")[0], 16)
        except ValueError:
            raise _HTTPError(400, "bad chunk size") from None
        del buf[: i + 2]
        if len(body) + size > MAX_BODY:
            raise _HTTPError(413, f"body larger than {MAX_BODY} bytes: split the batch")
        while len(buf) < size + 2:
            if not await _read_more(stream, buf):
                raise _HTTPError(400, "connection closed inside a chunk")
        with memoryview(buf) as view, view[:size] as part:
            body += part
        del buf[: size + 2]
        if size == 0:
            return bytes(body)


_JSON = "application/json"


async def _route(server: Server, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
    if path == "/v1/publish":
        if method != "POST":
            return 405, _JSON, b'{"error":"use POST to publish"}\n'
        try:
            items = parse_items(body, headers.get("content-type", ""))
        except PublishError as e:
            server.log.warning("publish_refused", reason=str(e))
            return 400, _JSON, orjson.dumps({"error": str(e)}) + b"\n"
        await server.bus.publish(items)
        server.stats.published += len(items)
        return 202, _JSON, orjson.dumps({"accepted": len(items)}) + b"\n"
    if path == "/healthz":
        status, text = server.health()
        return status, "text/plain; charset=utf-8", text.encode() + b"\n"
    if path == "/metrics":
        return 200, "text/plain; version=0.0.4; charset=utf-8", render(server.stats, server.gauges)
    if path == "/v1/token":
        if method != "POST":
            return 405, _JSON, b'{"error":"use POST with {\\"subscriber\\": ...}"}\n'
        try:
            req = orjson.loads(body or b"{}")
            sub = req.get("subscriber") if type(req) is dict else None
            ttl = req.get("ttl", 3600) if type(req) is dict else 3600
            if type(sub) is not str or not sub or len(sub) > MAX_SUBSCRIBER_LEN:
                raise MailpushError(f"'subscriber' must be a string of 1 to {MAX_SUBSCRIBER_LEN} characters")
            if type(ttl) not in (int, float) or not 0 < ttl <= MAX_TOKEN_TTL:
                raise MailpushError(f"'ttl' must be a number of seconds from 1 to {MAX_TOKEN_TTL}")
            token = mint(server.config.secret, sub, ttl)
        except (orjson.JSONDecodeError, MailpushError) as e:
            return 400, _JSON, orjson.dumps({"error": str(e)}) + b"\n"
        return 200, _JSON, orjson.dumps({"token": token, "subscriber": sub}) + b"\n"
    if path in ("/", "/index.html"):
        if method not in ("GET", "HEAD"):
            return 405, _JSON, b'{"error":"use GET"}\n'
        return 200, "text/html; charset=utf-8", _demo_page(server, headers.get("host", ""))
    return 404, _JSON, orjson.dumps({"error": f"no such admin endpoint: {path[:100]}", "endpoints": ["/v1/publish", "/v1/token", "/healthz", "/metrics", "/"]}) + b"\n"


@functools.cache
def _demo_template() -> str:
    return resources.files("mailpush").joinpath("demo.html").read_text(encoding="utf-8")


def _demo_page(server: Server, host_header: str) -> bytes:
    assert server.listen_address is not None
    host, port = server.listen_address
    if host in ("0.0.0.0", "::", ""):
        host = host_header.rpartition(":")[0] or host_header or "127.0.0.1"
    ws_url = f"ws://{host}:{port}{server.config.ws_path}"
    return _demo_template().replace("{{WS_URL}}", ws_url).encode("utf-8")
