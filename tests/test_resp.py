"""The RESP2 push parser of the Redis subscription connection."""

import pytest
from hypothesis import given, strategies as st

from mailpush.bus.resp import PushParser, RespError, RespProtocolError, command


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


@pytest.mark.parametrize("junk", [b"?what\r\n", b"$abc\r\n", b"*3\r\n$7\r\nmessage\r\n:1\r\n", b"$99999999999\r\n"])
def test_a_broken_stream_is_an_error_not_a_guess(junk):
    with pytest.raises(RespProtocolError):
        PushParser().feed(junk)


def test_command_encoding():
    assert command(b"SUBSCRIBE", "mailpush:é") == b"*2\r\n$9\r\nSUBSCRIBE\r\n$11\r\nmailpush:\xc3\xa9\r\n"
