"""Setting a GPU's compute time slice (GpuConfig sharing TimeSlicing).

NVML has no public call for the time slice (nvidia-ml-py 13 exposes only the vGPU
scheduler), so on real GPUs it is set the way NVIDIA's driver does it, with
`nvidia-smi compute-policy --set-timeslice`; the mock records the setting. The time slice
is one setting per GPU: the last writer wins, and unprepare puts back Default.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Protocol

import pynvml

from driver.errors import PluginError
from driver.nvml import Provider
from driver.plugin.config import TIMESLICE_INTERVALS
from driver.plugin.driverfiles import BINARY_SEARCH

log = logging.getLogger(__name__)
NVIDIA_SMI_TIMEOUT = 10.0


class SharingFailure(PluginError):
    """The GPU refused the setting."""


class Timeslicer(Protocol):
    def set(self, gpu_uuid: str, interval: str) -> None:
        """Set the time slice (Default|Short|Medium|Long); SharingFailure if it fails."""


class NvidiaSmiTimeslicer:
    def __init__(self, nvidia_smi: Path | None) -> None:
        self.nvidia_smi = nvidia_smi

    def set(self, gpu_uuid: str, interval: str) -> None:
        if self.nvidia_smi is None:
            raise SharingFailure("time slicing needs nvidia-smi, which is not under the "
                                 "driver root")
        command = [str(self.nvidia_smi), "compute-policy", "-i", gpu_uuid, "--set-timeslice",
                   str(TIMESLICE_INTERVALS[interval])]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=NVIDIA_SMI_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SharingFailure(f"{' '.join(command)}: {err}") from None
        if done.returncode != 0:
            raise SharingFailure(f"{' '.join(command)} exited {done.returncode}: "
                                 f"{(done.stderr or done.stdout).strip()}")
        log.info("time slice of %s set to %s", gpu_uuid, interval)


class MockTimeslicer:
    def __init__(self, nvml: object) -> None:
        self.nvml = nvml

    def set(self, gpu_uuid: str, interval: str) -> None:
        try:
            self.nvml.set_timeslice(gpu_uuid, TIMESLICE_INTERVALS[interval])  # type: ignore[attr-defined]
        except pynvml.NVMLError as err:
            raise SharingFailure(f"cannot set the time slice of {gpu_uuid}: {err}") from None
        log.info("time slice of %s set to %s (mock)", gpu_uuid, interval)


def timeslicer(provider: Provider, driver_root: Path) -> Timeslicer:
    if provider.name.startswith("mock:"):
        return MockTimeslicer(provider.nvml)
    smi = next((driver_root / d / "nvidia-smi" for d in BINARY_SEARCH
                if (driver_root / d / "nvidia-smi").is_file()), None)
    return NvidiaSmiTimeslicer(smi)
