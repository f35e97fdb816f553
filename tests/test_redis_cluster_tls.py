"""The Redis Cluster bus over TLS (``rediss+cluster://``): three masters on
loopback speaking only TLS (clients and the cluster bus), a self-signed
certificate for 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket
from conftest import make_config, token, ws_url
from test_admin import ahttp
from test_redis import free_port, self_signed_cert, startup_error
from test_redis_cluster import Cluster

from mailpush import Config, Server
from mailpush.bus import make_bus
from mailpush.bus.redis_cluster import ClusterBus
from mailpush.bus.slots import keyslot
from mailpush.errors import ConfigError


class TlsCluster(Cluster):
    """Cluster's three masters, TLS only (clients and the cluster bus)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.cert, self.key = self_signed_cert(root)
        seeds = ",".join(f"127.0.0.1:{p}" for p, _ in self.nodes[:2])
        self.url = f"rediss+cluster://{seeds}/?ssl_ca_certs={self.cert}"

    def port_args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.cert),
                "--tls-auth-clients", "no"]  # fmt: skip

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.cert)]


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    c = TlsCluster(tmp_path_factory.mktemp("tls_cluster"))
    try:
        c.create()
        yield c
    finally:
        c.close()


def one_per_shard() -> list[str]:
    out: list[str | None] = [None, None, None]
    n = 0
    while None in out:
        name = f"tls{n}@example.com"
        node = 0 if keyslot(name) <= 5460 else 1 if keyslot(name) <= 10922 else 2
        out[node] = out[node] or name
        n += 1
    return [name for name in out if name is not None]


async def test_every_shard_over_tls(tls_cluster, nursery):
    server = Server(make_config(), make_bus(Config(bus=tls_cluster.url, secret="s" * 32)))
    assert isinstance(server.bus, ClusterBus) and server.bus.tls is not None
    await nursery.start(server.serve)
    names = one_per_shard()
    tabs = []
    for name in names:
        ws = await trio_websocket.connect_websocket_url(nursery, ws_url(server, tok=token(name)))
        await ws.send_message('{"type":"subscribe"}')
        with trio.fail_after(10):
            assert json.loads(await ws.get_message())["type"] == "subscribed"
        tabs.append(ws)
    # Each subscriber's channel is on its own master, subscribed over TLS.
    for i, name in enumerate(names):
        assert f"mailpush:{{{name}}}" in tls_cluster.shard_channels(i)
    body = json.dumps([{"subscriber": n, "event": "over_tls"} for n in names]).encode()
    assert (await ahttp(server.admin_address, "POST", "/v1/publish", body))[0] == 202
    for ws, name in zip(tabs, names, strict=True):
        with trio.fail_after(10):
            got = json.loads(await ws.get_message())
        assert (got["event"], got["subscriber"]) == ("over_tls", name)
        await ws.aclose()
    assert (await ahttp(server.admin_address, "GET", "/healthz"))[0] == 200


def test_a_certificate_not_trusted_is_a_clear_startup_error(tls_cluster):
    url = tls_cluster.url.split("?")[0]  # the system's CAs: the self-signed certificate is not among them
    err = startup_error(url)
    assert "cannot reach the Redis bus at rediss+cluster://" in err and "certificate" in err.lower(), err


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("?ssl_ca_certs=/nonexistent.pem", "cannot read ssl_ca_certs"),
        ("?ssl_cert_reqs=maybe", "ssl_cert_reqs must be required or none"),
        ("?ssl_check_hostname=perhaps", "ssl_check_hostname must be true or false"),
        ("?tls=1", "unknown option 'tls'"),
    ],
)
def test_bad_tls_options_are_clear_errors(query, needle):
    with pytest.raises(ConfigError, match=needle):
        ClusterBus(f"rediss+cluster://127.0.0.1:{free_port()}/{query}")


def test_tls_options_need_rediss():
    with pytest.raises(ConfigError, match="TLS options need rediss"):
        ClusterBus(f"redis+cluster://127.0.0.1:{free_port()}/?ssl_ca_certs=/x.pem")
