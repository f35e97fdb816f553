"""Accepting and refusing on bare descriptors (the avalanche's cheap path)."""

import fcntl
import os
import select
import socket

import pytest

from mailpush import rawsock


@pytest.fixture(params=["c", "accept4", "fallback"])
def listener(request, monkeypatch):
    # c: mailpush._speedups' accept4(); accept4: the same through ctypes
    # (no extension); fallback: socket._accept() (no accept4 in the libc).
    if request.param == "c":
        if rawsock.C is None:
            pytest.skip("the extension is not built or is turned off (MAILPUSH_SPEEDUPS=0)")
        assert rawsock._c_accept is not None  # Linux: the fast path is the one tested
    else:
        monkeypatch.setattr(rawsock, "_c_accept", None)
    if request.param == "fallback":
        monkeypatch.setattr(rawsock, "_accept4", None)
    elif request.param == "accept4":
        assert rawsock._accept4 is not None  # glibc has it
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


def test_an_empty_queue_raises_blocking_io_error(listener):
    with pytest.raises(BlockingIOError):
        rawsock.accept_fd(listener)


def test_a_closed_listener_raises_os_error_with_its_errno(listener):
    listener.close()
    with pytest.raises(OSError) as info:
        rawsock.accept_fd(listener)
    assert not isinstance(info.value, BlockingIOError)


def test_refusal_answers_then_closes_cleanly_with_the_request_unread(listener):
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    client.settimeout(2)
    fd = _accept_when_ready(listener)
    rawsock.refuse_fd(fd, b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
    got = b""
    while chunk := client.recv(4096):  # ends in EOF (FIN), not ECONNRESET
        got += chunk
    assert got == b"HTTP/1.1 503 Service Unavailable\r\n\r\n"
    client.close()


def test_an_accepted_descriptor_becomes_a_nonblocking_socket(listener):
    client = socket.create_connection(listener.getsockname())
    sock = rawsock.socket_for(listener.family, _accept_when_ready(listener))
    assert sock.gettimeout() == 0.0 and not os.get_blocking(sock.fileno())
    assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
    with pytest.raises(BlockingIOError):
        sock.recv(10)  # the descriptor itself is non-blocking, not just the object
    assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # not leaked into a child process
    client.sendall(b"hi")
    assert sock.recv(10) == b"hi"
    assert sock.send(b"ok") == 2 and client.recv(10) == b"ok"
    client.close()
    sock.close()
    assert sock.fileno() == -1


def test_accept_fd_takes_the_connections_in_order_then_says_none_is_left(listener):
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    select.select([listener], [], [], 2)
    fds = []
    for c in clients:
        c.sendall(str(len(fds)).encode())
        fds.append(_accept_when_ready(listener))
    assert len(set(fds)) == 3 and all(fd >= 0 for fd in fds)
    for k, fd in enumerate(fds):
        select.select([fd], [], [], 2)
        assert os.read(fd, 10) == str(k).encode()
        os.close(fd)
    with pytest.raises(BlockingIOError):
        rawsock.accept_fd(listener)
    for c in clients:
        c.close()


def test_the_c_accept_refuses_a_descriptor_that_is_no_listener():
    if rawsock._c_accept is None:
        pytest.skip("the extension is not built or is turned off (MAILPUSH_SPEEDUPS=0)")
    for bad in (-1, 2**31, 2**40):
        with pytest.raises(OSError):
            rawsock._c_accept(bad)
    with pytest.raises(TypeError):
        rawsock._c_accept("3")
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            rawsock._c_accept(r)
        assert info.value.errno == __import__("errno").ENOTSOCK
    finally:
        os.close(r)
        os.close(w)


def _accept_when_ready(listener: socket.socket) -> int:
    select.select([listener], [], [], 2)
    return rawsock.accept_fd(listener)
