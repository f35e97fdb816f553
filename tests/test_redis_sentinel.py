"""The Redis bus behind Redis Sentinel, against real processes on loopback
(Debian's redis-server, in a temp dir): one master, one replica, three
sentinels. The master SIGKILLed: once a sentinel promoted the replica,
mailpush follows it, the tabs receive again, and what was published on the
new master before mailpush got there is recovered from the history (it was
replicated: same epoch, no resync). A manual failover (the old master alive,
demoted) is followed the same way."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import coredis
import pytest
import trio
import trio_websocket
from conftest import make_config, token, ws_url
from test_admin import ahttp
from test_redis import REDIS, free_port, startup_error
from test_redis_cluster import REDIS_CLI

from mailpush import Config, Server
from mailpush.bus import make_bus
from mailpush.bus.redis_functions import history_key, meta_key
from mailpush.bus.sentinel import SentinelBus
from mailpush.errors import ConfigError

pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS) and not os.environ.get("CI"),
    reason="redis-server not installed (make test installs it; in CI this test must run)",
)


def test_sentinel_urls():
    bus = make_bus(Config(bus="redis+sentinel://:pw@10.0.0.1:26380,h2/prod/2?sentinel_password=sp"))
    assert isinstance(bus, SentinelBus)
    assert (bus.sentinels, bus.master_name, bus.db, bus.password) == ([("10.0.0.1", 26380), ("h2", 26379)], "prod", 2, "pw")
    assert bus._sentinel_auth == (None, "sp")
    for url, needle in [
        ("redis+sentinel://127.0.0.1:26379/", "name the master"),
        ("redis+sentinel://127.0.0.1:26379/m/x", "invalid literal"),
        ("redis+sentinel://127.0.0.1:26379/m?ssl=1", "unknown options"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            make_bus(Config(bus=url))


def test_no_sentinel_at_startup_is_a_clear_error():
    port = free_port()
    err = startup_error(f"redis+sentinel://127.0.0.1:{port}/mymaster")
    assert "cannot reach the Redis bus at redis+sentinel://" in err and "no sentinel named the master 'mymaster'" in err


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.02)


def cli(port: int, *args: str) -> str:
    return subprocess.run([REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=10).stdout


class Setup:
    """A master, its replica and three sentinels (quorum 2, down after 1 s)."""

    NAME = "mymaster"

    def __init__(self, root) -> None:
        self.root = root
        self.master, self.replica = free_port(), free_port()
        self.sentinels = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{self.NAME}"

    def port_args(self, port: int) -> list[str]:
        """How a server listens (TlsSetup: TLS only, replication too)."""
        return ["--port", str(port)]

    def sentinel_port_conf(self, port: int) -> str:
        """How a sentinel listens, as sentinel.conf lines."""
        return f"port {port}\n"

    def cli(self, port: int, *args: str) -> str:
        return cli(port, *args)

    def _run(self, port: int, *args: str) -> None:
        self.procs[port] = subprocess.Popen([REDIS, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(port)

    def start(self) -> None:
        for port, extra in ((self.master, []), (self.replica, ["--replicaof", "127.0.0.1", str(self.master)])):
            d = self.root / str(port)
            d.mkdir()
            self._run(port, *self.port_args(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "", "--appendonly", "no", *extra)
        deadline = time.monotonic() + 10
        while "master_link_status:up" not in self.cli(self.replica, "info", "replication"):
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        for port in self.sentinels:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"{self.sentinel_port_conf(port)}bind 127.0.0.1\ndir {self.root}\n"
                f"sentinel monitor {self.NAME} 127.0.0.1 {self.master} 2\n"
                f"sentinel down-after-milliseconds {self.NAME} 1000\n"
                f"sentinel failover-timeout {self.NAME} 10000\n"
            )
            self._run(port, str(conf), "--sentinel")
        deadline = time.monotonic() + 20  # the sentinels find each other and the replica (hello messages)
        while not all(
            self.cli(p, "sentinel", "sentinels", self.NAME).count("name") == 2 and "name" in self.cli(p, "sentinel", "replicas", self.NAME)
            for p in self.sentinels
        ):
            assert time.monotonic() < deadline, "the sentinels did not find each other"
            time.sleep(0.1)

    def named(self) -> int:
        """The master's port as the first sentinel names it."""
        return int(self.cli(self.sentinels[0], "sentinel", "get-master-addr-by-name", self.NAME).split()[1])

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(10)


@pytest.fixture
def sentinel(tmp_path):
    s = Setup(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.close()


async def recv(ws, timeout: float = 10) -> dict:
    with trio.fail_after(timeout):
        return json.loads(await ws.get_message())


async def nothing(ws, wait: float = 0.3) -> None:
    with trio.move_on_after(wait):
        got = await ws.get_message()
        pytest.fail(f"unexpected {got}")


async def publish(server, sub: str, event: str) -> None:
    body = json.dumps({"subscriber": sub, "event": event}).encode()
    with trio.fail_after(20):
        while (await ahttp(server.admin_address, "POST", "/v1/publish", body))[0] != 202:
            await trio.sleep(0.1)  # 503 while the bus looks for the new master


async def start(sentinel, nursery) -> Server:
    server = Server(make_config(), SentinelBus(sentinel.url, Config(bus=sentinel.url, secret="s" * 32)))
    await nursery.start(server.serve)
    return server


async def tabs_for(server, nursery, names):
    out = {}
    for name in names:
        ws = await trio_websocket.connect_websocket_url(nursery, ws_url(server, tok=token(name)))
        await ws.send_message('{"type":"subscribe"}')
        answer = await recv(ws)
        assert answer["type"] == "subscribed"
        out[name] = (ws, answer)
    return out


async def test_the_master_killed_the_replica_promoted_and_the_tabs_caught_up(sentinel, nursery):
    server = await start(sentinel, nursery)
    assert server.bus.master == ("127.0.0.1", sentinel.master)
    tabs = await tabs_for(server, nursery, ["ann", "ben"])
    for name in tabs:
        await publish(server, name, "before")
        assert (await recv(tabs[name][0]))["offset"] == 1
    assert cli(sentinel.master, "wait", "1", "5000").strip() == "1"  # the replica has it all
    sentinel.kill(sentinel.master)
    with trio.fail_after(5):
        while server.bus.up:
            await trio.sleep(0.02)
    status, _, _ = await ahttp(server.admin_address, "POST", "/v1/publish", b'{"subscriber":"ann","event":"x"}')
    assert status == 503  # no master: say so, the caller retries
    with trio.fail_after(30):
        while sentinel.named() != sentinel.replica:
            await trio.sleep(0.05)
    # A mail store publishing on the new master at once, most likely before
    # mailpush is there: recovered from the (replicated) history, no resync.
    client = coredis.Redis(port=sentinel.replica)
    async with client:
        with trio.fail_after(10):
            while True:
                try:
                    await client.fcall("mailpush_publish", [meta_key("ann"), history_key("ann")], ["ann", "during", "{}", ""])
                    break
                except coredis.exceptions.ResponseError:  # READONLY until the promotion is done
                    await trio.sleep(0.05)
    got = await recv(tabs["ann"][0], 20)
    assert (got["type"], got["event"], got["offset"]) == ("event", "during", 2), got
    await nothing(tabs["ben"][0], 0.05)
    for name in tabs:
        await publish(server, name, "after")  # through mailpush, on the new master
        got = await recv(tabs[name][0])
        assert (got["event"], got["offset"]) == ("after", 3 if name == "ann" else 2)
        await nothing(tabs[name][0], 0.1)
    assert server.bus.master == ("127.0.0.1", sentinel.replica) and server.bus.up
    for name, (ws, first) in tabs.items():  # the epochs survived (the history was replicated)
        assert first["epoch"] == (await server.bus.read([(name, None, None)]))[0].position.epoch
        await ws.aclose()


async def test_a_manual_failover_is_followed_without_a_loss(sentinel, nursery):
    server = await start(sentinel, nursery)
    tabs = await tabs_for(server, nursery, ["cy"])
    ws, _ = tabs["cy"]
    await publish(server, "cy", "one")
    assert (await recv(ws))["offset"] == 1
    assert cli(sentinel.sentinels[1], "sentinel", "failover", sentinel.NAME).strip() == "OK"
    with trio.fail_after(30):
        while server.bus.master != ("127.0.0.1", sentinel.replica) or not server.bus.up:
            await trio.sleep(0.05)
    await publish(server, "cy", "two")
    got = await recv(ws)
    assert (got["type"], got["event"], got["offset"]) == ("event", "two", 2)
    await nothing(ws)
    await ws.aclose()
