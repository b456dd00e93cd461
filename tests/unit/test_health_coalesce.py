"""Coalescing a pool's writes: at most one per interval, every change written within an
interval, the first change after a quiet spell written at once."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from driver.health.coalesce import next_write, schedule

INTERVAL = 1.0

changes = st.lists(st.floats(min_value=0, max_value=60, allow_nan=False), max_size=60) \
    .map(sorted)
intervals = st.floats(min_value=0.01, max_value=10, allow_nan=False)


def test_a_burst_is_one_write_now_and_one_an_interval_later() -> None:
    assert schedule([10.0, 10.1, 10.2, 10.9], INTERVAL) == [10.0, 11.0]


def test_a_lone_change_is_written_at_once() -> None:
    assert schedule([5.0], INTERVAL) == [5.0]
    assert next_write(None, 5.0, INTERVAL) == 5.0
    assert next_write(3.0, 5.0, INTERVAL) == 5.0
    assert next_write(4.5, 5.0, INTERVAL) == 5.5


def test_no_change_no_write() -> None:
    assert schedule([], INTERVAL) == []


@given(changes, intervals)
def test_writes_are_at_least_an_interval_apart(times: list[float], interval: float) -> None:
    writes = schedule(times, interval)
    # (a + interval) - a may round below interval
    assert all(b - a >= interval - 1e-9 for a, b in pairwise(writes))


@given(changes, intervals)
def test_every_change_is_written_within_an_interval(times: list[float],
                                                    interval: float) -> None:
    writes = schedule(times, interval)
    for at in times:
        assert any(at <= w <= at + interval + 1e-9 for w in writes), at


@given(changes, intervals)
def test_the_last_state_is_written(times: list[float], interval: float) -> None:
    writes = schedule(times, interval)
    assert (writes[-1] >= times[-1]) if times else writes == []


@given(changes, intervals)
def test_a_change_after_a_quiet_interval_is_written_at_once(times: list[float],
                                                            interval: float) -> None:
    writes = schedule(times, interval)
    for at in times:
        earlier = [w for w in writes if w < at]
        pending = [t for t in times if t < at and not any(t <= w < at for w in writes)]
        if not pending and (not earlier or at - earlier[-1] >= interval):
            assert at in writes


@given(changes, intervals)
def test_never_more_writes_than_changes(times: list[float], interval: float) -> None:
    assert len(schedule(times, interval)) <= len(times)
