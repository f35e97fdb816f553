"""Running one server process: signals, drain on SIGTERM, the process's
GC and malloc tuning, the demo banner.

``mailpush serve`` (:mod:`mailpush.cli`) and each ``--workers`` worker run a
:class:`~mailpush.server.Server` through :func:`run_server`.
"""

from __future__ import annotations

import gc
import signal

import structlog
import trio

from .auth import mint
from .config import Config
from .log import log_sighup

__all__ = ["run_server", "GC_THRESHOLDS", "MMAP_THRESHOLD"]


async def run_server(config: Config, demo: bool = False, bus=None, worker: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return; SIGHUP is logged
    and ignored."""
    from .server import Server

    if worker is not None:
        structlog.contextvars.bind_contextvars(worker=worker)
    server = Server(config, bus)
    # Signals are caught from before the ports are bound: a SIGTERM during
    # startup drains right after it, a SIGHUP is logged.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
                await server.serve(task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: stop listening for signals

            await nursery.start(serve)
            _tune_gc()
            _tune_malloc()
            if demo:
                _print_demo(server)
            draining = False
            async for sig in signals:
                if sig == signal.SIGHUP:
                    log_sighup()
                elif not draining:
                    draining = True
                    nursery.start_soon(server.drain)
                else:  # a second signal while draining: stop at once
                    server.stop()
                    break


# The cyclic GC's first generation is collected every this many new
# container objects instead of CPython's 700: every upgrade leaves a dozen
# long-lived objects (task, coroutine, socket, connection …), and at the
# default the collector re-scanned them ~35 times per 1,000 upgrades (28 µs
# of each upgrade here, measured with gc.callbacks); at 10,000 it is ~8 µs,
# with pauses of a few milliseconds, well under the latency budget.
GC_THRESHOLDS = (10_000, 20, 100)


def _tune_gc() -> None:
    """Freeze what startup allocated and collect less often (see above)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# glibc serves blocks above its mmap threshold with their own mappings,
# returned to the system when freed; but it raises that threshold to the
# size of each such block freed (up to 32 MiB). After one multi-megabyte
# publish body, later bodies come from the heap instead, interleaved with
# long-lived frames and connections, and the heap never shrinks back: RSS
# ratchets up with every large publish. A fixed threshold keeps buffers of
# this size or more in their own mappings (M_MMAP_THRESHOLD = -3).
MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3


def _tune_malloc() -> None:
    """Fix glibc's mmap threshold (see above); nothing elsewhere."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc


def _print_demo(server) -> None:
    host, port = server.admin_address or ("127.0.0.1", 0)
    lhost, lport = server.listen_address
    lhost = "127.0.0.1" if lhost in ("0.0.0.0", "::") else lhost
    token = mint(server.config.secret, "demo@example.com", 86400)
    publish = """curl -d '{"subscriber":"demo@example.com","event":"new_letter"}'"""
    print(
        "\nmailpush is running.\n"
        f"  demo page:  http://{host}:{port}/\n"
        f"  WebSocket:  ws://{lhost}:{lport}{server.config.ws_path}?token={token}\n"
        "  (a token for subscriber demo@example.com, valid 24 h)\n"
        f"  publish:    {publish} http://{host}:{port}/v1/publish\n",
        flush=True,
    )
