"""server/sequencer.py, the one ordering rule (used by the Hub's feeds and the sessions'
cursors): pure, so every case runs in microseconds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.sequencer import Sequencer


def test_in_order_pushes_go_straight_through_and_duplicates_are_dropped():
    order: Sequencer[str] = Sequencer(3)
    assert order.offer(4, "m4") == [(4, "m4")]
    assert order.offer(4, "m4") == [] and order.offer(2, "m2") == []
    assert order.gap() is None


def test_a_jump_is_held_and_names_the_gap_to_read():
    order: Sequencer[str] = Sequencer(1)
    assert order.offer(4, "m4") == []
    assert order.gap() == (1, 4)
    # The read found 2 and 3: all three go out, in order.
    assert order.fill([(2, "db2"), (3, "db3"), (4, "db4")], 4) == [
        (2, "db2"), (3, "db3"), (4, "m4")]
    assert order.gap() is None and order.delivered == 4


def test_purged_seqs_are_skipped_not_waited_for():
    order: Sequencer[str] = Sequencer(0)
    order.offer(6, "m6")
    # 1-3 were purged by retention: the read finds 4 and 5 only.
    assert order.fill([(4, "m4"), (5, "m5")], 6) == [(4, "m4"), (5, "m5"), (6, "m6")]
    order.expect(9)  # a reconcile: 7-9 exist, or existed
    assert order.fill([], 9) == [] and order.delivered == 9


def test_a_seq_known_during_the_read_is_not_taken_for_purged():
    order: Sequencer[str] = Sequencer(0)
    order.offer(2, "m2")
    after, upto = order.gap()  # type: ignore[misc]
    order.offer(4, "m4")  # arrives while 1..2 are read
    assert order.fill([(1, "m1")], upto) == [(1, "m1"), (2, "m2")]
    assert order.gap() == (2, 4)  # 3 is still to be read, not skipped


def test_nothing_goes_out_before_the_edge_is_read():
    order: Sequencer[str] = Sequencer(started=False)
    assert order.offer(5, "m5") == [] and order.offer(6, "m6") == []
    assert order.gap() is None
    assert order.start(4) == [(5, "m5"), (6, "m6")]


def test_held_frames_are_bounded():
    order: Sequencer[int] = Sequencer(0, max_held=2)
    for seq in (3, 4, 5):
        order.offer(seq, seq)
    assert sorted(order.held) == [3, 4] and order.gap() == (0, 5)
    assert order.fill([(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], 5)[-1] == (5, 5)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.data())
def test_any_arrival_order_with_purges_pushes_each_remaining_seq_once_in_order(n, data):
    purged = data.draw(st.integers(0, n // 2))  # retention removed 1..purged
    arrivals = data.draw(st.lists(st.integers(1, n), max_size=3 * n))
    order: Sequencer[int] = Sequencer(0, max_held=data.draw(st.sampled_from([None, 4])))
    out: list[int] = []
    for seq in arrivals:
        out += [s for s, _ in order.offer(seq, seq)]
        if data.draw(st.booleans()) and (gap := order.gap()) is not None:
            after, upto = gap
            rows = [(s, s) for s in range(max(after, purged) + 1, upto + 1)]
            out += [s for s, _ in order.fill(rows, upto)]
    order.expect(n)
    while (gap := order.gap()) is not None:
        after, upto = gap
        out += [s for s, _ in order.fill(
            [(s, s) for s in range(max(after, purged) + 1, upto + 1)], upto)]
    assert out == sorted(set(out))  # ascending, no repeat
    # Every seq that still exists and was not already past went out.
    assert set(range(purged + 1, n + 1)) <= set(out) | set(range(1, min(out or [n + 1])))
    assert order.delivered == n
