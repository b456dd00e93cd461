"""When a resync leaves the pool to another publisher (the other plugin pod of a rolling
update whose version builds other slices) and when it restores its own."""

from __future__ import annotations

import copy

import pytest

from driver.resourceslice.plan import Stance, overtaken, plan, stance
from tests.support.slices import desired, stored

OURS = desired(200)  # two slices
THEIRS = desired(200, numa_node=1)  # another version's content for the same devices


def test_a_newer_generation_with_other_content_is_another_publisher() -> None:
    existing = stored(THEIRS, 4)
    assert overtaken(existing, plan(existing, OURS), last_generation=3)


def test_a_pool_half_way_through_the_other_publishers_write_is_overtaken_too() -> None:
    existing = stored(OURS, 3)
    existing[0] = stored(THEIRS, 4)[0]
    assert overtaken(existing, plan(existing, OURS), last_generation=3)


def test_deletions_and_edits_that_keep_the_generation_are_restored_as_ever() -> None:
    deleted = stored(OURS, 3)[:1]
    assert not overtaken(deleted, plan(deleted, OURS), last_generation=3)
    edited = stored(OURS, 3)
    edited[1]["spec"]["devices"].pop()
    assert not overtaken(edited, plan(edited, OURS), last_generation=3)
    assert not overtaken([], plan([], OURS), last_generation=3)  # the pool deleted


def test_our_content_in_a_newer_generation_needs_nothing() -> None:
    existing = stored(OURS, 5)
    assert not overtaken(existing, plan(existing, OURS), last_generation=3)


def test_before_our_first_write_there_is_nothing_to_yield() -> None:
    """A new pod's first publish finds the old version's slices: it writes its own."""
    existing = stored(THEIRS, 4)
    assert not overtaken(existing, plan(existing, OURS), last_generation=0)


def test_overtaken_leaves_its_inputs_alone() -> None:
    existing = stored(THEIRS, 4)
    before = copy.deepcopy(existing)
    overtaken(existing, plan(existing, OURS), last_generation=3)
    assert existing == before


@pytest.mark.parametrize(("over", "alive", "yielding", "alone_for", "want"), [
    (False, True, False, 0.0, "write"),  # a deletion or an edit: restored at once
    (False, False, True, 0.0, "write"),
    (True, True, False, 0.0, "yield"),  # the other pod runs: its slices stand
    (True, True, True, 60.0, "yield"),
    (True, False, False, 0.0, "wait"),  # a new pod publishes before its sockets open
    (True, False, False, 9.9, "wait"),
    (True, False, False, 10.0, "write"),  # no pod came: whoever wrote was no plugin pod
    (True, False, True, 0.0, "write"),  # the pod we yielded to is gone: ours again
])
def test_stance(over: bool, alive: bool, yielding: bool, alone_for: float,
                want: Stance) -> None:
    assert stance(over, alive, yielding, alone_for, grace=10.0) == want
