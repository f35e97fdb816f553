"""The Redis bus behind Redis Sentinel (``--bus
redis+sentinel://HOST:PORT,HOST:PORT/MASTER[/DB]``): the standalone bus
(channel ``mailpush:SUBSCRIBER``, ``redis.py``) on whichever server the
sentinels name as the master, followed through failovers.

Each session of the standalone bus starts by asking the sentinels, in
turn, ``SENTINEL get-master-addr-by-name MASTER`` (the one that answered
is asked first next time), connects the publishing side (coredis) and the
subscription connection there, and checks with ``ROLE`` that the server is
a master (a sentinel may still name a demoted one for a moment). A session
ends, and the next one asks the sentinels again, when:

- the connection to the master is lost (it died: the sessions retry with
  backoff until the sentinels have promoted a replica and name it);
- a sentinel announces ``+switch-master`` for MASTER (a task stays
  subscribed to one sentinel after another): the new master is used at
  once, even when the old one is still reachable (a partition);
- a publish is refused with ``READONLY`` (the server became a replica);
- the heartbeats stop, as on one Redis.

After each new session every local tab is brought up to date from the
history on the new master or resynced (``on_gap``). Replication is
asynchronous: events acknowledged by the old master but not yet copied to
the replica are lost in a failover; the new master then has an older top
offset (tabs that saw the lost events resync with ``bad_offset``) or, if
the subscriber's history never reached it, a new epoch (``epoch_changed``).
"""

from __future__ import annotations

import ssl
from urllib.parse import parse_qs, urlencode

import coredis
import trio

from ..config import Config
from ..errors import ConfigError, RespProtocolError
from ..log import LogLimiter
from .base import Sink
from .redis import RedisBus
from .redis_common import CONNECT_TIMEOUT, RECONNECT_FIRST, RECONNECT_MAX
from .redis_conn import TLS_OPTIONS, Address, MultiHostURL, Subscription, describe, open_stream, safe, tls_context
from .resp import PushParser, command
from .slots import Node

__all__ = ["SentinelBus", "SENTINEL_TIMEOUT"]

# How long one sentinel may take to answer (then the next is asked).
SENTINEL_TIMEOUT = 2.0
_SWITCH = b"+switch-master"


class SentinelBus(RedisBus):
    """The Redis bus on the master Sentinel names (see the module docstring).

    Args:
      url: ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB]``
        with the sentinels' addresses (default port 26379); the password is
        the master's. ``?sentinel_password=…`` (and ``sentinel_username``)
        when the sentinels ask for one.
      config: the history options (size, TTL).

    Raises:
      ConfigError: a URL that cannot be used.
    """

    def __init__(self, url: str, config: Config | None = None) -> None:
        super().__init__(url, config)
        scheme = "rediss+sentinel" if url.startswith("rediss+sentinel://") else "redis+sentinel"
        try:
            parsed = MultiHostURL(url, scheme, 26379)
            if not 1 <= len(parsed.path) <= 2:
                raise ValueError("name the master: redis+sentinel://HOST:PORT,HOST:PORT/MASTER[/DB]")
            self.db = int(parsed.path[1]) if len(parsed.path) == 2 else 0
            options = {k: v[-1] for k, v in parse_qs(parsed.query, strict_parsing=bool(parsed.query)).items()}
            auth_options = {"sentinel_password", "sentinel_username"}
            tls_options = set(TLS_OPTIONS) if scheme == "rediss+sentinel" else set()
            unknown = set(options) - auth_options - tls_options
            if unknown:
                hint = " (TLS options need rediss+sentinel://)" if unknown & set(TLS_OPTIONS) else ""
                raise ValueError(f"unknown options {sorted(unknown)}{hint}")
            # TLS to the sentinels and to the master they name.
            self.tls: ssl.SSLContext | None = None
            if scheme == "rediss+sentinel":
                self.tls = tls_context(urlencode({k: v for k, v in options.items() if k in tls_options}))
        except ValueError as e:
            raise ConfigError(f"bad --bus URL {safe(url)!r}: {e}") from None
        self.sentinels: list[Node] = parsed.hosts
        self.master_name = parsed.path[0]
        self.username, self.password = parsed.username, parsed.password
        self._sentinel_auth = (options.get("sentinel_username"), options.get("sentinel_password"))
        self.master: Node | None = None
        self._watch_log = LogLimiter(10.0)

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task of the standalone bus (sessions one after
        another, each on the master the sentinels name), with a task that
        listens for ``+switch-master``.

        Error handling: as the standalone bus's :meth:`RedisBus.run`; the
        listening task handles its own failures (see :meth:`_watch`).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            await super().run(sink, task_status=task_status)

    async def _locate(self) -> None:
        """Point ``client`` and ``_address`` at the master the first
        answering sentinel names.

        Raises:
          ConnectionError: no sentinel named it.
        """
        errors = []
        for i, (host, port) in enumerate(self.sentinels):
            try:
                with trio.fail_after(SENTINEL_TIMEOUT):
                    master = await self._ask(host, port)
            except (OSError, ConnectionError, trio.TooSlowError, RespProtocolError, ValueError) as e:
                errors.append(f"{host}:{port}: {describe(e)}")
                continue
            if master is None:
                errors.append(f"{host}:{port}: does not know {self.master_name!r}")
                continue
            self.sentinels.insert(0, self.sentinels.pop(i))
            self._use(master)
            return
        raise ConnectionError(f"no sentinel named the master {self.master_name!r}: " + "; ".join(errors))

    async def _ask(self, host: str, port: int) -> Node | None:
        stream = await open_stream(host, port, self.tls)
        async with stream:
            conn = Subscription(stream)
            user, password = self._sentinel_auth
            if password is not None:
                await conn.auth(user, password)
            reply = await conn.call(b"SENTINEL", b"get-master-addr-by-name", self.master_name)
        if reply is None:
            return None
        if not (isinstance(reply, list) and len(reply) == 2 and all(isinstance(x, bytes) for x in reply)):
            raise ValueError(f"unexpected answer {reply!r:.100}")
        return (reply[0].decode(), int(reply[1]))

    def _use(self, master: Node) -> None:
        if master != self.master:
            self.log.warning("bus_sentinel_master", name=self.master_name, master=f"{master[0]}:{master[1]}")
        self.master = master
        self.client = coredis.Redis(
            host=master[0],
            port=master[1],
            db=self.db,
            username=self.username,
            password=self.password,
            connect_timeout=CONNECT_TIMEOUT,
            ssl=self.tls is not None,
            ssl_context=self.tls,
        )
        scheme = "redis" if self.tls is None else "rediss"
        self._address = Address(scheme, master[0], master[1], "", self.username, self.password, self.tls)

    async def _check(self, sub: Subscription) -> None:
        role = await sub.call(b"ROLE")
        if not (isinstance(role, list) and role and role[0] == b"master"):
            kind = role[0] if isinstance(role, list) and role else role
            raise ConnectionError(f"{self._address.host}:{self._address.port} is not a master: ROLE says {kind!r:.40}")

    async def _refused(self, error: Exception) -> None:
        if str(error).startswith("READONLY"):
            await self._restart("the master is a replica now (READONLY)")

    async def _watch(self) -> None:
        """Stay subscribed to ``+switch-master`` on one sentinel after
        another; a switch of this master ends the bus's session (the next
        one goes to the new master at once).

        Error handling: a sentinel that cannot be reached, closes the
        connection or breaks the protocol is left for the next, with
        backoff after a round in which none answered; logged at most every
        10 s. Only cancellation ends this task.
        """
        wait = RECONNECT_FIRST
        while True:
            for host, port in list(self.sentinels):
                try:
                    await self._listen(host, port)
                except (OSError, ConnectionError, trio.TooSlowError, RespProtocolError, trio.BrokenResourceError) as e:
                    if n := self._watch_log.tick():
                        self.log.warning(
                            "bus_sentinel_unreachable", sentinel=f"{host}:{port}", error=describe(e), count=n
                        )
                else:
                    wait = RECONNECT_FIRST
            await trio.sleep(wait)
            wait = min(wait * 2, RECONNECT_MAX)

    async def _listen(self, host: str, port: int) -> None:
        with trio.fail_after(SENTINEL_TIMEOUT):
            stream = await open_stream(host, port, self.tls)
        async with stream:
            user, password = self._sentinel_auth
            if password is not None:
                with trio.fail_after(SENTINEL_TIMEOUT):
                    await Subscription(stream).auth(user, password)
            await stream.send_all(command(b"SUBSCRIBE", _SWITCH))
            parser = PushParser()
            while data := await stream.receive_some(65536):
                for push in parser.feed(data):
                    if type(push) is tuple and push[0] == _SWITCH:
                        await self._switched(push[1])
            raise ConnectionError("the sentinel closed the connection")

    async def _switched(self, payload: bytes) -> None:
        """``+switch-master``: ``NAME OLD-IP OLD-PORT NEW-IP NEW-PORT``."""
        parts = payload.decode("utf-8", "replace").split()
        if len(parts) == 5 and parts[0] == self.master_name and parts[4].isdigit():
            new = (parts[3], int(parts[4]))
            self.log.warning("bus_sentinel_switch", name=self.master_name, master=f"{new[0]}:{new[1]}")
            if new != self.master:
                await self._restart(f"+switch-master to {new[0]}:{new[1]}")
