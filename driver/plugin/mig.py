"""Dynamic MIG: create a MIG device at an exact placement, and destroy it, through NVML.

One lock per GPU serializes MIG changes on that GPU (NVML reconfigures the whole GPU's
partition table); different GPUs change in parallel. A MIG device is one GPU instance at
the published placement plus one compute instance spanning it. MIG mode follows what is
prepared, read live from NVML: the first MIG device turns it on, a whole-GPU prepare turns
it off (Hopper and later switch without a reset when no process uses the GPU; a GPU that
would need a reset is refused). A creation that fails half-way destroys what it made, and
turns MIG mode off again if it turned it on, before raising; if that destroy fails too, it
says which GPU instance is left (`MigLeftover`), for the caller to keep on record. A
device is found again by its placement, which identifies a GPU instance uniquely on its
GPU, so destroying works from a plan recorded before creation as well as from a finished
record.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pynvml

from driver.errors import PluginError
from driver.inventory.model import Gpu, MigProfile, Placement
from driver.nvml import Provider

log = logging.getLogger(__name__)

# The compute-instance profiles by size, largest first: the one whose slice count equals
# the GPU instance's spans it.
_CI_PROFILES = (pynvml.NVML_COMPUTE_INSTANCE_PROFILE_8_SLICE,
                pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE,
                pynvml.NVML_COMPUTE_INSTANCE_PROFILE_6_SLICE,
                pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE,
                pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE,
                pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE,
                pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE)
_MAX_INSTANCES = 8  # GPU instances of one profile, or compute instances of one GPU instance
_GONE = (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT)


class MigFailure(PluginError):
    """NVML refused a MIG change; the message names the GPU, profile and placement."""


class MigLeftover(MigFailure):
    """A creation failed and so did destroying what it made: the GPU instance at the
    placement is left on the GPU (`gi_id`, None if NVML never told its id). The caller
    must keep it on record, or nothing ever destroys it and its placement stays taken."""

    def __init__(self, message: str, gi_id: int | None) -> None:
        super().__init__(message)
        self.gi_id = gi_id


@dataclass(frozen=True)
class CreatedMig:
    gi_id: int
    ci_id: int


@dataclass(frozen=True)
class LiveInstance:
    profile_id: int
    start: int
    gi_id: int


class MigManager:
    def __init__(self, provider: Provider) -> None:
        self.nvml = provider.nvml
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_mutex = threading.Lock()

    def _lock(self, gpu_uuid: str) -> threading.Lock:
        with self._locks_mutex:
            return self._locks[gpu_uuid]

    def create(self, gpu: Gpu, profile: MigProfile, placement: Placement) -> CreatedMig:
        what = f"MIG {profile.name} at {placement.start}:{placement.size} on {gpu.uuid}"
        nvml = self.nvml
        with self._lock(gpu.uuid):
            try:
                device = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            except pynvml.NVMLError as err:
                raise MigFailure(f"cannot create {what}: {err}") from None
            enabled = self._set_mode(device, gpu.uuid, True)
            try:
                gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(
                    device, profile.id, ctypes.byref(
                        pynvml.c_nvmlGpuInstancePlacement_t(placement.start, placement.size)))
            except pynvml.NVMLError as err:
                self._restore_mode(device, gpu.uuid, enabled)
                raise MigFailure(f"cannot create {what}: {err}") from None
            ci, gi_id = None, None
            try:
                gi_id = nvml.nvmlGpuInstanceGetInfo(gi).id
                ci = nvml.nvmlGpuInstanceCreateComputeInstance(
                    gi, self._full_ci_profile(gi, profile))
                ci_id = nvml.nvmlComputeInstanceGetInfo(ci).id
            except pynvml.NVMLError as err:
                failure = f"cannot create the compute instance of {what}: {err}"
                left = self._undo(gi, ci)
                if left is not None:
                    raise MigLeftover(f"{failure}; destroying its GPU instance "
                                      f"{'(id unknown)' if gi_id is None else gi_id} failed "
                                      f"too: {left}", gi_id) from None
                self._restore_mode(device, gpu.uuid, enabled)
                raise MigFailure(failure) from None
        log.info("created %s: GPU instance %d, compute instance %d", what, gi_id, ci_id)
        return CreatedMig(gi_id, ci_id)

    def disable(self, gpu: Gpu) -> None:
        """Turn MIG mode off for a whole-GPU prepare; refused while MIG devices exist or a
        process uses the GPU."""
        nvml = self.nvml
        with self._lock(gpu.uuid):
            try:
                device = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                if nvml.nvmlDeviceGetMigMode(device)[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
                    return
                live = [(p.name, gi.placement.start) for p in gpu.mig_profiles
                        for gi in map(nvml.nvmlGpuInstanceGetInfo,
                                      self._gpu_instances(device, p.id))]
            except pynvml.NVMLError as err:
                raise MigFailure(f"cannot read the MIG mode of {gpu.uuid}: {err}") from None
            if live:
                raise MigFailure(f"cannot use the whole GPU {gpu.uuid}: MIG mode is on and "
                                 f"MIG devices still exist on it ("
                                 + ", ".join(f"{name} at {start}" for name, start in live)
                                 + "); unprepare the claims that hold them first")
            self._set_mode(device, gpu.uuid, False)

    def _set_mode(self, device: Any, gpu_uuid: str, on: bool) -> bool:
        """Switch MIG mode (the GPU's lock held); True if it changed."""
        nvml = self.nvml
        verb = "enable" if on else "disable"
        wanted = pynvml.NVML_DEVICE_MIG_ENABLE if on else pynvml.NVML_DEVICE_MIG_DISABLE
        try:
            if nvml.nvmlDeviceGetMigMode(device)[0] == wanted:
                return False
            status = nvml.nvmlDeviceSetMigMode(device, wanted)
        except pynvml.NVMLError as err:
            hint = "; a process is using the GPU" \
                if err.value == pynvml.NVML_ERROR_IN_USE else ""
            raise MigFailure(f"cannot {verb} MIG mode on {gpu_uuid}: {err}{hint}") from None
        if status != pynvml.NVML_SUCCESS:
            raise MigFailure(f"cannot {verb} MIG mode on {gpu_uuid} without a GPU reset "
                             f"(activation status {status}); reset the GPU, then retry")
        log.info("%sd MIG mode on %s", verb, gpu_uuid)
        return True

    def _restore_mode(self, device: Any, gpu_uuid: str, enabled: bool) -> None:
        """Undo a MIG mode switch that `create` made, once nothing it made is left."""
        if not enabled:
            return
        try:
            self._set_mode(device, gpu_uuid, False)
        except MigFailure as err:  # harmless: the next whole-GPU prepare turns it off
            log.error("%s", err)

    def _full_ci_profile(self, gi: Any, profile: MigProfile) -> int:
        for index in _CI_PROFILES:
            try:
                info = self.nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                    gi, index, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
            except pynvml.NVMLError:
                continue
            if info.sliceCount == profile.slice_count:
                return int(info.id)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def _undo(self, gi: Any, ci: Any) -> str | None:
        """Destroy what a failed creation made; NVML's error if it cannot."""
        try:
            if ci is not None:
                self.nvml.nvmlComputeInstanceDestroy(ci)
            self.nvml.nvmlGpuInstanceDestroy(gi)
        except pynvml.NVMLError as err:
            return str(err)
        return None

    def destroy(self, gpu_uuid: str, profile_id: int, start: int) -> bool:
        """Destroy the MIG device at this placement (its compute instances, then the GPU
        instance); False when there is none, which is success for a rollback."""
        nvml = self.nvml
        what = f"the MIG device of profile {profile_id} at {start} on {gpu_uuid}"
        with self._lock(gpu_uuid):
            try:
                device = nvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
                gi = next((gi for gi in self._gpu_instances(device, profile_id)
                           if nvml.nvmlGpuInstanceGetInfo(gi).placement.start == start), None)
                if gi is None:
                    return False
                what += f" (GPU instance {nvml.nvmlGpuInstanceGetInfo(gi).id})"
                for ci_id in range(_MAX_INSTANCES):
                    try:
                        ci = nvml.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id)
                    except pynvml.NVMLError as err:
                        if err.value in _GONE:
                            continue
                        raise
                    nvml.nvmlComputeInstanceDestroy(ci)
                nvml.nvmlGpuInstanceDestroy(gi)
            except pynvml.NVMLError as err:
                raise MigFailure(f"cannot destroy {what}: {err}") from None
        log.info("destroyed %s", what)
        return True

    def _gpu_instances(self, device: Any, profile_id: int) -> list[Any]:
        buffer = (pynvml.c_nvmlGpuInstance_t * _MAX_INSTANCES)()
        count = ctypes.c_uint(0)
        self.nvml.nvmlDeviceGetGpuInstances(device, profile_id, buffer, ctypes.byref(count))
        return [buffer[i] for i in range(count.value)]

    def live(self, gpu: Gpu) -> list[LiveInstance]:
        """Every GPU instance on the GPU, of any profile it offers."""
        nvml = self.nvml
        found = []
        with self._lock(gpu.uuid):
            try:
                device = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
                for profile in gpu.mig_profiles:
                    for gi in self._gpu_instances(device, profile.id):
                        info = nvml.nvmlGpuInstanceGetInfo(gi)
                        found.append(LiveInstance(profile.id, info.placement.start, info.id))
            except pynvml.NVMLError as err:
                raise MigFailure(f"cannot list the MIG devices of {gpu.uuid}: {err}") from None
        return found
