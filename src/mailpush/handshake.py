"""The HTTP Upgrade, parsed straight from the bytes read off the socket.

No HTTP framework and no I/O: :func:`find_head_end` finds the end of the
request head in the connection's buffer, :func:`parse_request` reads the
request line and headers and copies out only what the application needs
(path, query, cookie, Authorization, Origin, the key), and the ``response_*``
functions build the bytes to send back. Like gobwas/ws, required headers are
tracked as a bitmask; every refusal is a :class:`HandshakeError` carrying its
HTTP status and a one-line reason (RFC 6455 §4.2.1, §4.2.2).
"""

from __future__ import annotations

import binascii
import hashlib
import re
from http import HTTPStatus
from urllib.parse import unquote

from .errors import HandshakeError
from .speedups import C

__all__ = [
    "MAX_HEAD_BYTES",
    "MAX_HEADERS",
    "Request",
    "find_head_end",
    "parse_request",
    "check_upgrade",
    "accept_key",
    "response_101",
    "response_error",
    "response_text",
    "query_param",
    "cookie_value",
]

# The whole request head (request line + headers) must fit here; browsers
# send well under 2 KB even with a session cookie, so 8 KiB leaves room for
# proxies' headers while bounding what a connection can make us hold (431).
MAX_HEAD_BYTES = 8192
# More header lines than any browser sends; a cap on the work one request
# can cause (431).
MAX_HEADERS = 64

# RFC 6455 §1.3: the GUID appended to Sec-WebSocket-Key.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Bits of the required-header mask.
_HOST = 1
_UPGRADE = 2
_CONNECTION = 4
_KEY = 8
_VERSION = 16
_ALL_REQUIRED = _HOST | _UPGRADE | _CONNECTION | _KEY | _VERSION


class Request:
    """What mailpush keeps of an upgrade request: strings, nothing else."""

    __slots__ = (
        "method",
        "path",
        "query",
        "cookie",
        "authorization",
        "origin",
        "protocols",
        "last_event_id",
        "key",
        "seen",
        "upgrade",
        "version",
        "connection_upgrade",
        "http10",
    )

    def __init__(self) -> None:
        self.method = ""
        self.path = ""
        self.query = ""
        self.cookie = ""
        self.authorization = ""
        self.origin = ""
        self.protocols = ""  # Sec-WebSocket-Protocol, every line joined with ", "
        self.last_event_id = ""  # Last-Event-ID (an SSE client resuming)
        self.key = ""
        self.version = ""
        self.seen = 0  # bitmask of required headers present
        self.upgrade = False  # "Upgrade: websocket" present
        self.connection_upgrade = False  # "upgrade" token in Connection
        self.http10 = False  # HTTP/1.0 request line

    @property
    def wants_websocket(self) -> bool:
        """The client asked for an upgrade at all (vs a plain GET)."""
        return bool(self.seen & (_UPGRADE | _KEY | _VERSION))


def find_head_end(buf: bytes | bytearray, end: int) -> int:
    """Index just past the blank line ending the head in ``buf[:end]``, or -1.

    Raises:
      HandshakeError: 431 when no end is found within :data:`MAX_HEAD_BYTES`.
    """
    i = buf.find(b"\r\n\r\n", 0, end)
    if i >= 0:
        if i + 4 > MAX_HEAD_BYTES:
            raise HandshakeError(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
        return i + 4
    if end >= MAX_HEAD_BYTES:
        raise HandshakeError(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
    return -1


# The base64 of 16 bytes (§4.1: the key is a random 16-byte value, base64):
# exactly what ``len(base64.b64decode(key, validate=True)) == 16`` accepts.
_KEY16 = re.compile(r"[A-Za-z0-9+/]{22}==")
# RFC 9110 §5.6.2 token (the method) and a request target of visible ASCII.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
# A header name may not begin or end with a space or a tab (as ints: the
# bytes of a name are indexed, not sliced).
_BLANKS = (0x20, 0x09)


def _bad(reason: str) -> HandshakeError:
    return HandshakeError(400, reason)


def parse_request(head: bytes) -> Request:
    """Parse a request head (everything up to and including the blank line).

    Raises:
      HandshakeError: 400 malformed, 431 too many headers, 505 not HTTP/1.x.
    """
    if _c_parse_request is not None and (req := _c_parse_request(head, Request, _FIELDS)) is not None:
        return req  # a well-formed head, parsed in C the same way; any other is looked at below
    # RFC 9110 §5.5: a field value with NUL, CR or LF is refused. CR and LF
    # may only appear as the CRLF ending a line; four scans in C, no loop.
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf or b"\0" in head:
        raise _bad("NUL, CR or LF inside the request line or a header field (RFC 9110 section 5.5)")
    lines = head.split(b"\r\n")
    if len(lines) - 3 > MAX_HEADERS:  # minus the request line and the two blanks
        raise HandshakeError(431, f"more than {MAX_HEADERS} header lines")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise _bad("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise _bad("malformed request method")
    if not _TARGET.fullmatch(target):
        raise _bad("request target has spaces or control characters")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HandshakeError(505, "only HTTP/1.1 is supported")
    req = Request()
    # Plain requests (health checks: HAProxy sends HTTP/1.0) may be 1.0; the
    # upgrade itself needs 1.1 (RFC 6455 §4.1), see check_upgrade.
    req.http10 = version == b"HTTP/1.0"
    try:
        req.method = method.decode("ascii")
        target_s = target.decode("ascii")
    except UnicodeDecodeError:
        raise _bad("non-ASCII request line") from None
    if not target_s.startswith("/"):
        raise _bad("request target must be an absolute path")
    path, _, req.query = target_s.partition("?")
    req.path = path
    seen = 0
    fields = _FIELDS
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name[0] in _BLANKS or name[-1] in _BLANKS:
            raise _bad("malformed header line")
        bit = fields.get(name.lower())
        if bit is None:
            continue
        value = value.strip(b" \t")
        if bit == _HOST:
            if seen & _HOST:
                raise _bad("duplicate Host header")
        elif bit == _UPGRADE:
            # A list of protocols; "websocket" must be one of them (§4.2.1).
            low = value.lower()
            req.upgrade = low == b"websocket" or any(p.strip() == b"websocket" for p in low.split(b","))
        elif bit == _CONNECTION:
            low = value.lower()
            if low == b"upgrade" or any(p.strip() == b"upgrade" for p in low.split(b",")):
                req.connection_upgrade = True
        elif bit == _KEY:
            if seen & _KEY:
                raise _bad("duplicate Sec-WebSocket-Key header")
            req.key = value.decode("latin-1")
        elif bit == _VERSION:
            req.version = value.decode("latin-1")
        elif bit == _COOKIE:
            cookie = value.decode("latin-1")
            req.cookie = f"{req.cookie}; {cookie}" if req.cookie else cookie
        elif bit == _AUTHORIZATION:
            req.authorization = value.decode("latin-1")
        elif bit == _ORIGIN:
            req.origin = value.decode("latin-1")
        elif bit == _PROTOCOL:
            protocols = value.decode("latin-1")
            req.protocols = f"{req.protocols}, {protocols}" if req.protocols else protocols
        elif bit == _LAST_EVENT_ID:
            req.last_event_id = value.decode("latin-1")
        seen |= bit
    req.seen = seen
    return req


_COOKIE = 32
_AUTHORIZATION = 64
_ORIGIN = 128
_PROTOCOL = 256
_LAST_EVENT_ID = 512
_FIELDS = {
    b"host": _HOST,
    b"upgrade": _UPGRADE,
    b"connection": _CONNECTION,
    b"sec-websocket-key": _KEY,
    b"sec-websocket-version": _VERSION,
    b"cookie": _COOKIE,
    b"authorization": _AUTHORIZATION,
    b"origin": _ORIGIN,
    b"sec-websocket-protocol": _PROTOCOL,
    b"last-event-id": _LAST_EVENT_ID,
}


def check_upgrade(req: Request) -> None:
    """Check the headers a WebSocket upgrade needs (RFC 6455 §4.2.1).

    Raises:
      HandshakeError: 405 not GET, 400 a required header is missing or
        wrong, 426 another protocol version (with the one we speak).
    """
    if req.method != "GET":
        raise HandshakeError(405, f"method {req.method} not allowed, use GET", (("Allow", "GET"),))
    if req.http10:
        raise _bad("WebSocket upgrade requires HTTP/1.1")
    seen = req.seen
    if not seen & _HOST:
        raise _bad("missing Host header")
    if not req.upgrade:
        raise HandshakeError(
            426 if not seen & _UPGRADE else 400,
            "missing or wrong Upgrade header, expected 'Upgrade: websocket'",
            (("Upgrade", "websocket"), ("Connection", "Upgrade")),
        )
    if not req.connection_upgrade:
        raise _bad("Connection header must contain the 'upgrade' token")
    if not seen & _VERSION or req.version != "13":
        raise HandshakeError(
            426,
            f"unsupported Sec-WebSocket-Version {req.version!r}, this server speaks 13",
            (("Sec-WebSocket-Version", "13"),),
        )
    if not seen & _KEY:
        raise _bad("missing Sec-WebSocket-Key header")
    if not _KEY16.fullmatch(req.key):
        raise _bad("Sec-WebSocket-Key must be the base64 of 16 bytes")


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a client key (§4.2.2 step 5.4)."""
    return _accept_bytes(key).decode("ascii")


def _accept_bytes(key: str) -> bytes:
    """accept_key's value as ASCII bytes (base64.b64encode without its
    Python wrapper)."""
    return binascii.b2a_base64(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest(), newline=False)


_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "


def response_101(key: str, protocol: str = "") -> bytes:
    """The 101 answer that completes the handshake, naming ``protocol``
    (one the client offered) if given."""
    if not protocol:
        return _101 + _accept_bytes(key) + b"\r\n\r\n"
    return _101 + _accept_bytes(key) + b"\r\nSec-WebSocket-Protocol: " + protocol.encode("ascii") + b"\r\n\r\n"


def response_text(
    status: int,
    body: str | bytes,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    close: bool = True,
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    """A complete small HTTP/1.1 response with a body."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}", f"Content-Length: {len(data)}"]
    if close:
        lines.append("Connection: close")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def response_error(err: HandshakeError) -> bytes:
    """The refusal of a handshake: status, extra headers, the reason as body."""
    return response_text(err.status, err.reason + "\n", err.headers)


def query_param(query: str, name: str) -> str | None:
    """The first value of ``name`` in a URL query string, percent-decoded."""
    prefix = name + "="
    for part in query.split("&"):
        if part.startswith(prefix):
            value = part[len(prefix) :]
            # a JWT needs no decoding: '%' and '+' are not in its alphabet
            return unquote(value.replace("+", " ")) if "%" in value or "+" in value else value
    return None


def cookie_value(cookie: str, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header (RFC 6265 §5.4)."""
    for part in cookie.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq and k == name:
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            return v
    return None


_c_parse_request = C.parse_request if C is not None else None
