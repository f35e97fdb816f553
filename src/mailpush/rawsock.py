"""Accepting and refusing on bare file descriptors.

In a reconnect avalanche most connections get the cheap 503: accept, read
the request off, send a prebuilt response, close. Python's
``socket.accept()`` builds a socket object for each (and converts its
family and type to enums), which is about a third of that refusal's cost.
``accept4`` (in C, ``mailpush._speedups``; else through ctypes) returns the
bare descriptor, already non-blocking; a refusal then never creates a
Python socket object, and an accepted connection gets one made without
further system calls.
"""

from __future__ import annotations

import _socket
import ctypes
import os
import socket

from .speedups import C

_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
# Enough for any request head a client sends before it reads the answer
# (one read, so the close sends FIN rather than RST for unread bytes).
_SCRATCH = bytearray(8192)


def _load_accept4():
    try:
        fn = ctypes.CDLL(None, use_errno=True).accept4
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_accept4 = _load_accept4()
# The same accept4() without ctypes' ~0.6 µs per call (Linux).
_c_accept = getattr(C, "accept_fd", None)


def accept_fd(listener: socket.socket) -> int:
    """Accept one connection: a non-blocking, close-on-exec descriptor.

    Raises BlockingIOError when none is waiting, OSError (with its errno)
    for any other failure, as ``socket.accept()`` does.
    """
    if _c_accept is not None:
        return _c_accept(listener.fileno())
    if _accept4 is not None:
        fd = _accept4(listener.fileno(), None, None, _FLAGS)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))  # EAGAIN makes a BlockingIOError
    fd, _addr = listener._accept()  # type: ignore[attr-defined]  # no accept4 in this libc
    os.set_blocking(fd, False)
    return fd


def socket_for(family: int, fd: int) -> socket.socket:
    """The socket object for a descriptor from :func:`accept_fd` on a
    listener of ``family`` (non-blocking already: no system call). The
    caller reads the listener's family once: ``listener.family`` converts
    it to an enum on every read (0.9 µs here).

    It is the C socket type itself (``_socket.socket``), not the stdlib's
    Python subclass: every method a connection uses is the same C method,
    but it is made without the subclass's Python ``__init__`` (0.5 µs an
    upgrade) and is 40 bytes smaller, with nothing for the cyclic GC to
    track (the subclass adds ``makefile``/``dup``/``accept`` and enum
    properties, which connections never use)."""
    return _socket.socket(family, _STREAM_NONBLOCK, 0, fd)  # type: ignore[return-value]


_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


def refuse_fd(fd: int, response: bytes) -> None:
    """Read the request off (if it is there), send ``response``, close."""
    try:
        os.readv(fd, (_SCRATCH,))
    except OSError:
        pass
    try:
        os.write(fd, response)
    except OSError:
        pass
    os.close(fd)
