"""The Redis bus on a real Redis Cluster (three masters of Debian's
redis-server on loopback, in a temp dir): sharded pub/sub with a channel
``mailpush:{SUBSCRIBER}`` per subscriber on the master of its slot, the
functions on every master, publishing through the admin API, FCALL and
SPUBLISH; a master restarted with its data (the tabs of that shard are
caught up from the history) or without (they resync), a slot moved to
another master (its subscriber follows), and the other shards' tabs never
notice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import coredis
import pytest
import trio
import trio_websocket
from conftest import make_config, token, ws_url
from hypothesis import given, strategies as st
from test_admin import ahttp
from test_redis import REDIS, free_port, startup_error

from mailpush import Config, Server
from mailpush.bus import make_bus
from mailpush.bus.redis_cluster import ClusterBus
from mailpush.bus.redis_functions import history_key, meta_key
from mailpush.bus.resp import PushParser
from mailpush.bus.slots import crc16, keyslot
from mailpush.errors import ConfigError

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"

pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS) and not os.environ.get("CI"),
    reason="redis-server not installed (make test installs it; in CI this test must run)",
)

# -- no server needed --------------------------------------------------------------


def test_crc16_and_keyslot_known_values():
    assert crc16(b"123456789") == 0x31C3  # CRC16/XMODEM's check value
    assert keyslot("foo") == 12182 and keyslot("bar") == 5061  # from the Redis Cluster spec's examples
    assert keyslot("{user1000}.following") == keyslot("{user1000}.followers") == keyslot("user1000")
    assert keyslot("foo{}{bar}") == crc16(b"foo{}{bar}") % 16384  # an empty tag: the whole key
    assert keyslot("foo{{bar}}zap") == keyslot("{bar")
    assert keyslot("mailpush:{alice}") == keyslot(meta_key("alice")) == keyslot(history_key("alice"))


def smessage(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$8\r\nsmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(payload), payload)


SHARDED = (
    b"*3\r\n$10\r\nssubscribe\r\n$10\r\nmailpush:a\r\n:1\r\n"
    + smessage(b"mailpush:{a}", b'{"subscriber":"a","event":"x"}')
    + b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\np\r\n"
    + smessage(b"mailpush:{b}", b"with\r\ninside")
    + b"-MOVED 3300 127.0.0.1:7001\r\n"
    + b"*3\r\n$12\r\nsunsubscribe\r\n$12\r\nmailpush:{a}\r\n:0\r\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(SHARDED)), max_size=8))
def test_the_parser_takes_sharded_pushes_however_split(cuts):
    parser, replies = PushParser(), []
    bounds = [0, *sorted(cuts), len(SHARDED)]
    for a, b in zip(bounds, bounds[1:]):
        replies += parser.feed(SHARDED[a:b])
    assert replies[0] == [b"ssubscribe", b"mailpush:a", 1]
    assert replies[1] == (b"mailpush:{a}", b'{"subscriber":"a","event":"x"}')
    assert replies[2] == (b"c", b"p")
    assert replies[3] == (b"mailpush:{b}", b"with\r\ninside")
    assert str(replies[4]) == "MOVED 3300 127.0.0.1:7001"
    assert replies[5] == [b"sunsubscribe", b"mailpush:{a}", 0]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis+cluster://127.0.0.1:7000/3", "database 0 only"),
        ("redis+cluster://127.0.0.1:x/", "bad host"),
        ("redis+cluster://127.0.0.1:7000/?ssl=1", "no options"),
    ],
)
def test_bad_cluster_urls_are_clear_errors(url, needle):
    with pytest.raises(ConfigError, match=needle):
        make_bus(Config(bus=url))


def test_cluster_url_seeds_and_password():
    bus = make_bus(Config(bus="redis+cluster://:pw@10.0.0.1:7000,[::1]:7001,node3/"))
    assert isinstance(bus, ClusterBus)
    assert bus.seeds == [("10.0.0.1", 7000), ("::1", 7001), ("node3", 6379)] and bus.password == "pw"


# -- a real cluster ------------------------------------------------------------------


def _two_free_ports() -> tuple[int, int]:
    return free_port(), free_port()


class Cluster:
    """Three masters (no replicas) on loopback, each with its nodes.conf and
    AOF in its own directory."""

    def __init__(self, root) -> None:
        self.root = root
        self.nodes = [_two_free_ports() for _ in range(3)]  # (port, cluster bus port)
        self.procs: list[subprocess.Popen | None] = [None] * 3
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p, _ in self.nodes[:2]) + "/"

    def dir(self, i: int):
        d = self.root / f"node{i}"
        d.mkdir(exist_ok=True)
        return d

    def add_replica(self, of: int) -> int:
        """A fourth node, a replica of node ``of``; returns its index."""
        self.nodes.append(_two_free_ports())
        self.procs.append(None)
        i = len(self.nodes) - 1
        self.start(i)
        master_id = self.cli(of, "cluster", "myid").strip()
        self.cli(i, "cluster", "meet", "127.0.0.1", str(self.nodes[of][0]), str(self.nodes[of][1]))
        deadline = time.monotonic() + 15
        while "OK" not in self.cli(i, "cluster", "replicate", master_id):  # once it knows the master
            assert time.monotonic() < deadline, "the new node did not join"
            time.sleep(0.05)
        while "master_link_status:up" not in self.cli(i, "info", "replication") or not all(
            f":{self.nodes[i][0]}@" in self.cli(m, "cluster", "replicas", master_id) for m in range(3)
        ):  # (every master must know it as node of's replica to vote for it)
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        return i

    def port_args(self, port: int) -> list[str]:
        """How a node listens for clients (TlsCluster: TLS only)."""
        return ["--port", str(port)]

    def cli_args(self) -> list[str]:
        """What redis-cli needs to reach the nodes."""
        return []

    def start(self, i: int) -> None:
        port, bus_port = self.nodes[i]
        self.procs[i] = subprocess.Popen(
            [REDIS, *self.port_args(port), "--cluster-port", str(bus_port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
             "--cluster-require-full-coverage", "no", "--dir", str(self.dir(i)), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--repl-diskless-sync-delay", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.send_signal(sig)
            proc.wait(10)
            self.procs[i] = None

    def cli(self, i: int, *args: str) -> str:
        return subprocess.run([REDIS_CLI, *self.cli_args(), "-p", str(self.nodes[i][0]), *args], capture_output=True, text=True, timeout=10, check=True).stdout

    def create(self) -> None:
        for i in range(3):
            self.start(i)
        subprocess.run([REDIS_CLI, *self.cli_args(), "--cluster", "create", *(f"127.0.0.1:{p}" for p, _ in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, check=True, timeout=30)
        self.wait_ok()

    def wait_ok(self) -> None:
        deadline = time.monotonic() + 15
        while not all("cluster_state:ok" in self.cli(i, "cluster", "info") for i in range(3)):
            assert time.monotonic() < deadline, "the cluster did not come up"
            time.sleep(0.05)

    def owner(self, slot: int) -> int:
        """Which node (index) serves ``slot``."""
        for i in range(3):
            if self._serves(i, slot):
                return i
        raise AssertionError(f"nobody serves slot {slot}")

    def _serves(self, i: int, slot: int) -> bool:
        myid = self.cli(i, "cluster", "myid").strip()
        for line in self.cli(i, "cluster", "nodes").splitlines():
            fields = line.split()
            if fields[0] != myid:
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return True
        return False

    def shard_channels(self, i: int) -> set[str]:
        return set(self.cli(i, "pubsub", "shardchannels").split())

    def close(self) -> None:
        for i in range(len(self.nodes)):
            self.stop(i)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.create()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def people(cluster) -> list[list[str]]:
    """Two subscribers per master: people[i] are served by node i (the
    layout of redis-cli --cluster create: three equal ranges, in order)."""
    out: list[list[str]] = [[], [], []]
    n = 0
    while min(len(x) for x in out) < 2:
        name = f"user{n}@example.com"
        slot = keyslot(name)
        node = 0 if slot <= 5460 else 1 if slot <= 10922 else 2
        if len(out[node]) < 2:
            out[node].append(name)
        n += 1
    assert [cluster.owner(keyslot(g[0])) for g in out] == [0, 1, 2]
    return out


def test_keyslot_agrees_with_cluster_keyslot(cluster):
    keys = ["alice@example.com", "mailpush:{alice}", "{}", "a{b}c", "x{}y{z}", "é{ü}", "}{", "{{}}", "", "k" * 300]
    keys += [f"user{i}" for i in range(40)]
    for key in keys:
        assert keyslot(key) == int(cluster.cli(0, "cluster", "keyslot", key)), key


async def recv(ws, timeout: float = 10) -> dict:
    with trio.fail_after(timeout):
        return json.loads(await ws.get_message())


async def nothing(ws, wait: float = 0.3) -> None:
    with trio.move_on_after(wait):
        got = await ws.get_message()
        pytest.fail(f"unexpected {got}")


async def fcall(cluster, sub: str, event: str, data: dict, state: str = "") -> int:
    """What a mail store does: one FCALL, through a cluster client (it may
    meet a master that is still starting: retried for a while)."""
    with trio.fail_after(20):
        while True:
            client = coredis.RedisCluster(startup_nodes=[{"host": "127.0.0.1", "port": p} for p, _ in cluster.nodes])
            try:
                async with client:
                    return await client.fcall("mailpush_publish", [meta_key(sub), history_key(sub)], [sub, event, json.dumps(data), state])
            except* (coredis.exceptions.RedisError, OSError):
                pass  # the cluster down for a moment; a master restarted empty has no functions until mailpush is back
            await trio.sleep(0.1)


async def open_tabs(server, names):
    """One subscribed tab per name: {name: (ws, subscribed answer)}."""
    tabs = {}
    for name in names:
        ws = await trio_websocket.connect_websocket_url(server._test_nursery, ws_url(server, tok=token(name)))
        await ws.send_message('{"type":"subscribe"}')
        answer = await recv(ws)
        assert answer["type"] == "subscribed", answer
        tabs[name] = (ws, answer)
    return tabs


@pytest.fixture
async def cluster_server(cluster, nursery):
    """An in-process server on the cluster (one poller: the bus is the
    subject here)."""
    server = Server(make_config(), ClusterBus(cluster.url, Config(bus=cluster.url, secret="s" * 32)))
    await nursery.start(server.serve)
    server._test_nursery = nursery
    return server


async def test_subscribers_on_every_shard_get_their_events_however_published(cluster_server, cluster, people):
    server = cluster_server
    everyone = [name for group in people for name in group]
    tabs = await open_tabs(server, everyone)
    # Each subscriber's channel is on its own master, and only there.
    for i in range(3):
        mine = {f"mailpush:{{{name}}}" for name in people[i]}
        assert mine <= cluster.shard_channels(i)
        assert not ({f"mailpush:{{{n}}}" for n in everyone} - mine) & cluster.shard_channels(i)
    # The admin API: one publish with an item for each subscriber.
    body = json.dumps([{"subscriber": n, "event": "via_admin", "data": {"to": n}} for n in everyone]).encode()
    status, _, _ = await ahttp(server.admin_address, "POST", "/v1/publish", body)
    assert status == 202
    for name in everyone:
        got = await recv(tabs[name][0])
        assert (got["event"], got["data"], got["offset"]) == ("via_admin", {"to": name}, tabs[name][1]["offset"] + 1)
    # A mail store: FCALL from redis-cli on the right master (-c follows MOVED).
    for i, group in enumerate(people):
        for name in group:
            cluster.cli(i, "-c", "FCALL", "mailpush_publish", "2", meta_key(name), history_key(name), name, "via_fcall", '{"n":2}', "")
            got = await recv(tabs[name][0])
            assert (got["event"], got["offset"]) == ("via_fcall", tabs[name][1]["offset"] + 2)
    # An older publisher: a plain SPUBLISH, delivered without an offset.
    for i, group in enumerate(people):
        name = group[0]
        payload = json.dumps({"subscriber": name, "event": "via_spublish"})
        assert cluster.cli(i, "-c", "SPUBLISH", f"mailpush:{{{name}}}", payload).strip() == "1"
        got = await recv(tabs[name][0])
        assert got["event"] == "via_spublish" and "offset" not in got
    for ws, _ in tabs.values():
        await nothing(ws, 0.05)
        await ws.aclose()
    # The last tab of each left: no shard channel stays subscribed.
    with trio.fail_after(5):
        while any(c.startswith("mailpush:{") for i in range(3) for c in cluster.shard_channels(i)):
            await trio.sleep(0.05)
    assert server.bus.up


async def _restart_test(server, cluster, people, keep_data: bool):
    victim = 1
    everyone = [name for group in people for name in group]
    for name in everyone:  # every subscriber has a history first
        await fcall(cluster, name, "before", {})
    tabs = await open_tabs(server, everyone)
    cluster.stop(victim, signal.SIGTERM)  # a clean stop: the AOF is complete
    if not keep_data:
        shutil.rmtree(cluster.dir(victim) / "appendonlydir")
    # The other shards go on meanwhile.
    for i in (0, 2):
        for name in people[i]:
            await fcall(cluster, name, "during", {"n": 1})
            got = await recv(tabs[name][0])
            assert (got["type"], got["event"]) == ("event", "during")
    with trio.fail_after(5):
        while server.bus.up:
            await trio.sleep(0.02)
    # One master of three lost: the instance stays in its load balancer's
    # rotation (the other shards' tabs are served), and says what is wrong.
    status, body, _ = await ahttp(server.admin_address, "GET", "/healthz")
    assert status == 200 and b"ok, degraded: 1 of 3 Redis Cluster masters unreachable" in body, body
    assert b"mailpush_bus_degraded 1.0" in (await ahttp(server.admin_address, "GET", "/metrics"))[1]
    cluster.start(victim)
    # Published as soon as the master is back, most likely before mailpush
    # has its shard again: missed live, caught up from the history.
    for name in people[victim]:
        await fcall(cluster, name, "after", {"n": 2})
    for name in people[victim]:
        ws, first = tabs[name]
        got = await recv(ws, 20)
        if keep_data:
            assert (got["type"], got["event"], got["offset"]) == ("event", "after", first["offset"] + 1), got
        else:
            # A new epoch: told so first; "after" is then either in the
            # state the resync points at, or comes next, live.
            assert (got["type"], got["reason"]) == ("resync", "epoch_changed"), got
            assert got["epoch"] != first["epoch"]
            if got["offset"] == 0:
                nxt = await recv(ws)
                assert (nxt["event"], nxt["offset"], nxt["type"]) == ("after", 1, "event")
            else:
                assert got["offset"] == 1
        await nothing(ws)  # exactly once
    with trio.fail_after(10):
        while not server.bus.up:
            await trio.sleep(0.05)
    for i in (0, 2):  # the other shards' tabs saw nothing but their events
        for name in people[i]:
            await nothing(tabs[name][0], 0.05)
    # mailpush's own publishing side follows the restarted master too.
    body = json.dumps([{"subscriber": n, "event": "end"} for n in everyone]).encode()
    with trio.fail_after(10):
        while (await ahttp(server.admin_address, "POST", "/v1/publish", body))[0] != 202:
            await trio.sleep(0.1)
    for name in everyone:
        assert (await recv(tabs[name][0]))["event"] == "end"
        await nothing(tabs[name][0], 0.05)
        await tabs[name][0].aclose()


async def test_a_master_restarted_with_its_data_catches_its_tabs_up(cluster_server, cluster, people):
    await _restart_test(cluster_server, cluster, people, keep_data=True)


async def test_a_master_restarted_empty_resyncs_its_tabs_only(cluster_server, cluster, people):
    await _restart_test(cluster_server, cluster, people, keep_data=False)


async def test_a_slot_moved_to_another_master_takes_its_subscriber_along(cluster_server, cluster, people):
    server = cluster_server
    name = people[0][0]
    slot = keyslot(name)
    await fcall(cluster, name, "before", {})
    tabs = await open_tabs(server, [name, people[2][0]])
    ws, first = tabs[name]
    src, dst = cluster.owner(slot), 2
    src_id, dst_id = cluster.cli(src, "cluster", "myid").strip(), cluster.cli(dst, "cluster", "myid").strip()
    cluster.cli(dst, "cluster", "setslot", str(slot), "importing", src_id)
    cluster.cli(src, "cluster", "setslot", str(slot), "migrating", dst_id)
    keys = cluster.cli(src, "cluster", "getkeysinslot", str(slot), "100").split()
    assert keys
    cluster.cli(src, "migrate", "127.0.0.1", str(cluster.nodes[dst][0]), "", "0", "5000", "keys", *keys)
    for i in range(3):
        cluster.cli(i, "cluster", "setslot", str(slot), "node", dst_id)
    # The old master dropped the subscription itself; mailpush follows.
    with trio.fail_after(10):
        while f"mailpush:{{{name}}}" not in cluster.shard_channels(dst):
            await trio.sleep(0.05)
    assert f"mailpush:{{{name}}}" not in cluster.shard_channels(src)
    assert await fcall(cluster, name, "moved", {}) == first["offset"] + 1  # the history moved with the slot
    got = await recv(ws)
    assert (got["type"], got["event"], got["offset"]) == ("event", "moved", first["offset"] + 1)
    await nothing(ws)
    await nothing(tabs[people[2][0]][0], 0.05)
    # Give the slot back, for the other tests.
    cluster.cli(src, "cluster", "setslot", str(slot), "importing", dst_id)
    cluster.cli(dst, "cluster", "setslot", str(slot), "migrating", src_id)
    keys = cluster.cli(dst, "cluster", "getkeysinslot", str(slot), "100").split()
    cluster.cli(dst, "migrate", "127.0.0.1", str(cluster.nodes[src][0]), "", "0", "5000", "keys", *keys)
    for i in range(3):
        cluster.cli(i, "cluster", "setslot", str(slot), "node", src_id)
    for w, _ in tabs.values():
        await w.aclose()


async def test_a_replica_taking_over_its_master_takes_the_shard_along(cluster_server, cluster, people):
    """(Last in this module: it changes the cluster's layout.) A failover
    of node 1 to a replica: the old master drops its shard channels, the
    bus finds the new master in the refreshed map and subscribes there; the
    tabs of that shard are caught up, the others notice nothing."""
    server = cluster_server
    everyone = [name for group in people for name in group]
    for name in everyone:
        await fcall(cluster, name, "before", {})
    tabs = await open_tabs(server, everyone)
    replica = await trio.to_thread.run_sync(cluster.add_replica, 1)
    assert cluster.cli(replica, "cluster", "failover").strip() == "OK"
    channels = {f"mailpush:{{{n}}}" for n in people[1]}
    # The old master's sunsubscribe pushes make the bus look again at once;
    # should they be missed (a loaded machine: once in CI), its periodic
    # refresh of the slot map (every 30 s) finds the new master.
    with trio.fail_after(45):
        while not channels <= cluster.shard_channels(replica):
            await trio.sleep(0.05)
    assert not channels & cluster.shard_channels(1)
    for name in everyone:
        await fcall(cluster, name, "after", {})
        got = await recv(tabs[name][0])
        assert (got["type"], got["event"], got["offset"]) == ("event", "after", tabs[name][1]["offset"] + 1), got
    with trio.fail_after(10):
        while not server.bus.up:
            await trio.sleep(0.05)
    for ws, _ in tabs.values():
        await nothing(ws, 0.05)
        await ws.aclose()


def test_an_unreachable_cluster_at_startup_is_a_clear_error():
    port = free_port()
    err = startup_error(f"redis+cluster://127.0.0.1:{port}/")
    assert f"cannot reach the Redis bus at redis+cluster://127.0.0.1:{port}/" in err


async def test_the_per_subscriber_cap_holds_across_instances_on_a_cluster(cluster, people, nursery):
    """The counts live in each subscriber's slot (``mailpush:conns:{S}``),
    on whichever master owns it: one subscriber per shard, two instances."""
    servers = []
    for _ in range(2):
        server = Server(make_config(max_connections_per_subscriber=1), ClusterBus(cluster.url, Config(bus=cluster.url, secret="s" * 32)))
        await nursery.start(server.serve)
        servers.append(server)
    a, b = servers
    for group in people:
        tok = token(group[0])
        async with trio_websocket.open_websocket_url(ws_url(a, tok=tok)) as first:
            await first.send_message('{"type":"subscribe"}')
            assert (await recv(first))["type"] == "subscribed"
            with trio.fail_after(5):
                while a.ctx.shared_cap.pending:
                    await trio.sleep(0.02)
            async with trio_websocket.open_websocket_url(ws_url(b, tok=tok)) as second:
                with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as e:
                    await second.get_message()
                assert e.value.reason.code == 4008
            await first.send_message('{"type":"ping"}')
            assert (await recv(first)) == {"type": "pong"}
    assert b.stats.closes[4008] == len(people)


async def test_a_subscriber_that_cannot_be_hash_tagged_is_refused_clearly(cluster_server):
    """A subscriber id beginning with '}' makes an empty hash tag: its keys
    would span slots, every history read and publish would fail forever.
    Refused at the door instead: 403 at the upgrade (close 4003 for a
    mailpush.v1 client), 400 for a publish."""
    from test_client_protocol import close_code, frame, raw_upgrade, sub_protocols

    from mailpush.frames import Opcode

    server = cluster_server
    assert server.bus.check_subscriber("a}b") == "" and server.bus.check_subscriber("alice") == ""
    tok = token("}x")
    c, head = await raw_upgrade(server, "", path="/v1/ws?token=" + tok)
    assert head.startswith(b"HTTP/1.1 403") and b"cannot be hash-tagged" in await trio.to_thread.run_sync(c.read_all)
    c, head = await raw_upgrade(server, sub_protocols(tok))
    assert head.startswith(b"HTTP/1.1 101")
    op, payload = await frame(c)
    assert op == Opcode.CLOSE and close_code(payload) == 4003 and b"hash-tagged" in payload
    c.close()
    body = json.dumps([{"subscriber": "alice", "event": "e"}, {"subscriber": "}x", "event": "e"}]).encode()
    status, text, _ = await ahttp(server.admin_address, "POST", "/v1/publish", body)
    assert status == 400 and b"item 1: a subscriber id beginning with '}'" in text, text
    # Everyone else is served as before.
    async with trio_websocket.open_websocket_url(ws_url(server, tok=token("a}b"))) as ws:
        await ws.send_message('{"type":"subscribe"}')
        assert (await recv(ws))["type"] == "subscribed"
