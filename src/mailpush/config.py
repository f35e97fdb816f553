"""Server configuration: one attrs class, every limit named and explained.

The CLI (``cli.py``) fills it from options and ``MAILPUSH_*`` variables; the
tests build it directly. Each default says why it has that value.
"""

from __future__ import annotations

import ipaddress
import select

import attrs

from .errors import ConfigError

__all__ = ["Config", "parse_hostport", "is_loopback"]


def parse_hostport(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) → ``(host, port)``."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} must be HOST:PORT with a port from 0 to 65535, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# The admin API's address unless told otherwise: loopback only, it can
# publish to anyone.
DEFAULT_ADMIN = ("127.0.0.1", 8081)
# An admin token shorter than this is guessable.
MIN_ADMIN_TOKEN = 16


def is_loopback(host: str) -> bool:
    """``host`` (an address or ``localhost``) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen(kw_only=True)
class Config:
    """Every option of a server (frozen; ``attrs.evolve`` makes variants).

    Raises:
      ConfigError: from the constructor, for a value that cannot work,
        saying which option and why.
    """

    # Where browsers connect (behind the TCP load balancer).
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    # Admin HTTP (publish, health, metrics, demo): loopback only by default,
    # it can publish to anyone. None: no admin listener.
    admin: tuple[str, int] | None = DEFAULT_ADMIN
    # "embedded" (in-process) or a bus URL; the fake bus is passed in by tests.
    bus: str = "embedded"
    # The token secret; never in a repr or a log line.
    secret: str = attrs.field(default="", repr=False)
    # Bearer token every admin endpoint but /healthz requires; None: none,
    # and then the admin API must listen on a loopback address.
    admin_token: str | None = attrs.field(default=None, repr=False)
    # Development mode (--demo): the demo page may mint tokens (/v1/token)
    # without an admin token.
    demo: bool = False
    # Upgrade path of the push WebSocket (the external contract).
    ws_path: str = "/v1/ws"
    # Test-only echo endpoint for the conformance runner; off by default.
    echo_path: str | None = None
    # Origins allowed to open the WebSocket; empty: any (tokens still apply).
    allowed_origins: frozenset[str] = frozenset()
    # Worker processes sharing the listen port (SO_REUSEPORT).
    workers: int = 1
    # Open connections (handshaking + upgraded) per process. 18,000 stays
    # under this machine's 20,000-file limit with room for listeners, the
    # bus and admin sockets.
    max_connections: int = 18_000
    # Open connections of one subscriber per process (a mailbox owner with
    # 500 tabs, or a client that leaks sockets, cannot take a node's
    # capacity); 0: no cap. Beyond it an upgrade gets 429, or close 4008 for
    # a mailpush.v1 client.
    max_connections_per_subscriber: int = 0
    # Handshakes in progress at once: the accept loop waits for a slot and
    # leaves further connections in the kernel backlog. Enough to keep both
    # cores busy through a reconnect avalanche without piling up tasks.
    max_handshakes: int = 256
    # Seconds for the whole upgrade request (slowloris bound).
    handshake_timeout: float = 5.0
    # The one read buffer every connection reads into (each read is handled
    # before the next await, so one serves them all): 16 KiB takes a
    # browser's packets and a burst of frames in one recv().
    buffer_size: int = 16_384
    # Largest client message. Browsers send small packets here (subscribe,
    # ping); 4 KiB is generous and bounds what one client can make us hold.
    max_message_size: int = 4096
    # Bytes queued for one connection that does not read before it is
    # closed as a slow consumer (about 250 ordinary events).
    send_queue_bytes: int = 65_536
    # Error packets a connection may provoke before it is closed with 1008.
    max_packet_errors: int = 10
    # Keepalive: ping every interval; close when nothing came back within
    # pong_timeout after a ping. 0 disables pings.
    ping_interval: float = 30.0
    pong_timeout: float = 20.0
    # Event history, for tabs that reconnect: events kept per subscriber,
    # for how long (seconds), and in all at most (the memory bound: about
    # 230 bytes each plus its frame, bench/recovery.py). 100 events and ten minutes
    # cover a network blip, a drain and a deploy; 0 turns history off
    # (a resuming tab then always gets a resync).
    history_size: int = 100
    history_ttl: float = 600.0
    history_max_events: int = 1_000_000
    # How idle connections wait: "task" (one parked reader task each, the
    # default) or "shared" (one epoll set and one task for all of them, no
    # task per connection: poller.py; Linux only).
    poller: str = "task"
    # Drain: spread closes over this many seconds on SIGTERM/SIGINT.
    drain_seconds: float = 10.0
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console

    def __attrs_post_init__(self) -> None:
        for name in ("max_connections", "max_handshakes", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.buffer_size < 1024:
            raise ConfigError("--buffer-size must be at least 1024 bytes")
        if self.max_message_size < 125:
            raise ConfigError("--max-message-size must be at least 125 bytes")
        if self.send_queue_bytes < self.max_message_size:
            raise ConfigError("--send-queue-bytes must be at least --max-message-size")
        for name in ("history_size", "history_max_events", "max_connections_per_subscriber"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 (off) or more")
        if self.history_ttl < 0:
            raise ConfigError("--history-ttl must be 0 (off) or a positive number of seconds")
        for name in ("handshake_timeout", "pong_timeout", "drain_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds")
        if self.ping_interval < 0:
            raise ConfigError("--ping-interval must be 0 (off) or a positive number of seconds")
        if self.poller not in ("task", "shared"):
            raise ConfigError(f"--poller must be 'task' or 'shared', not {self.poller!r}")
        if self.poller == "shared" and not hasattr(select, "epoll"):
            raise ConfigError("--poller shared needs Linux (epoll); use --poller task here")
        if not self.ws_path.startswith("/"):
            raise ConfigError("--ws-path must start with '/'")
        if self.admin_token is not None and len(self.admin_token) < MIN_ADMIN_TOKEN:
            raise ConfigError(
                f"--admin-token must be at least {MIN_ADMIN_TOKEN} characters"
                " (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if self.admin is not None and not self.admin_token and not is_loopback(self.admin[0]):
            raise ConfigError(
                f"--admin {self.admin[0]}:{self.admin[1]} is not a loopback address: anyone who reaches it"
                " could publish to every subscriber; set --admin-token (MAILPUSH_ADMIN_TOKEN), or listen on 127.0.0.1"
            )
        if self.echo_path is not None and (not self.echo_path.startswith("/") or self.echo_path == self.ws_path):
            raise ConfigError("--echo-path must start with '/' and differ from the push path")
