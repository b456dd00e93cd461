"""The real NVML provider: nvidia-ml-py over the driver's libnvidia-ml, and sysfs.

In the DaemonSet the NVIDIA driver is often mounted away from the usual library
path (e.g. /driver-root with the GPU operator), so the library can be loaded
from a driver root instead of the dynamic linker's search path.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import pynvml

from driver.errors import NvmlLayerError
from driver.nvml import Provider

LIBRARY = "libnvidia-ml.so.1"
LIBRARY_DIRS = ("usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
                "lib64", "usr/lib", "lib")

_PCI_ROOT = re.compile(r"pci[0-9a-f]{4}:[0-9a-f]{2}")


class NvmlUnavailable(NvmlLayerError, RuntimeError):
    """libnvidia-ml cannot be loaded: no GPU driver on this machine or root."""


class SysfsHost:
    """Host facts from sysfs and procfs under `root` (the host's / by default)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def _pci_dir(self, bus_id: str) -> Path:
        return self.root / "sys/bus/pci/devices" / sysfs_bus_id(bus_id)

    def pcie_root(self, bus_id: str) -> str | None:
        try:
            target = os.readlink(self._pci_dir(bus_id))
        except OSError:
            return None
        return next((part for part in Path(target).parts if _PCI_ROOT.fullmatch(part)), None)

    def numa_node(self, bus_id: str) -> int | None:
        try:
            node = int((self._pci_dir(bus_id) / "numa_node").read_text().strip())
        except (OSError, ValueError):
            return None
        return node if node >= 0 else None

    def mig_minors(self, gpu_minor: int, gi_id: int, ci_id: int) -> tuple[int, int] | None:
        base = self.root / f"proc/driver/nvidia/capabilities/gpu{gpu_minor}/mig/gi{gi_id}"
        gi = _device_file_minor(base / "access")
        ci = _device_file_minor(base / f"ci{ci_id}/access")
        return (gi, ci) if gi is not None and ci is not None else None


def sysfs_bus_id(bus_id: str) -> str:
    """NVML's `00000000:18:00.0` as sysfs spells it: `0000:18:00.0`."""
    domain, rest = bus_id.lower().split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


def _device_file_minor(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"^DeviceFileMinor:\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def real_provider(driver_root: Path | None = None, host_root: Path = Path("/")) -> Provider:
    """Load libnvidia-ml (from `driver_root` if given) and check that NVML answers."""
    if driver_root is not None:
        _load_library_from(driver_root)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        where = f" under {driver_root}" if driver_root else ""
        raise NvmlUnavailable(
            f"cannot use NVML ({LIBRARY}{where}): {err}; "
            "on a machine without NVIDIA GPUs use --mock PROFILE") from err
    pynvml.nvmlShutdown()
    return Provider(name="nvml", nvml=pynvml, host=SysfsHost(host_root))


def _load_library_from(driver_root: Path) -> None:
    for directory in LIBRARY_DIRS:
        candidate = driver_root / directory / LIBRARY
        if candidate.exists():
            with pynvml.libLoadLock:
                pynvml.nvmlLib = ctypes.CDLL(str(candidate))
            return
    raise NvmlUnavailable(
        f"{LIBRARY} not found under --driver-root {driver_root} "
        f"(looked in {', '.join(LIBRARY_DIRS)}); "
        "on a machine without NVIDIA GPUs use --mock PROFILE")
