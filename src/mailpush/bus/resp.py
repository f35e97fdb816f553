"""The Redis protocol (RESP2) for a subscribed connection, as plain bytes.

A connection in subscribed mode receives pushes: arrays such as
``["message", channel, payload]`` or ``["subscribe", channel, count]``.
:class:`PushParser` turns the bytes of one ``recv()`` into every complete
push in them at once, so that thousands of messages a second cost one read
and one parse loop, not an await each; ``message`` pushes, nearly all of
the stream, take a fast path.
"""

from __future__ import annotations

__all__ = ["PushParser", "RespError", "RespProtocolError", "command"]

_MESSAGE = b"*3\r\n$7\r\nmessage\r\n"
_MESSAGE_LEN = len(_MESSAGE)
_INCOMPLETE = object()
# A push larger than this (one bulk string's declared length) is a broken
# stream, not an event: publish items are capped far below by the admin API.
MAX_BULK = 64 * 1024 * 1024


class RespError(Exception):
    """An error reply from Redis (``-ERR …``)."""


class RespProtocolError(Exception):
    """Bytes that are not RESP2: the connection cannot be trusted further."""


def command(*args: str | bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _int(buf: bytes, start: int, end: int) -> int:
    try:
        return int(buf[start:end])
    except ValueError:
        raise RespProtocolError(f"not a number: {buf[start:end][:40]!r}") from None


def _value(buf: bytes, pos: int):
    """(value, next position) of the RESP value at ``pos``, or
    (_INCOMPLETE, pos) when ``buf`` ends inside it."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return _INCOMPLETE, pos
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = _int(buf, pos + 1, end)
        if n < 0:
            return None, end + 2
        if n > MAX_BULK:
            raise RespProtocolError(f"bulk string of {n} bytes")
        stop = end + 2 + n
        if stop + 2 > len(buf):
            return _INCOMPLETE, pos
        return buf[end + 2 : stop], stop + 2
    if kind == 42:  # * array
        count = _int(buf, pos + 1, end)
        at = end + 2
        items = []
        for _ in range(max(count, 0)):
            item, at = _value(buf, at)
            if item is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(item)
        return (items if count >= 0 else None), at
    if kind == 58:  # : integer
        return _int(buf, pos + 1, end), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # - error
        return RespError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise RespProtocolError(f"unexpected byte {buf[pos:pos + 1]!r} at the start of a reply")


class PushParser:
    """Feed it bytes; get back the complete replies in them.

    A ``message`` push comes back as the tuple ``(channel, payload)``;
    anything else as its value: a list for other pushes (``[b"subscribe",
    channel, count]``), bytes for a simple string, a :class:`RespError`.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> list:
        buf = self._rest + data if self._rest else data
        out = []
        pos, n = 0, len(buf)
        find, startswith = buf.find, buf.startswith
        while pos < n:
            if startswith(_MESSAGE, pos):
                # ["message", channel, payload]: two bulk strings
                at = pos + _MESSAGE_LEN
                end = find(b"\r\n", at)
                if end < 0:
                    break
                if buf[at] != 36:
                    raise RespProtocolError("message push without a channel")
                cstart = end + 2
                cstop = cstart + _int(buf, at + 1, end)
                end = find(b"\r\n", cstop + 2)
                if end < 0:
                    break
                if buf[cstop + 2] != 36:
                    raise RespProtocolError("message push without a payload")
                size = _int(buf, cstop + 3, end)
                if size > MAX_BULK:
                    raise RespProtocolError(f"bulk string of {size} bytes")
                pstart = end + 2
                pstop = pstart + size
                if pstop + 2 > n:
                    break
                out.append((buf[cstart:cstop], buf[pstart:pstop]))
                pos = pstop + 2
                continue
            value, at = _value(buf, pos)
            if value is _INCOMPLETE:
                break
            out.append(value)
            pos = at
        self._rest = buf[pos:]
        return out
