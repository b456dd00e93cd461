"""The pydantic models of our opaque device configuration (`driver.plugin.config` says what
they decode and how strictly). A module of their own, loaded by the first config decoded:
pydantic and the models cost a plugin's start about 0.1 s of imports, and most claims
carry no config.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from driver.plugin.config import ApiVersion, memory_bytes

_DEVICE_KEY = re.compile(r"[0-9]+|gpu-[0-9]+|GPU-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


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
CONFIG: TypeAdapter[DeviceConfig] = TypeAdapter(
    Annotated[GpuConfig | MigDeviceConfig, Field(discriminator="kind")])
