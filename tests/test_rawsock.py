"""Accepting and refusing on bare descriptors (the avalanche's cheap path)."""

import os
import select
import socket

import pytest

from mailpush import rawsock


@pytest.fixture(params=["accept4", "fallback"])
def listener(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(rawsock, "_accept4", None)
    else:
        assert rawsock._accept4 is not None  # glibc has it: the fast path is the one tested
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
    client.sendall(b"hi")
    client.close()
    sock.close()


def _accept_when_ready(listener: socket.socket) -> int:
    select.select([listener], [], [], 2)
    return rawsock.accept_fd(listener)
