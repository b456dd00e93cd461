"""The publisher's pure decisions: what to write, which generation, which API server
layout, which watch events are someone else's, and how long to back off."""

from __future__ import annotations

import copy
import random
from itertools import islice
from typing import Any

import pytest

from driver.resourceslice.errors import PublishError
from driver.resourceslice.plan import (
    Backoff,
    content,
    counter_layout_for,
    dropped_fields,
    foreign_change,
    plan,
    stamped,
)
from tests.support.slices import desired, stored


def names(objs: tuple[dict[str, Any], ...]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]


def test_first_publish_creates_every_slice_in_generation_1() -> None:
    want = desired(200)
    todo = plan([], want)
    assert len(want) == 2
    assert names(todo.create) == names(tuple(want))
    assert todo.update == () and todo.delete == ()
    assert todo.generation == 1
    assert {s["spec"]["pool"]["generation"] for s in todo.create} == {1}


def test_unchanged_pool_needs_no_write_and_keeps_its_generation() -> None:
    todo = plan(stored(desired(200), 7), desired(200))
    assert todo.writes == 0
    assert todo.generation == 7


def test_what_the_server_adds_is_not_a_change() -> None:
    want = desired(3, health_error="nvmlDeviceGetMemoryInfo: Unknown")  # tainted
    existing = stored(want, 2)
    for device in existing[0]["spec"]["devices"]:
        device["taints"][0]["timeAdded"] = "2026-11-26T00:00:01Z"
    assert plan(existing, want).writes == 0


def test_a_content_change_moves_every_slice_to_the_next_generation_in_place() -> None:
    existing = stored(desired(200), 4)
    want = desired(200, numa_node=1)
    todo = plan(existing, want)
    assert todo.generation == 5
    assert todo.create == () and todo.delete == ()
    assert names(todo.update) == names(tuple(existing))
    assert [o["metadata"]["resourceVersion"] for o in todo.update] == ["100", "101"]
    assert [content(o) for o in todo.update] == [content(s) for s in want]
    assert {o["spec"]["pool"]["generation"] for o in todo.update} == {5}


def test_a_pool_that_shrinks_deletes_the_obsolete_slice_with_its_preconditions() -> None:
    existing = stored(desired(200), 1)
    todo = plan(existing, desired(3))
    assert names(todo.delete) == [existing[1]["metadata"]["name"]]
    assert todo.delete[0]["metadata"]["uid"] == "uid-1"
    assert todo.delete[0]["metadata"]["resourceVersion"] == "101"
    assert names(todo.update) == [existing[0]["metadata"]["name"]]
    assert todo.update[0]["spec"]["pool"] == {"name": "node-a", "generation": 2,
                                              "resourceSliceCount": 1}


def test_a_pool_that_grows_creates_the_new_slice() -> None:
    todo = plan(stored(desired(3), 1), desired(200))
    assert len(todo.update) == 1 and len(todo.create) == 1 and todo.delete == ()
    assert todo.generation == 2


def test_a_deleted_or_edited_slice_is_restored_in_a_new_generation() -> None:
    want = desired(200)
    missing = stored(want, 3)[:1]
    todo = plan(missing, want)
    assert (len(todo.update), len(todo.create), todo.generation) == (1, 1, 4)

    edited = stored(want, 3)
    edited[1]["spec"]["devices"].pop()
    todo = plan(edited, want)
    assert (len(todo.update), todo.generation) == (2, 4)
    assert [content(o) for o in todo.update] == [content(s) for s in want]


def test_a_half_finished_publish_is_finished_in_one_generation() -> None:
    want = desired(200)
    mixed = stored(want, 5)
    mixed[1]["spec"]["pool"]["generation"] = 4  # the crash came before this update
    todo = plan(mixed, want)
    assert todo.generation == 6
    assert len(todo.update) == 2


def test_a_slice_of_ours_with_a_foreign_name_is_deleted() -> None:
    want = desired(3)
    stranger = stamped(want[0], 1)
    stranger["metadata"].update(name="node-a-gpu.dra.dev-abcde", uid="x", resourceVersion="9")
    todo = plan([*stored(want, 1), stranger], want)
    assert names(todo.delete) == ["node-a-gpu.dra.dev-abcde"]
    assert todo.generation == 2


def test_a_lost_owner_reference_is_a_change() -> None:
    want = desired(3)
    orphan = stored(want, 1)
    del orphan[0]["metadata"]["ownerReferences"]
    assert plan(orphan, want).writes == 1


def test_plan_leaves_its_inputs_alone() -> None:
    want, existing = desired(200), stored(desired(200, numa_node=1), 2)
    before = copy.deepcopy((want, existing))
    plan(existing, want)
    assert (want, existing) == before


def test_duplicate_desired_names_are_refused() -> None:
    want = desired(3)
    with pytest.raises(ValueError, match=r"metadata\.name"):
        plan([], [want[0], copy.deepcopy(want[0])])


@pytest.mark.parametrize(("version", "layout"), [
    ("v1.34.0", "combined"), ("v1.34.7-gke.100", "combined"), ("v1.35.0", "split"),
    ("v1.37.2", "split"), ("v1.40.0-alpha.1", "split"), ("v2.0.0", "split"),
])
def test_counter_layout_follows_the_server_version(version: str, layout: str) -> None:
    assert counter_layout_for(version) == layout


@pytest.mark.parametrize(("version", "message"), [
    ("v1.33.4", "1.34 or newer"), ("unknown", "not a Kubernetes version"),
])
def test_servers_without_resource_v1_are_refused(version: str, message: str) -> None:
    with pytest.raises(PublishError, match=message):
        counter_layout_for(version)


def test_dropped_fields_names_what_the_server_did_not_keep() -> None:
    sent = {"devices": [{"name": "a", "consumesCounters": [{"counterSet": "s"}]},
                        {"name": "b"}],
            "sharedCounters": [{"name": "s"}], "driver": "d"}
    kept = {"devices": [{"name": "a"}, {"name": "b", "extra": 1}], "driver": "d"}
    assert dropped_fields(sent, kept, "spec") == ["spec.devices[0].consumesCounters",
                                                  "spec.sharedCounters"]
    assert dropped_fields(sent, copy.deepcopy(sent), "spec") == []


def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


def test_our_own_writes_are_not_foreign_changes() -> None:
    published = stored(desired(200), 3)
    expected = {s["metadata"]["name"]: s for s in published}
    for obj in published:
        assert foreign_change(event("ADDED", obj), expected, 3) is None
        assert foreign_change(event("MODIFIED", obj), expected, 3) is None
    gone = stamped(published[0], 2)
    gone["metadata"]["name"] = "node-a-gpu.dra.dev-9"  # an obsolete slice we deleted
    assert foreign_change(event("DELETED", gone), expected, 3) is None
    assert foreign_change({"type": "BOOKMARK", "object": {"metadata": {}}}, expected, 3) is None


def test_someone_elses_changes_are_foreign() -> None:
    published = stored(desired(200), 3)
    expected = {s["metadata"]["name"]: s for s in published}
    name = published[1]["metadata"]["name"]
    assert foreign_change(event("DELETED", published[1]), expected, 3) == \
        f"ResourceSlice {name} was deleted"
    edited = copy.deepcopy(published[1])
    edited["spec"]["devices"][0]["attributes"]["type"] = {"string": "cpu"}
    assert foreign_change(event("MODIFIED", edited), expected, 3) == \
        f"ResourceSlice {name} was changed"
    assert foreign_change(event("MODIFIED", stamped(published[1], 2)), expected, 3) == \
        f"ResourceSlice {name} was changed"
    stranger = copy.deepcopy(published[0])
    stranger["metadata"]["name"] = "intruder"
    assert foreign_change(event("ADDED", stranger), expected, 3) == \
        "ResourceSlice intruder is not one of ours"
    assert "too old" in str(foreign_change(
        event("ERROR", {"code": 410, "message": "too old resource version"}), expected, 3))


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    backoff = Backoff(initial=0.5, factor=2.0, cap=8.0, jitter=0.5)
    delays = list(islice(backoff.delays(random.Random(1)), 12))
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8]
    assert all(c * 0.5 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays), "jitter: no two waits alike"
