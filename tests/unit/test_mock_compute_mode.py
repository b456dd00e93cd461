"""The mock NVML's compute modes: DEFAULT as the real capture's GPU reports, set and read
back per GPU, kept in the state file across processes (and readable from it without NVML),
refused as NVML refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver.nvml.faults import Fault
from driver.nvml.mock import MockNvml, compute_mode
from driver.nvml.profile import ProfileError
from tests.unit.test_mock_nvml import code_of, started

EXCLUSIVE, DEFAULT = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS, pynvml.NVML_COMPUTEMODE_DEFAULT
CAPTURE = Path(__file__).resolve().parents[1] / "fixtures/nvml/h200-141gb-single/nvml.json"


def modes(nvml: MockNvml) -> list[int]:
    return [nvml.nvmlDeviceGetComputeMode(nvml.nvmlDeviceGetHandleByIndex(i))
            for i in range(nvml.nvmlDeviceGetCount())]


def test_gpus_start_in_the_mode_the_real_capture_reports() -> None:
    assert json.loads(CAPTURE.read_text())["calls"]["dev0.ComputeMode"] == DEFAULT
    assert modes(started("dgx-h100")) == [DEFAULT] * 8


def test_a_mode_set_is_read_back_on_that_gpu_only() -> None:
    nvml = started("dgx-h100")
    nvml.nvmlDeviceSetComputeMode(nvml.nvmlDeviceGetHandleByIndex(2), EXCLUSIVE)
    assert modes(nvml) == [DEFAULT, DEFAULT, EXCLUSIVE, *[DEFAULT] * 5]
    nvml.nvmlDeviceSetComputeMode(nvml.nvmlDeviceGetHandleByIndex(2),
                                  pynvml.NVML_COMPUTEMODE_PROHIBITED)
    assert modes(nvml)[2] == pynvml.NVML_COMPUTEMODE_PROHIBITED
    nvml.nvmlDeviceSetComputeMode(nvml.nvmlDeviceGetHandleByIndex(2), DEFAULT)
    assert modes(nvml) == [DEFAULT] * 8


def test_the_state_file_keeps_the_mode_for_other_processes(tmp_path: Path) -> None:
    state = tmp_path / "mock.json"
    nvml = started("dgx-h100", state)
    gpu3 = nvml.nvmlDeviceGetHandleByIndex(3)
    uuid3 = nvml.nvmlDeviceGetUUID(gpu3)
    assert compute_mode(state, uuid3) == DEFAULT
    assert "computeMode" not in json.loads(state.read_text())  # older drivers read it
    nvml.nvmlDeviceSetComputeMode(gpu3, EXCLUSIVE)
    assert compute_mode(state, uuid3) == EXCLUSIVE
    restarted = started("dgx-h100", state)  # a plugin restart, or `gpu-dra` beside it
    assert modes(restarted)[3] == EXCLUSIVE
    restarted.nvmlDeviceSetComputeMode(restarted.nvmlDeviceGetHandleByIndex(3), DEFAULT)
    assert modes(nvml)[3] == DEFAULT  # the first process sees the second's change
    assert "computeMode" not in json.loads(state.read_text())


def test_refusals_follow_nvml() -> None:
    nvml = started("a100-mig")
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    for mode in (pynvml.NVML_COMPUTEMODE_EXCLUSIVE_THREAD, 7, -1):  # removed; unknown
        assert code_of(nvml.nvmlDeviceSetComputeMode, gpu, mode) == \
            pynvml.NVML_ERROR_INVALID_ARGUMENT
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    assert code_of(nvml.nvmlDeviceSetComputeMode, mig, EXCLUSIVE) == \
        pynvml.NVML_ERROR_NOT_SUPPORTED
    assert code_of(nvml.nvmlDeviceGetComputeMode, mig) == pynvml.NVML_ERROR_NOT_SUPPORTED
    nvml.inject(nvml.nvmlDeviceGetMinorNumber(gpu), Fault("lost"))
    assert code_of(nvml.nvmlDeviceSetComputeMode, gpu, EXCLUSIVE) == \
        pynvml.NVML_ERROR_GPU_IS_LOST
    assert modes(started("a100-mig"))[0] == DEFAULT
    nvml.nvmlShutdown()
    assert code_of(nvml.nvmlDeviceGetComputeMode, gpu) == pynvml.NVML_ERROR_UNINITIALIZED


@pytest.mark.parametrize(("modes_in_file", "field"), [
    ({"GPU-0": 3}, "computeMode.GPU-0"),  # no such GPU
    ("first", "computeMode.first"),  # EXCLUSIVE_THREAD: removed from NVML
])
def test_a_bad_mode_in_the_state_file_is_named(tmp_path: Path, modes_in_file: Any,
                                               field: str) -> None:
    state = tmp_path / "mock.json"
    first = started("dgx-h100", state)
    uuid0 = first.nvmlDeviceGetUUID(first.nvmlDeviceGetHandleByIndex(0))
    data = json.loads(state.read_text())
    if modes_in_file == "first":
        modes_in_file, field = {uuid0: 1}, f"computeMode.{uuid0}"
    data["computeMode"] = modes_in_file
    state.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as err:
        started("dgx-h100", state)
    assert field in str(err.value)
    with pytest.raises(ProfileError):
        compute_mode(tmp_path / "missing.json", uuid0)
