"""`--exclude-gpus`: the list's syntax, and the node's GPUs split into those the driver
serves and those it leaves alone, with nothing of the excluded ones in the slices (devices,
MIG placements, counters, NVLink links)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from driver.inventory.discovery import discover
from driver.inventory.exclude import Exclusion, ExclusionError, parse_exclusion, split
from driver.inventory.model import Inventory
from driver.inventory.topology import nvlink_islands
from driver.nvml.mock import mock_provider
from driver.plugin.devices import device_index
from driver.resourceslice.build import SliceOptions, build_slices

GPU0 = "GPU-6493d427-501d-5931-bd3f-97d1981f0fc8"  # dgx-h100 minor 0


@pytest.fixture(scope="module")
def dgx() -> Inventory:
    return discover(mock_provider("dgx-h100"))


@pytest.fixture(scope="module")
def pcie() -> Inventory:
    return discover(mock_provider("a100-pcie-4x"))  # NVLink bridges 0-1 and 2-3


def test_minors_and_uuids_any_case_blank_entries_skipped() -> None:
    parsed = parse_exclusion(f" 3,{GPU0.upper()},, 5 ,")
    assert parsed == Exclusion(frozenset({3, 5}), frozenset({GPU0}))
    assert parsed.entries == ("3", "5", GPU0)
    assert not parse_exclusion("") and parse_exclusion("0")


@pytest.mark.parametrize(("text", "named"), [
    ("3,gpu-3", "'gpu-3' is neither a GPU minor number nor a GPU UUID"),
    ("-1", "'-1' is neither"),
    ("GPU-6493d427", "'GPU-6493d427' is neither"),
    ("MIG-6493d427-501d-5931-bd3f-97d1981f0fc8", "is a MIG device: exclude its GPU"),
])
def test_a_bad_entry_is_named(text: str, named: str) -> None:
    with pytest.raises(ExclusionError, match=named):
        parse_exclusion(text)


def test_split_by_minor_and_uuid_and_unmatched_entries(dgx: Inventory) -> None:
    parts = split(dgx, parse_exclusion(f"3,{GPU0},9"))
    assert [g.minor for g in parts.excluded] == [0, 3]
    assert [g.minor for g in parts.served.gpus] == [1, 2, 4, 5, 6, 7]
    assert parts.unmatched == ("9",)
    assert not any({0, 3} & set(pair) for pair in parts.served.links)  # indexes = minors here
    assert split(dgx, Exclusion()).served == dgx


def test_the_slices_lack_every_device_and_counter_of_an_excluded_gpu(dgx: Inventory) -> None:
    served = split(dgx, parse_exclusion("3")).served
    for mig_mode in ("static", "dynamic"):
        slices = build_slices(served, SliceOptions("gpu.dra.dev", "n", mig_mode), 1)
        text = repr(slices)
        assert "gpu-3" not in text and "GPU-68a37c14" not in text, mig_mode
        names = {d["name"] for s in slices for d in s["spec"].get("devices", [])}
        assert "gpu-4" in names
        assert set(device_index(served, mig_mode)) == names


def test_an_excluded_gpu_leaves_its_nvlink_island(pcie: Inventory) -> None:
    assert (0, 1) in nvlink_islands(pcie)
    served = split(pcie, parse_exclusion("1")).served  # minor 1 is NVML index 0 there
    assert nvlink_islands(served) == [(1,), (2, 3)]


def test_an_unidentified_gpu_is_left_alone_while_a_uuid_names_no_gpu(dgx: Inventory) -> None:
    lost = replace(dgx.gpus[3], uuid="", health_error="nvmlDeviceGetUUID: GPU is lost")
    inventory = Inventory(dgx.driver_version, dgx.cuda_driver_version,
                          (*dgx.gpus[:3], lost, *dgx.gpus[4:]), dgx.links)
    parts = split(inventory, parse_exclusion(f"{GPU0},GPU-68a37c14-cba3-5893-8527-70e1ada18b19"))
    assert [g.minor for g in parts.excluded] == [0, 3]
    assert parts.unmatched == ("GPU-68a37c14-cba3-5893-8527-70e1ada18b19",)
    assert parts.unreadable == 1
    assert [g.minor for g in split(inventory, parse_exclusion("5")).excluded] == [5]
