"""Admin HTTP: publish, health, metrics, token minting for the demo page, and
the live demo page. Loopback by default: it can publish to anyone.

HTTP/1.1 is h11's (:mod:`mailpush.admin_http`); this module is the Trio
side (a task per client, a handful of clients) and the routes.

Who may use it:

- ``--admin-token`` (``MAILPUSH_ADMIN_TOKEN``): every endpoint but
  ``/healthz`` then needs ``Authorization: Bearer <token>``; without one
  the admin API must listen on a loopback address (the server refuses to
  start otherwise, see :class:`~mailpush.config.Config`).
- CSRF: a request whose ``Origin`` is not the admin page's own (or whose
  ``Sec-Fetch-Site`` says cross-site) is refused with 403, so a web page
  cannot make a visitor's browser publish. Without a token the ``Host``
  must also be a loopback name (a DNS-rebinding page has its own name).
- ``/v1/token`` (used by the demo page) exists only with ``--demo`` or an
  admin token: otherwise anyone on the machine could mint tokens.
"""

from __future__ import annotations

import functools
import hmac
import html
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol

import msgspec
import trio

from .admin_http import CLOSED, CONTINUE, AdminConnection, Request
from .auth import mint
from .bus import Bus
from .config import Config, is_loopback
from .errors import AdminHTTPError, BusUnavailable, ConfigError, MailpushError, PublishError
from .items import parse_items
from .log import LogLimiter, get_logger
from .metrics import Stats
from .packets import MAX_SUBSCRIBER_LEN

__all__ = ["serve_admin", "Server"]


class Server(Protocol):
    """What the admin API needs of the server (a
    :class:`mailpush.server.Server` is one)."""

    config: Config
    stats: Stats
    bus: Bus
    log: Any
    listen_address: tuple[str, int] | None
    health: Callable[[], tuple[int, str]]

    async def metrics(self) -> bytes:
        """The Prometheus text of /metrics."""
        ...


# A keep-alive connection that sends nothing for this long is closed
# quietly (a health probe's pre-connect, an idle client pool).
IDLE_TIMEOUT = 60.0
# Once a request has begun, the whole of it must arrive within this long
# (408 beyond): a slow-sending client cannot hold a task for ever.
REQUEST_TIMEOUT = 30.0
# Admin clients served at once; more get 503 at once. A mail store, a
# scraper and a probe or two need a few; the bound keeps a local flood of
# connections from taking the process's file descriptors.
MAX_CLIENTS = 128
# A publish the bus has not taken within this long is answered 503: a
# Redis that stopped answering (paused, partitioned) while its connection
# looks up would otherwise hold the request until the heartbeat notices.
PUBLISH_TIMEOUT = 5.0
# Bytes per read of an admin connection.
RECV_SIZE = 65_536
# Longest token the demo page may ask for (a day).
MAX_TOKEN_TTL = 86_400

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_AUTH_HEADERS = (("WWW-Authenticate", 'Bearer realm="mailpush-admin"'),)
_ENDPOINTS = ["/v1/publish", "/v1/token", "/healthz", "/metrics", "/"]

_log_limit = LogLimiter()
_encode = msgspec.json.Encoder().encode


def _error_body(message: str) -> bytes:
    return _encode({"error": message}) + b"\n"


async def serve_admin(
    server: Server,
    address: tuple[str, int],
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on ``address`` until cancelled.

    ``task_status.started((host, port))`` once bound.

    Raises:
      ConfigError: the address cannot be bound.

    Error handling: each client task is an isolation boundary (see
    :func:`_client`); nothing a client sends or a route does ends this task.
    """
    host, port = address
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise ConfigError(f"cannot listen on admin address {host}:{port}: {e.strerror}") from None
    bound = listeners[0].socket.getsockname()[:2]
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, functools.partial(_client, server, limiter), listeners)
        task_status.started(bound)


async def _client(server: Server, limiter: trio.CapacityLimiter, stream: trio.SocketStream) -> None:
    """One admin connection, from accept to close.

    Resource handling: the stream is closed here, whatever happens.

    Error handling: this is an isolation boundary. A malformed request is
    answered with its status and the connection closed; a route that fails
    unexpectedly is answered 500 (503 when the bus is down) and logged;
    a peer that vanishes ends the connection quietly. Nothing but
    cancellation leaves, so no client can stop the admin server (trio's
    ``serve_listeners`` would let an exception end it, and the process).
    """
    http = AdminConnection()
    try:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.send_all(
                http.error_bytes(
                    503,
                    _JSON,
                    _error_body(f"more than {MAX_CLIENTS} admin connections at once; retry shortly"),
                    (("Retry-After", "1"),),
                )
            )
            return
        try:
            await _converse(server, stream, http)
        finally:
            limiter.release()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:  # noqa: BLE001 - the isolation boundary, see above
        if n := _log_limit.tick():
            get_logger().exception("admin_connection_failed", count=n)
    finally:
        await stream.aclose()


async def _converse(server: Server, stream: trio.SocketStream, http: AdminConnection) -> None:
    """Requests and answers until either side ends the connection."""
    while True:
        try:
            request = await _next_request(stream, http)
        except AdminHTTPError as e:
            await stream.send_all(http.error_bytes(e.status, _JSON, _error_body(e.message), e.headers))
            return
        if request is None:
            return
        status, ctype, body, headers = await _answer(server, request)
        await stream.send_all(http.respond(status, ctype, body, headers))
        if not http.keep_alive:
            return


async def _next_request(stream: trio.SocketStream, http: AdminConnection) -> Request | None:
    """The next whole request, or None when the client closed (or stayed
    idle for IDLE_TIMEOUT) between requests.

    Raises:
      AdminHTTPError: malformed or too large (from h11 and our limits), or
        408 when a begun request is not complete within REQUEST_TIMEOUT.
    """
    deadline = trio.current_time() + IDLE_TIMEOUT
    began = False
    while True:
        got = http.next()
        if type(got) is Request:
            return got
        if got is CLOSED:
            return None
        if got is CONTINUE:
            await stream.send_all(http.continue_bytes())
            continue
        if not began and http.started:
            began = True
            deadline = trio.current_time() + REQUEST_TIMEOUT
        with trio.move_on_at(deadline):
            http.receive(await stream.receive_some(RECV_SIZE))
            continue
        if began:
            raise AdminHTTPError(408, f"request not complete within {REQUEST_TIMEOUT:g} s")
        return None  # idle: close without an answer, as HTTP/1.1 servers do


async def _answer(server: Server, request: Request) -> tuple[int, str, bytes, tuple[tuple[str, str], ...]]:
    """The answer to one request: (status, content type, body, headers).

    Error handling: never raises but for cancellation. Refusals carry
    their status; a bus that cannot be reached is 503 with Retry-After;
    any other exception is a bug, logged (at most once a second) and
    answered 500.
    """
    try:
        return await _route(server, request)
    except AdminHTTPError as e:
        return e.status, _JSON, _error_body(e.message), e.headers
    except BusUnavailable as e:
        get_logger().warning("publish_unavailable", reason=str(e))
        return 503, _JSON, _error_body(f"the bus is unavailable: {e}"), (("Retry-After", "1"),)
    except Exception:  # noqa: BLE001 - the isolation boundary, see above
        if n := _log_limit.tick():
            get_logger().exception("admin_request_failed", method=request.method, path=request.path[:200], count=n)
        return 500, _JSON, _error_body("internal error while handling the request; the server logged it"), ()


async def _route(server: Server, request: Request) -> tuple[int, str, bytes, tuple[tuple[str, str], ...]]:
    method, path, headers = request.method, request.path, request.headers
    if path == "/healthz":
        if method not in ("GET", "HEAD"):
            raise AdminHTTPError(405, "use GET", (("Allow", "GET, HEAD"),))
        status, text = server.health()
        return status, _TEXT, text.encode() + b"\n", ()
    _check_origin(server, request)
    _check_token(server, request)
    if path == "/v1/publish":
        if method != "POST":
            raise AdminHTTPError(405, "use POST to publish", (("Allow", "POST"),))
        try:
            items = parse_items(request.body, headers.get("content-type", ""))
        except PublishError as e:
            server.log.warning("publish_refused", reason=str(e))
            raise AdminHTTPError(400, str(e)) from None
        if server.bus.restricts_subscribers:
            for i, item in enumerate(items):
                if reason := server.bus.check_subscriber(item[0]):
                    raise AdminHTTPError(400, f"item {i}: {reason}; nothing was published")
        with trio.move_on_after(PUBLISH_TIMEOUT) as waited:
            await server.bus.publish(items)
        if waited.cancelled_caught:
            raise BusUnavailable(
                f"the bus did not answer within {PUBLISH_TIMEOUT:g} s; the items may or may not have been published"
            )
        server.stats.published += len(items)
        return 202, _JSON, _encode({"accepted": len(items)}) + b"\n", ()
    if path == "/metrics":
        if method not in ("GET", "HEAD"):
            raise AdminHTTPError(405, "use GET", (("Allow", "GET, HEAD"),))
        return 200, "text/plain; version=0.0.4; charset=utf-8", await server.metrics(), ()
    if path == "/v1/token" and (server.config.demo or server.config.admin_token):
        if method != "POST":
            raise AdminHTTPError(405, 'use POST with {"subscriber": ...}', (("Allow", "POST"),))
        return _mint(server, request.body)
    if path in ("/", "/index.html"):
        if method not in ("GET", "HEAD"):
            raise AdminHTTPError(405, "use GET", (("Allow", "GET, HEAD"),))
        return 200, "text/html; charset=utf-8", _demo_page(server, headers.get("host", "")), ()
    endpoints = (
        _ENDPOINTS if server.config.demo or server.config.admin_token else [e for e in _ENDPOINTS if e != "/v1/token"]
    )
    return 404, _JSON, _encode({"error": f"no such admin endpoint: {path[:100]}", "endpoints": endpoints}) + b"\n", ()


def _check_origin(server: Server, request: Request) -> None:
    """Refuse what a web page could make a visitor's browser send (CSRF),
    and, without a token, requests for another host name (DNS rebinding).

    Raises:
      AdminHTTPError: 403 naming the header that was refused.
    """
    headers = request.headers
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        raise AdminHTTPError(
            403,
            f"cross-origin request refused: Origin {origin[:100]!r} is not this admin API's own;"
            " publish from a server, not from a web page",
        )
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise AdminHTTPError(403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]})")
    if not server.config.admin_token and host and not _loopback_host(host):
        raise AdminHTTPError(
            403,
            f"Host {host[:100]!r} is not a loopback name:"
            " without --admin-token the admin API answers only to localhost",
        )


def _loopback_host(host: str) -> bool:
    """``Host`` names this machine's loopback: localhost, 127.0.0.0/8, ::1."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    name = name.lower()
    return name.endswith(".localhost") or is_loopback(name)


def _check_token(server: Server, request: Request) -> None:
    """With ``--admin-token``, the request must carry it as a Bearer token.

    Raises:
      AdminHTTPError: 401 with ``WWW-Authenticate``.
    """
    expected = server.config.admin_token
    if not expected:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AdminHTTPError(
            401, "this endpoint needs 'Authorization: Bearer <admin token>' (--admin-token)", _AUTH_HEADERS
        )
    if not hmac.compare_digest(value.strip().encode("utf-8", "replace"), expected.encode("utf-8")):
        raise AdminHTTPError(401, "wrong admin token", _AUTH_HEADERS)


def _mint(server: Server, body: bytes) -> tuple[int, str, bytes, tuple[tuple[str, str], ...]]:
    try:
        req = msgspec.json.decode(body or b"{}")
        sub = req.get("subscriber") if type(req) is dict else None
        ttl = req.get("ttl", 3600) if type(req) is dict else 3600
        if type(sub) is not str or not sub or len(sub) > MAX_SUBSCRIBER_LEN:
            raise MailpushError(f"'subscriber' must be a string of 1 to {MAX_SUBSCRIBER_LEN} characters")
        if type(ttl) not in (int, float) or not 0 < ttl <= MAX_TOKEN_TTL:
            raise MailpushError(f"'ttl' must be a number of seconds from 1 to {MAX_TOKEN_TTL}")
        token = mint(server.config.secret, sub, ttl)
    except msgspec.DecodeError as e:
        raise AdminHTTPError(400, f"not valid JSON: {e}") from None
    except MailpushError as e:
        raise AdminHTTPError(400, str(e)) from None
    return 200, _JSON, _encode({"token": token, "subscriber": sub}) + b"\n", ()


@functools.cache
def _demo_template() -> str:
    return resources.files("mailpush").joinpath("demo.html").read_text(encoding="utf-8")


def _demo_page(server: Server, host_header: str) -> bytes:
    assert server.listen_address is not None
    host, port = server.listen_address
    if host in ("0.0.0.0", "::", ""):
        host = host_header.rpartition(":")[0] or host_header or "127.0.0.1"
    ws_url = f"ws://{host}:{port}{server.config.ws_path}"
    return _demo_template().replace("{{WS_URL}}", html.escape(ws_url)).encode("utf-8")
