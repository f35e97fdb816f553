"""The message bus between the mail store and mailpush.

``Bus`` is the interface; ``embedded`` is the in-process default (``make
run`` needs nothing else), ``redis`` the real one between processes and
machines (channel ``mailpush:SUBSCRIBER``; ``pip install 'mailpush[redis]'``;
``redis_cluster`` on a Redis Cluster with sharded pub/sub, channel
``mailpush:{SUBSCRIBER}``; ``sentinel`` following the master that Redis
Sentinel names),
``relay`` the embedded bus across ``--workers``; the recording stand-in of
integration tests is :class:`mailpush.testing.FakeBus`. A bus delivers
batches of publish items ``(subscriber, event, data)`` to one sink: the
bus-client task of :mod:`mailpush.dispatch`.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from ..history import History
from .base import Bus, Event, Item, Sink
from .embedded import EmbeddedBus

__all__ = ["Bus", "Event", "Item", "Sink", "EmbeddedBus", "make_bus", "history_of"]


def make_bus(config: Config) -> Bus:
    """The bus ``config.bus`` names, with the history the config asks for."""
    url = config.bus
    if url == "embedded":
        return EmbeddedBus(history_of(config))
    if url.startswith(
        (
            "redis://",
            "rediss://",
            "unix://",
            "redis+cluster://",
            "rediss+cluster://",
            "redis+sentinel://",
            "rediss+sentinel://",
        )
    ):
        try:
            from .redis import RedisBus
            from .redis_cluster import ClusterBus
            from .sentinel import SentinelBus
        except ImportError as e:
            raise ConfigError(
                f"--bus {url.partition('://')[0]}://… needs the Redis extra ({e.name} is missing):"
                " pip install 'mailpush[redis]'"
            ) from None
        if url.startswith(("redis+cluster://", "rediss+cluster://")):
            return ClusterBus(url, config)
        if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
            return SentinelBus(url, config)
        return RedisBus(url, config)
    raise ConfigError(
        f"unknown --bus {url!r}: use 'embedded' or a Redis URL such as redis://127.0.0.1:6379/0,"
        " redis+cluster://HOST:PORT,HOST:PORT/ or redis+sentinel://HOST:PORT,HOST:PORT/MASTER"
    )


def history_of(config: Config) -> History:
    """An in-memory history sized by the config (0 size or TTL: none kept)."""
    size = config.history_size if config.history_ttl else 0
    return History(size, config.history_ttl, config.history_max_events)
