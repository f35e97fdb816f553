"""The JSON envelope protocol spoken over the WebSocket, and publish items.

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

Publish items (admin API and every bus)::

    {"subscriber": SUB, "event": NAME, "data": {...}}

An event is encoded once into its final frame (:func:`event_frame`) and the
same bytes go to every recipient.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import orjson

from .errors import PacketError, PublishError
from .frames import encode_text

__all__ = [
    "MAX_SUBSCRIBER_LEN",
    "MAX_EVENT_LEN",
    "MAX_FILTER_EVENTS",
    "MAX_PUBLISH_BYTES",
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
    "parse_item",
    "parse_items",
    "parse_item_json",
]

# Subscriber ids are mailbox owners (an address or an account id); 256
# characters holds any e-mail address (RFC 5321 caps a path at 256).
MAX_SUBSCRIBER_LEN = 256
# Event names are short identifiers such as "new_letter".
MAX_EVENT_LEN = 64
# A tab filters on a handful of event kinds; more is a client bug.
MAX_FILTER_EVENTS = 32
# The largest publish body the admin API takes (100,000 items of ~150
# bytes), and so the largest single item any bus carries: bigger batches
# should be split; the limit bounds what one publisher can make us hold.
MAX_PUBLISH_BYTES = 16 * 1024 * 1024

# The wildcard filter: every event.
ALL_EVENTS = "*"


class Subscribe:
    __slots__ = ("events",)

    def __init__(self, events: frozenset[str] | None) -> None:
        self.events = events  # None: all events


class Unsubscribe:
    __slots__ = ()


class Ping:
    __slots__ = ()


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
      PacketError: not JSON, not an object, an unknown type or a bad field.
    """
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise PacketError("bad_json", f"packet is not valid JSON: {e.args[0] if e.args else e}") from None
    if type(obj) is not dict:
        raise PacketError("bad_packet", "packet must be a JSON object with a 'type' field")
    kind = obj.get("type")
    if kind == "subscribe":
        events = obj.get("events")
        if events is None:
            return _SUBSCRIBE_ALL
        if type(events) is not list:
            raise PacketError("bad_field", "'events' must be a list of event names")
        if len(events) > MAX_FILTER_EVENTS:
            raise PacketError("bad_field", f"'events' lists more than {MAX_FILTER_EVENTS} names")
        for name in events:
            if type(name) is not str or not name or len(name) > MAX_EVENT_LEN:
                raise PacketError("bad_field", f"each event name must be a string of 1 to {MAX_EVENT_LEN} characters")
        if not events or ALL_EVENTS in events:
            return _SUBSCRIBE_ALL
        return Subscribe(_intern_filter(frozenset(events)))
    if kind == "unsubscribe":
        return _UNSUBSCRIBE
    if kind == "ping":
        return _PING
    if kind is None:
        raise PacketError("bad_packet", "packet has no 'type' field")
    if type(kind) is not str:
        raise PacketError("bad_field", "'type' must be a string")
    raise PacketError("unknown_type", f"unknown packet type {kind[:MAX_EVENT_LEN]!r}, expected subscribe, unsubscribe or ping")


def subscribed_frame(subscriber: str, events: frozenset[str] | None) -> bytes:
    names = [ALL_EVENTS] if events is None else sorted(events)
    return encode_text(orjson.dumps({"type": "subscribed", "subscriber": subscriber, "events": names}))


def unsubscribed_frame(subscriber: str) -> bytes:
    return encode_text(orjson.dumps({"type": "unsubscribed", "subscriber": subscriber}))


def error_frame(code: str, message: str) -> bytes:
    return encode_text(orjson.dumps({"type": "error", "code": code, "message": message}))


class _Event(msgspec.Struct, tag_field="type", tag="event"):
    subscriber: str
    event: str
    data: Any  # a dict, or the publisher's own JSON bytes as msgspec.Raw


_encode = msgspec.json.Encoder().encode


def event_frame(subscriber: str, event: str, data: Any) -> bytes:
    """The complete text frame of one event, built once for all recipients.

    ``data`` is a dict or a :class:`msgspec.Raw` (the JSON the publisher
    sent, passed through without being decoded and encoded again).
    """
    return encode_text(_encode(_Event(subscriber, event, data)))


PONG_FRAME = encode_text(b'{"type":"pong"}')


def parse_item(obj: Any, where: str = "item") -> tuple[str, str, Any]:
    """Validate one publish item; return ``(subscriber, event, data)``.

    Raises:
      PublishError: saying which field of ``where`` is wrong and why.
    """
    if type(obj) is not dict:
        raise PublishError(f"{where}: must be a JSON object with 'subscriber', 'event' and optional 'data'")
    sub = obj.get("subscriber")
    if type(sub) is not str or not sub or len(sub) > MAX_SUBSCRIBER_LEN:
        raise PublishError(f"{where}: 'subscriber' must be a string of 1 to {MAX_SUBSCRIBER_LEN} characters")
    event = obj.get("event")
    if type(event) is not str or not event or len(event) > MAX_EVENT_LEN or event == ALL_EVENTS:
        raise PublishError(f"{where}: 'event' must be a string of 1 to {MAX_EVENT_LEN} characters, not '*'")
    data = obj.get("data")
    if data is None:
        data = {}
    elif type(data) is not dict:
        raise PublishError(f"{where}: 'data' must be a JSON object")
    return sub, event, data


class _Item(msgspec.Struct):
    subscriber: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SUBSCRIBER_LEN)]
    event: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_LEN)]
    data: msgspec.Raw = msgspec.Raw(b"{}")


# JSON nested deeper than the decoder's recursion bound (the interpreter's,
# a few hundred levels inside the server) is refused, never parsed: no mail
# event needs more than a handful of levels, and it would only be a way to
# make the decoders (and every browser that receives it) recurse.
_TOO_DEEP = "JSON nested too deeply: events' data may nest a few hundred levels at most"


# The fast path: one C call validates a whole batch and keeps each item's
# data as the raw JSON it came in (it goes out again as it is).
_decode_batch = msgspec.json.Decoder(list[_Item] | _Item).decode
_decode_one = msgspec.json.Decoder(_Item).decode
_EMPTY = msgspec.Raw(b"{}")
_LBRACE = ord("{")
_NULL = ord("n")


def _fast_items(decoded: list[_Item]) -> list[tuple[str, str, Any]] | None:
    """Items as tuples, or None if one needs the slow path's error."""
    out = []
    for it in decoded:
        data = it.data
        first = memoryview(data)[0]
        if first != _LBRACE:
            if first != _NULL:
                return None  # not an object
            data = _EMPTY
        if it.event == ALL_EVENTS:
            return None
        out.append((it.subscriber, it.event, data))
    return out


def parse_items(body: bytes, content_type: str = "") -> list[tuple[str, str, Any]]:
    """Parse a publish body: one item, a JSON array of items, or NDJSON.

    All or nothing: one bad item rejects the whole body. Valid bodies take
    the msgspec fast path; a bad one is parsed again slowly, only to say
    exactly which item is wrong and why.

    Raises:
      PublishError: what is wrong, and with NDJSON or arrays which item.
    """
    stripped = body.strip()
    if not stripped:
        raise PublishError("empty body: send a JSON object, a JSON array of them, or NDJSON")
    ndjson = "ndjson" in content_type or "jsonlines" in content_type
    if not ndjson:
        try:
            decoded = _decode_batch(stripped)
        except RecursionError:
            raise PublishError(_TOO_DEEP) from None
        except msgspec.ValidationError:
            decoded = None
        except msgspec.DecodeError:
            decoded = None
            if b"\n" in stripped:
                ndjson = True  # several lines: NDJSON without the content type
        if not ndjson:
            if decoded is not None:
                items = _fast_items(decoded if type(decoded) is list else [decoded])
                if items:
                    return items
            return _slow_items(stripped)
    try:
        items = _fast_items([_decode_one(line) for line in stripped.split(b"\n") if line.strip()])
    except RecursionError:
        raise PublishError(_TOO_DEEP) from None
    except msgspec.MsgspecError:
        items = None
    return items or _slow_ndjson(stripped)


def parse_item_json(data: bytes) -> tuple[str, str, Any]:
    """One publish item from its JSON (a bus payload), data kept raw.

    Raises:
      PublishError: what is wrong with it.
    """
    try:
        items = _fast_items([_decode_one(data)])
    except RecursionError:
        raise PublishError(_TOO_DEEP) from None
    except msgspec.MsgspecError:
        items = None
    if items:
        return items[0]
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise PublishError(f"payload is not valid JSON: {e.args[0] if e.args else e}") from None
    return parse_item(obj, "payload")


def _slow_items(body: bytes) -> list[tuple[str, str, Any]]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise PublishError(f"body is not valid JSON: {e.args[0] if e.args else e}") from None
    if type(obj) is list:
        if not obj:
            raise PublishError("empty array: nothing to publish")
        return [parse_item(o, f"item {i}") for i, o in enumerate(obj)]
    return [parse_item(obj)]


def _slow_ndjson(body: bytes) -> list[tuple[str, str, Any]]:
    items = []
    for n, line in enumerate(body.split(b"\n"), 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise PublishError(f"line {n}: not valid JSON: {e.args[0] if e.args else e}") from None
        items.append(parse_item(obj, f"line {n}"))
    if not items:
        raise PublishError("empty body: nothing to publish")
    return items
