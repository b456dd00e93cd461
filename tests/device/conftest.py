"""Device tier: real NVML on a GPU machine, read-only.

These tests never change MIG mode, clocks or any other setting; they compare
what the driver discovers with what the machine's own nvidia-smi says.
"""

from __future__ import annotations

import shutil

import pynvml
import pytest

from driver.nvml.real import NvmlUnavailable, real_provider


def _gpu_machine() -> str | None:
    """None on a GPU machine, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found"
    try:
        real_provider()
    except NvmlUnavailable as err:
        return str(err)
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    return None if count else "NVML sees no GPU"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device_items = [item for item in items if "tests/device/" in str(item.fspath)]
    if not device_items:
        return
    reason = _gpu_machine()
    for item in device_items:
        item.add_marker(pytest.mark.device)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"needs an NVIDIA GPU: {reason}"))
