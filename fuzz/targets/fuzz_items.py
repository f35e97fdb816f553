"""Fuzz target ``items``: publish bodies (mailpush.items.parse_items).

Input: one control byte picking the Content-Type the body is sent with (none,
application/json, application/x-ndjson, application/jsonlines, text/plain),
then the body: one JSON object, a JSON array of them, or NDJSON.

Checks:

- only :class:`PublishError` is raised, and it says what is wrong;
- every accepted item obeys the item rules (subscriber of 1 to 256
  characters, event of 1 to 64 other than ``*``, data an object, state a
  string or an object) and becomes a text frame whose payload is JSON
  carrying exactly that item;
- differential, against an oracle written from the documented rules on
  Python's ``json`` (as in tests/test_properties.py): a body is accepted
  exactly when the rules accept it, with the same items; no claim where the
  two JSON libraries legitimately differ (lone surrogates, numbers out of
  msgspec's range, nesting too deep for either).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from decimal import Decimal, InvalidOperation

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own

with atheris.instrument_imports(include=["mailpush.items", "mailpush.packets"]):
    import msgspec

    from mailpush.errors import PublishError
    from mailpush.items import parse_items
    from mailpush.packets import ALL_EVENTS, MAX_EVENT_LEN, MAX_SUBSCRIBER_LEN, event_frame

NAME = "items"
MAX_LEN = 4096
CONTENT_TYPES = ("", "application/json", "application/x-ndjson", "application/jsonlines; charset=utf-8", "text/plain")


class CannotSay(Exception):
    """The oracle's JSON library and msgspec disagree on this text."""


def _number(text: str):
    """A JSON number, exactly: a Decimal, or its text where Decimal's
    exponent range ends (1e999999999999999999 is JSON too)."""
    try:
        return Decimal(text)
    except InvalidOperation:
        return ("number", text)


def _no_constants(name: str):
    raise ValueError(f"not JSON: {name}")


def canon(text: bytes | str):
    """JSON to Python, exact for every number; no NaN/Infinity."""
    return json.loads(text, parse_int=_number, parse_float=_number, parse_constant=_no_constants)


def python_view(value):
    """An item's data or state (a dict or msgspec.Raw) as canon() reads it."""
    if isinstance(value, msgspec.Raw):
        return canon(bytes(value))
    return canon(msgspec.json.encode(value))


def check_item(item) -> None:
    expect(len(item) in (3, 4), f"an item of {len(item)} fields")
    sub, event, data = item[:3]
    expect(type(sub) is str and 1 <= len(sub) <= MAX_SUBSCRIBER_LEN, f"subscriber {sub!r}")
    expect(type(event) is str and 1 <= len(event) <= MAX_EVENT_LEN and event != ALL_EVENTS, f"event {event!r}")
    expect(type(data) is dict or (type(data) is msgspec.Raw and bytes(data)[:1] == b"{"), f"data {data!r}")
    data_view = python_view(data)
    expect(type(data_view) is dict, "data is not an object")
    if len(item) == 4 and item[3] is not None:
        expect(type(item[3]) is msgspec.Raw and type(python_view(item[3])) in (str, dict), f"state {item[3]!r}")
    frame = event_frame(sub, event, data)
    expect(frame[0] == 0x81, "the event frame is not a final text frame")
    n, head = frame[1], 2
    if n == 126:
        (n,), head = struct.unpack_from("!H", frame, 2), 4
    elif n == 127:
        (n,), head = struct.unpack_from("!Q", frame, 2), 10
    payload = frame[head:]
    expect(len(payload) == n, "the event frame's length is wrong")
    want = {"type": "event", "subscriber": sub, "event": event, "data": data_view}
    expect(canon(payload.decode("utf-8")) == want, "the event frame does not carry the item")


def oracle_item(obj):
    if type(obj) is not dict:
        return None
    sub, event, data, state = obj.get("subscriber"), obj.get("event"), obj.get("data"), obj.get("state")
    if type(sub) is not str or not 1 <= len(sub) <= MAX_SUBSCRIBER_LEN:
        return None
    if type(event) is not str or not 1 <= len(event) <= MAX_EVENT_LEN or event == ALL_EVENTS:
        return None
    if data is None:
        data = {}
    if type(data) is not dict:
        return None
    if state is not None and type(state) not in (str, dict):
        return None
    return sub, event, data, state


def oracle_json(text: bytes):
    try:
        value = canon(text.decode("utf-8"))
    except RecursionError:
        raise CannotSay("too deep for the oracle") from None
    try:
        msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        raise CannotSay("msgspec refuses what Python reads") from None
    return value


def oracle(body: bytes, content_type: str):
    """The items parse_items must return, None if it must refuse the body;
    CannotSay where no claim is made."""
    stripped = body.strip()
    if not stripped:
        return None
    ndjson = "ndjson" in content_type or "jsonlines" in content_type
    if not ndjson:
        try:
            value = oracle_json(stripped)
        except ValueError:
            if b"\n" not in stripped:
                return None
            ndjson = True
        else:
            objs = value if type(value) is list else [value]
            items = [oracle_item(o) for o in objs]
            return items if items and None not in items else None
    items = []
    for line in stripped.split(b"\n"):
        if not line.strip():
            continue
        try:
            items.append(oracle_item(oracle_json(line.strip())))
        except ValueError:
            return None
    return items if items and None not in items else None


def same_item(got, want) -> bool:
    sub, event, data, state = want
    if (got[0], got[1]) != (sub, event) or python_view(got[2]) != data:
        return False
    if len(got) == 4:
        return (got[3] is None and state is None) or (got[3] is not None and python_view(got[3]) == state)
    return True


def check_body(body: bytes, content_type: str) -> None:
    items, err = own(PublishError, parse_items, body, content_type)
    if err is not None:
        expect(str(err), "a PublishError that says nothing")
    else:
        expect(type(items) is list and items, f"accepted with {items!r}")
        for item in items:
            check_item(item)
    try:
        want = oracle(body, content_type)
    except CannotSay:
        return
    if want is None:
        expect(err is not None, f"accepted a body the item rules refuse: {items!r}")
    else:
        expect(err is None, f"refused a valid body: {err}")
        expect(
            len(items) == len(want) and all(same_item(g, w) for g, w in zip(items, want, strict=True)), "other items"
        )


def check(data: bytes) -> None:
    if not data:
        return
    check_body(data[1:], CONTENT_TYPES[data[0] % len(CONTENT_TYPES)])


# Seeds: bodies from tests/test_properties.py and the README.
ONE = b'{"subscriber":"alice@example.com","event":"new_letter","data":{"from":"bob@example.com"}}'
WITH_STATE = b'{"subscriber":"a","event":"e","data":{"id":42,"folder":"INBOX"},"state":"s1"}'
DEEP = b'{"subscriber":"a","event":"e","data":{"x":' + b"[" * 300 + b"]" * 300 + b"}}"
SEEDS = {
    "one": b"\x00" + ONE,
    "one-json": b"\x01" + WITH_STATE,
    "array": b"\x00[" + ONE + b", " + WITH_STATE + b"]",
    "ndjson": b"\x02" + ONE + b"\n" + WITH_STATE + b"\n",
    "ndjson-crlf-untyped": b"\x00" + ONE + b"\r\n\r\n" + b'{"subscriber":"b","event":"f","data":null}\r\n',
    "jsonlines": b"\x03" + WITH_STATE,
    "text-plain": b"\x04 " + ONE + b" ",
    "state-object": b'\x00{"subscriber":"a","event":"e","state":{"v":1}}',
    "bad-state": b'\x00{"subscriber":"a","event":"e","state":5}',
    "star-event": b'\x00[{"subscriber":"a","event":"e"},{"subscriber":"a","event":"*"}]',
    "dup-key": b'\x00{"subscriber":"a","event":"e","subscriber":5}',
    "big-number": b'\x00{"subscriber":"a","event":"e","data":{"x":1e400,"n":' + b"1" + b"0" * 400 + b"}}",
    "surrogate": b'\x00{"subscriber":"\\ud800","event":"e"}',
    "deep": b"\x00" + DEEP,
    "empty-array": b"\x00[]",
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
