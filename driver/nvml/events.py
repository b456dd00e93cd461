"""GPU health as NVML reports it, over any provider: event sets, liveness, recovery action.

Like discovery, this talks to `Provider.nvml` only through pynvml's functions, so the real
library and the mock answer the same calls and the health monitor sees plain values:
`NvmlEvent`, `Registration`, `GpuLiveness`, `RecoveryAction`. A `HealthWatch` keeps NVML
initialized while it is open (one event set; create one per GPU or one for all). NVML
registers events on whole GPUs only; an event on a MIG device names its GI and CI ids.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass
from typing import Any

import pynvml

from driver.errors import NvmlLayerError

# The events that say a GPU is failing; NVML supports a subset per GPU.
EVENT_TYPES: dict[int, str] = {pynvml.nvmlEventTypeXidCriticalError: "xid",
                               pynvml.nvmlEventTypeDoubleBitEccError: "double-bit-ecc",
                               pynvml.nvmlEventTypeSingleBitEccError: "single-bit-ecc"}
HEALTH_EVENT_MASK = sum(EVENT_TYPES)
# nvmlEventData_t's gpuInstanceId/computeInstanceId when the event names no MIG instance.
NO_INSTANCE = 0xFFFFFFFF
# Bursts (an XID storm) are read in one wait, up to this many events.
MAX_EVENTS_PER_WAIT = 256


class EventKind(enum.StrEnum):
    XID = "xid"
    DOUBLE_BIT_ECC = "double-bit-ecc"
    SINGLE_BIT_ECC = "single-bit-ecc"


class Liveness(enum.StrEnum):
    """Whether a GPU still answers NVML (the values are driver.health's words)."""

    OK = "answers"
    LOST = "lost"  # NVML_ERROR_GPU_IS_LOST: fallen off the bus
    RESET_REQUIRED = "requires-reset"  # NVML_ERROR_RESET_REQUIRED
    GONE = "gone"  # not enumerated any more (removed, unbound)
    ROW_REMAP_FAILED = "remap-failure"  # no spare rows left for an uncorrectable error


class RecoveryAction(enum.IntEnum):
    """nvmlDeviceGpuRecoveryAction_t: what the driver says the GPU needs."""

    NONE = pynvml.NVML_GPU_RECOVERY_ACTION_NONE
    GPU_RESET = pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET
    NODE_REBOOT = pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT
    DRAIN_P2P = pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P
    DRAIN_AND_RESET = pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET
    RECOVER_IMEX_DOMAIN = pynvml.NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN
    BUS_RESET = pynvml.NVML_GPU_RECOVERY_ACTION_BUS_RESET
    SYSTEM_REBOOT = pynvml.NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT

    @property
    def need(self) -> str:
        """What it asks of the node: none, reset, reboot or drain (an IMEX domain's
        recovery leaves the GPU usable, as NVIDIA's driver treats it)."""
        return _NEEDS[self]


_NEEDS = {RecoveryAction.NONE: "none", RecoveryAction.RECOVER_IMEX_DOMAIN: "none",
          RecoveryAction.GPU_RESET: "reset", RecoveryAction.BUS_RESET: "reset",
          RecoveryAction.NODE_REBOOT: "reboot", RecoveryAction.SYSTEM_REBOOT: "reboot",
          RecoveryAction.DRAIN_P2P: "drain", RecoveryAction.DRAIN_AND_RESET: "drain"}


@dataclass(frozen=True)
class NvmlEvent:
    """One event of a registered GPU; `xid` for XID events, GI/CI ids when NVML names a MIG
    instance."""

    minor: int
    uuid: str
    kind: EventKind
    xid: int | None = None
    gpu_instance: int | None = None
    compute_instance: int | None = None


@dataclass(frozen=True)
class Registration:
    """What a GPU's events are watched for; none (`monitored` false) when NVML supports none
    of them or refused the registration: `reason` says why, and the GPU must be published
    as unmonitored, never as healthy."""

    minor: int | None  # None: the GPU could not be opened
    uuid: str
    kinds: frozenset[EventKind]
    reason: str = ""

    @property
    def monitored(self) -> bool:
        return EventKind.XID in self.kinds


@dataclass(frozen=True)
class GpuLiveness:
    """A GPU's answer to the periodic check; `remap_pending`: a reset would apply pending row
    remaps; `detail`: the NVML error behind a state other than OK."""

    uuid: str
    state: Liveness
    remap_pending: bool = False
    detail: str = ""


class EventsLost(NvmlLayerError):
    """The wait answered GPU_IS_LOST: a registered GPU fell off the bus (check each GPU's
    liveness to find which)."""


class HealthWatch:
    """One NVML event set, and the health queries, with NVML initialized while it is open."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        nvml.nvmlInit()
        try:
            self._set = nvml.nvmlEventSetCreate()
        except pynvml.NVMLError:
            nvml.nvmlShutdown()
            raise
        self._gpus: dict[int, tuple[int, str]] = {}  # handle address -> (minor, uuid)
        self._lost: EventsLost | None = None

    def __enter__(self) -> HealthWatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._nvml.nvmlEventSetFree(self._set)
        finally:
            self._nvml.nvmlShutdown()

    def register(self, uuid: str) -> Registration:
        """Watch the GPU `uuid` for the health events it supports."""
        try:
            handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
            minor = int(self._nvml.nvmlDeviceGetMinorNumber(handle))
        except pynvml.NVMLError as err:
            return Registration(None, uuid, frozenset(), f"cannot open the GPU: {err}")
        try:
            mask = int(self._nvml.nvmlDeviceGetSupportedEventTypes(handle)) & HEALTH_EVENT_MASK
            if mask:
                self._nvml.nvmlDeviceRegisterEvents(handle, mask, self._set)
        except pynvml.NVMLError as err:
            return Registration(minor, uuid, frozenset(), f"events not supported: {err}")
        self._gpus[_address(handle)] = (minor, uuid)
        kinds = frozenset(EventKind(name) for bit, name in EVENT_TYPES.items() if mask & bit)
        reason = "" if EventKind.XID in kinds else "NVML supports no XID events on this GPU"
        return Registration(minor, uuid, kinds, reason)

    def wait(self, timeout_s: float) -> list[NvmlEvent]:
        """The events that come within `timeout_s` (none: an empty list), with any that
        follow at once; raises EventsLost when NVML answers GPU_IS_LOST."""
        if self._lost is not None:
            lost, self._lost = self._lost, None
            raise lost
        events: list[NvmlEvent] = []
        timeout_ms = max(0, round(timeout_s * 1000))
        while len(events) < MAX_EVENTS_PER_WAIT:
            try:
                data = self._nvml.nvmlEventSetWait_v2(self._set, timeout_ms)
            except pynvml.NVMLError as err:
                if err.value == pynvml.NVML_ERROR_TIMEOUT:
                    break
                if err.value != pynvml.NVML_ERROR_GPU_IS_LOST:
                    raise
                lost = EventsLost(f"waiting for GPU events: {err}")
                if not events:
                    raise lost from err
                self._lost = lost  # the events before it first; the loss on the next wait
                break
            timeout_ms = 0
            event = self._event(data)
            if event is not None:
                events.append(event)
        return events

    def _event(self, data: Any) -> NvmlEvent | None:
        gpu = self._gpus.get(_address(data.device))
        name = EVENT_TYPES.get(int(data.eventType))
        if gpu is None or name is None:
            return None
        kind = EventKind(name)
        return NvmlEvent(
            minor=gpu[0], uuid=gpu[1], kind=kind,
            xid=int(data.eventData) if kind is EventKind.XID else None,
            gpu_instance=_instance(data.gpuInstanceId),
            compute_instance=_instance(data.computeInstanceId))

    def liveness(self, uuid: str) -> GpuLiveness:
        """Whether the GPU still answers: found by UUID, then its remapped rows (a cheap
        query that a lost GPU or one needing a reset fails)."""
        try:
            handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
            rows = self._nvml.nvmlDeviceGetRemappedRows(handle)
        except pynvml.NVMLError as err:
            if err.value == pynvml.NVML_ERROR_NOT_SUPPORTED:  # no row remapping before Ampere
                return GpuLiveness(uuid, Liveness.OK)
            state = {pynvml.NVML_ERROR_NOT_FOUND: Liveness.GONE,
                     pynvml.NVML_ERROR_RESET_REQUIRED: Liveness.RESET_REQUIRED,
                     }.get(err.value, Liveness.LOST)
            return GpuLiveness(uuid, state, detail=str(err))
        _, _, pending, failure = rows
        if failure:
            return GpuLiveness(uuid, Liveness.ROW_REMAP_FAILED, bool(pending),
                               "row remapping failed")
        return GpuLiveness(uuid, Liveness.OK, bool(pending))

    def recovery_action(self, uuid: str) -> RecoveryAction | None:
        """The field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; None where the driver does not
        report it (older drivers, a GPU that does not answer, a value this driver does
        not know)."""
        try:
            handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
            value = self._nvml.nvmlDeviceGetFieldValues(
                handle, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])[0]
        except pynvml.NVMLError:
            return None
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            return None
        try:
            return RecoveryAction(int(value.value.uiVal))
        except ValueError:
            return None


def _address(handle: Any) -> int:
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def _instance(value: int) -> int | None:
    return None if value == NO_INSTANCE else int(value)
