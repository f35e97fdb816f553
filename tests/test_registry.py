"""Registry: first/last reporting, many tabs of one subscriber, snapshots."""

from __future__ import annotations

from mailpush.registry import SMALL, Registry


class Tab:
    def __init__(self, subscriber: str) -> None:
        self.subscriber = subscriber
        self.expires = 0


def test_first_and_last_connection_of_a_subscriber():
    r = Registry()
    a, b = Tab("s"), Tab("s")
    assert r.add(a) is True and r.add(b) is False and r.add(a) is False
    assert r.get("s") == (a, b)
    assert r.remove(a) is False and r.remove(a) is False
    assert r.remove(b) is True and "s" not in r and len(r) == 0


def test_many_tabs_of_one_subscriber_stay_linear_and_ordered():
    r = Registry()
    tabs = [Tab("wall") for _ in range(20_000)]
    for t in tabs:
        r.add(t)
    # Past SMALL tabs a dict holds them: O(1) add/remove, not a tuple copy each.
    assert type(r._subs["wall"]) is dict
    snapshot = r.get("wall")
    for t in tabs[:-1]:
        assert r.remove(t) is False
    assert snapshot == tuple(tabs)  # a snapshot: later removals do not touch it
    assert r.get("wall") == (tabs[-1],)
    assert r.remove(tabs[-1]) is True


def test_shrinks_back_to_a_tuple():
    r = Registry()
    tabs = [Tab("x") for _ in range(SMALL + 4)]
    for t in tabs:
        r.add(t)
    for t in tabs[: -(SMALL // 2 - 1)]:
        r.remove(t)
    assert type(r._subs["x"]) is tuple and len(r.get("x")) == SMALL // 2 - 1
