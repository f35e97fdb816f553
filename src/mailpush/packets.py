"""The JSON envelope protocol spoken over the WebSocket.

Plain bytes in, plain bytes out; no I/O. Client packets::

    {"type": "subscribe", "events": ["new_letter", ...]}   # no events or ["*"]: all
    {"type": "unsubscribe"}
    {"type": "ping"}                                       # browsers cannot send WS pings

Server packets::

    {"type": "subscribed", "subscriber": SUB, "events": [...]}
    {"type": "unsubscribed", "subscriber": SUB}
    {"type": "event", "subscriber": SUB, "event": NAME, "data": {...}}
    {"type": "pong"}
    {"type": "error", "code": CODE, "message": TEXT}

Client packets are msgspec tagged Structs (the ``type`` field is the tag),
decoded and validated in one C call; a packet that fails is looked at again
only to say what is wrong (:class:`~mailpush.errors.PacketError`, whose
``code`` names the rule). An event is encoded once into its final frame
(:func:`event_frame`) and the same bytes go to every recipient.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .errors import PacketError
from .frames import encode_text

__all__ = [
    "MAX_SUBSCRIBER_LEN",
    "MAX_EVENT_LEN",
    "MAX_FILTER_EVENTS",
    "ALL_EVENTS",
    "Subscribe",
    "Unsubscribe",
    "Ping",
    "parse_client_packet",
    "subscribed_frame",
    "unsubscribed_frame",
    "error_frame",
    "event_frame",
    "PONG_FRAME",
]

# Subscriber ids are mailbox owners (an address or an account id); 256
# characters holds any e-mail address (RFC 5321 caps a path at 256).
MAX_SUBSCRIBER_LEN = 256
# Event names are short identifiers such as "new_letter".
MAX_EVENT_LEN = 64
# A tab filters on a handful of event kinds; more is a client bug.
MAX_FILTER_EVENTS = 32

# The wildcard filter: every event.
ALL_EVENTS = "*"

_EventName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_LEN)]


class _Subscribe(msgspec.Struct, tag="subscribe", tag_field="type"):
    """``{"type":"subscribe","events":[…]}`` as it is decoded."""

    events: Annotated[list[_EventName], msgspec.Meta(max_length=MAX_FILTER_EVENTS)] | None = None


class Subscribe:
    """A subscribe packet: ``events`` a shared frozenset, or None for all."""

    __slots__ = ("events",)

    def __init__(self, events: frozenset[str] | None) -> None:
        self.events = events


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="type", frozen=True):
    """``{"type":"unsubscribe"}``: stop delivery to this tab."""


class Ping(msgspec.Struct, tag="ping", tag_field="type", frozen=True):
    """``{"type":"ping"}``: answered with ``{"type":"pong"}``."""


_decode_packet = msgspec.json.Decoder(_Subscribe | Unsubscribe | Ping).decode
_UNSUBSCRIBE = Unsubscribe()
_PING = Ping()
_SUBSCRIBE_ALL = Subscribe(None)
# Identical filters share one frozenset, so 10,000 tabs filtering on
# "new_letter" hold one set, not 10,000.
_filters: dict[frozenset[str], frozenset[str]] = {}
_MAX_INTERNED_FILTERS = 4096


def _intern_filter(events: frozenset[str]) -> frozenset[str]:
    found = _filters.get(events)
    if found is not None:
        return found
    if len(_filters) < _MAX_INTERNED_FILTERS:
        _filters[events] = events
    return events


def parse_client_packet(text: bytes) -> Subscribe | Unsubscribe | Ping:
    """Parse one text message from a client.

    Raises:
      PacketError: not JSON (``bad_json``), not an object with a ``type``
        (``bad_packet``), an unknown type (``unknown_type``) or a bad field
        (``bad_field``).
    """
    try:
        packet = _decode_packet(text)
    except RecursionError:
        raise PacketError("bad_json", "packet nested too deeply") from None
    except msgspec.ValidationError:
        raise _explain(text) from None
    except msgspec.DecodeError as e:
        raise PacketError("bad_json", f"packet is not valid JSON: {e}") from None
    if type(packet) is _Subscribe:
        events = packet.events
        if not events or ALL_EVENTS in events:
            return _SUBSCRIBE_ALL
        return Subscribe(_intern_filter(frozenset(events)))
    return _UNSUBSCRIBE if type(packet) is Unsubscribe else _PING


def _explain(text: bytes) -> PacketError:
    """What is wrong with a packet that is JSON but not a valid packet."""
    obj = msgspec.json.decode(text)  # valid JSON: it passed the decoder's syntax checks
    if type(obj) is not dict:
        return PacketError("bad_packet", "packet must be a JSON object with a 'type' field")
    kind = obj.get("type")
    if kind is None:
        return PacketError("bad_packet", "packet has no 'type' field")
    if type(kind) is not str:
        return PacketError("bad_field", "'type' must be a string")
    if kind not in ("subscribe", "unsubscribe", "ping"):
        return PacketError(
            "unknown_type", f"unknown packet type {kind[:MAX_EVENT_LEN]!r}, expected subscribe, unsubscribe or ping"
        )
    events = obj.get("events")
    if type(events) is not list:
        return PacketError("bad_field", "'events' must be a list of event names")
    if len(events) > MAX_FILTER_EVENTS:
        return PacketError("bad_field", f"'events' lists more than {MAX_FILTER_EVENTS} names")
    return PacketError("bad_field", f"each event name must be a string of 1 to {MAX_EVENT_LEN} characters")


_encode = msgspec.json.Encoder().encode


def subscribed_frame(subscriber: str, events: frozenset[str] | None) -> bytes:
    """The answer to a subscribe: the subscriber and its filter."""
    names = [ALL_EVENTS] if events is None else sorted(events)
    return encode_text(_encode({"type": "subscribed", "subscriber": subscriber, "events": names}))


def unsubscribed_frame(subscriber: str) -> bytes:
    """The answer to an unsubscribe."""
    return encode_text(_encode({"type": "unsubscribed", "subscriber": subscriber}))


def error_frame(code: str, message: str) -> bytes:
    """An error packet: ``code`` names the rule broken, ``message`` says how."""
    return encode_text(_encode({"type": "error", "code": code, "message": message}))


class _Event(msgspec.Struct, tag_field="type", tag="event"):
    subscriber: str
    event: str
    data: Any  # a dict, or the publisher's own JSON bytes as msgspec.Raw


def event_frame(subscriber: str, event: str, data: Any) -> bytes:
    """The complete text frame of one event, built once for all recipients.

    ``data`` is a dict or a :class:`msgspec.Raw` (the JSON the publisher
    sent, passed through without being decoded and encoded again).
    """
    return encode_text(_encode(_Event(subscriber, event, data)))


PONG_FRAME = encode_text(b'{"type":"pong"}')
