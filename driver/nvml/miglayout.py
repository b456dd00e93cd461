"""The MIG rules the mock NVML and profile validation obey: placements, GPU-instance ids,
and a GPU's live GPU and compute instances as NVML creates and destroys them.

The facts follow allocator-nvml-mig.md part C: placements count memory slices (8 per GPU),
GPU-instance ids follow the heap layout of those slices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pynvml

from driver.errors import NvmlLayerError
from driver.nvml.profile import ComputeInstanceSpec, GiProfile, GpuInstanceSpec, MigSpec

# First GPU-instance id for each placement size: 0 whole, 1-2 halves, 3-6 quarters, 7-14 eighths.
_GI_ID_BASE = {8: 0, 4: 1, 2: 3, 1: 7}
MAX_COMPUTE_INSTANCES = 8  # ci0..ci7 per GPU instance, as the kernel reserves them

# NVML_COMPUTE_INSTANCE_PROFILE_* -> compute slices, for the 7-slice parts modeled here.
CI_PROFILE_SLICES: dict[int, int] = {
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE: 1,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE: 3,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE: 7,
}
# A compute instance of n slices starts on a multiple of this, like GPU instances do in
# memory slices (a 3-slice instance takes a 4-aligned block).
_CI_ALIGN = {1: 1, 2: 2, 3: 4, 4: 4, 7: 8}


@dataclass(frozen=True)
class Placement:
    start: int
    size: int

    def overlaps(self, other: Placement) -> bool:
        return self.start < other.start + other.size and other.start < self.start + self.size

    def __str__(self) -> str:
        return f"{self.start}:{self.size}"


def gi_id(placement: Placement) -> int:
    """GPU-instance id by the heap layout of the memory slices (allocator-nvml-mig.md C.5)."""
    return _GI_ID_BASE[placement.size] + placement.start // placement.size


@dataclass
class ComputeInstance:
    id: int
    profile_id: int  # the NVML_COMPUTE_INSTANCE_PROFILE_* index, which NVML reports as the id
    placement: Placement  # in compute slices of its GPU instance


@dataclass
class GpuInstance:
    id: int
    profile: GiProfile
    placement: Placement
    cis: dict[int, ComputeInstance] = field(default_factory=dict)

    def ci(self, ci_id: int) -> ComputeInstance:
        if ci_id not in self.cis:
            raise MigError(pynvml.NVML_ERROR_NOT_FOUND, f"GPU instance {self.id} has no compute "
                           f"instance {ci_id}", "id")
        return self.cis[ci_id]


class MigError(NvmlLayerError):
    """A MIG request NVML refuses: `code` is its NVML_ERROR_*, `where` the offending field."""

    def __init__(self, code: int, message: str, where: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.where = where


class MigLayout:
    """The live GPU and compute instances of one GPU, created and destroyed by NVML's rules.

    Refusals: a placement the profile does not list is INVALID_ARGUMENT; one that overlaps a
    live instance, or a profile at its instanceCount, is INSUFFICIENT_RESOURCES; destroying
    a GPU instance that still has compute instances, or turning MIG mode off while GPU
    instances live, is IN_USE.
    """

    def __init__(self, spec: MigSpec, enabled: bool) -> None:
        self.spec = spec
        self.enabled = enabled  # MIG mode, current = pending (no reset needed, as on Hopper)
        self.gis: dict[int, GpuInstance] = {}

    def profile(self, profile_id: int) -> GiProfile:
        for profile in self.spec.profiles.values():
            if profile.id == profile_id:
                return profile
        raise MigError(pynvml.NVML_ERROR_INVALID_ARGUMENT,
                       f"no GPU-instance profile with id {profile_id}", "profileId")

    def placements(self, profile_id: int) -> list[Placement]:
        placements = self.profile(profile_id).placements
        return [Placement(start, placements.size) for start in placements.starts]

    def _blocker(self, placement: Placement) -> GpuInstance | None:
        return next((gi for gi in self.gis.values() if gi.placement.overlaps(placement)), None)

    def _room(self, profile: GiProfile) -> int:
        return profile.instanceCount - sum(gi.profile.id == profile.id for gi in self.gis.values())

    def remaining(self, profile_id: int) -> int:
        """How many more instances of the profile fit (its placements never overlap each other)."""
        free = sum(self._blocker(p) is None for p in self.placements(profile_id))
        return max(0, min(free, self._room(self.profile(profile_id))))

    def create_gi(self, profile_id: int, start: int | None = None,
                  size: int | None = None) -> GpuInstance:
        """A GPU instance at `start` (and `size`, if the caller gives one), else where NVML
        would put it."""
        profile = self.profile(profile_id)
        legal = self.placements(profile_id)
        if start is None:
            free = [p for p in legal if self._blocker(p) is None]
            if not free:
                raise MigError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES,
                               f"no free placement for {profile.name}", "profileId")
            # NVML fills from the top: in the MIG user guide two 3g instances get ids 2, then 1
            placement = free[-1]
        else:
            placement = Placement(start, profile.placements.size if size is None else size)
            if placement not in legal:
                raise MigError(pynvml.NVML_ERROR_INVALID_ARGUMENT,
                               f"{placement} is not a placement of {profile.name} "
                               f"({', '.join(map(str, legal))})", "start")
            blocker = self._blocker(placement)
            if blocker is not None:
                raise MigError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES,
                               f"placement {placement} overlaps GPU instance {blocker.id} "
                               f"({blocker.profile.name} at {blocker.placement})", "start")
        if self._room(profile) <= 0:
            raise MigError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES,
                           f"{profile.name} allows {profile.instanceCount} instance(s)",
                           "profileId")
        gi = GpuInstance(gi_id(placement), profile, placement)
        self.gis[gi.id] = gi
        return gi

    def gi(self, gi_id: int) -> GpuInstance:
        if gi_id not in self.gis:
            raise MigError(pynvml.NVML_ERROR_NOT_FOUND, f"no GPU instance {gi_id}")
        return self.gis[gi_id]

    def set_enabled(self, enabled: bool) -> None:
        if not enabled and self.gis:
            raise MigError(pynvml.NVML_ERROR_IN_USE, "MIG mode cannot be disabled while GPU "
                           f"instances {sorted(self.gis)} exist")
        self.enabled = enabled

    def destroy_gi(self, gi_id: int) -> None:
        gi = self.gi(gi_id)
        if gi.cis:
            raise MigError(pynvml.NVML_ERROR_IN_USE, f"GPU instance {gi_id} still has compute "
                           f"instances {sorted(gi.cis)}")
        del self.gis[gi_id]

    @staticmethod
    def ci_slices(gi: GpuInstance, ci_profile: int) -> int:
        slices = CI_PROFILE_SLICES.get(ci_profile)
        if slices is None or slices > gi.profile.sliceCount:
            raise MigError(pynvml.NVML_ERROR_NOT_SUPPORTED, f"compute-instance profile "
                           f"{ci_profile} does not fit {gi.profile.name}", "profileId")
        return slices

    @classmethod
    def ci_placements(cls, gi: GpuInstance, ci_profile: int) -> list[Placement]:
        size = cls.ci_slices(gi, ci_profile)
        width = gi.profile.sliceCount
        return [Placement(start, size) for start in range(0, width, _CI_ALIGN[size])
                if start + size <= width]

    def create_ci(self, gi_id: int, ci_profile: int, start: int | None = None,
                  ci_id: int | None = None) -> ComputeInstance:
        gi = self.gi(gi_id)
        legal = self.ci_placements(gi, ci_profile)
        free = [p for p in legal if not any(p.overlaps(ci.placement) for ci in gi.cis.values())]
        if start is None:
            if not free:
                raise MigError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES,
                               f"GPU instance {gi_id} has no room for compute-instance profile "
                               f"{ci_profile}", "profileId")
            placement = free[0]
        else:
            placement = Placement(start, legal[0].size)
            if placement not in legal:
                raise MigError(pynvml.NVML_ERROR_INVALID_ARGUMENT, f"{placement} is not a "
                               f"compute-instance placement in {gi.profile.name}", "start")
            if placement not in free:
                raise MigError(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES, f"placement "
                               f"{placement} overlaps a compute instance", "start")
        if ci_id is None:
            ci_id = min(set(range(MAX_COMPUTE_INSTANCES)) - set(gi.cis))
        elif ci_id in gi.cis or not 0 <= ci_id < MAX_COMPUTE_INSTANCES:
            raise MigError(pynvml.NVML_ERROR_INVALID_ARGUMENT,
                           f"compute-instance id {ci_id} is taken or out of range", "id")
        ci = ComputeInstance(ci_id, ci_profile, placement)
        gi.cis[ci_id] = ci
        return ci

    def destroy_ci(self, gi_id: int, ci_id: int) -> None:
        gi = self.gi(gi_id)
        del gi.cis[gi.ci(ci_id).id]

    def restore(self, specs: Sequence[GpuInstanceSpec]) -> None:
        """Create declared instances in order; a refusal names the entry (`gpuInstances[1]`)."""
        for i, spec in enumerate(specs):
            at = f"gpuInstances[{i}]"
            try:
                gi = self.create_gi(spec.profileId, spec.start)
            except MigError as err:
                raise MigError(err.code, err.message, f"{at}.{err.where}") from None
            for j, ci in enumerate(spec.computeInstances):
                try:
                    self.create_ci(gi.id, ci.profileId, ci.start, ci.id)
                except MigError as err:
                    raise MigError(err.code, err.message,
                                   f"{at}.computeInstances[{j}].{err.where}") from None

    def specs(self) -> list[GpuInstanceSpec]:
        """The live instances with every choice spelled out, so `restore` rebuilds them exactly."""
        return [GpuInstanceSpec(
            profileId=gi.profile.id, start=gi.placement.start,
            computeInstances=[ComputeInstanceSpec(profileId=ci.profile_id,
                                                  start=ci.placement.start, id=ci.id)
                              for _, ci in sorted(gi.cis.items())])
            for _, gi in sorted(self.gis.items())]

    def mig_devices(self) -> Iterator[tuple[GpuInstance, ComputeInstance]]:
        """Every compute instance, which NVML presents as one MIG device, in id order."""
        for _, gi in sorted(self.gis.items()):
            for _, ci in sorted(gi.cis.items()):
                yield gi, ci


# --------------------------------------------------------------------------- loading
