"""Publish items: what a mail store publishes, through the admin API or
straight onto a bus.

One item::

    {"subscriber": SUB, "event": NAME, "data": {...}, "state": STATE}

``state`` is optional: an opaque string or object (a JMAP state string, say)
kept as the subscriber's latest state, handed to a tab that must resync.

A publish body is one item, a JSON array of items, or NDJSON (one per
line). Valid bodies take msgspec's fast path, which validates a whole batch
in one C call and keeps each item's ``data`` as the raw JSON it came in (it
goes out to the browsers as it is, never decoded and encoded again); a bad
body is parsed again slowly, only to say exactly which item is wrong and
why. Plain bytes in, tuples out; no I/O.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .errors import PublishError
from .packets import ALL_EVENTS, MAX_EPOCH_LEN, MAX_EVENT_LEN, MAX_SUBSCRIBER_LEN
from .speedups import C

__all__ = ["Item", "MAX_PUBLISH_BYTES", "parse_item", "parse_items", "parse_item_json", "parse_bus_item"]

# One publish item: (subscriber id, event name, data: a dict or msgspec.Raw,
# state: the raw JSON of a string or object, or None).
Item = tuple[str, str, Any, Any]

# The largest publish body the admin API takes (100,000 items of ~150
# bytes), and so the largest single item any bus carries: bigger batches
# should be split; the limit bounds what one publisher can make us hold.
MAX_PUBLISH_BYTES = 16 * 1024 * 1024

# JSON nested deeper than the decoder's recursion bound (the interpreter's,
# a few hundred levels inside the server) is refused, never parsed: no mail
# event needs more than a handful of levels, and it would only be a way to
# make the decoders (and every browser that receives it) recurse.
_TOO_DEEP = "JSON nested too deeply: events' data may nest a few hundred levels at most"


def _require_utf8(data: bytes, what: str) -> None:
    """JSON is UTF-8 (RFC 8259 §8.1), and an event goes out in a text
    frame, which a browser that finds bad UTF-8 in it fails with 1007: so a
    publish that is not UTF-8 is refused whole, even where the bad bytes
    sit in a field mailpush skips or keeps raw (the fast decoders do not
    check those). ASCII, the common case, is checked without a copy.

    Raises:
      PublishError: ``what`` is not valid UTF-8, and where.
    """
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PublishError(f"{what} not valid UTF-8 (byte {e.start}): JSON must be UTF-8") from None


def _loads(data: bytes, what: str) -> Any:
    """Decode JSON for the slow path's messages; ``what`` starts them."""
    try:
        return msgspec.json.decode(data)
    except RecursionError:
        raise PublishError(_TOO_DEEP) from None
    except msgspec.DecodeError as e:
        raise PublishError(f"{what} not valid JSON: {e}") from None


def parse_item(obj: Any, where: str = "item") -> Item:
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
    state = obj.get("state")
    if state is not None:
        if type(state) not in (str, dict):
            raise PublishError(f"{where}: 'state' must be a string or a JSON object")
        state = msgspec.Raw(msgspec.json.encode(state))
    return sub, event, data, state


class _Item(msgspec.Struct, gc=False):  # str and Raw fields only: no cycles to collect
    subscriber: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SUBSCRIBER_LEN)]
    event: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_LEN)]
    data: msgspec.Raw = msgspec.Raw(b"{}")
    state: msgspec.Raw = msgspec.Raw(b"null")  # (Raw cannot be in a union with None)


# What an item without a state holds: the struct's one default object (the
# defaults are those of the last fields, hence the zip from the end).
_NO_STATE = dict(zip(reversed(_Item.__struct_fields__), reversed(_Item.__struct_defaults__), strict=False))["state"]

# The fast path: one C call validates a whole batch and keeps each item's
# data as the raw JSON it came in (it goes out again as it is).
_decode_batch = msgspec.json.Decoder(list[_Item] | _Item).decode
_decode_one = msgspec.json.Decoder(_Item).decode
_EMPTY = msgspec.Raw(b"{}")
_LBRACE = ord("{")
_QUOTE = ord('"')
_NULL = ord("n")


def _py_fast_items(decoded: list[_Item]) -> list[Item] | None:
    """Items as tuples, or None if one needs the slow path's error (the C
    twin: ``_speedups.fast_items``)."""
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
        state: msgspec.Raw | None = it.state
        first = memoryview(it.state)[0]
        if first != _LBRACE and first != _QUOTE:
            if first != _NULL:
                return None  # neither a string nor an object
            state = None
        out.append((it.subscriber, it.event, data, state))
    return out


if C is not None:
    _c_fast_items = C.fast_items

    def _fast_items(decoded: list[_Item]) -> list[Item] | None:
        return _c_fast_items(decoded, ALL_EVENTS, _EMPTY, _NO_STATE)

else:
    _fast_items = _py_fast_items


def parse_items(body: bytes, content_type: str = "") -> list[Item]:
    """Parse a publish body: one item, a JSON array of items, or NDJSON.

    All or nothing: one bad item rejects the whole body. Valid bodies take
    the msgspec fast path; a bad one is parsed again slowly, only to say
    exactly which item is wrong and why.

    Raises:
      PublishError: what is wrong, and with NDJSON or arrays which item.
    """
    stripped = body.strip()
    _require_utf8(stripped, "body is")
    if not stripped:
        raise PublishError("empty body: send a JSON object, a JSON array of them, or NDJSON")
    ndjson = "ndjson" in content_type or "jsonlines" in content_type
    if not ndjson:
        try:
            decoded = _decode_batch(stripped)
        except RecursionError:
            raise PublishError(_TOO_DEEP) from None
        except msgspec.ValidationError:
            # The typed decoder stops at the first bad field, before it has
            # read the rest: several lines may still be NDJSON.
            decoded = None
            if b"\n" in stripped and not _is_json(stripped):
                ndjson = True
        except msgspec.DecodeError:
            decoded = None
            if b"\n" in stripped:
                ndjson = True  # several lines: NDJSON without the content type
        if not ndjson:
            if decoded is not None:
                items = _fast_items(decoded if isinstance(decoded, list) else [decoded])
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


def _is_json(text: bytes) -> bool:
    """``text`` is one JSON value (of any shape, however deep).

    Raises:
      PublishError: nested too deeply to tell.
    """
    try:
        msgspec.json.decode(text)
    except RecursionError:
        raise PublishError(_TOO_DEEP) from None
    except msgspec.DecodeError:
        return False
    except msgspec.ValidationError:
        pass  # JSON, with a number out of range: the slow path says so
    return True


def parse_item_json(data: bytes) -> Item:
    """One publish item from its JSON (a bus payload), data kept raw.

    Raises:
      PublishError: what is wrong with it.
    """
    _require_utf8(data, "payload is")
    try:
        items = _fast_items([_decode_one(data)])
    except RecursionError:
        raise PublishError(_TOO_DEEP) from None
    except msgspec.MsgspecError:
        items = None
    if items:
        return items[0]
    return parse_item(_loads(data, "payload is"), "payload")


def _slow_items(body: bytes) -> list[Item]:
    obj = _loads(body, "body is")
    if type(obj) is list:
        if not obj:
            raise PublishError("empty array: nothing to publish")
        return [parse_item(o, f"item {i}") for i, o in enumerate(obj)]
    return [parse_item(obj)]


def _slow_ndjson(body: bytes) -> list[Item]:
    items = []
    for n, line in enumerate(body.split(b"\n"), 1):
        line = line.strip()
        if not line:
            continue
        items.append(parse_item(_loads(line, f"line {n}:"), f"line {n}"))
    if not items:
        raise PublishError("empty body: nothing to publish")
    return items


class _BusItem(_Item):
    offset: Annotated[int, msgspec.Meta(ge=1)] | None = None
    epoch: Annotated[str, msgspec.Meta(max_length=MAX_EPOCH_LEN)] | None = None


_decode_bus = msgspec.json.Decoder(_BusItem).decode


def parse_bus_item(data: bytes) -> tuple[str, str, Any, int | None, str | None]:
    """One message from a bus (a publish item, with the ``offset`` and
    ``epoch`` the history gave it, or without them from a publisher that
    bypassed it): ``(subscriber, event, data, offset, epoch)``, data raw.

    Raises:
      PublishError: what is wrong with it.
    """
    _require_utf8(data, "payload is")
    try:
        it = _decode_bus(data)
    except RecursionError:
        raise PublishError(_TOO_DEEP) from None
    except msgspec.MsgspecError:
        it = None
    if it is not None and it.event != ALL_EVENTS:
        first = memoryview(it.data)[0]
        if first in (_LBRACE, _NULL):
            return it.subscriber, it.event, it.data if first == _LBRACE else _EMPTY, it.offset, it.epoch
    parse_item(_loads(data, "payload is"), "payload")  # says what is wrong, if it is the item
    raise PublishError("payload: 'offset' must be a positive integer and 'epoch' a short string")
