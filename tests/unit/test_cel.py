"""Device selectors behave as in the scheduler's CEL environment."""

from __future__ import annotations

import pytest

from driver.allocator.cel import SelectorError, compile_selector, device_input

GPU = device_input(
    "gpu.dra.dev",
    {"type": {"string": "gpu"}, "cores": {"int": 132}, "nvlink": {"bool": True},
     "driverVersion": {"version": "580.95.5"},
     "resource.kubernetes.io/numaNode": {"int": 1}},
    {"memory": {"value": "80Gi"}, "gpu.dra.dev/power": {"value": "700"}},
    allow_multiple_allocations=False)


def matches(expression: str) -> bool:
    return compile_selector(expression).matches(GPU)


@pytest.mark.parametrize("expression, expected", [
    ('device.driver == "gpu.dra.dev"', True),
    ('device.attributes["gpu.dra.dev"].type == "gpu"', True),
    ('device.attributes["gpu.dra.dev"].cores > 100 && device.attributes["gpu.dra.dev"].nvlink',
     True),
    ('device.attributes["resource.kubernetes.io"].numaNode == 1', True),
    ('device.allowMultipleAllocations', False),
    # An unknown domain is an empty map, not an error.
    ('device.attributes["vendor.example.com"].size() == 0', True),
    ('!has(device.attributes["gpu.dra.dev"].profile)', True),
    ('device.attributes["gpu.dra.dev"].?profile.orValue("none") == "none"', True),
    # Quantities compare by value, whatever the suffix.
    ('device.capacity["gpu.dra.dev"].memory.compareTo(quantity("40Gi")) > 0', True),
    ('device.capacity["gpu.dra.dev"].memory.isLessThan(quantity("81920Mi"))', False),
    ('device.capacity["gpu.dra.dev"].memory == quantity("85899345920")', True),
    ('quantity("1") == quantity("1000m")', True),
    ('device.capacity["gpu.dra.dev"].power.asInteger() == 700', True),
    ('quantity("1.5").isInteger()', False),
    ('quantity("1").add(quantity("500m")).compareTo(quantity("1500m")) == 0', True),
    ('quantity("2").sub(1).sign() == 1', True),
    ('isQuantity("10Gi") && !isQuantity("ten")', True),
    # Versions compare as semantic versions, not as text.
    ('device.attributes["gpu.dra.dev"].driverVersion.isGreaterThan(semver("580.9.0"))', True),
    ('device.attributes["gpu.dra.dev"].driverVersion.major() == 580', True),
    ('semver("1.0.0-alpha").isLessThan(semver("1.0.0"))', True),
    ('semver("v1.2", true) == semver("1.2.0")', True),
    ('isSemver("1.2.3") && !isSemver("1.2")', True),
    ('cel.bind(a, device.attributes["gpu.dra.dev"], a.cores + 1 == 133)', True),
    ('device.attributes["gpu.dra.dev"].type.upperAscii() == "GPU"', True),
    ('device.attributes["gpu.dra.dev"].all(k, k.size() > 2)', True),
])
def test_selector_results(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


def test_a_missing_attribute_is_an_evaluation_error() -> None:
    with pytest.raises(SelectorError, match=r"runtime error.*profile"):
        matches('device.attributes["gpu.dra.dev"].profile == "1g.10gb"')


def test_a_bad_quantity_is_an_evaluation_error() -> None:
    with pytest.raises(SelectorError, match="not a quantity"):
        matches('quantity("lots") == quantity("1")')


@pytest.mark.parametrize("expression, message", [
    ('device.attributes["gpu.dra.dev"].cores + "x" == 1', "no matching overload"),
    ('device.driver ==', "compile error"),
    ("1 + 1", "must evaluate to bool"),
    ('device.attributes["gpu.dra.dev"].all(a, device.attributes["gpu.dra.dev"].all(b, '
     'device.attributes["gpu.dra.dev"].all(c, device.attributes["gpu.dra.dev"].all(d, '
     'a + b + c + d != ""))))', "too expensive"),
    ("true || " * 1400 + "true", "longer than"),
])
def test_expressions_the_api_server_rejects(expression: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        compile_selector(expression)


def test_a_selector_compiles_once_and_its_cost_stays_far_below_the_limit() -> None:
    expression = 'device.driver == "gpu.dra.dev" && device.attributes["gpu.dra.dev"].cores > 8'
    first = compile_selector(expression)
    assert compile_selector(expression) is first
    assert first.cost < 100
