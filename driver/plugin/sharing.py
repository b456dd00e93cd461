"""Setting a GPU's compute time slice (GpuConfig sharing TimeSlicing).

NVML has no public call for the time slice (nvidia-ml-py 13 exposes only the vGPU
scheduler), so on real GPUs it is set the way NVIDIA's driver does it, with the driver
root's `nvidia-smi compute-policy --set-timeslice`; the mock records the setting. The time
slice is one setting per GPU: which claims may set it, and when it goes back to Default,
is decided from the records (`records.timeslice_conflicts`, `effects`).

nvidia-smi is the host's, and the plugin's image carries no NVIDIA library, so it runs
with the driver root's NVML library preloaded (LD_PRELOAD, as NVIDIA's image runs it), not
with the driver's library folders on LD_LIBRARY_PATH: on most installs those folders
(/usr/lib/x86_64-linux-gnu, /usr/lib64) hold the host's own glibc too, which the image's
loader must not take for its own. Its environment is what a container starts with (PATH,
and the C locale for the messages we log), never the plugin's: a tool that needs no
setting of the plugin gets none (API credentials, proxies), and nothing set for the
plugin (the image's LD_LIBRARY_PATH, an NVML debug variable) changes what nvidia-smi does.
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
from driver.plugin.driverfiles import BINARY_SEARCH, nvml_library

log = logging.getLogger(__name__)
NVIDIA_SMI_TIMEOUT = 10.0
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SharingFailure(PluginError):
    """The GPU refused the setting."""


class Timeslicer(Protocol):
    def set(self, gpu_uuid: str, interval: str) -> None:
        """Set the time slice (Default|Short|Medium|Long); SharingFailure if it fails."""


def tool_environment(nvml: Path) -> dict[str, str]:
    """The whole environment of a driver tool the plugin runs: a container's defaults, and
    the driver's NVML library preloaded (LD_PRELOAD splits on spaces and colons, so a path
    with either cannot be preloaded: ValueError)."""
    if any(c in str(nvml) for c in " :"):
        raise ValueError(f"{nvml}: LD_PRELOAD cannot name a path with a space or a colon")
    return {"PATH": CONTAINER_PATH, "LC_ALL": "C", "LD_PRELOAD": str(nvml)}


class NvidiaSmiTimeslicer:
    def __init__(self, nvidia_smi: Path | None, nvml: Path | None) -> None:
        self.nvidia_smi = nvidia_smi
        self.nvml = nvml

    def set(self, gpu_uuid: str, interval: str) -> None:
        if self.nvidia_smi is None or self.nvml is None:
            missing = "nvidia-smi" if self.nvidia_smi is None else "libnvidia-ml.so.1"
            raise SharingFailure(f"time slicing needs {missing}, which is not under the "
                                 "driver root")
        command = [str(self.nvidia_smi), "compute-policy", "-i", gpu_uuid, "--set-timeslice",
                   str(TIMESLICE_INTERVALS[interval])]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  env=tool_environment(self.nvml),
                                  timeout=NVIDIA_SMI_TIMEOUT, check=False)
        except (OSError, ValueError, subprocess.TimeoutExpired) as err:
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


def timeslicer(provider: Provider, driver_root: Path, mock_root: bool) -> Timeslicer:
    """nvidia-smi of the driver root; with a mock NVML, whose GPUs exist only in the
    plugin, the mock's record of the setting where the root is the mock one (`mock_root`:
    its tools are placeholders) or the host's own / (whose nvidia-smi would act on real
    GPUs). A mock NVML with another driver root runs that root's nvidia-smi as a node
    would: that is how a stand-in driver root tests it."""
    if provider.name.startswith("mock:") and (mock_root or driver_root.resolve() == Path("/")):
        return MockTimeslicer(provider.nvml)
    smi = next((driver_root / d / "nvidia-smi" for d in BINARY_SEARCH
                if (driver_root / d / "nvidia-smi").is_file()), None)
    return NvidiaSmiTimeslicer(smi, nvml_library(driver_root))
