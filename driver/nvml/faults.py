"""Faults injected into mock GPUs (`gpu-dra mock inject`), applied to the persisted health
state as pure functions so the CLI and a running mock agree on what each fault means.

A fault is a one-shot event (an XID, a double-bit ECC error, the GPU falling off the bus:
delivered once to each event set registered at the time) and/or a lasting condition
(lost, removed, needing a reset, the recovery action NVML reports) that stays until
`recover` or `add`. The recovery action an XID sets follows NVIDIA's XID catalog
("Resolution Bucket (Immediate Action)"): the application errors NVIDIA's drivers ignore
need nothing, 79 (fallen off the bus) a reboot, every other XID a GPU reset; the action
NVML reports is the most severe since the last reset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pynvml

from driver.nvml.profile import FaultEvent, GpuCondition, HealthState

FaultKind = Literal["xid", "ecc-dbe", "lost", "recover", "remove", "add"]
FAULT_KINDS: tuple[FaultKind, ...] = ("xid", "ecc-dbe", "lost", "recover", "remove", "add")

# Kept in the state file so a waiter that polls now and then misses none.
EVENTS_KEPT = 64

# Application errors: the list NVIDIA's drivers ignore.
INFORMATIONAL_XIDS = frozenset({13, 31, 43, 45, 68, 109})
REBOOT_XIDS = frozenset({79})
RESET_REQUIRED_XIDS = frozenset({119, 120})  # GSP timeout or error: answers nothing until reset
ROW_REMAP_PENDING_XIDS = frozenset({63})
ROW_REMAP_FAILURE_XIDS = frozenset({64})

# Severity of the recovery actions, to keep the most severe one.
_SEVERITY = {pynvml.NVML_GPU_RECOVERY_ACTION_NONE: 0,
             pynvml.NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN: 1,
             pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P: 2,
             pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET: 3,
             pynvml.NVML_GPU_RECOVERY_ACTION_BUS_RESET: 4,
             pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET: 5,
             pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT: 6,
             pynvml.NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT: 7}


@dataclass(frozen=True)
class Fault:
    """One fault of the command line: its kind, and the XID number for `xid`."""

    kind: FaultKind
    xid: int | None = None


def xid_recovery_action(xid: int) -> int:
    """The nvmlDeviceGpuRecoveryAction_t the driver reports after `xid`."""
    if xid in INFORMATIONAL_XIDS:
        return int(pynvml.NVML_GPU_RECOVERY_ACTION_NONE)
    if xid in REBOOT_XIDS:
        return int(pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT)
    return int(pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET)


def _worst(a: int, b: int) -> int:
    return max(a, b, key=lambda action: _SEVERITY.get(action, 0))


def apply_fault(health: HealthState, gpu: str, fault: Fault) -> HealthState:
    """The health state after `fault` hits the GPU with UUID `gpu`."""
    condition = health.gpus.get(gpu, GpuCondition())
    event: Literal["xid", "ecc-dbe", "lost"] | None = None
    if fault.kind == "xid":
        assert fault.xid is not None
        event = "xid"
        condition = condition.model_copy(update={
            "recoveryAction": _worst(condition.recoveryAction, xid_recovery_action(fault.xid)),
            "resetRequired": condition.resetRequired or fault.xid in RESET_REQUIRED_XIDS,
            "rowRemapPending": condition.rowRemapPending or fault.xid in ROW_REMAP_PENDING_XIDS,
            "rowRemapFailure": condition.rowRemapFailure or fault.xid in ROW_REMAP_FAILURE_XIDS})
    elif fault.kind == "ecc-dbe":  # a reset remaps the bad row (Ampere and later)
        event = "ecc-dbe"
        condition = condition.model_copy(update={
            "recoveryAction": _worst(condition.recoveryAction,
                                     pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET),
            "rowRemapPending": True})
    elif fault.kind == "lost":
        event = "lost"
        condition = condition.model_copy(update={"lost": True})
    elif fault.kind == "recover":
        condition = GpuCondition(removed=condition.removed)
    else:  # a GPU plugged in again is reset: it comes back with no fault
        condition = GpuCondition(removed=fault.kind == "remove")
    gpus = {**health.gpus, gpu: condition}
    if condition == GpuCondition():
        del gpus[gpu]
    if event is None:
        return health.model_copy(update={"gpus": gpus})
    seq = health.seq + 1
    events = [*health.events, FaultEvent(seq=seq, gpu=gpu, kind=event, xid=fault.xid)]
    return HealthState(seq=seq, events=events[-EVENTS_KEPT:], gpus=gpus)
