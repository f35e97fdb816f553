"""Fuzz target ``resp``: the Redis push stream (mailpush.bus.resp.PushParser).

Input: the bytes a subscribed Redis connection receives, fed to one
``PushParser`` in pieces (split points derived from the input), as reads
off the socket would hand them over.

Checks:

- ``feed`` returns replies or raises only :class:`RespProtocolError`
  (carrying the replies complete before the fault);
- replies are what RESP2 decodes to: ``(channel, payload)`` for a message
  push, bytes, ints, None, :class:`RespError` and lists of those, nested at
  most MAX_DEPTH deep;
- the parser never holds more than it was fed nor more than MAX_REPLY bytes
  (checked after every feed);
- differential: whole, cut at points derived from the input and (when
  short) byte by byte, the stream gives the same replies, the same error
  text and, when it ends without an error, the same number of bytes held.
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own, pieces, rng_for, split_points

with atheris.instrument_imports(include=["mailpush.bus.resp"]):
    from mailpush.bus import resp
    from mailpush.bus.resp import PushParser
    from mailpush.errors import RespError, RespProtocolError

NAME = "resp"
MAX_LEN = 4096
BYTE_BY_BYTE = 300


def normal(value, depth: int = 0):
    """A reply as plain comparable values; checks its shape on the way."""
    if isinstance(value, RespError):
        return ("error", str(value))
    if type(value) is tuple:
        expect(depth == 0 and len(value) == 2, f"a tuple reply {value!r}")
        return tuple(normal(v, depth + 1) for v in value)
    if isinstance(value, list):
        expect(depth < resp.MAX_DEPTH, "a reply nested deeper than MAX_DEPTH")
        expect(len(value) <= resp.MAX_ARRAY, "an array longer than MAX_ARRAY")
        return [normal(v, depth + 1) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        expect(len(value) <= max(resp.MAX_BULK, resp.MAX_LINE), "a string over the bounds")
        return bytes(value)
    expect(value is None or type(value) is int, f"a reply of type {type(value).__name__}")
    return value


def push_feed(chunks: list[bytes]):
    """(replies, error text or None, bytes held at the end)."""
    parser = PushParser()
    out: list = []
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        replies, err = own(RespProtocolError, parser.feed, chunk)
        if err is not None:
            expect(isinstance(str(err), str) and str(err), "a RespProtocolError without a reason")
            return out + [normal(r) for r in err.replies], str(err), parser.buffered
        out += [normal(r) for r in replies]
        expect(0 <= parser.buffered <= min(fed, resp.MAX_REPLY), f"holds {parser.buffered} bytes after {fed}")
    return out, None, parser.buffered


def outcome(chunks: list[bytes]):
    """What must not depend on the split: the replies, the error, and the
    bytes held at the end unless there was an error (the parser is dropped
    after one, and what it holds then is whatever the last read left)."""
    replies, err, held = push_feed(chunks)
    return replies, err, held if err is None else None


def check(data: bytes) -> None:
    whole = outcome([data])
    rng = rng_for(data)
    expect(outcome(pieces(data, split_points(rng, len(data)))) == whole, "a different result when split")
    if len(data) <= BYTE_BY_BYTE:
        expect(outcome([data[i : i + 1] for i in range(len(data))]) == whole, "different byte by byte")


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n" + bulk(b"message") + bulk(channel) + bulk(payload)


# Seeds: pushes and broken streams from tests/test_properties.py and tests/test_resp.py.
SEEDS = {
    "message": message(b"mailpush:alice", b'{"subscriber":"alice","event":"new_letter","data":{}}'),
    "subscribe-ack": b"*3\r\n" + bulk(b"subscribe") + bulk(b"mailpush:a") + b":1\r\n",
    "pmessage": b"*4\r\n" + bulk(b"pmessage") + bulk(b"mailpush:*") + bulk(b"mailpush:a") + bulk(b"x"),
    "mixed": b"+OK\r\n-ERR wrong\r\n:-42\r\n$-1\r\n*-1\r\n*2\r\n" + bulk(b"pong") + bulk(b"") + message(b"c", b""),
    "nested": b"*1\r\n" * resp.MAX_DEPTH + b":7\r\n",
    "too-deep": b"*1\r\n" * (resp.MAX_DEPTH + 1) + b":7\r\n",
    "bad-length": b"$-5\r\n" + message(b"c", b"p"),
    "huge-bulk": b"$99999999999\r\n",
    "over-bulk": b"$%d\r\n" % (resp.MAX_BULK + 1),
    "underscore": b"$1_0\r\n0123456789\r\n",
    "no-crlf": b"*3\r\n$7\r\nmessage\r\n$1\r\naXY$1\r\nb\r\n",
    "null-payload": b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$-1\r\n",
    "message-int": b"*3\r\n$7\r\nmessage\r\n:1\r\n",
    "float": b":1.5\r\n",
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
