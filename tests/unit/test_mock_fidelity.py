"""The `h200-141gb` mock answers every query discovery makes exactly as the real H200 did.

Ground truth is the capture in tests/fixtures/nvml/h200-141gb-single: `nvml.json` (each
query's value or NVML error) and `extra.txt` (`nvidia-smi mig -lgipp` placements). Nothing
of the capture is copied here: the test reads it and replays each query on the mock.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver.nvml.mock import MockNvml, load_profile

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures/nvml/h200-141gb-single"

# The per-device queries of discovery (driver/inventory/discovery.py) and of the health checks
# (driver/nvml/events.py) that the capture recorded.
DEVICE_QUERIES = ["Name", "UUID", "MinorNumber", "Index", "Brand", "Architecture",
                  "CudaComputeCapability", "MemoryInfo", "PciInfo", "PciInfo_v3", "MigMode",
                  "MaxMigDeviceCount", "NumaNodeId", "IsMigDeviceHandle",
                  "DeviceHandleFromMigDeviceHandle", "SupportedEventTypes", "RemappedRows"]
SYSTEM_QUERIES = {"device_count": "nvmlDeviceGetCount",
                  "system.driver_version": "nvmlSystemGetDriverVersion",
                  "system.cuda_driver_version": "nvmlSystemGetCudaDriverVersion",
                  "system.nvml_version": "nvmlSystemGetNVMLVersion"}


@pytest.fixture(scope="module")
def calls() -> dict[str, Any]:
    return json.loads((FIXTURE / "nvml.json").read_text())["calls"]


@pytest.fixture
def nvml() -> Iterator[MockNvml]:
    mock = MockNvml(load_profile("h200-141gb"))
    mock.nvmlInit()
    yield mock
    mock.nvmlShutdown()


def as_captured(value: Any) -> Any:
    """A mock answer in the capture's JSON form."""
    if isinstance(value, ctypes.Structure):
        return {name: as_captured(getattr(value, name)) for name, *_ in value._fields_}
    if isinstance(value, ctypes._SimpleCData):
        return str(value)  # the capture printed such objects, e.g. "c_uint(0)"
    if isinstance(value, tuple | list):
        return [as_captured(item) for item in value]
    return value


def assert_answers(expected: Any, query: Callable[..., Any], *args: Any) -> None:
    """query(*args) gives the captured value, or raises the captured NVML error."""
    if isinstance(expected, dict) and "nvml_error" in expected:
        with pytest.raises(pynvml.NVMLError) as err:
            query(*args)
        assert (err.value.value, str(err.value)) == (expected["code"], expected["nvml_error"])
    else:
        assert as_captured(query(*args)) == expected


def keys(calls: dict[str, Any], pattern: str) -> list[re.Match[str]]:
    found = [m for key in calls if (m := re.fullmatch(pattern, key))]
    assert found, f"the capture has no {pattern}"
    return found


def test_system_queries(calls: dict[str, Any], nvml: MockNvml) -> None:
    for key, function in SYSTEM_QUERIES.items():
        assert_answers(calls[key], getattr(nvml, function))


@pytest.mark.parametrize("query", DEVICE_QUERIES)
def test_device_query(calls: dict[str, Any], nvml: MockNvml, query: str) -> None:
    function = f"nvmlDevice{query}" if query.startswith("Is") else f"nvmlDeviceGet{query}"
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert_answers(calls[f"dev0.{query}"], getattr(nvml, function), handle)


def test_every_gpu_instance_profile_index(calls: dict[str, Any], nvml: MockNvml) -> None:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    matches = keys(calls, r"dev0\.gi_profile(\d+)\.(info|infoV)")
    for match in matches:
        assert_answers(calls[match.group(0)], nvml.nvmlDeviceGetGpuInstanceProfileInfo, handle,
                       int(match.group(1)), 2)
    assert {int(m.group(1)) for m in matches} == set(range(16))


def test_remaining_capacity_of_each_profile(calls: dict[str, Any], nvml: MockNvml) -> None:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    for match in keys(calls, r"dev0\.gi_profile(\d+)\.remaining"):
        profile_id = calls[f"dev0.gi_profile{match.group(1)}.info"]["id"]
        assert_answers(calls[match.group(0)], nvml.nvmlDeviceGetGpuInstanceRemainingCapacity,
                       handle, profile_id)


def test_placements_match_nvidia_smi_mig_lgipp(nvml: MockNvml) -> None:
    text = (FIXTURE / "extra.txt").read_text()
    listed = re.findall(r"Profile ID\s+(\d+) Placements?\s*: \{([\d,]+)\}:(\d+)", text)
    assert len(listed) == 7
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    for profile_id, starts, size in listed:
        buffer = (pynvml.c_nvmlGpuInstancePlacement_t * 8)()
        count = ctypes.c_uint(8)
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, int(profile_id), buffer,
                                                        ctypes.byref(count))
        got = [(buffer[i].start, buffer[i].size) for i in range(count.value)]
        assert got == [(int(s), int(size)) for s in starts.split(",")], profile_id


def test_every_nvlink_state(calls: dict[str, Any], nvml: MockNvml) -> None:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    matches = keys(calls, r"dev0\.nvlink(\d+)\.state")
    assert len(matches) == pynvml.NVML_NVLINK_MAX_LINKS
    for match in matches:
        assert_answers(calls[match.group(0)], nvml.nvmlDeviceGetNvLinkState, handle,
                       int(match.group(1)))


def test_topology_queries(calls: dict[str, Any], nvml: MockNvml) -> None:
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    for match in keys(calls, r"topo\.nearest\.(\d+)"):
        assert_answers(calls[match.group(0)], nvml.nvmlDeviceGetTopologyNearestGpus, handle,
                       int(match.group(1)))
