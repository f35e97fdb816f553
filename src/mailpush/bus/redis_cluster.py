"""The Redis bus on a Redis Cluster (``--bus
redis+cluster://HOST:PORT,HOST:PORT/``): sharded pub/sub, so an event goes
to one shard only, not to every node of the cluster.

A subscriber's channel is ``mailpush:{SUBSCRIBER}`` (hash-tagged like its
history keys ``mailpush:meta:{S}`` and ``mailpush:hist:{S}``: all three in
one slot, on one master). The functions are loaded on every master (by
each shard session as it connects, so a master restarted empty or a
promoted replica gets them; a publish refused with "Function not found"
loads them everywhere and is sent again); ``mailpush_publish`` there
SPUBLISHes, so a mail store publishes with the same FCALL as on one Redis.

Design:

- the slot map comes from ``CLUSTER SHARDS``, asked of the known masters,
  then of the seed nodes of the URL; the slot of a channel is computed here
  (``slots.py``);
- one :class:`~mailpush.bus.cluster_shard.Shard` per master: a subscription
  connection read by mailpush's own RESP parser, with the subscribers whose
  slots that master serves SSUBSCRIBEd on it (one command per slot);
- heartbeats: each shard has its own control channel
  ``mailpush.control.{N}``, N chosen so that the channel lives in a slot of
  that master; every HEARTBEAT_INTERVAL the shard SPUBLISHes on it, and a
  shard that heard nothing for HEARTBEAT_TIMEOUT ends its session. A
  silent or lost master costs a reconnect of its own shard only;
- this module's task (the coordinator) refreshes the map when something
  says it changed (a shard lost, a ``-MOVED`` answer, an ``sunsubscribe``
  the node sent on its own after a resharding) and every REFRESH_INTERVAL;
  after a refresh it starts a shard for each new master, stops those of
  nodes that serve no slot any more, and SSUBSCRIBEs every subscriber that
  is not subscribed on the master now serving it. Whenever subscribers are
  subscribed anew (a shard's session came back, their slot moved), their
  gap is reported (``on_gap`` with those subscribers): their local tabs are
  brought up to date from the history, or resynced; tabs of other shards
  notice nothing.

``up`` is True while every shard is subscribed. One master lost is not a
reason to take the instance out of its load balancer (every instance on the
cluster would go at once, and the other shards' subscribers with them):
``/healthz`` says 200 with the lost shards named while at least one shard
is subscribed (:meth:`ClusterBus.degraded`), 503 only when none is.
Publishing and history reads go to the shards that answer (a publish for a
subscriber on a lost shard gets 503).
"""

from __future__ import annotations

import ssl
import traceback
from collections.abc import Collection, Sequence

import coredis
import trio

from ..backoff import Backoff
from ..config import Config
from ..errors import BusUnavailable, ConfigError
from ..history import Replay
from ..log import LogLimiter
from .base import Item, Read, Sink
from .cluster_shard import Shard
from .redis_common import CONNECT_TIMEOUT, LOST, RECONNECT_FIRST, RECONNECT_MAX, RedisBase, innermost
from .redis_conn import MultiHostURL, describe, safe, tls_context
from .redis_functions import cluster_channel
from .slots import Node, SlotMap, keyslot

__all__ = ["ClusterBus", "CONTROL_PREFIX", "REFRESH_INTERVAL"]

# The control channel of a shard is this prefix + a hash tag in its slots.
CONTROL_PREFIX = "mailpush.control."
# The slot map is asked for again this often even when nothing says it
# changed (a master added, its slots moved while we had no channel there).
REFRESH_INTERVAL = 30.0
# No two refreshes closer than this: a burst of MOVED answers or dropped
# subscriptions makes one.
REFRESH_MIN_GAP = 0.2
# How long one node may take to answer CLUSTER SHARDS.
MAP_TIMEOUT = 2.0

_TAG_START = len("mailpush:{")


class ClusterBus(RedisBase):
    """The Redis bus on a Redis Cluster (see the module docstring).

    Args:
      url: ``redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/``,
        the seed nodes (one is enough; more survive one being down at
        start). The password is the nodes' (AUTH).
      config: the history options (size, TTL).

    Raises:
      ConfigError: a URL that cannot be used.
    """

    def __init__(self, url: str, config: Config | None = None) -> None:
        super().__init__(url, config, sharded=True)
        scheme = "rediss+cluster" if url.startswith("rediss+cluster://") else "redis+cluster"
        try:
            parsed = MultiHostURL(url, scheme, 6379)
            if parsed.path not in ([], ["0"]):
                raise ValueError("a Redis Cluster has database 0 only")
            if parsed.query and scheme == "redis+cluster":
                raise ValueError("no options are known after '?' (TLS options need rediss+cluster://)")
            # TLS to every node, the subscription connections as the client's.
            self.tls: ssl.SSLContext | None = tls_context(parsed.query) if scheme == "rediss+cluster" else None
        except ValueError as e:
            raise ConfigError(f"bad --bus URL {safe(url)!r}: {e}") from None
        self.seeds: list[Node] = parsed.hosts
        self.username, self.password = parsed.username, parsed.password
        self.client = coredis.RedisCluster(
            startup_nodes=[coredis.typing.Node(host=h, port=p) for h, p in self.seeds],
            username=self.username,
            password=self.password,
            connect_timeout=CONNECT_TIMEOUT,
            ssl=self.tls is not None,
            ssl_context=self.tls,
        )
        self.library_source = self._library
        self.beat = self._beat
        self.item_of = self._item
        self.subscriber_of = self._subscriber_of
        self.up = False
        self._map: SlotMap | None = None
        self._shards: dict[Node, Shard] = {}
        self._wanted: dict[str, int] = {}  # subscriber -> its slot
        self._tags: dict[Node, str] = {}
        self._refresh = trio.Event()
        self._started = False
        self._error_log = LogLimiter()

    # -- what the shards use ------------------------------------------------------

    def _subscriber_of(self, channel: bytes) -> str:
        return channel.decode("utf-8", "replace")[_TAG_START:-1]

    def channel(self, subscriber: str) -> str:
        return cluster_channel(subscriber)

    def slot_of(self, subscriber: str) -> int:
        slot = self._wanted.get(subscriber)
        return keyslot(cluster_channel(subscriber)) if slot is None else slot

    def assigned(self, node: Node) -> list[str]:
        """The wanted subscribers whose slots ``node`` serves."""
        owns = self._map.owns if self._map is not None else None
        return [s for s, slot in self._wanted.items() if owns is not None and owns(node, slot)]

    def control_for(self, node: Node) -> str:
        """The control channel of ``node``: in one of its slots."""
        if self._map is None or node not in self._map.masters:
            raise BusUnavailable(f"{node[0]}:{node[1]} serves no slot")
        tag = self._tags.get(node)
        if tag is None or not self._map.owns(node, keyslot(tag)):
            tag = self._tags[node] = self._map.tag_for(node, CONTROL_PREFIX)
        return tag

    def refresh(self) -> None:
        """Ask for the slot map again soon."""
        self._refresh.set()

    def shard_changed(self) -> None:
        self.up = self._started and bool(self._shards) and all(s.sub is not None for s in self._shards.values())

    restricts_subscribers = True

    def check_subscriber(self, subscriber: str) -> str:
        """A subscriber id beginning with '}' makes an empty hash tag
        (``mailpush:meta:{}…}``): its keys would hash whole, each to its own
        slot, and no function could take them together."""
        if subscriber.startswith("}"):
            return (
                "a subscriber id beginning with '}' cannot be hash-tagged on a Redis Cluster"
                " (its keys would span slots)"
            )
        return ""

    def serving(self) -> bool:
        """At least one shard subscribed: its subscribers get their events."""
        return self._started and any(s.sub is not None for s in self._shards.values())

    def degraded(self) -> str:
        lost = sorted(node for node, s in self._shards.items() if s.sub is None)
        if not lost or not self.serving():
            return ""
        names = ", ".join(f"{host}:{port}" for host, port in lost[:3])
        return (
            f"{len(lost)} of {len(self._shards)} Redis Cluster masters unreachable ({names}):"
            " their subscribers' events wait for them"
        )

    def gap(self, reason: str, subscribers: Collection[str]) -> None:
        if self.on_gap is not None and subscribers:
            self.on_gap(reason, subscribers)

    def heartbeat_lag(self) -> float:
        """Seconds since the quietest shard last heard a heartbeat."""
        now = trio.current_time()
        return max((now - s.heard for s in self._shards.values() if s.sub is not None), default=0.0)

    # -- the coordinator ----------------------------------------------------------

    async def run(self, sink: Sink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The bus-client task: the slot map and one task per master.

        ``task_status.started()`` once every master's first session is
        subscribed.

        Error handling: before that, a cluster that cannot be reached (no
        seed answers, a master refuses) is a
        :class:`~mailpush.errors.ConfigError` (the server does not start).
        Afterwards each shard handles its own failures (see
        :meth:`Shard.run`); a refresh of the map that fails is logged and
        tried again with backoff, the shards going on meanwhile; anything
        else in a refresh (a bug) is logged with its traceback and the
        refresh is tried again: only cancellation ends this task.
        """
        failure: BaseException | None = None
        try:
            # the publishing side (coredis follows the cluster by itself), and a task per master
            async with self.client, trio.open_nursery() as nursery:
                try:
                    self._map = await self._fetch_map()
                    for node in self._map.masters:
                        shard = self._shards[node] = Shard(self, node)
                        await nursery.start(shard.run, sink)
                except* LOST as group:
                    failure = innermost(group)
                    nursery.cancel_scope.cancel()
                else:
                    self._started = True
                    self.shard_changed()
                    task_status.started()
                    await self._coordinate(sink, nursery)
        except* LOST as group:
            if self._started:
                raise
            failure = failure or innermost(group)
        raise ConfigError(f"cannot reach the Redis bus at {safe(self.url)}: {describe(failure)}")

    async def _coordinate(self, sink: Sink, nursery: trio.Nursery) -> None:
        backoff = Backoff(RECONNECT_FIRST, RECONNECT_MAX)
        while True:
            with trio.move_on_after(REFRESH_INTERVAL):
                await self._refresh.wait()
            await trio.sleep(REFRESH_MIN_GAP)  # what else happens meanwhile joins this refresh
            self._refresh = trio.Event()
            try:
                await self._apply(await self._fetch_map(), sink, nursery)
            except* LOST as group:
                delay = backoff.next()
                if n := self._error_log.tick():
                    error = describe(innermost(group))
                    self.log.error(
                        "bus_cluster_map_failed", url=safe(self.url), error=error, retry_in=round(delay, 3), count=n
                    )
                await trio.sleep(delay)
                self._refresh.set()
            except* Exception as group:  # noqa: BLE001 - the isolation boundary, see run()
                lost = innermost(group)
                self.log.error(
                    "bus_cluster_refresh_failed", error=repr(lost), trace="".join(traceback.format_exception(lost))
                )
                await trio.sleep(backoff.next())
                self._refresh.set()
            else:
                backoff.reset()

    async def _fetch_map(self) -> SlotMap:
        """The slot map, from the first node that answers: the known
        masters first, then the seeds.

        Raises:
          BusUnavailable: no node answered.
        """
        errors = []
        for host, port in dict.fromkeys([*self._shards, *self.seeds]):
            try:
                with trio.fail_after(MAP_TIMEOUT):
                    client = coredis.Redis(
                        host=host,
                        port=port,
                        username=self.username,
                        password=self.password,
                        connect_timeout=MAP_TIMEOUT,
                        ssl=self.tls is not None,
                        ssl_context=self.tls,
                    )
                    async with client:
                        return SlotMap.from_shards(await client.cluster_shards(), tls=self.tls is not None)
            except (*LOST, ValueError, KeyError, TypeError) as e:
                errors.append(f"{host}:{port}: {describe(e)}")
        raise BusUnavailable("no node of the cluster answered CLUSTER SHARDS: " + "; ".join(errors))

    async def _apply(self, new: SlotMap, sink: Sink, nursery: trio.Nursery) -> None:
        """Follow a new slot map: shards started and stopped, subscribers
        subscribed where they now belong (and their gap reported)."""
        old, self._map = self._map, new
        if old is None or old.masters != new.masters:
            self.log.info("bus_cluster_map", masters=sorted(f"{h}:{p}" for h, p in new.masters))
        for node in list(self._shards):
            if node not in new.masters:
                self._shards.pop(node).scope.cancel()  # its subscribers belong elsewhere now
        for node in new.masters:
            if node not in self._shards:
                shard = self._shards[node] = Shard(self, node)
                nursery.start_soon(shard.run, sink)
        self.shard_changed()
        for shard in list(self._shards.values()):
            sub = shard.sub
            if sub is None:
                continue  # its next session subscribes what it serves (and reports the gap)
            try:
                await shard.retag(sub)
                want = set(self.assigned(shard.node))
                stale = shard.subscribed - want
                if stale:
                    await shard.sunsubscribe(sub, stale)
                missing = want - shard.subscribed
                if missing:
                    done = await shard.ssubscribe(sub, missing)
                    self.gap(f"slots moved to {shard.name}", done)
            except BusUnavailable:
                pass  # that session ends; its next one subscribes them

    # -- the Bus interface --------------------------------------------------------

    async def publish(self, items: Sequence[Item]) -> None:
        """``mailpush_publish`` each item (offset, history and SPUBLISH in
        one step on the subscriber's master), in one pipeline (coredis
        sends each to its master and follows MOVED answers).

        Raises:
          BusUnavailable: not started, or a master is not reachable now;
            the items may or may not have been published, the caller
            retries.
        """
        if not self._started:
            raise BusUnavailable(f"not connected to the Redis bus at {safe(self.url)}; retry shortly")
        await self._fcall_publish(items)

    async def read(self, requests: Sequence[Read]) -> list[Replay]:
        """``mailpush_read`` each request in one pipeline, then a PING on
        the subscription connection of each master concerned (the barrier:
        its answer comes after every message that master published before
        the reads).

        Raises:
          BusUnavailable: one of those masters is not reachable now.
        """
        if self._map is None or not self._started:
            raise BusUnavailable(f"not connected to the Redis bus at {safe(self.url)}")
        replays = await self._fcall_read(requests)
        nodes = {self._map.node_of(self.slot_of(s)) for s, _, _ in requests}
        for node in nodes:
            shard = self._shards.get(node) if node is not None else None
            sub = shard.sub if shard is not None else None
            if sub is None:
                raise BusUnavailable(f"the master of some of these subscribers is not reachable ({node})")
            await sub.request(b"PING", [])
        return replays

    async def subscribe(self, subscribers: Sequence[str]) -> None:
        """SSUBSCRIBE their channels, each on its master; returns once
        every master acknowledged.

        Raises:
          BusUnavailable: a master concerned is not reachable now, or its
            slots moved (the dispatcher retries; the subscribers are
            wanted from now on, so a shard coming back subscribes them).
        """
        if self._map is None or not self._started:
            raise BusUnavailable(f"not connected to the Redis bus at {safe(self.url)}")
        by_node: dict[Node | None, list[str]] = {}
        for s in subscribers:
            slot = self._wanted[s] = keyslot(cluster_channel(s))
            by_node.setdefault(self._map.node_of(slot), []).append(s)
        missing = []
        for node, subs in by_node.items():
            shard = self._shards.get(node) if node is not None else None
            sub = shard.sub if shard is not None else None
            if shard is None or sub is None:
                missing.append(node)
                continue
            try:
                done = await shard.ssubscribe(sub, subs)
            except BusUnavailable:
                done = []
            if len(done) < len(subs):
                missing.append(node)
        if missing:
            raise BusUnavailable(f"the Redis Cluster masters {missing} did not subscribe (not reachable, or moved)")

    async def unsubscribe(self, subscribers: Sequence[str]) -> None:
        """SUNSUBSCRIBE their channels where they are subscribed (and not
        subscribe them again)."""
        for s in subscribers:
            self._wanted.pop(s, None)
        for shard in list(self._shards.values()):
            mine = [s for s in subscribers if s in shard.subscribed]
            if mine and shard.sub is not None:
                try:
                    await shard.sunsubscribe(shard.sub, mine)
                except BusUnavailable:
                    pass  # that connection is gone, and its subscriptions with it

    def __repr__(self) -> str:
        return f"ClusterBus({safe(self.url)!r})"
