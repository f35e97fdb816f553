"""The embedded bus across workers (src/mailpush/bus/relay.py), in one
process: the supervisor's Relay and two workers' RelayBus on socketpairs."""

from __future__ import annotations

import json
import socket

import msgspec
import trio

from mailpush.bus.relay import Relay, RelayBus
from mailpush.history import History


async def test_each_worker_gets_only_the_events_of_the_subscribers_it_holds():
    relay = Relay(History(100, 600, 10_000))
    got: list[list] = [[], []]
    frames: list[bytes] = []
    buses = []
    async with trio.open_nursery() as nursery:
        for slot in (0, 1):
            parent, child = socket.socketpair()
            nursery.start_soon(relay.serve, slot, trio.SocketStream(trio.socket.from_stdlib_socket(parent)))
            bus = RelayBus(child)

            async def sink(batch, into=got[slot]) -> None:
                into.extend((sub, event) for sub, event, *_ in batch)
                frames.extend(item[5] for item in batch)

            await nursery.start(bus.run, sink)
            buses.append(bus)
        a, b = buses
        await a.subscribe(["alice", "carol"])
        await b.subscribe(["bob", "carol"])
        data = msgspec.Raw(b"{}")
        relay.publish([("alice", "1", data, None), ("bob", "2", data, None), ("carol", "3", data, None), ("dave", "4", data, None)])
        # A worker's publish goes the same way, and a read answer comes
        # behind every event sent to that worker before it (the barrier).
        await b.publish([("alice", "5", data, None), ("bob", "6", data, None)])
        for bus in (a, b):
            await bus.read([("alice", None, None)])
        assert got[0] == [("alice", "1"), ("carol", "3"), ("alice", "5")]
        assert got[1] == [("bob", "2"), ("carol", "3"), ("bob", "6")]
        # Unsubscribed: no more of carol's for a.
        await a.unsubscribe(["carol"])
        await a.read([("carol", None, None)])  # behind the unsubscribe on a's stream
        relay.publish([("carol", "7", data, None)])
        await a.read([("carol", None, None)])
        await b.read([("carol", None, None)])
        assert got[0][-1] == ("alice", "5") and got[1][-1] == ("carol", "7")
        # States and the history pass through: a tab resuming on a worker
        # gets the frames the supervisor built, and the latest state.
        await b.publish([("bob", "8", msgspec.Raw(b'{"id":1}'), msgspec.Raw(b'{"unread":3}'))])
        replay = (await b.read([("bob", None, None)]))[0]
        assert replay.position.state == msgspec.Raw(b'{"unread":3}')
        epoch = replay.position.epoch
        replay = (await a.read([("bob", epoch, replay.position.offset - 1)]))[0]
        assert [(event, frame) for _, event, frame, _ in replay.events] == [("8", frames[-1])]
        assert json.loads(frames[-1][2:]) == {"type": "event", "subscriber": "bob", "event": "8", "data": {"id": 1}, "offset": replay.position.offset}
        nursery.cancel_scope.cancel()
