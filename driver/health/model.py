"""What the health core reads and writes: observations a monitor makes of a GPU, the
conditions they leave on it, and the transitions between them, as frozen values.

A monitor (NVML events, periodic checks, an admin's request) fills the observations;
nothing here talks to NVML, so the same rules run on real GPUs, the mock and in tests.
Times are timezone-aware `datetime`s passed in by the caller, never read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

# A device taint's effect as resource.k8s.io/v1 spells it ("None": informational, 1.35+).
Effect = Literal["None", "NoSchedule", "NoExecute"]
SEVERITY: dict[Effect, int] = {"None": 0, "NoSchedule": 1, "NoExecute": 2}

# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: NONE, GPU_RESET, NODE_REBOOT, DRAIN_P2P or
# DRAIN_AND_RESET (both "drain"); None where the driver does not report it.
RecoveryAction = Literal["none", "reset", "reboot", "drain"]

# A periodic check: the GPU answers, is lost (GPU_IS_LOST or its UUID no longer
# resolves), needs a reset (GPU_REQUIRES_RESET) or has a remapped-row failure.
Liveness = Literal["answers", "lost", "requires-reset", "remap-failure"]

# What a condition is about; also its taint key after `<driver>/`.
Kind = Literal["out-of-service", "gpu-lost", "xid", "ecc", "recovery",
               "remap-failure", "unmonitored"]

# The GPU's health as the kubelet's stream (KEP-4680) and the metrics say it.
Status = Literal["healthy", "unhealthy", "unknown"]


@dataclass(frozen=True)
class XidEvent:
    """An XidCriticalError event; `gi`/`ci` name the MIG instance it came from, and
    `recovery` is the driver's recovery action read with it (None: not reported)."""

    gpu: int
    xid: int
    at: datetime
    gi: int | None = None
    ci: int | None = None
    recovery: RecoveryAction | None = None


@dataclass(frozen=True)
class EccEvent:
    """A DoubleBitEccError event: memory the GPU could not correct."""

    gpu: int
    at: datetime


@dataclass(frozen=True)
class Check:
    """One periodic liveness check of a GPU."""

    gpu: int
    at: datetime
    liveness: Liveness
    recovery: RecoveryAction | None = None


@dataclass(frozen=True)
class Unmonitored:
    """NVML cannot deliver this GPU's events (`supported` False), or can again."""

    gpu: int
    at: datetime
    supported: bool = False


@dataclass(frozen=True)
class Manual:
    """An admin's request: keep the GPU out of service, return it to service (that
    condition alone goes), or clear everything on it."""

    gpu: int
    at: datetime
    action: Literal["out-of-service", "return", "clear"]
    reason: str = ""


Observation = XidEvent | EccEvent | Check | Unmonitored | Manual


@dataclass(frozen=True)
class Condition:
    """Something wrong (or unknown) about a GPU, from `since` until it is removed.

    `last` is the latest observation that confirmed it (the quiet window counts from
    there); `value` becomes the taint's value.
    """

    kind: Kind
    effect: Effect
    since: datetime
    last: datetime
    value: str = ""
    xid: int | None = None


@dataclass(frozen=True)
class GpuHealth:
    """A GPU's conditions, and whether it has shown a need for recovery (lost, a reset
    or another recovery action asked for) since its latest fatal event: only then can
    answering again mean that it was reset."""

    gpu: int
    conditions: tuple[Condition, ...] = ()
    recovery_seen: bool = False

    @property
    def status(self) -> Status:
        if any(c.effect != "None" for c in self.conditions):
            return "unhealthy"
        if any(c.kind == "unmonitored" for c in self.conditions):
            return "unknown"
        return "healthy"


@dataclass(frozen=True)
class Transition:
    """A condition set or cleared on a GPU, for the caller to log and count."""

    gpu: int
    kind: Kind
    change: Literal["set", "cleared"]
    before: Status
    after: Status
    cause: str
    at: datetime
    xid: int | None = None
    meaning: str | None = None
