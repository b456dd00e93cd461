"""The device model: what discovery saw on a node, as plain frozen values.

Everything downstream (slices, CDI, allocation, the CLI) reads these values and
never an NVML handle, so the same code runs on real and mock GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Placement:
    """A MIG placement in memory-slice units: [start, start + size)."""

    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size

    def overlaps(self, other: Placement) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True)
class MigProfile:
    """A GPU-instance profile as NVML reports it for one GPU."""

    id: int
    index: int
    name: str
    memory_mb: int
    multiprocessors: int
    slice_count: int
    instance_count: int
    copy_engines: int
    decoders: int
    encoders: int
    jpeg_engines: int
    ofa_engines: int
    placements: tuple[Placement, ...]


@dataclass(frozen=True)
class MigDevice:
    """A live MIG device: one compute instance inside one GPU instance."""

    uuid: str
    gi_id: int
    ci_id: int
    profile_id: int
    profile: str
    placement: Placement
    ci_profile_id: int
    gi_cap_minor: int | None
    ci_cap_minor: int | None


@dataclass(frozen=True)
class NvLink:
    """One active NVLink of a GPU; `remote_bus_id` is a GPU or an NVSwitch."""

    link: int
    version: str
    remote_type: str
    remote_bus_id: str


@dataclass(frozen=True)
class Gpu:
    index: int
    minor: int
    uuid: str
    product_name: str
    brand: str
    architecture: str
    cuda_compute_capability: str
    memory_bytes: int
    pci_bus_id: str
    pcie_root: str | None
    numa_node: int | None
    mig_enabled: bool
    mig_pending: bool
    mig_profiles: tuple[MigProfile, ...] = ()
    mig_devices: tuple[MigDevice, ...] = ()
    nvlinks: tuple[NvLink, ...] = ()
    health_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.health_error is None


@dataclass(frozen=True)
class Inventory:
    """All GPUs of a node plus the pairwise link class (`NV18`, `PIX`, ..., `SYS`)."""

    driver_version: str
    cuda_driver_version: str
    gpus: tuple[Gpu, ...]
    links: dict[tuple[int, int], str] = field(default_factory=dict)

    def link(self, a: int, b: int) -> str | None:
        """Link class between GPU indexes a and b (either order); None if unknown."""
        return self.links.get((min(a, b), max(a, b)))
