"""DeviceTaintRules and slice taints in the allocator and `explain`, as the v1.37
scheduler applies them: a rule's taint goes on every device its selector's set fields
(driver, pool, device) match, after the slice's own; NoSchedule and NoExecute keep a
claim that does not tolerate them off the device, None and unknown effects do not."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from driver.allocator import Allocator, InputError, Ledger, Node
from driver.allocator.explain import explain
from driver.allocator.input import Taint, parse_taint_rules
from driver.allocator.pools import gather_pools
from tests.support.oracle import normalized
from tests.support.problems import instance

DRIVER = "d.example.com"
OTHER = "other.example.com"
BACKENDS = ["reference", "native"]
SINCE = "2026-12-07T01:02:03Z"


def pool_slice(name: str, devices: list[str], pool: str = "p1", driver: str = DRIVER,
               taints: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {
        "driver": driver, "nodeName": "n1",
        "pool": {"name": pool, "generation": 1, "resourceSliceCount": 1},
        "devices": [{"name": d, **({"taints": taints[d]} if taints and d in taints else {})}
                    for d in devices]}}


def rule(name: str, effect: str = "NoSchedule", key: str = "maintenance", value: str = "",
         since: str = "", **selector: str) -> dict[str, Any]:
    taint = {"key": key, "effect": effect, **({"value": value} if value else {}),
             **({"timeAdded": since} if since else {})}
    return {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceTaintRule",
            "metadata": {"name": name},
            "spec": {"deviceSelector": selector, "taint": taint}}


CLASSES = [{"metadata": {"name": "c"}, "spec": {}}]
SLICES = [pool_slice("a", ["dev-0", "dev-1"]), pool_slice("b", ["dev-0", "dev-1"], pool="p2"),
          pool_slice("c", ["dev-0"], pool="p1", driver=OTHER)]


def tainted(slices: list[dict[str, Any]], rules: list[dict[str, Any]]
            ) -> dict[str, list[Taint]]:
    """`driver/pool/device` -> its taints, for every device with one."""
    pools = gather_pools(slices, Node("n1"), parse_taint_rules(rules))
    return {str(d.ref): list(d.taints) for p in pools for d in p.devices if d.taints}


def claim(name: str, count: int = 1, **fields: Any) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": "c", **fields}
    if fields.get("allocationMode") != "All":
        exactly["count"] = count
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"devices": {"requests": [{"name": "r", "exactly": exactly}]}}}


def picked(slices: list[dict[str, Any]], rules: list[dict[str, Any]], backend: str,
           *claims: dict[str, Any]) -> list[str] | str:
    """The devices (pool/device) the claims get together, or the outcome's status."""
    allocator = Allocator(slices, CLASSES, rules)
    outcome = allocator.allocate(allocator.parse(list(claims)), Ledger.of([]), "n1",
                                 backend=backend)  # type: ignore[arg-type]
    if outcome.status != "allocated":
        return outcome.status
    return [f"{r['pool']}/{r['device']}" for a in outcome.allocations
            for r in a["devices"]["results"]]


@pytest.mark.parametrize(("selector", "want"), [
    ({}, {f"{DRIVER}/p1/dev-0", f"{DRIVER}/p1/dev-1", f"{DRIVER}/p2/dev-0",
          f"{DRIVER}/p2/dev-1", f"{OTHER}/p1/dev-0"}),
    ({"driver": DRIVER}, {f"{DRIVER}/p1/dev-0", f"{DRIVER}/p1/dev-1", f"{DRIVER}/p2/dev-0",
                          f"{DRIVER}/p2/dev-1"}),
    ({"pool": "p1"}, {f"{DRIVER}/p1/dev-0", f"{DRIVER}/p1/dev-1", f"{OTHER}/p1/dev-0"}),
    ({"device": "dev-0"}, {f"{DRIVER}/p1/dev-0", f"{DRIVER}/p2/dev-0", f"{OTHER}/p1/dev-0"}),
    ({"driver": DRIVER, "pool": "p2", "device": "dev-1"}, {f"{DRIVER}/p2/dev-1"}),
    ({"driver": DRIVER, "pool": "p3"}, set()),
])
def test_a_rule_taints_the_devices_every_set_selector_field_matches(
        selector: dict[str, str], want: set[str]) -> None:
    assert set(tainted(SLICES, [rule("r", **selector)])) == want


def test_a_rule_without_a_selector_taints_nothing() -> None:
    bare = rule("r")
    del bare["spec"]["deviceSelector"]
    assert tainted(SLICES, [bare]) == {}


def test_rule_taints_follow_the_slices_own_named_by_rule_and_ordered_by_name() -> None:
    slices = [pool_slice("a", ["dev-0"], taints={"dev-0": [
        {"key": f"{DRIVER}/xid", "value": "79", "effect": "NoSchedule", "timeAdded": SINCE}]})]
    got = tainted(slices, [rule("z-drain", "NoExecute", device="dev-0"),
                           rule("a-note", "None", key="note", device="dev-0", since=SINCE)])
    assert got[f"{DRIVER}/p1/dev-0"] == [
        Taint(f"{DRIVER}/xid", "79", "NoSchedule", SINCE),
        Taint("note", "", "None", SINCE, rule="a-note"),
        Taint("maintenance", "", "NoExecute", rule="z-drain")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("effect", "blocks"), [
    ("NoSchedule", True), ("NoExecute", True), ("None", False), ("PreferNoSchedule", False)])
def test_only_no_schedule_and_no_execute_rules_keep_a_claim_off(
        backend: str, effect: str, blocks: bool) -> None:
    rules = [rule("r", effect, driver=DRIVER, pool="p1", device="dev-0")]
    want = ["p1/dev-1"] if blocks else ["p1/dev-0"]
    assert picked(SLICES, rules, backend, claim("a")) == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("toleration", "tolerated"), [
    ({"key": "maintenance", "operator": "Exists"}, True),
    ({"key": "maintenance", "operator": "Equal", "value": "drain"}, True),
    ({"key": "maintenance", "value": "drain"}, True),  # Equal is the default operator
    ({"key": "maintenance", "operator": "Equal", "value": "other"}, False),
    ({"operator": "Exists"}, True),  # no key: every taint
    ({"operator": "Exists", "effect": "NoExecute"}, True),
    ({"operator": "Exists", "effect": "NoSchedule"}, False),  # the effect must match too
    ({"key": "other", "operator": "Exists"}, False),
])
def test_a_no_execute_rule_is_tolerated_by_key_operator_and_effect(
        backend: str, toleration: dict[str, str], tolerated: bool) -> None:
    """A one-device pool, so the claim fits only if it tolerates the rule's taint."""
    slices = [pool_slice("a", ["dev-0"])]
    rules = [rule("drain", "NoExecute", value="drain", device="dev-0")]
    got = picked(slices, rules, backend, claim("a", tolerations=[toleration]))
    assert got == (["p1/dev-0"] if tolerated else "unschedulable")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_devices_fails_on_a_rule_tainted_device_as_on_a_slice_tainted_one(
        backend: str) -> None:
    """Upstream does not skip a tainted device in allocationMode All: the request fails."""
    all_of = claim("a", allocationMode="All")
    assert picked(SLICES[:1], [], backend, all_of) == ["p1/dev-0", "p1/dev-1"]
    assert picked(SLICES[:1], [rule("r", device="dev-1")], backend, all_of) == "unschedulable"
    tolerant = claim("a", allocationMode="All", tolerations=[{"operator": "Exists"}])
    assert picked(SLICES[:1], [rule("r", device="dev-1")], backend, tolerant) == \
        ["p1/dev-0", "p1/dev-1"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["metadata"].pop("name"), "DeviceTaintRule <unnamed>: metadata.name: must be"),
    (lambda r: r["spec"]["taint"].pop("key"), "DeviceTaintRule r: spec.taint.key: required"),
    (lambda r: r["spec"]["taint"].pop("effect"), "DeviceTaintRule r: spec.taint.effect: required"),
    (lambda r: r["spec"]["deviceSelector"].update(deviceClassName="gpu.dra.dev"),
     "DeviceTaintRule r: spec.deviceSelector.deviceClassName: removed in Kubernetes 1.35"),
    (lambda r: r["spec"]["deviceSelector"].update(selectors=[]),
     "DeviceTaintRule r: spec.deviceSelector.selectors: removed in Kubernetes 1.35"),
    (lambda r: r["spec"]["deviceSelector"].update(device=3),
     "DeviceTaintRule r: spec.deviceSelector.device: must be a string"),
])
def test_a_bad_rule_is_refused_naming_the_rule_and_field(edit: Any, message: str) -> None:
    bad = rule("r", device="dev-0")
    edit(bad)
    with pytest.raises(InputError, match=message):
        Allocator(SLICES, CLASSES, [bad])


def test_a_rule_listed_twice_is_refused() -> None:
    with pytest.raises(InputError, match=r"DeviceTaintRule r: metadata\.name: listed twice"):
        Allocator(SLICES, CLASSES, [rule("r"), rule("r")])


def test_a_rule_per_slice_taint_gives_the_same_answer_as_the_slice_taint() -> None:
    """The scheduler patches rule taints into the slices: moving every device's taints
    from its slice into DeviceTaintRules that select exactly it changes nothing, on
    either search (the differential test's problems that have tainted devices)."""
    compared = 0
    for seed in range(60):
        problem = instance(random.Random(seed))
        moved = copy.deepcopy(problem)
        rules: list[dict[str, Any]] = []
        for s in moved["slices"]:
            for device in s["spec"].get("devices") or []:
                for k, taint in enumerate(device.pop("taints", [])):
                    rules.append(rule(f"{device['name']}-{k}", taint["effect"], taint["key"],
                                      taint.get("value", ""), driver=s["spec"]["driver"],
                                      pool=s["spec"]["pool"]["name"], device=device["name"]))
        if not rules:
            continue
        compared += 1
        for backend in BACKENDS:
            assert answer(moved, [*problem["taintRules"], *rules], backend) == \
                answer(problem, problem["taintRules"], backend), (seed, backend)
    assert compared >= 20


def answer(problem: dict[str, Any], rules: list[dict[str, Any]], backend: str
           ) -> dict[str, Any]:
    try:
        allocator = Allocator(problem["slices"], problem["classes"], rules)
        claims = allocator.parse(problem["claims"])
    except InputError as err:
        return {"status": "error", "error": str(err)}
    node = problem["node"]
    outcome = allocator.allocate(claims, Ledger.of(problem["allocated"]),
                                 Node(node["name"], tuple(sorted(node["labels"].items()))),
                                 backend=backend)  # type: ignore[arg-type]
    return normalized({"status": outcome.status, "allocations": outcome.allocations})


def test_explain_names_each_tainted_device_its_taint_since_and_rule() -> None:
    slices = [pool_slice("a", ["gpu-0", "gpu-1", "gpu-2", "gpu-3"], taints={"gpu-3": [
        {"key": f"{DRIVER}/xid", "value": "79", "effect": "NoSchedule", "timeAdded": SINCE},
        {"key": f"{DRIVER}/unmonitored", "effect": "None", "timeAdded": SINCE}]})]
    rules = [rule("drain-gpu-1", "NoExecute", since="2026-12-07T00:59:00Z", device="gpu-1"),
             rule("note", "None", device="gpu-0")]
    allocator = Allocator(slices, CLASSES, rules)
    wanted = allocator.parse([claim("big", 3)])[0]
    reasons = explain(allocator, wanted, Ledger.of([]), "n1").reasons
    assert reasons[0] == "request r: 4 devices match class c; 2 tainted (not tolerated); " \
                         "2 free for 3"
    assert reasons[1:3] == (
        "gpu-1: tainted maintenance:NoExecute since 2026-12-07T00:59:00Z "
        "(DeviceTaintRule drain-gpu-1)",
        f"gpu-3: tainted {DRIVER}/xid=79:NoSchedule since {SINCE}")
    # Tolerating the rule's taint leaves only the slice's taint to name.
    tolerant = allocator.parse([claim("big", 4, tolerations=[
        {"key": "maintenance", "operator": "Exists"}])])[0]
    reasons = explain(allocator, tolerant, Ledger.of([]), "n1").reasons
    assert [r for r in reasons if ": tainted " in r] == \
        [f"gpu-3: tainted {DRIVER}/xid=79:NoSchedule since {SINCE}"]


def test_explain_names_the_first_few_tainted_devices_then_counts_the_rest() -> None:
    slices = [pool_slice("a", [f"gpu-{i}" for i in range(8)])]
    allocator = Allocator(slices, CLASSES, [rule("all", driver=DRIVER)])
    reasons = explain(allocator, allocator.parse([claim("one")])[0], Ledger.of([]),
                      "n1").reasons
    assert reasons[1:] == (*(f"gpu-{i}: tainted maintenance:NoSchedule (DeviceTaintRule all)"
                             for i in range(4)), "and 4 more tainted devices")
