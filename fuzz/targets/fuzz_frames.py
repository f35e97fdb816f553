"""Fuzz target ``frames``: the WebSocket frame decoder (mailpush.frames).

Input: one control byte, then the bytes a client sends after the upgrade.
The control byte picks the decoder's message-size limit (small ones, so
that 1009 is reachable with short inputs); the split points are derived
from the input.

Checks:

- ``Decoder.feed`` returns messages or raises only :class:`ProtocolError`,
  with close code 1002, 1007 or 1009, and so does ``parse_close`` on every
  Close payload decoded;
- what is returned obeys RFC 6455 as the decoder promises: data messages
  within the limit, text messages valid UTF-8, control payloads of at most
  125 bytes, only known opcodes;
- differential: the stream fed whole, cut at points derived from the input,
  and (when short) byte by byte gives the same messages, the same error and
  the same idle state;
- differential: where the C reader (``mailpush._speedups.one_frame``) takes
  the stream as one small whole frame, a fresh Decoder gives that one
  message, no error, and is idle.
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import expect, main, own, pieces, rng_for, split_points

with atheris.instrument_imports(include=["mailpush.frames"]):
    from mailpush.errors import ProtocolError
    from mailpush.frames import MAX_CONTROL_PAYLOAD, Decoder, Opcode, parse_close
    from mailpush.speedups import C

NAME = "frames"
MAX_LEN = 4096
LIMITS = (0, 16, 125, 126, 1024, 4096, 65536, 1 << 20)  # message-size limits, by the control byte
CLOSE_CODES = {1002, 1007, 1009}
DATA = (Opcode.TEXT, Opcode.BINARY)
CONTROL = (Opcode.PING, Opcode.PONG, Opcode.CLOSE)
BYTE_BY_BYTE = 300  # inputs up to this long are also fed one byte at a time


def decode(chunks: list[bytes], limit: int):
    """(messages, (close code, reason) or None, idle) of a stream fed in
    these chunks; messages before a violation count as decoded."""
    dec = Decoder(limit)
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        msgs, err = own(ProtocolError, dec.feed, chunk)
        if err is not None:
            expect(err.code in CLOSE_CODES, f"close code {err.code}: {err.reason}")
            expect(isinstance(err.reason, str) and err.reason, "a close without a reason")
            return out + err.messages, (err.code, err.reason), False
        out += msgs
    return out, None, dec.idle


def check(data: bytes) -> None:
    if not data:
        return
    limit = LIMITS[data[0] % len(LIMITS)]
    stream = data[1:]
    whole = decode([stream], limit)
    messages, _, _ = whole
    for opcode, payload in messages:
        expect(type(payload) is bytes, f"payload of type {type(payload).__name__}")
        if opcode in DATA:
            expect(len(payload) <= limit, f"a message of {len(payload)} bytes over the limit {limit}")
            if opcode == Opcode.TEXT:
                payload.decode("utf-8")  # a UnicodeDecodeError here is a crash
        else:
            expect(opcode in CONTROL, f"opcode {opcode} returned")
            expect(len(payload) <= MAX_CONTROL_PAYLOAD, f"a control payload of {len(payload)} bytes")
            if opcode == Opcode.CLOSE:
                got, err = own(ProtocolError, parse_close, payload)
                if err is not None:
                    expect(err.code in CLOSE_CODES, f"parse_close: close code {err.code}")
                else:
                    expect(type(got[1]) is str, "parse_close: reason not a str")
    if C is not None:  # the C reading of one small whole frame is a fresh Decoder's
        one = C.one_frame(stream, limit)
        if one is not None:
            expect(whole == ([one], None, True), f"C read {one!r}, the Decoder {whole!r}")
    rng = rng_for(data)
    split = decode(pieces(stream, split_points(rng, len(stream))), limit)
    expect(split == whole, "a different result when the stream is split")
    if len(stream) <= BYTE_BY_BYTE:
        expect(decode([stream[i : i + 1] for i in range(len(stream))], limit) == whole, "different byte by byte")


# -- seeds: frames as in tests/test_properties.py ------------------------------------------------

MASK = b"\x5a\xa5\x0f\xf0"


def client_frame(opcode: int, payload: bytes, fin: bool = True, form: str = "min", mask: bytes | None = MASK) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if mask is not None else 0
    if form == "min":
        form = "7" if n < 126 else "16" if n < 65536 else "64"
    if form == "7":
        head = bytes((b0, m | n))
    elif form == "16":
        head = bytes((b0, m | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, m | 127)) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _limit(n: int) -> bytes:
    return bytes((LIMITS.index(n),))


SEEDS = {
    "text": _limit(4096) + client_frame(Opcode.TEXT, b'{"type":"subscribe","events":["new_letter"]}'),
    "binary": _limit(4096) + client_frame(Opcode.BINARY, bytes(range(40))),
    "ping-pong-close": _limit(1024)
    + client_frame(Opcode.PING, b"hi")
    + client_frame(Opcode.PONG, b"")
    + client_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"bye"),
    "fragmented-text": _limit(4096)
    + client_frame(Opcode.TEXT, "h\u00e9".encode()[:2], fin=False)
    + client_frame(Opcode.PING, b"x")
    + client_frame(Opcode.CONTINUATION, "h\u00e9".encode()[2:] + b"llo", fin=True),
    "len16": _limit(4096) + client_frame(Opcode.TEXT, b"abcdefghijklmnopqrstuvwxyz" * 6),
    "len64-nonminimal": _limit(4096) + client_frame(Opcode.BINARY, b"xyz", form="64"),
    "too-big": _limit(16) + client_frame(Opcode.BINARY, b"x" * 40),
    "unmasked": _limit(4096) + client_frame(Opcode.TEXT, b"hello", mask=None),
    "bad-utf8": _limit(4096) + client_frame(Opcode.TEXT, b"a\xed\xa0\x80b"),
    "close-1byte": _limit(4096) + client_frame(Opcode.CLOSE, b"\x03"),
    "close-bad-code": _limit(4096) + client_frame(Opcode.CLOSE, struct.pack("!H", 1005)),
}

if __name__ == "__main__":
    main(NAME, check, __file__, MAX_LEN, SEEDS)
