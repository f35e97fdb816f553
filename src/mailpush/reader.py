"""The one task of a connection: the article's parked reader.

Each accepted socket gets exactly one task, :func:`serve_socket`. It runs
the upgrade (:mod:`mailpush.upgrade`), and then parks on the socket's
readiness holding no buffer. When bytes arrive it reads them into the
process's one read buffer, hands them to the connection (which handles them
without awaiting anything, so one buffer serves every connection: Trio's
single thread is the bound), and parks again.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

import trio

from .connection import CLOSED
from .upgrade import RESPONSE_500, close_socket, open_connection, send_answer

if TYPE_CHECKING:
    from .context import Context

__all__ = ["serve_socket"]

# Socket errors that are just a peer going away: not worth a log line.
_QUIET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.EBADF, errno.ETIMEDOUT)


async def serve_socket(ctx: Context, sock: socket.socket, slot: object) -> None:
    """The one task of a connection, from accept to close.

    Kept small on purpose: this coroutine's frame is what every idle
    connection holds (with the I/O manager's wait below it).

    Args:
      ctx: the server as a connection sees it.
      sock: the accepted socket, counted in ``ctx.sockets`` by the accept
        loop.
      slot: the handshake slot taken for it (see :mod:`mailpush.upgrade`).

    Resource handling: the socket is this task's from the accept loop on,
    and its connection's once upgraded (:meth:`Connection.abort` closes
    it); either way it is closed on every way out, and it leaves
    ``ctx.sockets`` (and the connection the server's books) here, in one
    place. (The timer task closes a handshake past its deadline early, to
    wake it.)

    Error handling: this is the isolation boundary of one connection. A
    client's protocol faults get their close code or HTTP status; socket
    errors end it quietly; an unexpected error (a bug) in the handshake is
    answered 500, after it ends the connection, and either way it is
    reported to ``ctx.task_failed`` (logged, counted), never reaching the
    other connections or the server.
    """
    conn = None
    try:
        try:
            conn, rest = await open_connection(ctx, sock, slot)
        except Exception:  # noqa: BLE001 - the isolation boundary, see above
            ctx.task_failed("handshake")
            send_answer(sock, RESPONSE_500)
            return
        if conn is None:
            return
        ctx.added(conn)
        try:
            if rest:
                conn.on_data(rest)
            del rest
            # Shared by every connection (no per-connection view or buffer:
            # a parked frame holds only references).
            buf, view = ctx.buffer, ctx.view
            wait_readable = ctx.wait_readable
            while conn.state != CLOSED:
                await wait_readable(sock)
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    continue
                if not n:
                    break  # EOF: the peer is gone
                conn.on_data(view[:n])
        except trio.ClosedResourceError:
            pass
        except OSError as e:
            if e.errno not in _QUIET_ERRNOS:
                ctx.log.warning("socket_error", error=str(e))
        except Exception:  # noqa: BLE001 - the isolation boundary, see above
            ctx.task_failed("connection")
        finally:
            conn.abort()
            ctx.removed(conn)
    finally:
        if conn is None:
            close_socket(sock)  # never upgraded: still ours to close
        ctx.sockets -= 1
