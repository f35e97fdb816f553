"""The JSON envelope protocol spoken over the WebSocket.

Plain bytes in, plain bytes out; no I/O. Client packets::

    {"type": "subscribe", "events": ["new_letter", ...],   # no events or ["*"]: all
     "since": {"epoch": E, "offset": N}}                   # optional: resume after N
    {"type": "unsubscribe"}
    {"type": "ping"}                                       # browsers cannot send WS pings
    {"type": "refresh", "token": JWT}                      # a new token for the same subscriber

Server packets::

    {"type": "subscribed", "subscriber": SUB, "events": [...],
     "epoch": E, "offset": TOP, "recovered": true|false,   # recovered: with since only
     "expires_at": EXP}                                    # the token's exp (seconds since 1970)
    {"type": "event", "subscriber": SUB, "event": NAME, "data": {...}, "offset": N}
    {"type": "resync", "subscriber": SUB, "reason": WHY, "epoch": E, "offset": TOP,
     "state": LATEST_OR_NULL}                              # history cannot fill the gap
    {"type": "unsubscribed", "subscriber": SUB}
    {"type": "pong"}
    {"type": "refreshed", "expires_at": EXP}
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
from .speedups import C

__all__ = [
    "MAX_SUBSCRIBER_LEN",
    "MAX_EVENT_LEN",
    "MAX_FILTER_EVENTS",
    "ALL_EVENTS",
    "Subscribe",
    "Unsubscribe",
    "Ping",
    "Refresh",
    "Since",
    "parse_client_packet",
    "subscribed_frame",
    "resync_frame",
    "unsubscribed_frame",
    "error_frame",
    "refreshed_frame",
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
# Epochs are short random strings (ours: 16 hex digits; Redis's: a time).
MAX_EPOCH_LEN = 64
# A token in a refresh packet (auth.MAX_TOKEN_BYTES checks it again).
MAX_TOKEN_LEN = 4096

# The wildcard filter: every event.
ALL_EVENTS = "*"

_EventName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_LEN)]


class Since(msgspec.Struct, frozen=True):
    """Where a resuming tab stands: the last offset it processed, in the
    epoch it had it from."""

    epoch: Annotated[str, msgspec.Meta(max_length=MAX_EPOCH_LEN)]
    offset: Annotated[int, msgspec.Meta(ge=0)]


class _Subscribe(msgspec.Struct, tag="subscribe", tag_field="type"):
    """``{"type":"subscribe","events":[…],"since":{…}}`` as it is decoded."""

    events: Annotated[list[_EventName], msgspec.Meta(max_length=MAX_FILTER_EVENTS)] | None = None
    since: Since | None = None


class Subscribe:
    """A subscribe packet: ``events`` a shared frozenset, or None for all;
    ``since`` where a resuming tab stands, or None."""

    __slots__ = ("events", "since")

    def __init__(self, events: frozenset[str] | None, since: Since | None = None) -> None:
        self.events = events
        self.since = since


class Unsubscribe(msgspec.Struct, tag="unsubscribe", tag_field="type", frozen=True):
    """``{"type":"unsubscribe"}``: stop delivery to this tab."""


class Ping(msgspec.Struct, tag="ping", tag_field="type", frozen=True):
    """``{"type":"ping"}``: answered with ``{"type":"pong"}``."""


class Refresh(msgspec.Struct, tag="refresh", tag_field="type", frozen=True):
    """``{"type":"refresh","token":JWT}``: a new token for the connection's
    subscriber, answered ``{"type":"refreshed","expires_at":EXP}``."""

    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_LEN)]


_decode_packet = msgspec.json.Decoder(_Subscribe | Unsubscribe | Ping | Refresh).decode
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


def parse_client_packet(text: bytes) -> Subscribe | Unsubscribe | Ping | Refresh:
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
        since = packet.since
        if not events or ALL_EVENTS in events:
            return _SUBSCRIBE_ALL if since is None else Subscribe(None, since)
        return Subscribe(_intern_filter(frozenset(events)), since)
    if type(packet) is Refresh:
        return packet
    return _UNSUBSCRIBE if type(packet) is Unsubscribe else _PING


def _explain(text: bytes) -> PacketError:
    """What is wrong with a packet the typed decoder refused: it stops at
    the first field of the wrong type, before it has read the rest, so the
    text may not be JSON at all (or too deep, or a number out of range)."""
    try:
        obj = msgspec.json.decode(text)
    except RecursionError:
        return PacketError("bad_json", "packet nested too deeply")
    except msgspec.MsgspecError as e:
        return PacketError("bad_json", f"packet is not valid JSON: {e}")
    if type(obj) is not dict:
        return PacketError("bad_packet", "packet must be a JSON object with a 'type' field")
    kind = obj.get("type")
    if kind is None:
        return PacketError("bad_packet", "packet has no 'type' field")
    if type(kind) is not str:
        return PacketError("bad_field", "'type' must be a string")
    if kind not in ("subscribe", "unsubscribe", "ping", "refresh"):
        return PacketError(
            "unknown_type",
            f"unknown packet type {kind[:MAX_EVENT_LEN]!r}, expected subscribe, unsubscribe, ping or refresh",
        )
    if kind == "refresh":
        return PacketError("bad_field", f"'token' must be a string of at most {MAX_TOKEN_LEN} characters")
    since = obj.get("since")
    if since is not None and (
        type(since) is not dict
        or type(since.get("epoch")) is not str
        or type(since.get("offset")) is not int
        or since["offset"] < 0
        or len(since["epoch"]) > MAX_EPOCH_LEN
    ):
        return PacketError(
            "bad_field", '\'since\' must be {"epoch": the epoch string, "offset": a non-negative integer}'
        )
    events = obj.get("events")
    if events is None:
        return PacketError("bad_field", "bad subscribe packet")
    if type(events) is not list:
        return PacketError("bad_field", "'events' must be a list of event names")
    if len(events) > MAX_FILTER_EVENTS:
        return PacketError("bad_field", f"'events' lists more than {MAX_FILTER_EVENTS} names")
    return PacketError("bad_field", f"each event name must be a string of 1 to {MAX_EVENT_LEN} characters")


_encode = msgspec.json.Encoder().encode


def subscribed_frame(
    subscriber: str,
    events: frozenset[str] | None,
    epoch: str | None = None,
    offset: int | None = None,
    recovered: bool | None = None,
    expires_at: int = 0,
) -> bytes:
    """The answer to a subscribe: the subscriber and its filter, where its
    stream stands (with history), whether a resume recovered, and when the
    connection's token expires (0: never, e.g. the echo endpoint)."""
    names = [ALL_EVENTS] if events is None else sorted(events)
    packet: dict[str, Any] = {"type": "subscribed", "subscriber": subscriber, "events": names}
    if epoch is not None:
        packet["epoch"] = epoch
        packet["offset"] = offset
    if recovered is not None:
        packet["recovered"] = recovered
    if expires_at:
        packet["expires_at"] = expires_at
    return encode_text(_encode(packet))


def refreshed_frame(expires_at: int) -> bytes:
    """The answer to a refresh: when the new token expires."""
    return encode_text(_encode({"type": "refreshed", "expires_at": expires_at}))


def resync_frame(subscriber: str, reason: str, epoch: str, offset: int, state: Any) -> bytes:
    """History cannot fill the tab's gap: it should refetch its state (the
    latest one is ``state``, raw JSON or None) and go on from ``offset``."""
    packet = {
        "type": "resync",
        "subscriber": subscriber,
        "reason": reason,
        "epoch": epoch,
        "offset": offset,
        "state": state,
    }
    return encode_text(_encode(packet))


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


class _OffsetEvent(msgspec.Struct, tag_field="type", tag="event"):
    subscriber: str
    event: str
    data: Any
    offset: int


def event_frame(subscriber: str, event: str, data: Any, offset: int | None = None) -> bytes:
    """The complete text frame of one event, built once for all recipients.

    ``data`` is a dict or a :class:`msgspec.Raw` (the JSON the publisher
    sent, passed through without being decoded and encoded again);
    ``offset`` its place in the subscriber's stream (None: a publisher that
    bypassed the history, e.g. a plain Redis PUBLISH).
    """
    if offset is None:
        return encode_text(_encode(_Event(subscriber, event, data)))
    if _c_event_frame is not None and (frame := _c_event_frame(subscriber, event, data, offset)) is not None:
        return frame  # the common case, in C: data raw, strings needing no escape
    return encode_text(_encode(_OffsetEvent(subscriber, event, data, offset)))


_c_event_frame = C.event_frame if C is not None else None


PONG_FRAME = encode_text(b'{"type":"pong"}')
