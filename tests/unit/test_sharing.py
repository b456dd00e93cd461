"""Time slicing's rules: the environment nvidia-smi runs with (a container's, the driver's
NVML preloaded, nothing of the plugin's), and one interval per GPU, held until the last
claim that set it is unprepared."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from driver.plugin.checkpoint import ClaimRecord, PreparedDevice, State
from driver.plugin.claims import ClaimRef
from driver.plugin.records import timeslice_conflicts, timeslices_held
from driver.plugin.sharing import NvidiaSmiTimeslicer, tool_environment

UIDS = [f"0b8f3c9e-2d4a-4c1b-8e7f-6a5d4c3b2a1{i}" for i in range(4)]
NVML = Path("/driver-root/usr/lib64/libnvidia-ml.so.580.159.04")


def device(name: str, gpu: str, timeslice: str | None) -> PreparedDevice:
    return PreparedDevice(("gpu",), "node-a", name, (), gpu, timeslice=timeslice)


def record(i: int, *devices: PreparedDevice, state: State = "PrepareCompleted"
           ) -> ClaimRecord:
    return ClaimRecord(UIDS[i], "ns", f"c{i}", state, devices)


def key(i: int) -> str:
    return f"ResourceClaim ns/c{i} ({UIDS[i]})"


def test_nvidia_smi_gets_a_containers_environment_and_the_drivers_nvml() -> None:
    assert tool_environment(NVML) == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C", "LD_PRELOAD": str(NVML)}


@pytest.mark.parametrize("path", ["/driver root/libnvidia-ml.so.1", "/a:b/libnvidia-ml.so.1"])
def test_a_library_ld_preload_cannot_name_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="LD_PRELOAD cannot name"):
        tool_environment(Path(path))


def test_nvidia_smi_runs_with_that_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", "/secret/kubeconfig")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/image/lib")
    seen: list[dict[str, Any]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append({"command": command, "env": kwargs["env"]})
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    NvidiaSmiTimeslicer(Path("/driver-root/usr/bin/nvidia-smi"), NVML).set("GPU-1", "Medium")
    assert seen == [{"command": ["/driver-root/usr/bin/nvidia-smi", "compute-policy", "-i",
                                 "GPU-1", "--set-timeslice", "2"],
                     "env": tool_environment(NVML)}]


def test_the_same_interval_is_shared_and_another_refused() -> None:
    records = [record(0, device("gpu-0", "GPU-A", "Long")),
               record(1, device("gpu-1", "GPU-B", "Short"))]
    me = ClaimRef("ns", "c2", UIDS[2])
    assert timeslice_conflicts(me, [device("gpu-0", "GPU-A", "Long")], records) == []
    assert timeslice_conflicts(me, [device("gpu-0", "GPU-A", None)], records) == []
    assert timeslice_conflicts(me, [device("gpu-0", "GPU-A", "Short")], records) == [
        f"device gpu-0 asks for time slice Short, but its GPU GPU-A has time slice Long for "
        f"{key(0)}: a GPU has one time slice, kept until the last claim that set it is "
        "unprepared"]


def test_two_intervals_on_one_gpu_in_one_claim_are_refused() -> None:
    me = ClaimRef("ns", "c2", UIDS[2])
    assert timeslice_conflicts(me, [device("gpu-0", "GPU-A", "Long"),
                                    device("gpu-0", "GPU-A", "Short")], []) == [
        "devices gpu-0 and gpu-0 ask for time slices Long and Short of one GPU GPU-A, which "
        "has one time slice"]


def test_a_claim_being_unprepared_holds_no_time_slice() -> None:
    records = [record(0, device("gpu-0", "GPU-A", "Long"), state="UnprepareStarted"),
               record(1, device("gpu-0", "GPU-A", "Long"), state="PrepareStarted"),
               record(2, device("gpu-0", "GPU-A", None))]
    assert timeslices_held(records, "GPU-A", besides=UIDS[3]) == {key(1): "Long"}
    assert timeslices_held(records, "GPU-A", besides=UIDS[1]) == {}
    assert timeslices_held(records, "GPU-B", besides=UIDS[3]) == {}
    me = ClaimRef("ns", "c3", UIDS[3])
    assert timeslice_conflicts(me, [device("gpu-0", "GPU-A", "Short")], records[:1]) == []
