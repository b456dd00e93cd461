"""A node's model is kept across Allocators per version of its slices: a new version, a
slice leaving the pool, a new pool generation or a new taint rule is seen by the next
Allocator; slices without a version are read afresh; nothing that depends on the
classes or the claims outlives its Allocator."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from driver.allocator import Allocator, Ledger
from driver.allocator.cel import compile_selector, decide
from driver.allocator.pools import Node
from driver.allocator.versions import Recent, object_version
from tests.unit.test_alloc_semantics import CLASSES, DRIVER, claim, device, pool_slice, request

_uids = itertools.count()


def versioned(s: dict[str, Any], version: str = "1", uid: str = "") -> dict[str, Any]:
    """`s` as read from the API server: a uid (new unless given) and a resourceVersion."""
    out = copy.deepcopy(s)
    out["metadata"].update(uid=uid or f"static-cache-{next(_uids)}", resourceVersion=version)
    return out


def picks(slices: list[dict[str, Any]], count: int = 1, held: tuple[str, ...] = (),
          classes: list[dict[str, Any]] = CLASSES, rules: list[dict[str, Any]] | None = None,
          selectors: list[dict[str, Any]] | None = None) -> list[str] | str:
    """What a fresh Allocator (as the scheduler makes one per cycle) allocates on n1:
    the device names, or the outcome's status."""
    allocator = Allocator(slices, classes, rules or [])
    ledger = Ledger.of([{"metadata": {"name": "held", "namespace": "ns"}, "status": {
        "allocation": {"devices": {"results": [
            {"request": "r", "driver": DRIVER, "pool": "p1", "device": d} for d in held]}}}}])
    fields = {"selectors": selectors} if selectors else {}
    outcome = allocator.allocate(allocator.parse([claim("c", request("r", count, **fields))]),
                                 ledger, "n1")
    if outcome.status != "allocated":
        return outcome.status
    return [r["device"] for r in outcome.allocations[0]["devices"]["results"]]


def test_the_next_allocator_reuses_the_model_of_the_same_slice_versions() -> None:
    slices = [versioned(pool_slice("s1", [device("a0")]))]
    first = Allocator(slices, CLASSES).model(Node("n1"))
    assert Allocator(copy.deepcopy(slices), CLASSES).model(Node("n1")) is first


def test_a_new_resource_version_of_a_slice_is_seen() -> None:
    old = versioned(pool_slice("s1", [device("a0")]))
    assert picks([old]) == ["a0"]
    new = versioned(pool_slice("s1", [device("b0")]), "2", old["metadata"]["uid"])
    assert picks([new]) == ["b0"]


def test_a_slice_removed_from_its_pool_is_seen() -> None:
    prefix = f"static-cache-{next(_uids)}"
    a = versioned(pool_slice("s1", [device("a0")], count=2), uid=f"{prefix}-a")
    b = versioned(pool_slice("s2", [device("b0")], count=2), uid=f"{prefix}-b")
    assert picks([a, b], held=("a0",)) == ["b0"]
    assert picks([a], held=("a0",)) == "unschedulable"  # the pool is incomplete now
    c = versioned(pool_slice("s3", [device("c0")], count=2), uid=f"{prefix}-c")
    assert picks([a, c], held=("a0",)) == ["c0"]  # s2 replaced, s1 unchanged
    shrunk = versioned(pool_slice("s1", [device("a0")]), "2", a["metadata"]["uid"])
    assert picks([shrunk]) == ["a0"]


def test_a_new_pool_generation_is_seen() -> None:
    old = versioned(pool_slice("s1", [device("a0")]))
    assert picks([old]) == ["a0"]
    newer = versioned(pool_slice("s1-new", [device("n0")], generation=2))
    assert picks([old, newer]) == ["n0"]


def test_a_new_taint_rule_is_seen() -> None:
    slices = [versioned(pool_slice("s1", [device("a0"), device("a1")]))]
    assert picks(slices) == ["a0"]
    rule = {"metadata": {"name": "a0-out"}, "spec": {
        "deviceSelector": {"driver": DRIVER, "pool": "p1", "device": "a0"},
        "taint": {"key": "k", "value": "v", "effect": "NoSchedule"}}}
    assert picks(slices, rules=[rule]) == ["a1"]
    assert picks(slices) == ["a0"]


def test_slices_without_a_version_are_read_on_every_call() -> None:
    """As local files are: the same dicts, changed in place between calls."""
    s = pool_slice("s1", [device("a0", kind="small"), device("a1", kind="large")])
    large = [{"cel": {"expression": f'device.attributes["{DRIVER}"].kind == "large"'}}]
    assert picks([s], selectors=large) == ["a1"]
    s["spec"]["devices"][1]["attributes"]["kind"] = {"string": "small"}
    assert picks([s], selectors=large) == "unschedulable"


def test_selector_results_belong_to_one_allocator() -> None:
    """The same slice versions under other classes and selectors: each Allocator
    evaluates its own."""
    slices = [versioned(pool_slice("s1", [device("a0", kind="small"),
                                          device("a1", kind="large")]))]
    for kind, expected in (("large", ["a1"]), ("small", ["a0"]), ("none", "unschedulable")):
        assert picks(slices, selectors=[{"cel": {"expression":
                     f'device.attributes["{DRIVER}"].kind == "{kind}"'}}]) == expected
    only_large = [{"metadata": {"name": "c"}, "spec": {"selectors": [{"cel": {
        "expression": f'device.attributes["{DRIVER}"].kind == "large"'}}]}}]
    assert picks(slices, classes=only_large) == ["a1"]
    assert picks(slices) == ["a0"]


def test_the_caches_drop_the_least_recently_used() -> None:
    kept: Recent[str, int] = Recent(2)
    kept.put("a", 1)
    kept.put("b", 2)
    assert kept.get("a") == 1
    kept.put("c", 3)
    assert (kept.get("a"), kept.get("b"), kept.get("c"), len(kept)) == (1, None, 3, 2)


def test_asking_for_the_most_recent_entry_keeps_the_order() -> None:
    """A get of the newest entry skips the reordering; the oldest is still dropped."""
    kept: Recent[tuple[str, str], int] = Recent(2)
    kept.put(("a", "1"), 1)
    kept.put(("b", "1"), 2)
    assert kept.get(("b", "1")) == 2
    kept.put(("c", "1"), 3)
    assert (kept.get(("a", "1")), kept.get(("b", "1")), kept.get(("c", "1"))) == (None, 2, 3)


def test_an_entry_asked_for_in_the_newer_half_stays_where_it_is() -> None:
    """Only a get in the older half moves its entry: an entry asked for once in every
    half a cache's worth of new entries is never dropped; the others go oldest first."""
    kept: Recent[str, int] = Recent(4)
    for i, key in enumerate("abcd"):
        kept.put(key, i)
    assert kept.get("c") == 2  # newer half: left in place
    assert kept.get("a") == 0  # older half: now the newest
    kept.put("e", 4)
    kept.put("f", 5)
    assert [k for k in "abcdef" if kept.get(k) is not None] == ["a", "d", "e", "f"]
    for key in "ghijkl":  # "a" asked for in every half of the cache's new entries
        assert kept.get("a") == 0
        kept.put(key, 0)
    assert kept.get("a") == 0


def test_an_object_version_is_its_uid_and_resource_version_as_text() -> None:
    assert object_version({"metadata": {"uid": "u", "resourceVersion": "7"}}) == ("u", "7")
    assert object_version({"metadata": {"uid": 5, "resourceVersion": 7}}) == ("5", "7")
    assert object_version({"metadata": {"uid": "u", "resourceVersion": ""}}) is None
    assert object_version({"metadata": None}) is None
    assert object_version({}) is None


def test_the_caches_are_bounded_by_weight() -> None:
    """As the node models are, by the devices they hold."""
    kept: Recent[str, int] = Recent(10, lambda v: v)
    for key, value in (("a", 4), ("b", 4), ("c", 4)):
        kept.put(key, value)
    assert (kept.get("a"), kept.get("b"), kept.get("c"), kept.total) == (None, 4, 4, 8)
    kept.put("b", 9)  # replaced: its old weight no longer counts
    assert (kept.get("b"), kept.get("c"), kept.total) == (9, None, 9)
    kept.put("huge", 50)  # heavier than the bound: kept alone, until the next
    assert (len(kept), kept.get("huge")) == (1, 50)


@pytest.mark.parametrize(("expression", "values", "expected"), [
    ('device.driver == "d" && device.attributes["d"].kind == "gpu"',
     (("string", "gpu"), "d"), True),
    ('device.driver == "d" && device.attributes["d"].kind == "gpu"',
     (("string", "mig"), "d"), False),
    # false && (an error) is false in CEL; true && (an error) needs CEL's error
    ('device.driver == "x" && device.attributes["d"].kind == "gpu"', (("absent",), "d"), False),
    ('device.driver == "d" && device.attributes["d"].kind == "gpu"', (("absent",), "d"), None),
    ('device.attributes["d"].rank != 1', (("int", 2),), True),
    ('device.attributes["d"].rank == 1', (("bool", True),), None),  # a bool is not an int
    ('device.attributes["d"].v == "1.0.0"', (("version", "1.0.0"),), None),
])
def test_equality_tests_are_decided_only_where_cel_would_agree(
        expression: str, values: tuple[Any, ...], expected: bool | None) -> None:
    selector = compile_selector(expression)
    assert selector.tests is not None
    assert decide(selector.tests, values) is expected


@pytest.mark.parametrize("expression", [
    'device.attributes["d"].kind == "gpu" || device.driver == "d"',
    'device.attributes["d"].rank == 1u',
    'device.capacity["d"].memory.compareTo(quantity("1Gi")) > 0',
    '"d" == device.driver',
])
def test_other_shapes_go_to_cel(expression: str) -> None:
    assert compile_selector(expression).tests is None


def test_a_pool_across_nodes_sees_the_other_nodes_slice_leave() -> None:
    here = versioned(pool_slice("s1", [device("a0")], count=2))
    there = versioned({**pool_slice("s2", [device("b0")], count=2)})
    there["spec"]["nodeName"] = "n2"
    assert picks([here, there]) == ["a0"]
    assert picks([here]) == "unschedulable"  # the pool is incomplete without s2
