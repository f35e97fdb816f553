"""Fuzz target ``bus_item``: one publish item off a bus (mailpush.items
``parse_item_json`` and ``parse_bus_item``).

Input: a bus payload (a Redis PUBLISH payload or a stream entry's item),
JSON text of one item, possibly with the ``offset`` and ``epoch`` the
history gave it.

Checks:

- both raise only :class:`PublishError`, saying what is wrong;
- an item from ``parse_item_json`` obeys the item rules and becomes an event
  frame carrying exactly it (the checks of the ``items`` target);
- ``parse_bus_item`` returns a subscriber and an event within their
  bounds (event not ``*``), data as the raw JSON of an object, an offset that
  is None or at least 1 and an epoch that is None or at most 64 characters;
- differential: a payload that is one JSON object parses like a publish
  body of that one item (``parse_items(payload, "application/json")``):
  accepted by both or refused by both, with the same item. (A body of
  several lines that is not one JSON value is read as NDJSON, and a body is
  stripped of all ASCII whitespace, a payload is not: only payloads with
  none of the non-JSON whitespace bytes 0x0b and 0x0c around them are
  compared.)
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own
from fuzz_items import ONE, WITH_STATE, check_item, python_view, same_item

with atheris.instrument_imports(include=["mailpush.items", "mailpush.packets"]):
    import msgspec

    from mailpush.errors import PublishError
    from mailpush.items import parse_bus_item, parse_item_json, parse_items
    from mailpush.packets import ALL_EVENTS, MAX_EPOCH_LEN, MAX_EVENT_LEN, MAX_SUBSCRIBER_LEN

NAME = "bus_item"
MAX_LEN = 4096
JSON_WS = b" \t\r\n"


def decodes(text: bytes) -> bool:
    try:
        msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def check(data: bytes) -> None:
    item, err = own(PublishError, parse_item_json, data)
    if err is None:
        check_item(item)
    else:
        expect(str(err), "a PublishError that says nothing")

    bus, bus_err = own(PublishError, parse_bus_item, data)
    if bus_err is None:
        sub, event, raw, offset, epoch = bus
        expect(type(sub) is str and 1 <= len(sub) <= MAX_SUBSCRIBER_LEN, f"subscriber {sub!r}")
        expect(type(event) is str and 1 <= len(event) <= MAX_EVENT_LEN and event != ALL_EVENTS, f"event {event!r}")
        expect(type(raw) is msgspec.Raw and bytes(raw)[:1] == b"{", f"data {raw!r}")
        expect(type(python_view(raw)) is dict, "data is not an object")
        expect(offset is None or (type(offset) is int and offset >= 1), f"offset {offset!r}")
        expect(epoch is None or (type(epoch) is str and len(epoch) <= MAX_EPOCH_LEN), f"epoch {epoch!r}")
    else:
        expect(str(bus_err), "a PublishError that says nothing")

    stripped = data.strip()
    one_value = b"\n" not in stripped or decodes(stripped)  # else a body may be read as NDJSON
    if stripped[:1] == b"{" and stripped == data.strip(JSON_WS) and one_value:
        body, body_err = own(PublishError, parse_items, data, "application/json")
        expect((err is None) == (body_err is None), f"as a payload: {err}; as a body: {body_err}")
        if err is None:
            expect(len(body) == 1, f"one object, {len(body)} items as a body")
            got = body[0]
            state = None if len(got) < 4 or got[3] is None else python_view(got[3])
            expect(same_item(item, (got[0], got[1], python_view(got[2]), state)), "another item than as a body")


# Seeds: payloads from tests/test_properties.py and the Redis history.
SEEDS = {
    "item": ONE,
    "item-state": WITH_STATE,
    "history": b'{"subscriber":"a","event":"e","data":{"x":1},"offset":7,"epoch":"5f3c-1"}',
    "offset-zero": b'{"subscriber":"a","event":"e","offset":0}',
    "long-epoch": b'{"subscriber":"a","event":"e","epoch":"' + b"x" * 65 + b'"}',
    "null-data": b'{"subscriber":"a","event":"e","data":null}',
    "star": b'{"subscriber":"a","event":"*"}',
    "array": b"[" + ONE + b"]",
    "huge-int": b'{"subscriber":"a","event":"e","data":{"n":-1' + b"0" * 400 + b"}}",
    "unclosed": b"[" * 50,
    "leading-space": b" \n" + ONE,
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
