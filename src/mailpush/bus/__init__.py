"""The message bus between the mail store and mailpush.

``Bus`` is the interface; ``embedded`` is the in-process default (``make
run`` needs nothing else), ``redis`` the real one between processes and
machines (channel ``mailpush:SUBSCRIBER``; ``pip install 'mailpush[redis]'``),
``relay`` the embedded bus across ``--workers``; the recording stand-in of
integration tests is :class:`mailpush.testing.FakeBus`. A bus delivers
batches of publish items ``(subscriber, event, data)`` to one sink: the
bus-client task of :mod:`mailpush.dispatch`.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Bus, Item, Sink
from .embedded import EmbeddedBus

__all__ = ["Bus", "Item", "Sink", "EmbeddedBus", "make_bus"]


def make_bus(url: str) -> Bus:
    """The bus named by ``--bus``."""
    if url == "embedded":
        return EmbeddedBus()
    if url.startswith(("redis://", "rediss://", "unix://")):
        try:
            from .redis import RedisBus
        except ImportError as e:
            raise ConfigError(
                f"--bus {url.partition('://')[0]}://… needs the Redis extra ({e.name} is missing):"
                " pip install 'mailpush[redis]'"
            ) from None
        return RedisBus(url)
    raise ConfigError(f"unknown --bus {url!r}: use 'embedded' or a Redis URL such as redis://127.0.0.1:6379/0")
