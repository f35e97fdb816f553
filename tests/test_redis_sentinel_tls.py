"""The Redis bus behind Redis Sentinel over TLS (``rediss+sentinel://``):
a master, its replica and three sentinels on loopback speaking only TLS
(clients, replication, the sentinels), a self-signed certificate for
127.0.0.1. The master SIGKILLed: mailpush follows the promoted replica."""

from __future__ import annotations

import subprocess

import pytest
import trio
from test_redis import free_port, self_signed_cert
from test_redis_cluster import REDIS_CLI
from test_redis_sentinel import Setup, nothing, publish, recv, start, tabs_for

from mailpush.bus.sentinel import SentinelBus
from mailpush.errors import ConfigError


class TlsSetup(Setup):
    """Setup's servers and sentinels, TLS only (replication too)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.cert, self.key = self_signed_cert(root)
        self.url = (
            "rediss+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinels) + f"/{self.NAME}"
            f"?ssl_ca_certs={self.cert}"
        )

    def port_args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert), "--tls-key-file",
                str(self.key), "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
                "--tls-replication", "yes"]  # fmt: skip

    def sentinel_port_conf(self, port: int) -> str:
        return (
            f"port 0\ntls-port {port}\ntls-cert-file {self.cert}\ntls-key-file {self.key}\n"
            f"tls-ca-cert-file {self.cert}\ntls-auth-clients no\ntls-replication yes\n"
        )

    def cli(self, port: int, *args: str) -> str:
        return subprocess.run([REDIS_CLI, "--tls", "--cacert", str(self.cert), "-p", str(port), *args],
                              capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip


@pytest.fixture
def tls_sentinel(tmp_path):
    s = TlsSetup(tmp_path)
    try:
        s.start()
        yield s
    finally:
        s.close()


async def test_a_failover_is_followed_over_tls(tls_sentinel, nursery):
    server = await start(tls_sentinel, nursery)
    assert server.bus.tls is not None and server.bus.master == ("127.0.0.1", tls_sentinel.master)
    tabs = await tabs_for(server, nursery, ["ann"])
    await publish(server, "ann", "before")
    assert (await recv(tabs["ann"][0]))["event"] == "before"
    assert tls_sentinel.cli(tls_sentinel.master, "wait", "1", "5000").strip() == "1"
    tls_sentinel.kill(tls_sentinel.master)
    with trio.fail_after(30):
        while tls_sentinel.named() != tls_sentinel.replica:
            await trio.sleep(0.05)
    await publish(server, "ann", "after")  # 503 until mailpush is on the new master, over TLS
    got = await recv(tabs["ann"][0], 20)
    assert (got["event"], got["offset"]) == ("after", 2), got
    await nothing(tabs["ann"][0], 0.1)
    assert server.bus.master == ("127.0.0.1", tls_sentinel.replica)
    await tabs["ann"][0].aclose()


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis+sentinel://127.0.0.1:{port}/m?ssl_ca_certs=/x.pem", "TLS options need rediss"),
        ("rediss+sentinel://127.0.0.1:{port}/m?ssl_cert_reqs=maybe", "ssl_cert_reqs must be required or none"),
        ("rediss+sentinel://127.0.0.1:{port}/m?ssl_ca_certs=/nonexistent.pem", "cannot read ssl_ca_certs"),
    ],
)
def test_bad_tls_options_are_clear_errors(url, needle):
    with pytest.raises(ConfigError, match=needle):
        SentinelBus(url.format(port=free_port()))
