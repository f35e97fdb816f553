"""Fuzz target ``packets``: client packets (mailpush.packets).

Input: the payload of one text message from a browser tab, as
``parse_client_packet`` gets it from the frame decoder.

Checks:

- only :class:`PacketError` is raised, with one of the documented codes
  (``bad_json``, ``bad_packet``, ``bad_field``, ``unknown_type``) and a
  message;
- what is accepted obeys the packet rules: a ``Subscribe`` whose filter is
  None (all events) or 1 to MAX_FILTER_EVENTS names of 1 to MAX_EVENT_LEN
  characters other than ``*``, and whose ``since`` is None or an epoch of at
  most MAX_EPOCH_LEN characters with a non-negative offset; the
  ``Unsubscribe``/``Ping`` singletons; or (where this version has it) a
  ``Refresh`` whose token is a string of at most MAX_TOKEN_LEN characters;
- differential: the same text parses to the same packet when parsed again
  (the filter interning must not change what a filter means).
"""

from __future__ import annotations

import json
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own

with atheris.instrument_imports(include=["mailpush.packets"]):
    from mailpush import packets
    from mailpush.errors import PacketError
    from mailpush.packets import (
        ALL_EVENTS,
        MAX_EPOCH_LEN,
        MAX_EVENT_LEN,
        MAX_FILTER_EVENTS,
        Ping,
        Since,
        Subscribe,
        Unsubscribe,
        parse_client_packet,
    )

# The refresh packet (a new token for the connection), where this version has it.
Refresh = getattr(packets, "Refresh", None)
MAX_TOKEN_LEN = getattr(packets, "MAX_TOKEN_LEN", 4096)
PACKET_TYPES = tuple(t for t in (Subscribe, Unsubscribe, Ping, Refresh) if t is not None)

NAME = "packets"
MAX_LEN = 2048
CODES = {"bad_json", "bad_packet", "bad_field", "unknown_type"}


def summary(packet) -> tuple:
    if type(packet) is Subscribe:
        since = None if packet.since is None else (packet.since.epoch, packet.since.offset)
        return ("subscribe", packet.events, since)
    if Refresh is not None and type(packet) is Refresh:
        return ("refresh", packet.token)
    return (type(packet).__name__,)


def check(data: bytes) -> None:
    packet, err = own(PacketError, parse_client_packet, data)
    if err is not None:
        expect(err.code in CODES, f"error code {err.code!r}")
        expect(isinstance(err.message, str) and err.message, "an error without a message")
        return
    expect(type(packet) in PACKET_TYPES, f"returned a {type(packet).__name__}")
    if Refresh is not None and type(packet) is Refresh:
        expect(type(packet.token) is str and len(packet.token) <= MAX_TOKEN_LEN, "a refresh with a bad token")
    if type(packet) is Subscribe:
        events = packet.events
        if events is not None:
            expect(type(events) is frozenset and 1 <= len(events) <= MAX_FILTER_EVENTS, f"filter {events!r}")
            for e in events:
                expect(type(e) is str and 1 <= len(e) <= MAX_EVENT_LEN and e != ALL_EVENTS, f"event name {e!r}")
        since = packet.since
        if since is not None:
            expect(type(since) is Since, f"since of type {type(since).__name__}")
            expect(type(since.epoch) is str and len(since.epoch) <= MAX_EPOCH_LEN, f"epoch {since.epoch!r}")
            expect(type(since.offset) is int and since.offset >= 0, f"offset {since.offset!r}")
    again = parse_client_packet(data)
    expect(summary(again) == summary(packet), "the same text parsed to another packet")


def _subscribe(events=None, since=None) -> bytes:
    p: dict = {"type": "subscribe"}
    if events is not None:
        p["events"] = events
    if since is not None:
        p["since"] = since
    return json.dumps(p).encode()


# Seeds: packets from tests/test_properties.py and the README.
SEEDS = {
    "subscribe": b'{"type":"subscribe"}',
    "subscribe-events": _subscribe(["new_letter", "flags"]),
    "subscribe-all": _subscribe(["*"]),
    "subscribe-since": _subscribe(["new_letter"], {"epoch": "e1", "offset": 42}),
    "unsubscribe": b'{"type":"unsubscribe"}',
    "ping": b'{"type":"ping","extra":[1,{"a":null}]}',
    "not-json": b"not json",
    "array": b"[]",
    "no-type": b'{"events":[]}',
    "type-int": b'{"type":5}',
    "unknown": b'{"type":"nope"}',
    "events-str": b'{"type":"subscribe","events":"x"}',
    "empty-event": b'{"type":"subscribe","events":[""]}',
    "long-event": _subscribe(["e" * (MAX_EVENT_LEN + 1)]),
    "many-events": _subscribe(["e"] * (MAX_FILTER_EVENTS + 1)),
    "bad-since": _subscribe(None, {"epoch": 1, "offset": -1}),
    "refresh": b'{"type":"refresh","token":"eyJhbGciOiJIUzI1NiJ9.e30.c2ln"}',
    "refresh-no-token": b'{"type":"refresh"}',
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
