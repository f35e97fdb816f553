"""``--poller shared``: the article's netpoll shape, no task per idle connection.

In the default mode every connection has one parked reader task
(:mod:`mailpush.reader`). In this mode idle connections, and handshakes not
yet complete, live in one epoll set of mailpush's own, level-triggered, and
one task (:meth:`SharedPoller.run`) waits on that epoll descriptor with
``trio.lowlevel.wait_readable``. When it is readable, the task takes the
ready connections in batches of at most BATCH, reads each into the one
read buffer and handles it synchronously (the upgrade parser and the packet
handling have no awaits), with a checkpoint between batches. An idle
connection is then only a socket, a :class:`~mailpush.connection.Connection`
and an entry in a dict: no task, no coroutine frame, no buffer.

Everything else is the same code as in the default mode: the upgrade
(:func:`mailpush.upgrade.answer_head`), the connection and its packets,
writers spawned on demand (they wait on Trio's own epoll, as before),
keepalive, drain, limits and metrics. The accept loop takes a handshake
slot per socket, as in the default mode, and hands it back when the socket
joins the set; the request is then parsed and answered in one synchronous
step when its bytes arrive, so it needs no slot: a connection that sends
nothing holds no task and no slot, only its entry and its handshake
deadline.

Ownership: a socket handed to :meth:`SharedPoller.add` belongs to the
poller (an entry in :attr:`SharedPoller.entries`) until it is dropped. A
connection is dropped when it closes, wherever that starts: the
connection's :meth:`~mailpush.connection.Connection.abort` calls the
context's ``on_close`` hook (:meth:`SharedPoller.forget`) before the
descriptor is closed, so the descriptor leaves the epoll set and the
books (``ctx.sockets``, ``ctx.connections``, the registry) first, and a
reused descriptor number can never reach a stale entry.

Linux only (epoll). Error handling: the poller task is the isolation
boundary of every connection in it: an unexpected error while handling one
connection (a bug) is reported to ``ctx.task_failed`` and ends that
connection, never the others or the task; a failing handshake is answered
500. If the task itself is cancelled (the server stops), every socket it
still holds is closed.
"""

from __future__ import annotations

import errno
import select
import socket
from typing import TYPE_CHECKING

import trio

from .connection import Connection
from .upgrade import RESPONSE_500, answer_head, close_socket, send_answer

if TYPE_CHECKING:
    from .context import Context

__all__ = ["SharedPoller", "BATCH"]

# Ready connections handled between two checkpoints: a burst of 15,000
# readable connections is worked off in slices, and the accept loop, the
# timers and the writers run in between.
BATCH = 256

_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
_QUIET_ERRNOS = (errno.ECONNRESET, errno.EPIPE, errno.EBADF, errno.ETIMEDOUT)


class _Handshake:
    """A socket whose upgrade request is not complete yet."""

    __slots__ = ("sock", "data", "deadline")

    def __init__(self, sock: socket.socket, deadline: list) -> None:
        self.sock = sock
        self.data = b""
        self.deadline = deadline


class SharedPoller:
    """One epoll set and one task for every connection of a server.

    Args:
      ctx: the server as its connections see it; the poller sets its
        ``on_close`` hook.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.epoll = select.epoll()
        # descriptor -> the handshake or connection on it
        self.entries: dict[int, _Handshake | Connection] = {}
        ctx.on_close = self.forget

    # -- handing sockets in and taking them out -------------------------------

    def add(self, sock: socket.socket, slot: object | None) -> None:
        """Take an accepted socket (counted in ``ctx.sockets`` already): it
        waits in the set for its upgrade request, holding no slot (the
        acceptor's, if it took one, is given back)."""
        if slot is not None:
            self.ctx.handshakes.release_on_behalf_of(slot)
        fd = sock.fileno()
        self.entries[fd] = _Handshake(sock, self.ctx.timers.handshake_deadline(sock))
        self.epoll.register(fd, _EVENTS)

    def forget(self, conn: Connection) -> None:
        """``conn`` is closing (its descriptor still open): off the set and
        the books. The ``on_close`` hook of the context."""
        fd = conn.sock.fileno()
        if self.entries.get(fd) is conn:
            del self.entries[fd]
            self._unregister(fd)
            self.ctx.removed(conn)
            self.ctx.sockets -= 1

    def expire(self, sock: socket.socket) -> None:
        """A handshake past its deadline (the timers call this): 408 and close."""
        from .upgrade import expire_handshake

        self._drop_handshake(sock)
        expire_handshake(self.ctx, sock)

    def _drop_handshake(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        entry = self.entries.get(fd)
        if isinstance(entry, _Handshake) and entry.sock is sock:
            del self.entries[fd]
            self._unregister(fd)
            entry.deadline[1] = None
            self.ctx.sockets -= 1

    def _unregister(self, fd: int) -> None:
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed already: the kernel dropped it from the set

    # -- the task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait on the epoll set and handle what is ready, until cancelled.

        Resource handling: on the way out every socket still in the set is
        closed and the epoll descriptor with it.

        Error handling: see the module docstring (one connection's bug ends
        that connection only).
        """
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self.epoll)
                for fd, _ in self.epoll.poll(0, BATCH):
                    entry = self.entries.get(fd)
                    if entry is None:
                        self._unregister(fd)
                    elif type(entry) is _Handshake:
                        self._handshake(entry)
                    else:
                        self._read(entry)  # type: ignore[arg-type]
                await trio.lowlevel.checkpoint()
        finally:
            for entry in list(self.entries.values()):
                if type(entry) is _Handshake:
                    self._drop_handshake(entry.sock)
                    close_socket(entry.sock)
                else:
                    entry.abort()  # type: ignore[union-attr]
            self.epoll.close()

    def _read(self, conn: Connection) -> None:
        ctx = self.ctx
        try:
            n = conn.sock.recv_into(ctx.buffer)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in _QUIET_ERRNOS:
                ctx.log.warning("socket_error", error=str(e))
            conn.abort()
            return
        if not n:
            conn.abort()  # EOF: the peer is gone
            return
        try:
            conn.on_data(ctx.view[:n])
        except Exception:  # noqa: BLE001 - the isolation boundary, see the module docstring
            ctx.task_failed("connection")
            conn.abort()

    def _handshake(self, hs: _Handshake) -> None:
        # No handshake slot is taken here: the request is read and answered
        # in this one synchronous step, so no other handshake can run
        # meanwhile (a slot would be taken and given back with nothing in
        # between: ~3 µs of Trio bookkeeping per upgrade for no bound).
        ctx, sock = self.ctx, hs.sock
        try:
            conn, rest, done = answer_head(ctx, sock, hs.data)
        except Exception:  # noqa: BLE001 - the isolation boundary, see the module docstring
            ctx.task_failed("handshake")
            send_answer(sock, RESPONSE_500)
            conn, rest, done = None, b"", True
        if not done:
            hs.data = rest
            return
        hs.deadline[1] = None
        if conn is None:  # refused or gone: off the set and the books, closed
            self._drop_handshake(sock)
            close_socket(sock)
            return
        # Upgraded: the same descriptor and registration, now the connection's.
        self.entries[sock.fileno()] = conn
        ctx.added(conn)
        if rest:
            try:
                conn.on_data(rest)
            except Exception:  # noqa: BLE001 - the isolation boundary, see the module docstring
                ctx.task_failed("connection")
                conn.abort()
