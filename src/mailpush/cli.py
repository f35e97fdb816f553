"""Command line: ``mailpush serve | token | publish | listen`` and ``trio-run mailpush``.

Every option can also come from a ``MAILPUSH_<OPTION>`` environment variable
(``--max-connections`` ↔ ``MAILPUSH_MAX_CONNECTIONS``); the command line wins.
Bad values exit with status 2 and a message that says what to fix.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import signal
import socket
import sys
from collections.abc import Sequence

import msgspec
import trio

from . import log
from .auth import load_secret, mint
from .config import DEFAULT_ADMIN, Config, parse_hostport
from .errors import ConfigError, PublishError
from .items import parse_item
from .runner import run_server

__all__ = ["main", "trio_app", "build_parser"]

_D = Config()  # defaults, for the help texts
_DEFAULT_ADMIN = f"{DEFAULT_ADMIN[0]}:{DEFAULT_ADMIN[1]}"


def _env(name: str, default: object) -> object:
    return os.environ.get("MAILPUSH_" + name.upper().replace("-", "_"), default)


def _serve_options(p: argparse.ArgumentParser) -> None:
    def opt(name: str, default: object, help: str, type=str, **kw) -> None:
        env = "MAILPUSH_" + name.upper().replace("-", "_")
        p.add_argument(
            "--" + name, default=_env(name, default), type=type, help=f"{help} [env {env}; default {default}]", **kw
        )

    opt("listen", f"{_D.listen[0]}:{_D.listen[1]}", "HOST:PORT for browsers' WebSockets")
    opt(
        "admin",
        _DEFAULT_ADMIN,
        "HOST:PORT of the admin API (publish, health, metrics, demo); 'off' for none",
    )
    opt(
        "bus",
        _D.bus,
        "message bus: 'embedded' (in-process) or a Redis URL: redis://HOST:PORT/DB (channels mailpush:SUBSCRIBER),"
        " redis+cluster://HOST:PORT,HOST:PORT/ (sharded, channels mailpush:{SUBSCRIBER}) or"
        " redis+sentinel://HOST:PORT,HOST:PORT/MASTER[/DB]",
    )
    opt("secret", None, "HS256 secret for tokens, at least 32 bytes")
    opt("secret-file", None, "file whose first line is the secret")
    opt(
        "admin-token",
        None,
        "Bearer token required by every admin endpoint but /healthz; required when --admin is not a loopback address",
    )
    opt("ws-path", _D.ws_path, "upgrade path of the push WebSocket")
    opt("echo-path", None, "TEST ONLY: path of an echo endpoint without tokens, for the conformance runner")
    opt("allowed-origins", "", "comma-separated Origins allowed to connect; empty: any")
    opt(
        "workers",
        _D.workers,
        "worker processes sharing the listen port; worker i's admin API is on the admin port + 1 + i",
        type=int,
    )
    opt("max-connections", _D.max_connections, "open connections per process; beyond it upgrades get 503", type=int)
    opt(
        "max-connections-per-subscriber",
        _D.max_connections_per_subscriber,
        "open connections of one subscriber, per process and, on a Redis bus, across every instance on it;"
        " beyond it 429 (close 4008 for mailpush.v1 clients, and for a tab over the shared count); 0: no cap",
        type=int,
    )
    opt(
        "max-handshakes", _D.max_handshakes, "handshakes in progress at once; more wait in the kernel backlog", type=int
    )
    opt("handshake-timeout", _D.handshake_timeout, "seconds for the whole upgrade request", type=float)
    opt("buffer-size", _D.buffer_size, "bytes of the read buffer (one for all connections)", type=int)
    opt("max-message-size", _D.max_message_size, "largest client message in bytes (close 1009 beyond)", type=int)
    opt(
        "send-queue-bytes",
        _D.send_queue_bytes,
        "bytes queued for a client that does not read before it is dropped",
        type=int,
    )
    opt("max-packet-errors", _D.max_packet_errors, "bad packets before close 1008", type=int)
    opt("ping-interval", _D.ping_interval, "seconds between keepalive pings; 0: off", type=float)
    opt("pong-timeout", _D.pong_timeout, "seconds a client has to answer a ping", type=float)
    opt("history-size", _D.history_size, "events kept per subscriber for tabs that reconnect; 0: no history", type=int)
    opt("history-ttl", _D.history_ttl, "seconds an event is kept in the history", type=float)
    opt("history-max-events", _D.history_max_events, "events kept in the history in all (the memory bound)", type=int)
    opt(
        "poller",
        _D.poller,
        "how idle connections wait: 'task' (a parked reader task each) or 'shared' (one epoll set, no task each)",
    )
    opt("drain-seconds", _D.drain_seconds, "on SIGTERM/SIGINT, spread closes over this many seconds", type=float)
    opt("log-level", _D.log_level, "debug, info, warning or error")
    opt("log-format", _D.log_format, "auto (console on a terminal, else JSON), json or console")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument("--relay-fd", type=int, default=None, help=argparse.SUPPRESS)  # the worker's relay socket
    p.add_argument(
        "--demo",
        action="store_true",
        help="development: make a random secret if none is set, print the demo page URL and a ready token",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``mailpush`` command line: serve, token, listen, publish."""
    parser = argparse.ArgumentParser(prog="mailpush", description="WebSocket push gateway for mail.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the server", description="Run the push server.")
    _serve_options(serve)

    token = sub.add_parser(
        "token", help="print a token for a subscriber", description="Print a JWT (HS256) for SUBSCRIBER."
    )
    token.add_argument("subscriber", help="subscriber id (the mailbox owner)")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until the token expires [default 3600]")
    token.add_argument("--secret", default=_env("secret", None), help="HS256 secret [env MAILPUSH_SECRET]")
    token.add_argument(
        "--secret-file",
        default=_env("secret-file", None),
        help="file whose first line is the secret [env MAILPUSH_SECRET_FILE]",
    )

    lis = sub.add_parser(
        "listen",
        help="print the events a subscriber receives",
        description="Connect to a running server as SUBSCRIBER (like a browser tab)"
        " and print each event it receives as a JSON line.",
    )
    lis.add_argument("subscriber", help="subscriber id")
    lis.add_argument(
        "--url",
        default=_env("url", f"ws://127.0.0.1:{_D.listen[1]}{_D.ws_path}"),
        help=f"the server's WebSocket URL [env MAILPUSH_URL; default ws://127.0.0.1:{_D.listen[1]}{_D.ws_path}]",
    )
    lis.add_argument("--events", default="", help="comma-separated event names to receive [default: all]")
    lis.add_argument(
        "--count", type=int, default=0, help="exit after this many events [default 0: until the server closes]"
    )
    lis.add_argument("--token", default=None, help="the token to connect with [default: minted with the secret]")
    lis.add_argument("--ttl", type=float, default=3600.0, help="seconds the minted token is valid [default 3600]")
    lis.add_argument(
        "--secret", default=_env("secret", None), help="HS256 secret to mint the token [env MAILPUSH_SECRET]"
    )
    lis.add_argument(
        "--secret-file",
        default=_env("secret-file", None),
        help="file whose first line is the secret [env MAILPUSH_SECRET_FILE]",
    )

    pub = sub.add_parser(
        "publish", help="publish one event", description="Publish one event through the admin API of a running server."
    )
    pub.add_argument("subscriber", help="subscriber id")
    pub.add_argument("event", help="event name, e.g. new_letter")
    pub.add_argument("--data", default="{}", help="event data, a JSON object [default {}]")
    pub.add_argument(
        "--admin",
        default=_env("admin", _DEFAULT_ADMIN),
        help="HOST:PORT of the server's admin API [env MAILPUSH_ADMIN]",
    )
    pub.add_argument(
        "--admin-token",
        default=_env("admin-token", None),
        help="the server's admin token, if it has one [env MAILPUSH_ADMIN_TOKEN]",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The server's Config from ``mailpush serve``'s options.

    Raises:
      ConfigError: an option or the secret is unusable.
    """
    secret = args.secret
    if args.demo and not secret and not args.secret_file:
        secret = secrets.token_urlsafe(32)
    secret = load_secret(secret, args.secret_file)
    admin = None if str(args.admin).lower() in ("off", "none", "") else parse_hostport(args.admin, "--admin")
    origins = frozenset(o.strip() for o in str(args.allowed_origins).split(",") if o.strip())
    return Config(
        listen=parse_hostport(args.listen, "--listen"),
        admin=admin,
        bus=args.bus,
        secret=secret,
        admin_token=args.admin_token or None,
        demo=args.demo,
        ws_path=args.ws_path,
        echo_path=args.echo_path or None,
        allowed_origins=origins,
        workers=args.workers,
        max_connections=args.max_connections,
        max_connections_per_subscriber=args.max_connections_per_subscriber,
        max_handshakes=args.max_handshakes,
        handshake_timeout=args.handshake_timeout,
        buffer_size=args.buffer_size,
        max_message_size=args.max_message_size,
        send_queue_bytes=args.send_queue_bytes,
        max_packet_errors=args.max_packet_errors,
        ping_interval=args.ping_interval,
        pong_timeout=args.pong_timeout,
        drain_seconds=args.drain_seconds,
        poller=args.poller,
        history_size=args.history_size,
        history_ttl=args.history_ttl,
        history_max_events=args.history_max_events,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    # Until the server listens for it (and after), SIGHUP is ignored too.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = config_from_args(args)
    log.configure(config.log_level, config.log_format)
    if args.worker_index is not None:  # one worker of a --workers set
        from .bus.relay import RelayBus
        from .workers import die_with_supervisor

        die_with_supervisor()
        bus = (
            RelayBus(socket.socket(fileno=args.relay_fd))
            if config.bus == "embedded" and args.relay_fd is not None
            else None
        )
        trio.run(run_server, config, args.demo and args.worker_index == 0, bus, args.worker_index)
        return 0
    if config.workers > 1:
        from .workers import run_workers

        return run_workers(config, args.raw_argv)
    trio.run(run_server, config, args.demo)
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    secret = load_secret(args.secret, args.secret_file)
    print(mint(secret, args.subscriber, args.ttl))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = msgspec.json.decode(args.data)
    except msgspec.DecodeError as e:
        raise ConfigError(f"--data is not valid JSON: {e}") from None
    try:
        item = parse_item({"subscriber": args.subscriber, "event": args.event, "data": data}, "event")
    except PublishError as e:
        raise ConfigError(str(e)) from None
    host, port = parse_hostport(args.admin, "--admin")
    body = msgspec.json.encode({"subscriber": item[0], "event": item[1], "data": item[2]})
    conn = http.client.HTTPConnection(host if host != "0.0.0.0" else "127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if args.admin_token:
            headers["Authorization"] = f"Bearer {args.admin_token}"
        conn.request("POST", "/v1/publish", body, headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace").strip()
    except OSError as e:
        print(f"mailpush publish: cannot reach the admin API at {args.admin}: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if resp.status != 202:
        print(f"mailpush publish: refused ({resp.status}): {text}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _cmd_listen(args: argparse.Namespace) -> int:
    from .listen import listen

    token = args.token or mint(load_secret(args.secret, args.secret_file), args.subscriber, args.ttl)
    events = [e.strip() for e in args.events.split(",") if e.strip()] or None
    if args.count < 0:
        raise ConfigError("--count must be 0 (no limit) or more")
    try:
        return trio.run(listen, args.url, token, events, args.count)
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status (2 for a configuration
    error, with a message that says what to fix)."""
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    args.raw_argv = raw[1:]  # a serve command's own options, for the workers it starts
    try:
        return {"serve": _cmd_serve, "token": _cmd_token, "publish": _cmd_publish, "listen": _cmd_listen}[args.command](
            args
        )
    except ConfigError as e:
        print(f"mailpush {args.command}: {e}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # A configuration problem found by a task of the running server
        # (a port in use, an unreachable bus) is still a configuration problem.
        config_errors, rest = group.split(ConfigError)
        if config_errors is None or rest is not None:
            raise
        first: BaseException = config_errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"mailpush {args.command}: {first}", file=sys.stderr)
        return 2


def trio_app(argv: Sequence[str]) -> int:
    """``trio-run mailpush [OPTIONS]``: the same as ``mailpush serve``."""
    return main(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main())
