"""What the device tests read of the machine's GPUs to show they changed no setting."""

from __future__ import annotations

import pynvml


def gpu_settings() -> list[tuple[str, int, int]]:
    """(UUID, current MIG mode, compute mode) of every GPU."""
    pynvml.nvmlInit()
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                mig = pynvml.nvmlDeviceGetMigMode(handle)[0]
            except pynvml.NVMLError:
                mig = -1
            found.append((pynvml.nvmlDeviceGetUUID(handle), mig,
                          pynvml.nvmlDeviceGetComputeMode(handle)))
        return found
    finally:
        pynvml.nvmlShutdown()
