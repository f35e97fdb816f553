"""RFC 6455 frame codec: plain bytes in, plain bytes out, no I/O and no Trio.

The decoder reads frames straight out of whatever buffer the caller hands it
(the connection's pooled read buffer) and copies out only payloads, which
have to be copied anyway to unmask them. The encoder builds server frames
(never masked, RFC 6455 §5.1); an event's frame is built once and the same
``bytes`` object is written to every recipient.

Error handling: every violation by the peer raises :class:`ProtocolError`
carrying the close code to answer with (§7.4.1) and a one-line reason.
"""

from __future__ import annotations

import codecs
import struct
from enum import IntEnum

from .errors import ProtocolError

__all__ = [
    "Opcode",
    "CloseCode",
    "Decoder",
    "encode_frame",
    "encode_text",
    "encode_close",
    "parse_close",
    "apply_mask",
    "PING_FRAME",
    "CLOSE_NORMAL_FRAME",
]


class Opcode(IntEnum):
    """Frame opcodes, RFC 6455 §5.2 and §11.8."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """Close codes, RFC 6455 §7.4.1 and the IANA registry (1012–1014)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent on the wire (§7.4.1)
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    # mailpush's own (the 4000–4999 range is the application's, §7.4.2).
    TOKEN_EXPIRED = 4001  # the token expired and was not refreshed in time
    UNAUTHORIZED = 4003  # the token was refused (mailpush.v1 clients only)
    TOO_MANY_CONNECTIONS = 4008  # the subscriber is at --max-connections-per-subscriber


# Codes a peer may legitimately put in a Close frame (§7.4.1, §7.4.2): the
# registered ones below 3000 that are not reserved for local use, and the
# whole 3000–4999 range for libraries and applications.
_VALID_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))

# Control frames carry at most 125 bytes of payload (§5.5).
MAX_CONTROL_PAYLOAD = 125

_DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY)
_CONTROL_OPCODES = (Opcode.CLOSE, Opcode.PING, Opcode.PONG)
_KNOWN_OPCODES = frozenset(int(op) for op in Opcode)

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_H_EXT16 = struct.Struct("!BBH")
_H_EXT64 = struct.Struct("!BBQ")

_utf8_incremental = codecs.getincrementaldecoder("utf-8")


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray | memoryview) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (§5.3).

    One big-integer XOR instead of a Python loop over bytes: linear, and a
    few hundred nanoseconds for the small packets browsers send here.
    """
    n = len(data)
    if n == 0:
        return b""
    key = bytes(mask) * (n // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(key[:n], "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """Build one unmasked server frame (§5.2)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return _H_EXT16.pack(b0, 126, n) + payload
    return _H_EXT64.pack(b0, 127, n) + payload


# The two header bytes of every short unfragmented text frame, built once:
# the event path adds one to each event instead of building a tuple.
_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]


def encode_text(payload: bytes) -> bytes:
    """A complete text frame around already UTF-8 encoded ``payload``."""
    n = len(payload)
    if n < 126:
        return _TEXT_HEADERS[n] + payload
    if n < 65536:
        return _H_EXT16.pack(0x81, 126, n) + payload
    return _H_EXT64.pack(0x81, 127, n) + payload


def encode_close(code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
    """A Close frame; the reason is cut so the payload fits a control frame."""
    if code == CloseCode.NO_STATUS:
        return encode_frame(Opcode.CLOSE, b"")
    body = _U16.pack(code) + reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]
    # Cutting may split a multi-byte character: drop the incomplete tail.
    body = body[:2] + body[2:].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(Opcode.CLOSE, body)


def parse_close(payload: bytes) -> tuple[int, str]:
    """Validate a Close payload from the peer (§5.5.1, §7.4).

    Returns ``(code, reason)``; an empty payload means "no status" (1005).
    """
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame payload of 1 byte")
    (code,) = _U16.unpack_from(payload)
    if not (code in _VALID_CLOSE_CODES or 3000 <= code <= 4999):
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CloseCode.INVALID_DATA, "close reason is not valid UTF-8") from None
    return code, reason


# Frames the server sends over and over are built once.
PING_FRAME = encode_frame(Opcode.PING, b"")
CLOSE_NORMAL_FRAME = encode_close(CloseCode.NORMAL)


class Decoder:
    """Turns client bytes into ``(opcode, payload)`` messages.

    Data messages come out whole (fragments joined, text checked as UTF-8)
    as ``(Opcode.TEXT | Opcode.BINARY, bytes)``; control frames come out as
    they arrive, interleaved, as ``(Opcode.PING | PONG | CLOSE, bytes)``.

    A connection holds a Decoder only while a frame or a fragmented message
    is incomplete; :attr:`idle` says when it can be dropped again, so an idle
    connection holds none.

    Args:
      max_message_size: the largest message (payload bytes, all fragments
        together) accepted; a frame header announcing more fails with 1009
        before any of its payload is buffered.
    """

    __slots__ = ("max_message_size", "_rest", "_frag_opcode", "_frag_parts", "_frag_size", "_utf8")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._rest = bytearray()  # bytes of an incomplete frame, kept between reads
        self._frag_opcode = 0  # opcode of the fragmented message in progress, 0 if none
        self._frag_parts: list[bytes] = []
        self._frag_size = 0
        self._utf8: codecs.IncrementalDecoder | None = None  # for a fragmented text message

    @property
    def idle(self) -> bool:
        """True when no partial frame or message is held."""
        return not self._rest and not self._frag_opcode

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        """Parse every complete frame in what was received so far.

        Raises:
          ProtocolError: the peer broke RFC 6455; its ``code`` is the close
            code to answer with, and its ``messages`` the messages that were
            complete before the violation (to be handled first). The decoder
            is unusable afterwards.
        """
        out: list[tuple[int, bytes]] = []
        try:
            return self._feed(data, out)
        except ProtocolError as e:
            e.messages = out
            raise

    def _feed(self, data: bytes | bytearray | memoryview, out: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        rest = self._rest
        if rest:
            # Append to what was kept: a message arriving in many reads is
            # copied once, not once per read.
            rest += data
            data = rest
        end = len(data)
        pos = 0
        max_size = self.max_message_size
        while True:
            if end - pos < 2:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            fin = b0 & 0x80
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set without a negotiated extension")
            if not b1 & 0x80:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
            length = b1 & 0x7F
            head = 2
            if opcode >= 0x8:
                if opcode not in _KNOWN_OPCODES:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
                if not fin:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "control frame payload over 125 bytes")
            else:
                if opcode not in _KNOWN_OPCODES:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
                if opcode == Opcode.CONTINUATION:
                    if not self._frag_opcode:
                        raise ProtocolError(
                            CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue"
                        )
                elif self._frag_opcode:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new data frame inside a fragmented message")
                if length == 126:
                    if end - pos < 4:
                        break
                    (length,) = _U16.unpack_from(data, pos + 2)
                    head = 4
                elif length == 127:
                    if end - pos < 10:
                        break
                    (length,) = _U64.unpack_from(data, pos + 2)
                    if length >> 63:
                        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "payload length with the top bit set")
                    head = 10
                if length + self._frag_size > max_size:
                    raise ProtocolError(
                        CloseCode.MESSAGE_TOO_BIG,
                        f"message over the {max_size}-byte limit",
                    )
            start = pos + head + 4
            stop = start + length
            if stop > end:
                break
            payload = apply_mask(data[start:stop], data[start - 4 : start])
            pos = stop
            if opcode >= 0x8:
                out.append((opcode, payload))
                continue
            if opcode and fin:
                # The common case: a whole message in one frame.
                if opcode == Opcode.TEXT:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ProtocolError(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None
                out.append((opcode, payload))
                continue
            self._fragment(opcode, fin, payload, out)
        if data is self._rest:
            del data[:pos]  # keep the tail in place
        elif pos < end:
            self._rest = bytearray(data[pos:end])
        return out

    def _fragment(self, opcode: int, fin: int, payload: bytes, out: list[tuple[int, bytes]]) -> None:
        if opcode:  # first fragment
            self._frag_opcode = opcode
            self._frag_parts = []
            self._frag_size = 0
            self._utf8 = _utf8_incremental() if opcode == Opcode.TEXT else None
        if self._utf8 is not None:
            try:
                # Checked fragment by fragment so a bad byte fails fast,
                # even when the message is never finished.
                self._utf8.decode(payload, final=bool(fin))
            except UnicodeDecodeError:
                raise ProtocolError(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None
        self._frag_parts.append(payload)
        self._frag_size += len(payload)
        if fin:
            out.append((self._frag_opcode, b"".join(self._frag_parts)))
            self._frag_opcode = 0
            self._frag_parts = []
            self._frag_size = 0
            self._utf8 = None
