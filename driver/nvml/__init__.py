"""NVML providers: the real library (nvidia-ml-py) or a mock machine profile.

Discovery talks to a provider only through `Provider.nvml`, an object with the
function surface of the `pynvml` module (same names, argument order, return
shapes, and `pynvml.NVMLError` subclasses with NVML's codes), and `Provider.host`,
the few facts NVML does not report (sysfs and /proc/driver/nvidia).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class HostView(Protocol):
    """What discovery reads from the host besides NVML, keyed by PCI bus id."""

    def pcie_root(self, bus_id: str) -> str | None:
        """The PCIe root complex (`pci<domain>:<bus>`) the device hangs off."""

    def numa_node(self, bus_id: str) -> int | None:
        """The NUMA node of the device, None where the platform has none."""

    def mig_minors(self, gpu_minor: int, gi_id: int, ci_id: int) -> tuple[int, int] | None:
        """The /dev/nvidia-caps minors of a GPU instance and its compute instance."""


@dataclass(frozen=True)
class Provider:
    """One NVML backend: `nvml` quacks like the pynvml module."""

    name: str
    nvml: Any
    host: HostView
