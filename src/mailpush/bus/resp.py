"""The Redis protocol (RESP2) for a subscribed connection, as plain bytes.

A connection in subscribed mode receives pushes: arrays such as
``["message", channel, payload]`` or ``["subscribe", channel, count]``, and
on a Redis Cluster's sharded pub/sub ``["smessage", channel, payload]``,
``["ssubscribe", channel, count]`` and ``["sunsubscribe", channel, count]``
(the last also unasked, when the channel's slot left that node).
:class:`PushParser` turns the bytes of one ``recv()`` into every complete
push in them at once, so that thousands of messages a second cost one read
and one parse loop, not an await each; ``message`` and ``smessage`` pushes,
nearly all of the stream, take a fast path.

The peer is not trusted: every length is checked against a bound before
anything is allocated or waited for, nesting is limited, every bulk string
must end in CRLF, and numbers are digits only. A violation raises
:class:`RespProtocolError`; the caller ends that connection and makes a new
one (the stream cannot be resynchronised). The parser never holds more than
:data:`MAX_REPLY` bytes of an incomplete reply.
"""

from __future__ import annotations

from ..errors import RespError, RespProtocolError
from ..items import MAX_PUBLISH_BYTES

__all__ = [
    "PushParser",
    "RespError",
    "RespProtocolError",
    "command",
    "MAX_BULK",
    "MAX_LINE",
    "MAX_ARRAY",
    "MAX_DEPTH",
    "MAX_REPLY",
]

_MESSAGE = b"*3\r\n$7\r\nmessage\r\n"
_MESSAGE_LEN = len(_MESSAGE)
_SMESSAGE = b"*3\r\n$8\r\nsmessage\r\n"  # sharded pub/sub (Redis Cluster)
_SMESSAGE_LEN = len(_SMESSAGE)
# A bulk string longer than this is a broken stream, not an event: no
# publish item can be longer than the largest publish body, and a channel
# name is far shorter. (Redis itself would allow 512 MB.)
MAX_BULK = MAX_PUBLISH_BYTES
# The longest line: a type byte and a length, or a simple string or error
# text. Redis's error replies are a few hundred bytes.
MAX_LINE = 64 * 1024
# Elements of one array: pushes have 3 (``pmessage`` 4); a command reply on
# this connection is never long.
MAX_ARRAY = 1024
# Arrays inside arrays: pushes are flat (depth 1); a little room, no more.
MAX_DEPTH = 4
# The largest reply held while incomplete: one bulk string at its bound
# plus the lines around it.
MAX_REPLY = MAX_BULK + MAX_LINE
# Digits of a length: MAX_BULK has 8; more is never valid.
_MAX_DIGITS = 12

_CRLF = b"\r\n"

Buf = bytes | bytearray  # what reads hand the parser


def command(*args: str | bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _length(buf: Buf, start: int, end: int, what: str, limit: int) -> int:
    """A bulk length or array count: digits, or -1 (null); at most ``limit``.

    ``int()`` alone would also take signs, spaces and underscores.
    """
    digits = buf[start:end]
    if digits.isdigit() and len(digits) <= _MAX_DIGITS:
        n = int(digits)
        if n > limit:
            raise RespProtocolError(f"{what} of {n} exceeds the limit of {limit}")
        return n
    if digits == b"-1":
        return -1
    raise RespProtocolError(f"bad {what}: {digits[:40]!r}")


def _integer(buf: Buf, start: int, end: int) -> int:
    digits = buf[start:end]
    body = digits[1:] if digits[:1] == b"-" else digits
    if not body.isdigit() or len(body) > 20:
        raise RespProtocolError(f"bad integer: {digits[:40]!r}")
    return int(digits)


def _line_end(buf: Buf, pos: int) -> int:
    """Where the line at ``pos`` ends (its CR), or -1 if not in ``buf`` yet."""
    end = buf.find(_CRLF, pos, pos + MAX_LINE)
    if end < 0 and len(buf) - pos >= MAX_LINE:
        raise RespProtocolError(f"a line longer than {MAX_LINE} bytes")
    return end


def _value(buf: Buf, pos: int, depth: int = 0) -> tuple[object, int]:
    """(value, next position) of the RESP value at ``pos``, or
    (_INCOMPLETE, index) when ``buf`` ends inside it: ``index`` is how far
    ``buf`` must reach before trying again (``pos + 1`` when unknown)."""
    end = _line_end(buf, pos)
    if end < 0:
        return _INCOMPLETE, len(buf) + 1
    kind = buf[pos]
    if kind == 36:  # $ bulk string
        n = _length(buf, pos + 1, end, "bulk string length", MAX_BULK)
        if n < 0:
            return None, end + 2
        stop = end + 2 + n
        if stop + 2 > len(buf):
            return _INCOMPLETE, stop + 2
        if buf[stop : stop + 2] != _CRLF:
            raise RespProtocolError("bulk string not followed by CRLF")
        return buf[end + 2 : stop], stop + 2
    if kind == 42:  # * array
        count = _length(buf, pos + 1, end, "array length", MAX_ARRAY)
        if count < 0:
            return None, end + 2
        if depth >= MAX_DEPTH:
            raise RespProtocolError(f"arrays nested more than {MAX_DEPTH} deep")
        at = end + 2
        items = []
        for _ in range(count):
            item, at = _value(buf, at, depth + 1)
            if item is _INCOMPLETE:
                return _INCOMPLETE, at
            items.append(item)
        return items, at
    if kind == 58:  # : integer
        return _integer(buf, pos + 1, end), end + 2
    if kind == 43:  # + simple string
        return buf[pos + 1 : end], end + 2
    if kind == 45:  # - error
        return RespError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
    raise RespProtocolError(f"unexpected byte {buf[pos : pos + 1]!r} at the start of a reply")


_INCOMPLETE = object()


class PushParser:
    """Feed it bytes; get back the complete replies in them.

    A ``message`` or ``smessage`` push comes back as the tuple ``(channel,
    payload)``;
    anything else as its value: a list for other pushes (``[b"subscribe",
    channel, count]``), bytes for a simple string, a :class:`RespError`.

    Resource handling: an incomplete reply is kept until the rest arrives;
    when its size is known (a long bulk string), later reads are only
    collected until it is complete instead of being joined and parsed
    again each time. Never more than :data:`MAX_REPLY` bytes are held.

    Raises:
      RespProtocolError: from :meth:`feed`, for anything that is not RESP2
        or breaks a bound; the parser is unusable afterwards.
    """

    __slots__ = ("_rest", "_chunks", "_have", "_need")

    def __init__(self) -> None:
        self._rest: Buf = b""
        self._chunks: list[Buf] = []  # reads collected until _need bytes are there
        self._have = 0
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete reply held now."""
        return self._have if self._chunks else len(self._rest)

    def feed(self, data: Buf) -> list:
        """Every reply completed by ``data``, in order.

        Raises:
          RespProtocolError: see the class docstring.
        """
        out: list = []
        try:
            return self._feed(data, out)
        except RespProtocolError as e:
            e.replies = out
            raise

    def _feed(self, data: Buf, out: list) -> list:
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf: Buf = b"".join(self._chunks)
            self._chunks = []
        else:
            buf = self._rest + data if self._rest else data
        pos, n = 0, len(buf)
        need = 0  # where buf must reach for the reply at pos, once incomplete
        find, startswith = buf.find, buf.startswith
        while pos < n:
            if startswith(_MESSAGE, pos) or startswith(_SMESSAGE, pos):
                # ["message" or "smessage", channel, payload]: two bulk strings
                at = pos + (_MESSAGE_LEN if buf[pos + 8] == 109 else _SMESSAGE_LEN)  # m(essage) / s(message)
                end = find(_CRLF, at, at + MAX_LINE)
                if end < 0:
                    need = n + 1
                    break
                if buf[at] != 36:
                    raise RespProtocolError("message push without a channel")
                cstart = end + 2
                cstop = cstart + _length(buf, at + 1, end, "bulk string length", MAX_BULK)
                if cstop < cstart:
                    raise RespProtocolError("message push with a null channel")
                if cstop + 3 > n:
                    need = cstop + 3
                    break
                if buf[cstop : cstop + 2] != _CRLF:
                    raise RespProtocolError("bulk string not followed by CRLF")
                if buf[cstop + 2] != 36:
                    raise RespProtocolError("message push without a payload")
                end = find(_CRLF, cstop + 3, cstop + 3 + MAX_LINE)
                if end < 0:
                    need = n + 1
                    break
                size = _length(buf, cstop + 3, end, "bulk string length", MAX_BULK)
                if size < 0:
                    raise RespProtocolError("message push with a null payload")
                pstart = end + 2
                pstop = pstart + size
                if pstop + 2 > n:
                    need = pstop + 2
                    break
                if buf[pstop : pstop + 2] != _CRLF:
                    raise RespProtocolError("bulk string not followed by CRLF")
                out.append((buf[cstart:cstop], buf[pstart:pstop]))
                pos = pstop + 2
                continue
            value, at = _value(buf, pos)
            if value is _INCOMPLETE:
                need = at
                break
            out.append(value)
            pos = at
        rest = buf[pos:] if pos < n else b""
        if need - pos > MAX_REPLY or len(rest) > MAX_REPLY:
            raise RespProtocolError(f"a reply larger than {MAX_REPLY} bytes")
        if need - pos > len(rest) + 1:
            # A long bulk string on its way: collect reads until it is all here.
            self._chunks, self._have, self._need, self._rest = [rest], len(rest), need - pos, b""
        else:
            self._rest = rest
        return out
