"""Devices that agree on what a selector reads share one evaluation, and every device
still gets its own verdict; slices read from the API server are checked and parsed once
per version, and a bad attribute value is refused naming its field."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from driver.allocator import Allocator, InputError, Ledger
from driver.allocator.cel import SelectorError, compile_selector, device_input
from tests.support import celdiff
from tests.unit.test_alloc_semantics import CLASSES, DRIVER, claim, pool_slice, request

EXPRESSIONS = [
    f'device.attributes["{DRIVER}"].model == "a"',
    'device.attributes["other.example.com"].model == "a"',
    f'device.attributes["{DRIVER}"].rank >= 2 || device.allowMultipleAllocations',
    f'device.capacity["{DRIVER}"].memory.compareTo(quantity("20Gi")) >= 0',
    f'has(device.attributes["{DRIVER}"].flag) && device.attributes["{DRIVER}"].flag',
    f'device.attributes["{DRIVER}"].version.isGreaterThan(semver("1.1.0"))',
    f'device.attributes["{DRIVER}"].rank == 1',  # a bool true is not the int 1
    f'device.attributes["{DRIVER}"].model.startsWith("a") && device.driver == "{DRIVER}"',
]


def _devices(seed: int) -> list[dict[str, Any]]:
    """Devices drawn from few values, so many agree; some fields short, some qualified,
    some missing."""
    rng = random.Random(seed)
    devices = []
    for i in range(40):
        attributes: dict[str, Any] = {"serial": {"string": f"s-{i}"}}
        for name, values in (("model", [{"string": "a"}, {"string": "b"}, None]),
                             ("rank", [{"int": 1}, {"int": 3}, {"bool": True}, None]),
                             ("flag", [{"bool": True}, {"bool": False}, None]),
                             ("version", [{"version": "1.2.0"}, {"version": "1.2.0+b"},
                                          {"version": "1.0.0"}, None])):
            value = rng.choice(values)
            if value is not None:
                qualified = rng.random() < 0.5
                attributes[f"{DRIVER}/{name}" if qualified else name] = value
        if rng.random() < 0.3:
            attributes["other.example.com/model"] = {"string": rng.choice("ab")}
        raw: dict[str, Any] = {"name": f"dev-{i}", "attributes": attributes}
        memory = rng.choice(["16Gi", "20Gi", "21474836480", "40Gi", None])
        if memory is not None:
            raw["capacity"] = {"memory": {"value": memory}}
        devices.append(raw)
    return devices


def _verdict(expression: str, raw: dict[str, Any], driver: str) -> bool | str:
    """The selector on this one device, evaluated on its own."""
    try:
        return compile_selector(expression).matches(device_input(
            driver, raw["attributes"], raw.get("capacity") or {},
            bool(raw.get("allowMultipleAllocations"))))
    except SelectorError as err:
        return str(err)


def _all_but(driver: str, pool: str, devices: list[dict[str, Any]], keep: str) -> Ledger:
    """Every device of the pool held, except `keep`."""
    return Ledger.of([{"metadata": {"name": "held", "namespace": "ns"}, "status": {
        "allocation": {"devices": {"results": [
            {"request": "r", "driver": driver, "pool": pool, "device": d["name"]}
            for d in devices if d["name"] != keep]}}}}])


def _assert_own_verdicts(expression: str, devices: list[dict[str, Any]], driver: str,
                         classes: list[dict[str, Any]]) -> None:
    """Each device, the only one free, is allocated, refused or named in the error as
    the selector on it alone says; two nodes with the same devices, one Allocator (it
    shares results across nodes too)."""
    slices = [pool_slice("s1", devices, pool="p1", driver=driver),
              {**pool_slice("s2", copy.deepcopy(devices), pool="p2", driver=driver),
               "spec": {**pool_slice("s2", devices, pool="p2", driver=driver)["spec"],
                        "nodeName": "n2"}}]
    allocator = Allocator(slices, classes)
    claims = allocator.parse([claim("c", request("r", selectors=[
        {"cel": {"expression": expression}}]))])
    for node, pool in (("n1", "p1"), ("n2", "p2")):
        for raw in devices:
            outcome = allocator.allocate(claims, _all_but(driver, pool, devices, raw["name"]),
                                         node)
            verdict = _verdict(expression, raw, driver)
            if isinstance(verdict, str):
                assert outcome.status == "error", (expression, raw, outcome)
                assert outcome.message.endswith(
                    f"selector #0 on device {driver}/{pool}/{raw['name']}: {verdict}")
            else:
                assert outcome.status == ("allocated" if verdict else "unschedulable"), (
                    expression, raw, outcome)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_each_device_gets_the_verdict_it_gets_on_its_own(expression: str, seed: int) -> None:
    _assert_own_verdicts(expression, _devices(seed), DRIVER, CLASSES)


def test_the_cel_differentials_selectors_give_each_device_its_own_verdict() -> None:
    """The CEL differential's generated selectors, on devices drawn from three of its
    generated ones (copies differ only in a field no selector reads)."""
    rng = random.Random(17)
    classes = [{"metadata": {"name": "c"}, "spec": {}}]
    checked = 0
    while checked < 150:
        expression = celdiff.selector(rng)
        try:
            compile_selector(expression)
        except SelectorError:
            continue
        bases = [celdiff.device(rng) for _ in range(3)]
        devices = [{"name": f"dev-{i}", "allowMultipleAllocations": base[
                        "allowMultipleAllocations"],
                    "attributes": {**base["attributes"], "serial": {"int": i}},
                    "capacity": {k: {"value": v["value"]} for k, v in base["capacity"].items()}}
                   for i, base in enumerate(rng.choice(bases) for _ in range(6))]
        _assert_own_verdicts(expression, devices, celdiff.DRIVER, classes)
        checked += 1


@pytest.mark.parametrize(("value", "message"), [
    ({"int": "3"}, "spec.devices[0].attributes[rank].int: must be int, not str"),
    ({"int": True}, "spec.devices[0].attributes[rank].int: must be int, not bool"),
    ({"bool": 1}, "spec.devices[0].attributes[rank].bool: must be bool, not int"),
    ({"version": "1.2"}, "spec.devices[0].attributes[rank].version: '1.2' is not a semantic "
                         "version"),
])
def test_a_bad_attribute_value_is_refused_naming_its_field(value: dict[str, Any],
                                                           message: str) -> None:
    bad = pool_slice("s1", [{"name": "dev-0", "attributes": {"rank": value}}])
    with pytest.raises(InputError, match=f"ResourceSlice s1: {message}".replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.")):
        Allocator([bad], CLASSES)


def test_a_new_version_of_a_slice_is_checked_and_read_again() -> None:
    first = pool_slice("s1", [{"name": "dev-0", "capacity": {"memory": {"value": "10Gi"}}}])
    first["metadata"].update(uid="u-1", resourceVersion="1")
    big = claim("c", request("r", capacity={"requests": {"memory": "20Gi"}}))
    allocator = Allocator([first], CLASSES)
    assert allocator.allocate(allocator.parse([big]), Ledger(), "n1").status == "unschedulable"
    grown = copy.deepcopy(first)
    grown["metadata"]["resourceVersion"] = "2"
    grown["spec"]["devices"][0]["capacity"]["memory"]["value"] = "40Gi"
    allocator = Allocator([grown], CLASSES)
    assert allocator.allocate(allocator.parse([big]), Ledger(), "n1").status == "allocated"
    broken = copy.deepcopy(grown)
    broken["metadata"]["resourceVersion"] = "3"
    broken["spec"]["devices"][0]["capacity"]["memory"]["value"] = "lots"
    allocator = Allocator([broken], CLASSES)
    with pytest.raises(InputError, match=r"ResourceSlice s1: spec\.devices\[0\]"
                                         r"\.capacity\[memory\]"):
        allocator.allocate(allocator.parse([big]), Ledger(), "n1")


def test_a_served_slice_is_checked_for_what_the_api_server_lets_through() -> None:
    """A list attribute (the API server takes it with DRAListTypeAttributes on) is refused
    naming its field once its node is tried; a node with good slices still allocates."""
    good = pool_slice("s1", [{"name": "dev-0"}])
    listed = pool_slice("s2", [{"name": "dev-0", "attributes": {"ranks": {"ints": [1, 2]}}}],
                        pool="p2", nodeName="n2")
    for n, s in enumerate((good, listed)):
        s["metadata"].update(uid=f"u-{n}", resourceVersion="1")
    allocator = Allocator([good, listed], CLASSES)
    one = allocator.parse([claim("c", request("r"))])
    assert allocator.allocate(one, Ledger(), "n1").status == "allocated"
    with pytest.raises(InputError, match=r"ResourceSlice s2: spec\.devices\[0\]"
                                         r"\.attributes\[ranks\]: exactly one of int"):
        allocator.allocate(one, Ledger(), "n2")
