"""The in-memory history (mailpush.history): offsets, retention by size,
age and total, what a read can and cannot recover, and the memory spent."""

from __future__ import annotations

import sys

from hypothesis import given, settings, strategies as st

from mailpush.history import DROPPED_MEMORY, History, record
from mailpush.packets import event_frame


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publish(h: History, sub: str, n: int, state=None) -> list[int]:
    return [e[3] for e in record(h, [(sub, "new_letter", {"i": i}, state) for i in range(n)])]


def offsets(replay) -> list[int] | None:
    return None if replay.events is None else [e[0] for e in replay.events]


def test_offsets_increase_for_everyone_and_reads_recover_what_came_after():
    h = History(10, 60, 1000)
    a = publish(h, "a", 3)
    b = publish(h, "b", 2)
    assert a == [1, 2, 3] and b == [4, 5] and h.top == 5
    r = h.read("a", h.epoch, 1)
    assert offsets(r) == [2, 3] and (r.position.epoch, r.position.offset) == (h.epoch, 5)
    assert offsets(h.read("b", h.epoch, 0)) == [4, 5]
    assert offsets(h.read("c", h.epoch, 0)) == []  # never had an event: nothing missed
    assert offsets(h.read("a", h.epoch, 5)) == []  # up to date


def test_what_a_read_cannot_recover_says_why():
    h = History(3, 60, 1000)
    publish(h, "a", 5)  # offsets 1..5, 3 kept
    assert h.read("a", h.epoch, 1).reason == "history_gap"  # 2 was trimmed
    assert offsets(h.read("a", h.epoch, 2)) == [3, 4, 5]
    assert h.read("a", "another-epoch", 2).reason == "epoch_changed"
    assert h.read("a", h.epoch, 99).reason == "bad_offset"
    assert offsets(h.read("a", None, None)) == []  # the position alone


def test_the_latest_state_is_kept_and_given_with_the_position():
    h = History(3, 60, 1000)
    publish(h, "a", 1, state=b'"s1"')
    publish(h, "a", 1)  # no state: the last one stands
    assert h.position("a").state == b'"s1"' and h.position("b").state is None


def test_events_expire_after_the_ttl_and_the_gap_is_remembered():
    clock = Clock()
    h = History(10, 60, 1000, clock=clock)
    publish(h, "a", 2)
    clock.now += 61
    publish(h, "b", 1)  # the next write sweeps what expired
    assert len(h) == 1 and h.events == 1
    assert h.read("a", h.epoch, 0).reason == "history_gap"  # its events are gone
    assert offsets(h.read("a", h.epoch, 2)) == []  # it had seen them: nothing missed
    publish(h, "a", 1)  # a new stream for a, still knowing what was lost
    assert h.read("a", h.epoch, 1).reason == "history_gap"
    assert offsets(h.read("a", h.epoch, 2)) == [4]


def test_an_expired_event_not_yet_swept_is_not_replayed():
    clock = Clock()
    h = History(10, 60, 1000, clock=clock)
    publish(h, "a", 1)
    clock.now += 30
    publish(h, "a", 1)
    clock.now += 40  # the first is 70 s old, the second 40 s
    assert h.read("a", h.epoch, 0).reason == "history_gap"
    assert offsets(h.read("a", h.epoch, 1)) == [2]


def test_the_total_bound_evicts_the_least_recently_published():
    h = History(10, 600, 5)
    publish(h, "old", 3)
    publish(h, "new", 3)
    assert h.events <= 5 and len(h) == 1
    assert h.read("old", h.epoch, 0).reason == "history_gap"
    assert offsets(h.read("new", h.epoch, 3)) == [4, 5, 6]


def test_forgotten_streams_fold_into_one_floor():
    h = History(1, 600, 1)
    for i in range(DROPPED_MEMORY + 2):
        publish(h, f"s{i}", 1)  # each evicts the one before
    # s0's drop fell out of the bounded memory: only the floor stands for it.
    assert h.read("s0", h.epoch, 0).reason == "history_gap"
    assert offsets(h.read("s0", h.epoch, h._floor)) == []


def test_no_history_gives_offsets_and_resyncs():
    h = History(0, 600, 1000)
    publish(h, "a", 2)
    assert h.events == 0 and len(h) == 0 and h.top == 2
    assert h.read("a", h.epoch, 1).reason == "history_off"
    assert offsets(h.read("a", h.epoch, 2)) == []  # nothing since, even without history


def test_a_subscriber_without_events_costs_nothing():
    h = History(10, 600, 1000)
    before = sys.getsizeof(h._streams)
    for i in range(1000):
        h.position(f"idle{i}")
        h.read(f"idle{i}", h.epoch, 0)
    assert len(h) == 0 and sys.getsizeof(h._streams) == before


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(0, 4),
    batches=st.lists(
        st.lists(st.tuples(st.sampled_from("abcde"), st.one_of(st.none(), st.integers(0, 9))), max_size=12), max_size=8
    ),
)
def test_a_batch_recorded_at_once_is_the_same_as_one_append_at_a_time(size, batches):
    """record() inlines History.append for speed: the streams, offsets,
    frames, states and reads must be what appending one by one gives."""
    clock = Clock()
    fast, slow = History(size, 60, 10_000, clock), History(size, 60, 10_000, clock)
    slow.epoch = fast.epoch
    for k, batch in enumerate(batches):
        clock.now += 1
        items = [(sub, f"e{k}", {"k": k}, state) for sub, state in batch]
        got = record(fast, items)
        want = []
        for sub, event, data, state in items:
            offset = slow.next_offset()
            frame = event_frame(sub, event, data, offset)
            slow.append(sub, offset, event, frame, state, clock.now)
            want.append((sub, event, data, offset, slow.epoch, frame))
        slow.expire(clock.now)
        assert got == want
        assert (fast.top, fast.events, len(fast)) == (slow.top, slow.events, len(slow))
        for sub in "abcde":
            for since in range(fast.top + 1):
                a, b = fast.read(sub, fast.epoch, since), slow.read(sub, slow.epoch, since)
                assert (a.events, a.reason, a.position.state) == (b.events, b.reason, b.position.state)
