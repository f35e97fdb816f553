"""The two reaches into Trio's internals (mailpush._trio_compat): they apply
on this Trio, do what they say with real sockets, undo themselves, and step
aside on a Trio they were not written for."""

from __future__ import annotations

import select
import socket

import pytest
import trio

from mailpush import _trio_compat

EpollIOManager = pytest.importorskip("trio._core._io_epoll").EpollIOManager


def test_they_apply_to_this_trio():
    assert _trio_compat.applies()


def ready_manager(n: int):
    """An epoll manager of Trio's own with ``n`` readable sockets in it."""
    mgr = EpollIOManager()
    pairs = [socket.socketpair() for _ in range(n)]
    for a, b in pairs:
        a.send(b"x")
        mgr._epoll.register(b.fileno(), select.EPOLLIN)
        mgr._registered[b.fileno()]  # a waiter entry, as wait_readable makes
    return mgr, pairs


def test_more_ready_sockets_than_the_limit_give_at_most_the_limit():
    mgr, pairs = ready_manager(10)
    try:
        assert len(mgr.get_events(0)) == 10  # Trio's own: all of them
        with _trio_compat.bounded_wakeups(3) as applied:
            assert applied
            assert len(mgr.get_events(0)) == 3  # level-triggered: the same 3 again
            with _trio_compat.bounded_wakeups(5):  # nested: one patch, the first limit
                assert len(mgr.get_events(0)) == 3
            assert len(mgr.get_events(0)) == 3
        assert len(mgr.get_events(0)) == 10  # restored on the last exit
    finally:
        mgr.close()
        for a, b in pairs:
            a.close()
            b.close()


def test_restored_when_the_body_raises():
    original = EpollIOManager.get_events
    with pytest.raises(RuntimeError):
        with _trio_compat.bounded_wakeups(3):
            assert EpollIOManager.get_events is not original
            raise RuntimeError("boom")
    assert EpollIOManager.get_events is original


def test_another_trio_version_is_left_alone(monkeypatch):
    monkeypatch.setattr(_trio_compat, "TESTED", ((0, 1), (0, 2)))
    original = EpollIOManager.get_events
    with _trio_compat.bounded_wakeups(3) as applied:
        assert not applied and EpollIOManager.get_events is original
    assert _trio_compat.parking_wait_readable() is trio.lowlevel.wait_readable


async def test_the_parking_wait_readable_parks_like_the_public_one():
    wait = _trio_compat.parking_wait_readable()
    assert wait is not trio.lowlevel.wait_readable
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            woke = trio.Event()

            async def reader():
                await wait(b)
                woke.set()

            nursery.start_soon(reader)
            await trio.sleep(0.05)
            assert not woke.is_set()
            a.send(b"x")
            with trio.fail_after(2):
                await woke.wait()
    finally:
        a.close()
        b.close()
