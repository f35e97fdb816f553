"""The RESP2 push parser of the Redis subscription connection."""

import pytest
from hypothesis import given, strategies as st

from mailpush.bus.resp import MAX_BULK, MAX_DEPTH, MAX_LINE, MAX_REPLY, PushParser, RespError, RespProtocolError, command


def message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(payload), payload)


STREAM = (
    b"*3\r\n$9\r\nsubscribe\r\n$10\r\nmailpush:a\r\n:1\r\n"
    + message(b"mailpush:a", b'{"subscriber":"a","event":"x"}')
    + message(b"mailpush:b", b"with\r\ninside")  # CRLF inside a payload
    + message(b"mailpush:c", b"")
    + b"-ERR unknown command\r\n"
    + b"*3\r\n$11\r\nunsubscribe\r\n$10\r\nmailpush:a\r\n:0\r\n"
    + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
)


def check(replies):
    assert replies[0] == [b"subscribe", b"mailpush:a", 1]
    assert replies[1] == (b"mailpush:a", b'{"subscriber":"a","event":"x"}')
    assert replies[2] == (b"mailpush:b", b"with\r\ninside")
    assert replies[3] == (b"mailpush:c", b"")
    assert isinstance(replies[4], RespError) and str(replies[4]) == "ERR unknown command"
    assert replies[5] == [b"unsubscribe", b"mailpush:a", 0]
    assert replies[6] == [b"pong", b""]
    assert len(replies) == 7


def test_a_whole_stream_in_one_read():
    check(PushParser().feed(STREAM))


def test_byte_by_byte():
    parser = PushParser()
    replies = []
    for i in range(len(STREAM)):
        replies += parser.feed(STREAM[i : i + 1])
    check(replies)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_gives_the_same_replies(cuts):
    parser = PushParser()
    replies = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for a, b in zip(bounds, bounds[1:]):
        replies += parser.feed(STREAM[a:b])
    check(replies)


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_any_channel_and_payload_round_trip(channel, payload):
    assert PushParser().feed(message(channel, payload)) == [(channel, payload)]


def test_simple_strings_integers_and_null_bulk():
    assert PushParser().feed(b"+OK\r\n:42\r\n$-1\r\n*-1\r\n") == [b"OK", 42, None, None]


@pytest.mark.parametrize(
    "junk",
    [
        b"?what\r\n",
        b"$abc\r\n",
        b"*3\r\n$7\r\nmessage\r\n:1\r\n",
        b"$99999999999\r\n",
        # Regression: -42 sent the fast path back to the start of this push,
        # forever, appending to its output (100% CPU, ~1 GB in seconds).
        b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$-42\r\n" + b"x" * 64,
        b"*3\r\n$7\r\nmessage\r\n$-3\r\n",
        b"$-5\r\n",
        b"*-3\r\n",
        b"$ 3\r\nabc\r\n",  # int() would take the space
        b"$1_0\r\n0123456789\r\n",  # and the underscore
        b":+1\r\n",
        b"$3\r\nabcXY",  # a bulk string must end in CRLF
        b"*3\r\n$7\r\nmessage\r\n$1\r\naXY$1\r\nb\r\n",
        b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nbXY",
        # Regression: nesting was recursion without a bound (RecursionError).
        b"*1\r\n" * 5000,
        # Regression: a length under the old 64 MiB bound waited for ever.
        b"*3\r\n$7\r\nmessage\r\n$10\r\nmailpush:a\r\n$60000000\r\n",
        b"+" + b"a" * (MAX_LINE + 1),  # a line that never ends
    ],
)
def test_a_broken_stream_is_an_error_not_a_guess(junk):
    with pytest.raises(RespProtocolError):
        PushParser().feed(junk)


def test_command_encoding():
    assert command(b"SUBSCRIBE", "mailpush:é") == b"*2\r\n$9\r\nSUBSCRIBE\r\n$11\r\nmailpush:\xc3\xa9\r\n"


def test_the_bounds():
    PushParser().feed(b"*1\r\n" * MAX_DEPTH + b":1\r\n")  # at the limit: fine
    with pytest.raises(RespProtocolError, match="nested"):
        PushParser().feed(b"*1\r\n" * (MAX_DEPTH + 1) + b":1\r\n")
    parser = PushParser()
    assert parser.feed(b"$%d\r\n" % MAX_BULK) == []  # the largest bulk string may come
    with pytest.raises(RespProtocolError, match="exceeds"):
        PushParser().feed(b"$%d\r\n" % (MAX_BULK + 1))


def test_an_endless_line_fails_however_it_arrives():
    parser = PushParser()
    with pytest.raises(RespProtocolError, match="longer than"):
        for _ in range(MAX_LINE // 1000 + 2):
            parser.feed(b"a" * 1000 if parser.buffered else b"+" + b"a" * 999)
    assert MAX_LINE < MAX_REPLY


def test_replies_before_a_fault_are_kept_for_the_caller():
    with pytest.raises(RespProtocolError) as e:
        PushParser().feed(message(b"mailpush:a", b"one") + b":1\r\n?junk\r\n")
    assert e.value.replies == [(b"mailpush:a", b"one"), 1]


def test_a_long_payload_is_collected_not_reparsed_and_stays_bounded():
    payload = b"p" * 1_000_000
    stream = message(b"mailpush:a", payload) + b"+OK\r\n"
    parser, out = PushParser(), []
    for i in range(0, len(stream), 4096):
        out += parser.feed(stream[i : i + 4096])
        assert parser.buffered <= len(stream)
    assert out == [(b"mailpush:a", payload), b"OK"] and parser.buffered == 0
