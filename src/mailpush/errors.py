"""The one error hierarchy of mailpush.

::

    MailpushError
    ├── ConfigError            bad option or environment value (CLI message, exit 2)
    ├── HandshakeError         the HTTP Upgrade is refused: carries the HTTP status
    │   └── AuthError          401: missing, malformed, badly signed or expired token
    ├── ProtocolError          the peer broke RFC 6455: carries the close code
    ├── PacketError            a bad JSON packet: answered with an ``error`` packet
    ├── PublishError           a bad publish item or body: 400 with what is wrong
    ├── AdminHTTPError         a bad admin request: carries the HTTP status
    └── BusError               the bus side
        ├── BusUnavailable     the bus cannot be reached now: 503, retry
        │   └── BusNotReady    it answers, but does not serve yet: retry soon
        ├── RespError          an error reply from Redis (``-ERR …``)
        └── RespProtocolError  bytes from Redis that are not RESP2: reconnect

Each error that reaches a client says what was wrong and which rule or limit
it broke; the text is sent as-is (HTTP reason body, close reason, error
packet message), so it never contains a token or other secret.
"""

from __future__ import annotations

__all__ = [
    "MailpushError",
    "ConfigError",
    "HandshakeError",
    "AuthError",
    "ProtocolError",
    "PacketError",
    "PublishError",
    "AdminHTTPError",
    "BusError",
    "BusUnavailable",
    "BusNotReady",
    "RespError",
    "RespProtocolError",
]


class MailpushError(Exception):
    """Base of every error mailpush raises on purpose."""


class ConfigError(MailpushError):
    """An option, environment variable or secret file is unusable."""


class HandshakeError(MailpushError):
    """The opening handshake is refused with HTTP ``status``.

    ``headers`` are extra response headers, e.g. ``Sec-WebSocket-Version``
    with 426 or ``Retry-After`` with 503.
    """

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


class AuthError(HandshakeError):
    """The token is missing or not acceptable (401); ``expired`` says the
    token was fine but for its age (a client should fetch a new one)."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(401, reason, (("WWW-Authenticate", 'Bearer realm="mailpush"'),))
        self.expired = expired


class ProtocolError(MailpushError):
    """The peer violated RFC 6455; close the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = int(code)
        self.reason = reason
        # Messages that were complete before the violation, in order: the
        # peer is owed their handling before the close (set by the decoder).
        self.messages: list[tuple[int, bytes]] = []


class PacketError(MailpushError):
    """A packet could not be understood; ``code`` names the rule it broke."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PublishError(MailpushError):
    """A publish request is malformed (HTTP 400)."""


class AdminHTTPError(MailpushError):
    """An admin request is refused with HTTP ``status``; ``message`` says
    what was wrong (sent back as the JSON ``error``)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class BusError(MailpushError):
    """Something on the bus side."""


class BusUnavailable(BusError):
    """The bus cannot be reached now: a subscription change or a publish
    cannot be made (the dispatcher retries with backoff; a publisher gets
    503 with Retry-After)."""


class BusNotReady(BusUnavailable):
    """The bus answers but does not serve yet, and will shortly: a Redis
    Cluster master rejoining (``CLUSTERDOWN``, ``TRYAGAIN``), a Redis
    loading its data (``LOADING``). A history read so refused is retried
    sooner than after an outage (see recovery.py)."""


class RespError(BusError):
    """An error reply from Redis (``-ERR …``): a value the RESP parser
    returns in its place, raised by the request that it answers."""


class RespProtocolError(BusError):
    """Bytes that are not RESP2 (or exceed a bound): the connection cannot
    be trusted further. ``replies`` holds those complete before the fault,
    in order (they arrived intact and are still owed their handling)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.replies: list = []
