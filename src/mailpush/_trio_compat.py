"""Two small reaches into Trio's internals, both in this one module.

They save memory and bound work per connection; neither changes what the
server does. Each checks every attribute it uses and is applied only on the
Trio versions it was written and tested for (:data:`TESTED`); anywhere else
the public API is used instead, which costs memory, not correctness.

1. :func:`bounded_wakeups`: Trio asks epoll for as many events as it has
   registrations, so when 15,000 idle connections become readable at once,
   all 15,000 readers are woken in one loop iteration, each with its event
   tuple, outcome object and run-queue entry: ~190 bytes of transient memory
   per connection, ~2.7 MiB for the burst. Asking for at most ``limit``
   events leaves the rest armed in the kernel for the next iteration
   (epoll's ready list is FIFO), so a burst is worked off in bounded slices,
   like the article's worker pool, and timers and the accept loop get their
   turn in between. Trio's epoll manager is a slotted class, so its
   ``get_events`` is replaced on the class while the context is entered
   (nested entries share one patch; the last exit restores the original).

2. :func:`parking_wait_readable`: ``trio.lowlevel.wait_readable`` is a
   generated coroutine that only forwards to the running I/O manager's
   method; every parked reader would hold that extra coroutine frame (~200
   bytes of each idle connection). Calling the manager's method directly
   parks in exactly the same way.

   What is lost: the public wrapper carries ``enable_ki_protection``, so
   that a KeyboardInterrupt from Trio's own SIGINT handler is never raised
   inside it. It is safe to go without here: ``mailpush serve`` catches
   SIGINT with a signal receiver for as long as the server runs (Trio's
   handler then raises nothing), and a parked reader's frame is suspended,
   not running, when a signal arrives; only an embedding application that
   lets Ctrl-C raise KeyboardInterrupt could interrupt the few instructions
   of the manager's method, and that interrupt ends the whole Trio run
   anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

__all__ = ["TESTED", "bounded_wakeups", "limited_get_events", "parking_wait_readable", "applies"]

# The Trio releases (major, minor) these were written for and tested with,
# inclusive; pyproject.toml pins the same range.
TESTED = ((0, 27), (0, 35))

_depth = 0  # entries of bounded_wakeups now active
_original: Any = None  # the get_events they replaced


def _version() -> tuple[int, int]:
    major, minor = trio.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def applies() -> bool:
    """This Trio is one the patches were tested with, and has every
    attribute they use."""
    if not TESTED[0] <= _version() <= TESTED[1]:
        return False
    try:
        import attrs
        from trio._core._io_epoll import EpollIOManager
        from trio._core._run import GLOBAL_RUN_CONTEXT  # noqa: F401
    except ImportError:
        return False
    fields = {f.name for f in attrs.fields(EpollIOManager)} if attrs.has(EpollIOManager) else set()
    return (
        {"_epoll", "_registered"} <= fields
        and callable(getattr(EpollIOManager, "get_events", None))
        and callable(getattr(EpollIOManager, "wait_readable", None))
    )


def limited_get_events(limit: int) -> Callable[[Any, float], Any]:
    """A replacement for ``EpollIOManager.get_events`` that asks epoll for
    at most ``limit`` events."""

    def get_events(self: Any, timeout: float) -> Any:
        return self._epoll.poll(timeout, max(1, min(limit, len(self._registered))))

    get_events._mailpush_limit = limit  # type: ignore[attr-defined]
    return get_events


@contextlib.contextmanager
def bounded_wakeups(limit: int) -> Iterator[bool]:
    """While entered, Trio's epoll wakes at most ``limit`` waiters per loop
    iteration (see the module docstring). Yields whether the patch applies.

    Resource handling: the original method is restored when the last of
    nested entries exits, however it exits.
    """
    global _depth, _original
    if not applies():
        yield False
        return
    from trio._core._io_epoll import EpollIOManager

    if _depth == 0:
        _original = EpollIOManager.get_events
        EpollIOManager.get_events = limited_get_events(limit)  # type: ignore[method-assign,assignment]
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            EpollIOManager.get_events = _original  # type: ignore[method-assign]
            _original = None


def parking_wait_readable() -> Callable[[Any], Awaitable[None]]:
    """The running I/O manager's ``wait_readable`` (see the module
    docstring), or the public function where that does not apply. Call it
    inside the Trio run whose manager it is."""
    if applies():
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runner = getattr(GLOBAL_RUN_CONTEXT, "runner", None)
        method = getattr(getattr(runner, "io_manager", None), "wait_readable", None)
        if method is not None:
            return method
    return trio.lowlevel.wait_readable
