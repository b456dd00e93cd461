"""The driver's error hierarchy: one base per layer, all under `DriverError`.

Every error the driver raises on purpose carries `reason`, a short code that metrics
(`gpu_dra_errors_total{reason}`) and logs use; a subclass sets its own or passes one per
instance. Anything that is not a `DriverError` is a bug or an OS error, and is reported as
such. The layers follow the data flow (see `driver/__init__.py`).
"""

from __future__ import annotations


class DriverError(Exception):
    """An error the driver raises on purpose."""

    reason: str = "error"


class NvmlLayerError(DriverError):
    """`driver.nvml`: the NVML library, a mock profile or the mock's MIG rules."""

    reason = "nvml"


class KubeError(DriverError):
    """`driver.kube`: the API server, quantities, versions."""

    reason = "kube"


class SliceError(DriverError):
    """`driver.resourceslice`: building or publishing ResourceSlices."""

    reason = "publish"


class AllocatorError(DriverError):
    """`driver.allocator`: claims, classes, slices or selectors the allocator refuses."""

    reason = "invalid_input"


class PluginError(DriverError):
    """`driver.plugin`: a claim, its config, a device action, the checkpoint or the lock."""

    reason = "device_error"


class CliError(DriverError):
    """`driver.cli`: bad input from the command line or the environment (exit code 2)."""

    reason = "usage"


class DevClusterError(DriverError):
    """`driver.devcluster` and `driver.demo`: the local control plane, nodes and demo."""

    reason = "devcluster"


class HealthError(DriverError):
    """`driver.health`: GPU health rules and their settings."""

    reason = "health"
