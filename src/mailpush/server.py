"""The server: listeners, the accept loop, the nursery tree, keepalive, drain.

Nursery tree::

    Server.serve
    ├── bus-client task          Bus.run → Dispatcher.deliver
    ├── subscription flusher     Dispatcher.run_subscriptions
    ├── admin HTTP server        admin.serve
    ├── keepalive                Server._keepalive (one task for all connections)
    └── connections nursery
        ├── accept loop          bounded by the handshake CapacityLimiter
        ├── serve_socket × N     one parked reader per connection
        └── _writer × k          only for connections with unsent bytes
"""

from __future__ import annotations

import errno
import os
import math
import random
import socket
import struct
from collections import deque

import trio

from .admin import serve_admin
from .auth import Verifier
from .bus import Bus, make_bus
from .config import Config
from .connection import OPEN, F_PING, F_SEEN, Connection, expire_handshake, serve_socket
from .dispatch import Dispatcher
from .errors import ConfigError
from .frames import PING_FRAME, CloseCode
from .handshake import response_text
from .log import LogLimiter, get_logger
from .metrics import Stats
from .pool import Pool
from .rawsock import accept_fd, refuse_fd, socket_for
from .registry import Registry

__all__ = ["Server"]

# Kernel accept backlog: as large as the system allows (the kernel caps it at
# net.core.somaxconn, 4096 on a stock Debian). While all handshake slots are
# busy, new connections wait here, not in tasks, and the accept loop sheds
# what cannot be served in time. When the queue itself overflows, the kernel
# drops SYNs and clients retry only after a second or more: for reconnect
# avalanches raise net.core.somaxconn and net.ipv4.tcp_max_syn_backlog.
LISTEN_BACKLOG = 65535
# Accepts in one go before going back to the scheduler, so a connection
# avalanche cannot starve the connections already open.
ACCEPT_BATCH = 64
# After EMFILE/ENFILE, wait this long before accepting again (a file
# descriptor must be freed first; retrying at once would spin).
ACCEPT_ERROR_PAUSE = 0.1
# How long a connection that we sent a Close may take to answer it (§7.1.1),
# or to take the rest of its queue before it.
CLOSE_TIMEOUT = 5.0
# Slow-consumer drops are logged at most once per this many seconds.
SLOW_LOG_INTERVAL = 1.0
# Keepalive visits connections in this many slices per interval, so pings
# go out spread over the interval rather than all at once.
KEEPALIVE_SLICES = 50
# A keepalive tick later than this (seconds) means the server itself
# stalled: missed pongs of that period are not held against the clients.
LAG_TOLERANCE = 1.0
# When every handshake slot is busy, how long the accept loop waits for one
# before it looks at the backlog (the article's ScheduleTimeout(1ms)).
ACCEPT_SLOT_WAIT = 0.001
# A connection should be upgraded or refused within a second (issue target):
# the backlog may hold what the recent upgrade rate serves in half of that;
# the rest gets a 503 at once. At least SHED_MIN_QUEUE stay: half a second
# at 2,000 upgrades/s, a safe floor for one process here (which does
# 3,500–5,000/s), for a cold start that has no rate yet. At most SHED_BATCH
# are refused per look (then the loop yields to the handshakes in progress).
QUEUE_BUDGET = 0.5
SHED_MIN_QUEUE = 1024
SHED_BATCH = 1024
# Readers woken per event-loop iteration at most (see _bound_wakeups): a
# burst of 15,000 readable connections is handled 1,024 at a time.
MAX_WAKEUPS = 1024
# The upgrade rate is sampled at most this often (seconds).
RATE_SAMPLE = 0.25
# Handshake deadlines are checked at most this often: a deadline fires up
# to this late, and an avalanche costs a few wakeups a second, not one each.
HANDSHAKE_SWEEP_TICK = 0.05
# Drain: after the window, how long the last closed peers get to answer
# their Close before the rest are cut; the exit comes within the drain
# window plus this (and a little shutdown work).
DRAIN_GRACE = 1.0
# Drain: closes are issued in ticks of this length, a group per tick.
DRAIN_TICK = 0.01
# The event-loop lag gauge reports the worst tick lateness over this many
# seconds: a scrape every 10-15 s sees every stall since the last one.
LAG_WINDOW = 15.0

# One name shared by every connection task (Trio would build a new string
# per task otherwise: 80 bytes of each idle connection).
_CONNECTION_TASK = "mailpush.connection"

_RESPONSE_FULL = response_text(503, "server at its connection limit, retry shortly\n", (("Retry-After", "1"),))
_RESPONSE_BUSY = response_text(503, "server overloaded, retry shortly\n", (("Retry-After", "1"),))


class Server:
    """One mailpush process.

    Args:
      config: the options.
      bus: the bus to use; by default the one ``config.bus`` names.
    """

    def __init__(self, config: Config, bus: Bus | None = None) -> None:
        self.config = config
        self.bus = bus if bus is not None else make_bus(config.bus)
        self.log = get_logger()
        self.stats = Stats()
        self.pool = Pool(config.pool_size, config.buffer_size)
        self.registry = Registry()
        self.dispatcher = Dispatcher(self.registry, self.bus, self.stats)
        self.verifier = Verifier(config.secret) if config.secret else None
        self.handshakes = trio.CapacityLimiter(config.max_handshakes)
        self.connections: set[Connection] = set()
        self.open_sockets = 0  # accepted and not yet closed (handshaking + open)
        self.draining = False
        self.paused = False  # accept loop waiting for a handshake slot
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.connections_nursery: trio.Nursery = None  # type: ignore[assignment]
        self._closing: deque[tuple[float, Connection]] = deque()
        # [deadline, socket or None once done] per handshake, in deadline order
        # (the timeout is the same for all); swept by one task.
        self.handshake_deadlines: deque[list] = deque()
        self._listener: socket.socket | None = None
        self._cancel = trio.CancelScope()
        self._drained = trio.Event()
        self._seq = 0
        self._slow_log = LogLimiter(SLOW_LOG_INTERVAL)
        self._rate: float | None = None  # upgrades/s, see _upgrade_rate
        self._rate_at = 0.0
        self._rate_upgrades = 0
        self._lags: deque[tuple[float, float]] = deque()
        self._error_log = LogLimiter()  # (when, how late) of recent keepalive ticks
        self.wait_readable = trio.lowlevel.wait_readable

    # -- lifecycle ----------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`drain` finishes or the caller cancels.

        ``task_status.started(self)`` once both ports are bound, with
        :attr:`listen_address` and :attr:`admin_address` filled in.

        Resource handling: the listener is closed on every way out, the
        bus's resources released after the nursery tree has ended.

        Raises:
          ConfigError: at startup: no secret, a port that cannot be bound,
            a bus that cannot be reached.

        Error handling: every task below has its own isolation boundary
        (see each: the accept loop, each connection and writer, keepalive,
        the handshake sweeper, the admin server, the dispatcher); an
        exception that still reaches this nursery is a bug that the server
        cannot survive, and ends it.
        """
        if self.verifier is None:
            raise ConfigError("no token secret: set --secret, MAILPUSH_SECRET or --secret-file")
        self.wait_readable = _parking_wait_readable()
        _bound_wakeups(MAX_WAKEUPS)
        listener = self._bind(self.config.listen)
        self._listener = listener
        self.listen_address = listener.getsockname()[:2]
        try:
            with self._cancel:
                async with trio.open_nursery() as root:
                    await root.start(self.bus.run, self.dispatcher.deliver)
                    await root.start(self.dispatcher.run_subscriptions)
                    if self.config.admin is not None:
                        self.admin_address = await root.start(serve_admin, self, self.config.admin)
                    root.start_soon(self._keepalive)
                    root.start_soon(self._sweep_handshakes)
                    async with trio.open_nursery() as conns:
                        self.connections_nursery = conns
                        conns.start_soon(self._accept_loop, listener)
                        self.log.info("listening", listen=_fmt(self.listen_address), admin=_fmt(self.admin_address), bus=type(self.bus).__name__, pid=os.getpid())
                        task_status.started(self)
                        await self._drained.wait()
                        root.cancel_scope.cancel()
        finally:
            listener.close()  # also when startup failed (bus, admin port)
        await self.bus.aclose()

    def _bind(self, address: tuple[str, int]) -> socket.socket:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.config.workers > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    def health(self, *, own_sockets: int = 0) -> tuple[int, str]:
        """What /healthz answers on both ports.

        Args:
          own_sockets: sockets of the asking probe itself among
            :attr:`open_sockets` (1 on the public port), not counted
            against the limit it asks about.
        """
        if self.draining:
            return 503, "draining"
        if self.open_sockets - own_sockets >= self.config.max_connections:
            return 503, "at connection limit"
        if self.paused:
            return 503, "overloaded: all handshake slots busy"
        return 200, "ok"

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Live values for /metrics."""
        return {
            "mailpush_connections": ("Open WebSocket connections", len(self.connections)),
            "mailpush_sockets": ("Accepted sockets, handshaking or open", self.open_sockets),
            "mailpush_subscribers": ("Subscribers with at least one subscribed connection here", len(self.registry)),
            "mailpush_handshakes_in_progress": ("Handshake slots in use", self.handshakes.borrowed_tokens),
            "mailpush_pool_busy": ("Connections being processed now (worker pool slots in use)", self.pool.busy),
            "mailpush_pool_size": ("Worker pool slots", self.pool.size),
            "mailpush_pool_buffers": ("Read buffers allocated (never more than the pool size)", self.pool.created),
            "mailpush_pool_waits": ("Times a reader waited for a pool slot", self.pool.waits),
            "mailpush_draining": ("1 while draining", int(self.draining)),
            "mailpush_bus_up": ("1 while the bus is connected", int(self.bus.up)),
            "mailpush_tasks": ("Live Trio tasks in this process", _count_tasks()),
            "mailpush_event_loop_lag_seconds": (f"Worst lateness of the timer task's ticks over the last {LAG_WINDOW:g} s", self.loop_lag()),
        }

    def loop_lag(self) -> float:
        """How late the keepalive task's ticks ran at worst, lately (seconds):
        the time the event loop was busy elsewhere when it should have run."""
        cutoff = trio.current_time() - LAG_WINDOW
        lags = self._lags
        while lags and lags[0][0] < cutoff:
            lags.popleft()
        return max((lag for _, lag in lags), default=0.0)

    def counters(self) -> dict[str, tuple[str, float]]:
        """Counters for /metrics kept outside :class:`Stats`."""
        return {
            "mailpush_bus_bad_items": ("Items from the bus dropped as unusable (malformed payload, or delivery failed)", self.stats.bad_items + self.bus.bad_items),
        }

    # -- accepting ----------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections and start a task for each, until drain closes
        the listener.

        Resource handling: an accepted descriptor belongs to this loop
        until its task is started (or it is refused); the task owns it then.

        Error handling: EMFILE and the like pause accepting briefly; a
        client gone before its accept is skipped; an unexpected error (a
        bug) is logged and accepting resumes after ACCEPT_ERROR_PAUSE.
        """
        while not self.draining:
            try:
                await self._accept_some(listener)
            except trio.ClosedResourceError:
                return  # the listener was closed by drain
            except Exception:  # noqa: BLE001 - the isolation boundary, see above
                self._task_failed("accept")
                await trio.sleep(ACCEPT_ERROR_PAUSE)

    async def _accept_some(self, listener: socket.socket) -> None:
        limiter = self.handshakes
        nursery = self.connections_nursery
        max_conns = self.config.max_connections
        stats = self.stats
        while not self.draining:
            await trio.lowlevel.wait_readable(listener)
            # Before taking more: if the backlog holds more than can be
            # served within the budget, refuse the excess now, before the
            # accept queue overflows and the kernel starts dropping SYNs
            # (which costs clients a second or more of retransmission).
            self._shed(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    fd = accept_fd(listener)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self.log.warning("accept_failed", error=e.strerror)
                        await trio.sleep(ACCEPT_ERROR_PAUSE)
                        break
                    continue  # ECONNABORTED and the like: that client is gone
                if self.open_sockets >= max_conns:
                    stats.rejections["full"] += 1
                    refuse_fd(fd, _RESPONSE_FULL)
                    continue
                sock = socket_for(listener, fd)
                self._seq += 1
                slot = self._seq
                try:
                    limiter.acquire_on_behalf_of_nowait(slot)
                except trio.WouldBlock:
                    # Every handshake slot is busy: the server is saturated.
                    stats.accept_pauses += 1
                    self.paused = True
                    try:
                        await self._wait_for_slot(listener, slot)
                    except BaseException:
                        sock.close()
                        raise
                    finally:
                        self.paused = False
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.open_sockets += 1
                nursery.start_soon(serve_socket, self, sock, slot, name=_CONNECTION_TASK)

    async def _wait_for_slot(self, listener: socket.socket, slot: int) -> None:
        """Wait for a handshake slot, shedding what cannot be served in time.

        As the article's ``pool.ScheduleTimeout(1ms, …)``: a slot usually
        frees within ACCEPT_SLOT_WAIT. If not, the connections still in the
        kernel backlog are counted (TCP_INFO on the listener), and those
        beyond what the recent upgrade rate can serve within QUEUE_BUDGET get
        the cheap 503 now instead of a long wait; the rest stay in the
        backlog, untouched, until slots free up.
        """
        with trio.move_on_after(ACCEPT_SLOT_WAIT):
            await self.handshakes.acquire_on_behalf_of(slot)
            return
        self._shed(listener)
        await self.handshakes.acquire_on_behalf_of(slot)

    def _shed(self, listener: socket.socket) -> None:
        """Refuse (fast 503) what the backlog holds beyond QUEUE_BUDGET's worth."""
        allowed = max(SHED_MIN_QUEUE, int(self._upgrade_rate() * QUEUE_BUDGET))
        depth = _backlog_depth(listener)
        rejections = self.stats.rejections
        for _ in range(min(depth - allowed, SHED_BATCH)):
            try:
                fd = accept_fd(listener)
            except OSError:
                break
            rejections["overloaded"] += 1
            refuse_fd(fd, _RESPONSE_BUSY)

    def _upgrade_rate(self) -> float:
        """Upgrades per second lately (an exponentially weighted average)."""
        now = trio.current_time()
        dt = now - self._rate_at
        if dt >= RATE_SAMPLE:
            rate = (self.stats.upgrades - self._rate_upgrades) / dt
            self._rate = rate if self._rate is None else (self._rate + rate) / 2
            self._rate_at = now
            self._rate_upgrades = self.stats.upgrades
        return self._rate or 0.0

    # -- connection bookkeeping (called by serve_socket) --------------------

    def added(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.stats.upgrades += 1
        self.log.debug("connected", subscriber=conn.subscriber)

    def removed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.open_sockets -= 1
        if self.registry.remove(conn):
            self.dispatcher.changed(conn.subscriber)
        self.log.debug("disconnected", subscriber=conn.subscriber)

    def slow_consumer(self, conn: Connection) -> None:
        """Count a client dropped for not reading; log at most once a second
        (a thousand dropped at once must not become a thousand log lines)."""
        self.stats.slow_consumers += 1
        self.stats.closes[CloseCode.POLICY_VIOLATION] += 1
        if n := self._slow_log.tick():
            self.log.warning("slow_consumers_dropped", count=n, last_subscriber=conn.subscriber, send_queue_bytes=self.config.send_queue_bytes)

    def _task_failed(self, task: str) -> None:
        """Log an unexpected error caught at a long-lived task's isolation
        boundary (at most once a second; the count says how many)."""
        self.stats.internal_errors += 1
        if n := self._error_log.tick():
            self.log.exception("internal_error", task=task, count=n)

    def closing(self, conn: Connection) -> None:
        """``conn`` is closing; cut it if it is not closed within CLOSE_TIMEOUT."""
        self._closing.append((trio.current_time() + CLOSE_TIMEOUT, conn))

    async def _sweep_handshakes(self) -> None:
        """Answer 408 to handshakes past their deadline (slowloris bound).

        Error handling: a failure to answer one (a bug) is logged and that
        socket closed; the sweep goes on with the next.
        """
        q = self.handshake_deadlines
        timeout = self.config.handshake_timeout
        while True:
            now = trio.current_time()
            while q and q[0][0] <= now:
                sock = q.popleft()[1]
                if sock is not None:
                    try:
                        expire_handshake(self, sock)
                    except Exception:  # noqa: BLE001 - the isolation boundary, see above
                        self._task_failed("handshake_sweep")
                        sock.close()
            next_at = q[0][0] if q else now + timeout
            await trio.sleep_until(max(next_at, now + HANDSHAKE_SWEEP_TICK))

    # -- keepalive ----------------------------------------------------------

    async def _keepalive(self) -> None:
        """One task pings every connection once per interval, in slices.

        Every tick pings one slice of the connections and, ``pong_timeout``
        later, checks that each of them has sent something since (a pong or
        anything else); those that have not are closed with 1001. If a tick
        comes late by more than LAG_TOLERANCE, the server itself stalled:
        the pending checks are dropped, so no client pays for our stall.
        The same ticks expire closing handshakes the peer never answered.

        Error handling: an unexpected error in a tick (a bug) is logged, the
        pending checks of that round are forgotten, and the next tick runs:
        keepalive never stops, and no connection is judged on a broken round.
        """
        interval = self.config.ping_interval
        tick = (interval / KEEPALIVE_SLICES) if interval else 1.0
        pong_timeout = self.config.pong_timeout
        stats = self.stats
        pending: list[Connection] = []
        checks: deque[tuple[float, list[Connection]]] = deque()
        round_at = trio.current_time()
        while True:
            expected = trio.current_time() + tick
            await trio.sleep_until(expected)
            try:
                now = trio.current_time()
                self._lags.append((now, now - expected))
                if len(self._lags) > 2 * KEEPALIVE_SLICES:
                    self._lags.popleft()
                while self._closing and self._closing[0][0] <= now:
                    self._closing.popleft()[1].abort()
                if not interval:
                    continue
                if now - expected > LAG_TOLERANCE:
                    stats.lag_skips += 1
                    self.log.warning("keepalive_lag", seconds=round(now - expected, 3), skipped_checks=sum(len(b) for _, b in checks))
                    checks.clear()
                    continue
                while checks and checks[0][0] <= now:
                    for conn in checks.popleft()[1]:
                        if conn.state == OPEN and conn.flags & F_PING and not conn.flags & F_SEEN:
                            stats.pong_timeouts += 1
                            conn.close(CloseCode.GOING_AWAY, f"no pong within {pong_timeout:g} s", wait_for_peer=False)
                if not pending:
                    if now - round_at < interval - tick / 2:
                        continue
                    pending = list(self.connections)
                    round_at = now
                n = max(1, math.ceil(len(pending) * tick / interval))
                batch, pending = pending[-n:], pending[:-n]
                pinged = []
                for conn in batch:
                    if conn.state == OPEN:
                        conn.flags = (conn.flags | F_PING) & ~F_SEEN
                        if conn.send(PING_FRAME):
                            pinged.append(conn)
                stats.pings += len(pinged)
                checks.append((now + pong_timeout, pinged))
            except Exception:  # noqa: BLE001 - the isolation boundary, see the docstring
                self._task_failed("keepalive")
                checks.clear()
                pending = []

    # -- drain ----------------------------------------------------------------

    async def drain(self, seconds: float | None = None) -> None:
        """Stop accepting, then close every connection, spread over ``seconds``.

        Each connection gets 1012 (service restart) with a suggested reconnect
        delay; its queued events go out before the Close frame. Returns when
        all connections are closed (or seconds + DRAIN_GRACE have passed),
        then stops :meth:`serve`.

        Error handling: a connection that fails to close (a bug) is logged
        and cut; the drain goes on, and :meth:`serve` is stopped in any case.
        """
        if self.draining:
            return
        seconds = self.config.drain_seconds if seconds is None else seconds
        self.draining = True
        self.log.info("draining", connections=len(self.connections), seconds=seconds)
        if self._listener is not None:
            trio.lowlevel.notify_closing(self._listener)
            self._listener.close()
        conns = list(self.connections)
        random.shuffle(conns)
        start = trio.current_time()
        n = len(conns)
        try:
            for i, conn in enumerate(conns):
                # Connection i closes at i/n of the window: an even spread, the
                # order random, so reconnects arrive evenly over the window.
                at = start + seconds * i / n
                if at - trio.current_time() > DRAIN_TICK:
                    await trio.sleep_until(at)
                try:
                    if conn.state == OPEN:
                        delay = random.uniform(1.0, max(1.0, seconds))
                        conn.close(CloseCode.SERVICE_RESTART, f"restarting; reconnect in {delay:.0f} s")
                except Exception:  # noqa: BLE001 - the isolation boundary, see above
                    self._task_failed("drain")
                    conn.abort()
            with trio.move_on_after(DRAIN_GRACE):
                while self.connections:
                    await trio.sleep(0.05)
        finally:
            for conn in list(self.connections):
                conn.abort()
            self._drained.set()

    def stop(self) -> None:
        """Stop at once, without draining."""
        self._cancel.cancel()


def _count_tasks() -> int:
    """Live tasks of the running Trio loop (a walk of the task tree: a few
    milliseconds at 15,000 connections, for a scrape)."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _bound_wakeups(limit: int) -> None:
    """Let Trio's epoll wake at most ``limit`` waiters per loop iteration.

    Trio asks epoll for as many events as it has registrations, so when
    15,000 idle connections become readable at once, all 15,000 readers are
    woken in one iteration, each with its event tuple, outcome object and run
    queue entry: ~190 bytes of transient memory per connection, ~2.7 MiB for
    the burst. Asking for at most ``limit`` events leaves the rest armed in
    the kernel for the next iteration (epoll's ready list is FIFO), so a
    burst is worked off in bounded slices, like the article's worker pool,
    and timers and the accept loop get their turn in between.

    Trio's epoll manager is a slotted class, so its ``get_events`` is
    replaced on the class, once per process (the same bound for every Trio
    run in it). If Trio's internals differ, nothing is changed.
    """
    try:
        from trio._core._io_epoll import EpollIOManager
    except ImportError:
        return
    original = getattr(EpollIOManager, "get_events", None)
    if original is None or getattr(original, "_mailpush_limit", None) is not None:
        return
    try:
        EpollIOManager.__slots__  # noqa: B018
    except AttributeError:
        return

    EpollIOManager.get_events = limited_get_events(limit)  # type: ignore[method-assign]


def limited_get_events(limit: int):
    """The replacement of ``EpollIOManager.get_events`` that asks epoll for
    at most ``limit`` events (see :func:`_bound_wakeups`)."""

    def get_events(self, timeout: float):
        return self._epoll.poll(timeout, max(1, min(limit, len(self._registered))))

    get_events._mailpush_limit = limit  # type: ignore[attr-defined]
    return get_events


def _parking_wait_readable():
    """``trio.lowlevel.wait_readable`` without its generated wrapper.

    The public function is a coroutine that only forwards to the running
    I/O manager's method; every parked reader would hold that extra
    coroutine (~200 bytes of each idle connection). Calling the manager's
    method directly parks in exactly the same way. If Trio's internals
    move, fall back to the public function.
    """
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        return GLOBAL_RUN_CONTEXT.runner.io_manager.wait_readable
    except (ImportError, AttributeError):
        return trio.lowlevel.wait_readable


_TCP_INFO_SIZE = 104
_TCPI_UNACKED = struct.Struct("=I")  # at offset 24 of struct tcp_info


def _backlog_depth(listener: socket.socket) -> int:
    """Connections waiting in the listener's accept queue (Linux: for a
    listening socket, tcp_info.tcpi_unacked is the accept queue length)."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return 0
    return _TCPI_UNACKED.unpack_from(info, 24)[0] if len(info) >= 28 else 0


def _fmt(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"
