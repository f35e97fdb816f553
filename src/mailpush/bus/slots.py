"""Redis Cluster's key space, as plain data: the slot of a key or channel
(CRC16/XMODEM of its hash tag, modulo 16384) and the map of which master
serves which slots (no I/O).

A subscriber's keys and its cluster channel carry the subscriber id as
their hash tag (``mailpush:meta:{alice}``, ``mailpush:hist:{alice}``,
``mailpush:{alice}``), so the three live in one slot, on one master: the
function that publishes touches only local keys and its SPUBLISH reaches
the node the subscriber's channel is subscribed on.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SLOTS", "crc16", "keyslot", "SlotMap", "Node"]

SLOTS = 16384

# A master: (host, port).
Node = tuple[str, int]


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _table()


def crc16(data: bytes) -> int:
    """CRC16/XMODEM (polynomial 0x1021, initial 0), Redis Cluster's."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def keyslot(key: str | bytes) -> int:
    """The slot of a key or shard channel: only the part between the first
    ``{`` and the next ``}`` is hashed when that part is not empty."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return crc16(data) % SLOTS


class SlotMap:
    """Which master serves each slot (a slot nobody serves maps to None).

    Built from ``CLUSTER SHARDS`` as coredis returns it: a list of shards,
    each ``{b"slots": [start, end, …], b"nodes": [{b"role", b"ip",
    b"endpoint", b"port", …}, …]}``.
    """

    __slots__ = ("_owner", "masters")

    def __init__(self, ranges: Iterable[tuple[int, int, Node]]) -> None:
        owner: list[Node | None] = [None] * SLOTS
        masters: dict[Node, list[tuple[int, int]]] = {}
        for start, end, node in ranges:
            if not 0 <= start <= end < SLOTS:
                raise ValueError(f"bad slot range {start}-{end}")
            owner[start : end + 1] = [node] * (end + 1 - start)
            masters.setdefault(node, []).append((start, end))
        self._owner = owner
        self.masters = masters  # each master and its slot ranges

    @classmethod
    def from_shards(cls, shards: list, *, tls: bool = False) -> SlotMap:
        """The map of a ``CLUSTER SHARDS`` answer; with ``tls``, the nodes'
        TLS ports (a node serving TLS only has no plain ``port``).

        Raises:
          ValueError: an answer of another shape.
        """
        ranges: list[tuple[int, int, Node]] = []
        for shard in shards:
            slots, nodes = _get(shard, "slots"), _get(shard, "nodes")
            master = next((n for n in nodes if _text(_get(n, "role")) == "master"), None)
            if master is None or not slots:
                continue  # a shard without a master or without slots serves nothing
            host = _text(_get(master, "endpoint", None) or b"?")
            if host in ("?", ""):
                host = _text(_get(master, "ip"))
            node = (host, int(_get(master, "tls-port") if tls else _get(master, "port")))
            for i in range(0, len(slots), 2):
                ranges.append((int(slots[i]), int(slots[i + 1]), node))
        if not ranges:
            raise ValueError("the cluster serves no slot")
        return cls(ranges)

    def node_of(self, slot: int) -> Node | None:
        return self._owner[slot]

    def owns(self, node: Node, slot: int) -> bool:
        return self._owner[slot] == node

    def tag_for(self, node: Node, prefix: str) -> str:
        """The first channel ``prefix{N}`` (N = 0, 1, …) whose slot ``node``
        serves: the node's own control channel."""
        owner = self._owner
        for n in range(SLOTS * 64):
            channel = f"{prefix}{{{n}}}"
            if owner[keyslot(channel)] == node:
                return channel
        raise ValueError(f"no channel found for {node}")  # a node with no slot: not in masters


def _get(mapping, name: str, *default):
    """``mapping[name]`` with bytes or str keys (coredis decodes or not)."""
    if name in mapping:
        return mapping[name]
    key = name.encode()
    if key in mapping or not default:
        return mapping[key]
    return default[0]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
