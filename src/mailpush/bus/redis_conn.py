"""The Redis bus's connections: the subscription connection (commands out,
acknowledgements matched, read by mailpush's own RESP parser), its sharded
kind for a Redis Cluster, and where it goes (the --bus URL)."""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from ..errors import BusUnavailable, RespError, RespProtocolError
from .resp import PushParser, command

__all__ = [
    "Subscription",
    "ShardSubscription",
    "Address",
    "MultiHostURL",
    "describe",
    "safe",
    "chunks",
    "SUBSCRIBE_ACK_TIMEOUT",
    "CHANNELS_PER_COMMAND",
]

# How long to wait for Redis to acknowledge a command on the subscription
# connection (the acknowledgement queues behind the messages already on
# their way). Past it the connection's state is unknown: it is dropped and
# made again.
SUBSCRIBE_ACK_TIMEOUT = 10.0
# Channels per SUBSCRIBE/UNSUBSCRIBE command: one command for a thousand
# tabs arriving at once, small enough to keep the command line short.
CHANNELS_PER_COMMAND = 500


# The pushes that acknowledge a command (one per channel, ``pong`` for PING);
# the sharded ones are a Redis Cluster's.
_ACKS = (b"subscribe", b"unsubscribe", b"pong", b"ssubscribe", b"sunsubscribe")


class _Waiter:
    __slots__ = ("remaining", "done", "error")

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.done = trio.Event()
        self.error: BaseException | None = None


class Subscription:
    """The subscription connection: commands out, acknowledgements matched.

    Redis answers a SUBSCRIBE or UNSUBSCRIBE of k channels with k pushes and
    a PING with one ``pong``, in command order, so the waiters form a queue
    and each counts its own. A PING's answer comes after every message
    published before Redis ran it: the barrier of a history read.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._waiters: deque[_Waiter] = deque()
        self._send_lock = trio.Lock()
        self._broken: BaseException | None = None

    async def auth(self, username: str | None, password: str) -> None:
        """AUTH before anything else (the reader is not running yet)."""
        args = (b"AUTH", username, password) if username else (b"AUTH", password)
        await self.call(*args)

    async def call(self, *args: str | bytes) -> object:
        """One command and its reply, before the reader runs (AUTH, ROLE,
        FUNCTION LOAD on one node).

        Raises:
          ConnectionError: the connection closed, or Redis answered an error.
        """
        await self.stream.send_all(command(*args))
        parser, replies = PushParser(), list[object]()
        while not replies:
            data = await self.stream.receive_some(4096)
            if not data:
                raise ConnectionError("Redis closed the connection")
            replies = parser.feed(data)
        if isinstance(replies[0], RespError):
            verb = args[0].decode() if isinstance(args[0], bytes) else args[0]
            raise ConnectionError(f"Redis refused {verb}: {replies[0]}")
        return replies[0]

    async def request(self, verb: bytes, channels: Sequence[str]) -> None:
        """Send ``verb channels…`` (or a bare PING); return once Redis
        acknowledged each.

        Raises:
          BusUnavailable: the connection failed, or Redis refused.
        """
        if self._broken is not None:
            raise BusUnavailable(f"the Redis subscription connection failed: {self._broken!r}")
        waiter = _Waiter(len(channels) or 1)
        self._waiters.append(waiter)
        async with self._send_lock:
            await self.stream.send_all(command(verb, *channels))
        with trio.move_on_after(SUBSCRIBE_ACK_TIMEOUT):
            await waiter.done.wait()
        if not waiter.done.is_set():
            # The queue of acknowledgements can no longer be trusted: make
            # the connection again (run() reconnects and resubscribes).
            self.fail(TimeoutError(f"no acknowledgement of {verb.decode()} in {SUBSCRIBE_ACK_TIMEOUT:g} s"))
            await self.stream.aclose()
        if waiter.error is not None:
            raise BusUnavailable(f"Redis did not acknowledge {verb.decode()}: {waiter.error}")

    def reply(self, push) -> None:
        """A reply other than a message: acknowledgements and errors."""
        if type(push) is list and push and push[0] in _ACKS:
            if self._waiters:
                head = self._waiters[0]
                head.remaining -= 1
                if head.remaining <= 0:
                    self._waiters.popleft().done.set()
        elif isinstance(push, RespError) and self._waiters:
            head = self._waiters.popleft()  # one error answers the whole command
            head.error = push
            head.done.set()
        # anything else needs no answer

    def fail(self, error: BaseException) -> None:
        """The connection is gone: every waiting request fails."""
        if self._broken is None:
            self._broken = error
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.error = error
            waiter.done.set()


_SSUBSCRIBE, _SUNSUBSCRIBE, _PONG = b"ssubscribe", b"sunsubscribe", b"pong"


class _Command:
    """A command waiting for its answer: one ack per channel, in order."""

    __slots__ = ("kind", "channels", "next", "done", "error")

    def __init__(self, kind: bytes, channels: list[bytes]) -> None:
        self.kind = kind
        self.channels = channels
        self.next = 0
        self.done = trio.Event()
        self.error: BaseException | None = None


class ShardSubscription(Subscription):
    """A subscription connection in sharded mode: every acknowledgement is
    matched to the channel its command named, so an ``sunsubscribe`` that no
    command asked for is told apart (``dropped(channel)``) and anything out
    of order is a broken stream.

    Raises:
      RespProtocolError: from :meth:`reply`, for a reply that fits no
        command (the session ends and is made again).
    """

    def __init__(self, stream: trio.abc.Stream, dropped: Callable[[bytes], None]) -> None:
        super().__init__(stream)
        self._dropped = dropped

    async def request(self, verb: bytes, channels: Sequence[str]) -> None:
        """PING (the barrier of a history read) or one command; as the base."""
        (error,) = await self.request_many(verb, [list(channels)])
        if error is not None:
            raise BusUnavailable(f"Redis did not acknowledge {verb.decode()}: {error}")

    async def request_many(self, verb: bytes, groups: Sequence[Sequence[str]]) -> list[RespError | None]:
        """One ``verb`` command per group, all in one write; returns once
        Redis answered each: None (acknowledged) or the error it answered
        (``MOVED``, ``CLUSTERDOWN`` …), per group.

        Raises:
          BusUnavailable: the connection failed, or answered nothing for
            SUBSCRIBE_ACK_TIMEOUT (it is then closed: the session ends).
        """
        if self._broken is not None:
            raise BusUnavailable(f"the Redis subscription connection failed: {self._broken!r}")
        kind = _PONG if verb == b"PING" else verb.lower()
        waiters = [_Command(kind, [c.encode() for c in group] if kind != _PONG else [b""]) for group in groups]
        data = b"".join(command(verb, *group) for group in groups)
        async with self._send_lock:
            self._waiters.extend(waiters)  # type: ignore[arg-type]  # the same interface as _Waiter
            try:
                await self.stream.send_all(data)
            except BaseException as e:
                # Nothing or part of it went out (cancelled, or the connection
                # failed): the acknowledgements can no longer be matched, so
                # the connection is closed and the session ends.
                self.fail(e)
                await trio.aclose_forcefully(self.stream)
                if not isinstance(e, Exception):
                    raise
                raise BusUnavailable(f"sending to Redis failed: {describe(e)}") from None
        with trio.move_on_after(SUBSCRIBE_ACK_TIMEOUT):
            for waiter in waiters:
                await waiter.done.wait()
        if not all(w.done.is_set() for w in waiters):
            self.fail(TimeoutError(f"no acknowledgement of {verb.decode()} in {SUBSCRIBE_ACK_TIMEOUT:g} s"))
            await self.stream.aclose()
        out: list[RespError | None] = []
        for waiter in waiters:
            if isinstance(waiter.error, RespError):
                out.append(waiter.error)
            elif waiter.error is not None:
                raise BusUnavailable(f"Redis did not acknowledge {verb.decode()}: {waiter.error}")
            else:
                out.append(None)
        return out

    def reply(self, push) -> None:
        waiters = self._waiters
        if type(push) is list and len(push) >= 2 and push[0] in (_SSUBSCRIBE, _SUNSUBSCRIBE, _PONG):
            kind = push[0]
            head: _Command | None = waiters[0] if waiters else None  # type: ignore[assignment]
            if head is not None and head.kind == kind and (kind == _PONG or head.channels[head.next] == push[1]):
                head.next += 1
                if head.next >= len(head.channels):
                    waiters.popleft()
                    head.done.set()
                return
            if kind == _SUNSUBSCRIBE and isinstance(push[1], bytes):
                self._dropped(push[1])  # its slot left this node
                return
            raise RespProtocolError(f"a {kind.decode()} reply no command asked for")
        if isinstance(push, RespError):
            if not waiters:
                raise RespProtocolError(f"an error no command asked for: {push}")
            waiter = waiters.popleft()  # one error answers the whole command
            waiter.error = push
            waiter.done.set()
        # anything else needs no answer


def describe(error: BaseException | None) -> str:
    """An error and what caused it, for a log line or a startup error
    (TLS failures arrive as a bare BrokenResourceError caused by the SSLError)."""
    if error is None:
        return "unknown error"
    text = str(error) or type(error).__name__
    return f"{text}: {describe(error.__cause__)}" if error.__cause__ is not None else text


class Address:
    """Where the subscription connection goes, from the --bus URL."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        path: str,
        username: str | None,
        password: str | None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.scheme, self.host, self.port, self.path = scheme, host, port, path
        self.username, self.password = username, password
        self.tls = tls

    @classmethod
    def parse(cls, url: str, tls: ssl.SSLContext | None = None) -> Address:
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("the scheme must be redis://, rediss:// or unix://")
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// needs a socket path, as in unix:///run/redis.sock")
            return cls(scheme, "", 0, parts.path, username, password)
        if scheme == "rediss" and tls is None:
            tls = ssl.create_default_context()
        return cls(scheme, parts.hostname or "127.0.0.1", parts.port or 6379, "", username, password, tls)

    async def connect(self) -> trio.abc.Stream:
        if self.scheme == "unix":
            return await trio.open_unix_socket(self.path)
        assert self.scheme == "redis" or self.tls is not None  # rediss:// always has a context (parse)
        return await open_stream(self.host, self.port, self.tls if self.scheme == "rediss" else None)


async def open_stream(host: str, port: int, tls: ssl.SSLContext | None) -> trio.abc.Stream:
    """A TCP connection to a Redis node, a sentinel or a cluster master,
    with its TLS handshake done when ``tls`` is given (closed again if the
    handshake fails)."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if tls is None:
        return stream
    secure = trio.SSLStream(stream, tls, server_hostname=host)
    try:
        await secure.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(secure)
        raise
    return secure


class MultiHostURL:
    """A --bus URL naming several hosts: ``SCHEME://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/PATH``
    (Redis Cluster's seed nodes, Sentinel's sentinels); IPv6 hosts in brackets.

    Raises:
      ValueError: from the constructor, for a URL that cannot be used.
    """

    def __init__(self, url: str, scheme: str, default_port: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != scheme:
            raise ValueError(f"the scheme must be {scheme}://")
        userinfo, at, hostlist = parts.netloc.rpartition("@")
        self.username: str | None = None
        self.password: str | None = None
        if at:
            user, colon, password = userinfo.partition(":")
            self.username = unquote(user) or None
            self.password = unquote(password) if colon else None
        self.hosts: list[tuple[str, int]] = []
        for item in hostlist.split(","):
            host, port = item, str(default_port)
            if item.startswith("["):
                host, _, rest = item[1:].partition("]")
                if rest:
                    if not rest.startswith(":"):
                        raise ValueError(f"bad host {item!r}")
                    port = rest[1:]
            elif ":" in item:
                host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad host {item!r}: use HOST:PORT")
            self.hosts.append((host, int(port)))
        self.path = [unquote(p) for p in parts.path.split("/") if p]
        self.query = parts.query


# The TLS options a rediss+cluster:// or rediss+sentinel:// URL may carry
# after '?', as a rediss:// URL does for coredis.
TLS_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_check_hostname")


def tls_context(query: str) -> ssl.SSLContext:
    """The client TLS context of a ``rediss+…://`` URL's query: the server's
    certificate checked against the system's CAs, or ``ssl_ca_certs`` (a PEM
    file); ``ssl_cert_reqs=none`` skips the check, ``ssl_check_hostname=false``
    the host name's.

    Raises:
      ValueError: an option that is not one of TLS_OPTIONS, or a bad value.
    """
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(TLS_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} after '?' (known: {', '.join(TLS_OPTIONS)})")
    try:
        context = ssl.create_default_context(cafile=options.get("ssl_ca_certs") or None)
    except OSError as e:
        raise ValueError(f"cannot read ssl_ca_certs: {e.strerror or e}") from None
    reqs = options.get("ssl_cert_reqs", "required").lower()
    if reqs not in ("required", "none"):
        raise ValueError("ssl_cert_reqs must be required or none")
    check = options.get("ssl_check_hostname", "true").lower()
    if check not in ("true", "false"):
        raise ValueError("ssl_check_hostname must be true or false")
    if check == "false" or reqs == "none":
        context.check_hostname = False
    if reqs == "none":
        context.verify_mode = ssl.CERT_NONE
    return context


def chunks(channels: list[str]):
    for i in range(0, len(channels), CHANNELS_PER_COMMAND):
        yield channels[i : i + CHANNELS_PER_COMMAND]


def safe(url: str) -> str:
    """The URL without a password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest
