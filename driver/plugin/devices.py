"""The devices this node publishes, by name: what preparing each one means physically.

Built once at start from the inventory with the same rules and names as the slice builder,
so a name in an allocation result resolves without a search. Which devices share hardware
is not decided here: the published counters say it, and the allocator's ledger checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

from driver.inventory.model import Gpu, Inventory, MigDevice, MigProfile, Placement
from driver.plugin.checkpoint import MigInstance
from driver.resourceslice.build import MigMode, gpu_device_name, mig_device_name


@dataclass(frozen=True)
class Target:
    """A published device: a whole GPU, a live (static) MIG device, or a dynamic MIG
    placement that preparation creates."""

    name: str
    gpu: Gpu
    placement: Placement | None = None  # None: the whole GPU
    static_mig: MigDevice | None = None
    dynamic_profile: MigProfile | None = None

    @property
    def kind(self) -> str:
        return "gpu" if self.placement is None else "mig"

    @property
    def mig_to_create(self) -> MigInstance | None:
        """The MIG device preparing a dynamic MIG target creates, as recorded before its
        ids are known (destroying it needs only its profile and placement)."""
        if self.dynamic_profile is None or self.placement is None:
            return None
        return MigInstance(self.dynamic_profile.id, self.placement.start, self.placement.size)


def device_index(inventory: Inventory, mig_mode: MigMode) -> dict[str, Target]:
    """Every device name the slice builder publishes for this inventory -> its Target."""
    index: dict[str, Target] = {}
    for gpu in inventory.gpus:
        if gpu.minor < 0:
            continue
        targets: list[Target] = []
        if mig_mode == "dynamic" and gpu.mig_profiles:
            targets.append(Target(gpu_device_name(gpu), gpu))
            targets += [Target(mig_device_name(gpu, profile.name, placement), gpu, placement,
                               dynamic_profile=profile)
                        for profile in gpu.mig_profiles for placement in profile.placements]
        elif gpu.mig_enabled:
            targets += [Target(mig_device_name(gpu, mig.profile, mig.placement), gpu,
                               mig.placement, static_mig=mig)
                        for mig in gpu.mig_devices]
        else:
            targets.append(Target(gpu_device_name(gpu), gpu))
        index.update((t.name, t) for t in targets)
    return index
