"""Opaque device configuration: our versioned schema, strict, and which config applies where.

A ResourceClaim (or its DeviceClass) carries `opaque.parameters` for this driver. They are
decoded strictly: an unknown field, a wrong type (no coercion of "50" to 50) or a bad value
is an error naming the field's full path, so a typo never silently means "no sharing".
The shapes are NVIDIA's resource.nvidia.com/v1beta1 GpuConfig and MigDeviceConfig, and that
apiVersion is accepted beside ours, decoded by the same models (NVIDIA's driver decodes
them strictly too), so a claim written for NVIDIA's driver prepares unchanged.

Precedence follows the upstream convention: class configs first, then claim configs, and a
later config replaces an earlier one for the requests it names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from driver.errors import PluginError
from driver.kube.quantity import parse_quantity

GROUP = "gpu.dra.dev"
API_VERSION = f"{GROUP}/v1alpha1"
NVIDIA_API_VERSION = "resource.nvidia.com/v1beta1"
ApiVersion = Literal["gpu.dra.dev/v1alpha1", "resource.nvidia.com/v1beta1"]
MAX_PARAMETERS_BYTES = 10 * 1024  # what the API server allows for opaque parameters

# nvidia-smi compute-policy --set-timeslice values.
TIMESLICE_INTERVALS: dict[str, int] = {"Default": 0, "Short": 1, "Medium": 2, "Long": 3}

_DEVICE_KEY = re.compile(r"[0-9]+|gpu-[0-9]+|GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


class ConfigError(PluginError, ValueError):
    """A config that cannot be used; the message names the field."""


def memory_bytes(quantity: str) -> int:
    """A whole-byte Kubernetes quantity (`1Gi`, `512M`, `1073741824`) in bytes."""
    value = parse_quantity(quantity)
    if value.denominator != 1:
        raise ValueError(f"{quantity!r} is not a whole number of bytes")
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
    return int(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TimeSlicingConfig(_Strict):
    interval: Literal["Default", "Short", "Medium", "Long"] = "Default"


class MpsConfig(_Strict):
    defaultActiveThreadPercentage: int | None = Field(default=None, ge=1, le=100)
    defaultPinnedDeviceMemoryLimit: str | None = None
    # device name (gpu-0), GPU UUID or, as NVIDIA's, the device's index in the claim
    # -> limit, overriding the default for that GPU
    defaultPerDevicePinnedMemoryLimit: dict[str, str] | None = None

    @model_validator(mode="after")
    def _quantities(self) -> MpsConfig:
        if self.defaultPinnedDeviceMemoryLimit is not None:
            _check_quantity(self.defaultPinnedDeviceMemoryLimit, "defaultPinnedDeviceMemoryLimit")
        for key, value in (self.defaultPerDevicePinnedMemoryLimit or {}).items():
            where = f"defaultPerDevicePinnedMemoryLimit.{key}"
            if not _DEVICE_KEY.fullmatch(key):
                raise ValueError(f"{where}: the key must be a device name (gpu-0), a GPU "
                                 "UUID or the device's index in the claim")
            _check_quantity(value, where)
        return self


def _check_quantity(value: str, where: str) -> None:
    try:
        memory_bytes(value)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


class GpuSharing(_Strict):
    strategy: Literal["TimeSlicing", "MPS"]
    timeSlicingConfig: TimeSlicingConfig | None = None
    mpsConfig: MpsConfig | None = None

    @model_validator(mode="after")
    def _matching_config(self) -> GpuSharing:
        if self.strategy == "TimeSlicing" and self.mpsConfig is not None:
            raise ValueError("mpsConfig: only allowed with strategy MPS")
        if self.strategy == "MPS" and self.timeSlicingConfig is not None:
            raise ValueError("timeSlicingConfig: only allowed with strategy TimeSlicing")
        return self

    @property
    def timeslice(self) -> str | None:
        """The time-slice interval to set on the GPU, None for MPS."""
        if self.strategy != "TimeSlicing":
            return None
        return (self.timeSlicingConfig or TimeSlicingConfig()).interval


class MigSharing(_Strict):
    """MIG devices cannot change the time slice (a per-GPU setting), so there is no interval."""

    strategy: Literal["TimeSlicing", "MPS"]
    mpsConfig: MpsConfig | None = None

    @model_validator(mode="after")
    def _matching_config(self) -> MigSharing:
        if self.strategy == "TimeSlicing" and self.mpsConfig is not None:
            raise ValueError("mpsConfig: only allowed with strategy MPS")
        return self


class GpuConfig(_Strict):
    apiVersion: ApiVersion
    kind: Literal["GpuConfig"]
    sharing: GpuSharing | None = None


class MigDeviceConfig(_Strict):
    apiVersion: ApiVersion
    kind: Literal["MigDeviceConfig"]
    sharing: MigSharing | None = None


DeviceConfig = GpuConfig | MigDeviceConfig
_CONFIG: TypeAdapter[DeviceConfig] = TypeAdapter(
    Annotated[GpuConfig | MigDeviceConfig, Field(discriminator="kind")])


def parse_parameters(parameters: Any, where: str) -> DeviceConfig:
    """One opaque.parameters object -> a config; ConfigError names `where` + the field."""
    if not isinstance(parameters, dict):
        raise ConfigError(f"{where}: must be an object, not {type(parameters).__name__}")
    size = len(json.dumps(parameters, separators=(",", ":")).encode())
    if size > MAX_PARAMETERS_BYTES:
        raise ConfigError(f"{where}: {size} bytes, at most {MAX_PARAMETERS_BYTES}")
    if parameters.get("apiVersion") not in (API_VERSION, NVIDIA_API_VERSION):
        raise ConfigError(f"{where}.apiVersion: must be {API_VERSION} or {NVIDIA_API_VERSION},"
                          f" not {parameters.get('apiVersion')!r}")
    if parameters.get("kind") not in ("GpuConfig", "MigDeviceConfig"):
        raise ConfigError(f"{where}.kind: must be GpuConfig or MigDeviceConfig, not "
                          f"{parameters.get('kind')!r}")
    try:
        return _CONFIG.validate_python(parameters)
    except ValidationError as err:
        raise ConfigError("; ".join(_problem(where, e) for e in err.errors())) from None


def _problem(where: str, error: Any) -> str:
    # the discriminator's tag ("GpuConfig") is not a field of the document
    loc = [str(part) for part in error["loc"][1:]]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    path = ".".join([where, *loc])
    # a model validator's message starts with the field below the model it checks
    if error["type"] == "value_error" and ": " in message:
        field, message = message.split(": ", 1)
        path = f"{path}.{field}"
    return f"{path}: {message}"


@dataclass(frozen=True)
class OpaqueConfig:
    """One entry of status.allocation.devices.config for this driver, decoded."""

    index: int
    source: str  # FromClass | FromClaim
    requests: tuple[str, ...]  # empty: every request
    config: DeviceConfig

    def applies_to(self, request: str) -> bool:
        """`request` is a result's request (`gpu` or `gpu/sub0`); a config may name either."""
        return not self.requests or request in self.requests or \
            request.split("/", 1)[0] in self.requests


def parse_allocation_configs(entries: Any, driver: str) -> list[OpaqueConfig]:
    """This driver's configs of an allocation, class configs first, each decoded.

    Configs for other drivers are skipped unread; a malformed one of ours is an error.
    """
    where = "status.allocation.devices.config"
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: must be a list")
    configs: list[OpaqueConfig] = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be an object")
        opaque = entry.get("opaque")
        if not isinstance(opaque, dict) or opaque.get("driver") != driver:
            continue
        source = entry.get("source")
        if source not in ("FromClass", "FromClaim"):
            raise ConfigError(f"{at}.source: must be FromClass or FromClaim, not {source!r}")
        requests = entry.get("requests") or []
        if not (isinstance(requests, list) and all(isinstance(r, str) for r in requests)):
            raise ConfigError(f"{at}.requests: must be a list of request names")
        configs.append(OpaqueConfig(i, source, tuple(requests),
                                    parse_parameters(opaque.get("parameters"),
                                                     f"{at}.opaque.parameters")))
    return sorted(configs, key=lambda c: (c.source != "FromClass", c.index))


def config_for(configs: Sequence[OpaqueConfig], request: str) -> OpaqueConfig | None:
    """The config that wins for a result's request: the last that applies."""
    winner = None
    for config in configs:
        if config.applies_to(request):
            winner = config
    return winner
