"""One discovery path over any NVML provider: Provider -> Inventory.

Every NVML query of the driver is made here, so the mock only needs to be
faithful to this module's calls. An NVML error on one GPU marks that GPU
unhealthy and discovery goes on; queries a GPU does not support (MIG on an L4,
NVLink on a lone GPU) are normal answers, not errors.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from itertools import combinations
from typing import Any, TypeVar

import pynvml

from driver.inventory.model import Gpu, Inventory, MigDevice, MigProfile, NvLink, Placement
from driver.inventory.topology import link_class
from driver.nvml import Provider

T = TypeVar("T")

# nvmlBrandType_t -> the name NVIDIA's DRA driver publishes ("Nvidia", "Tesla", ...).
BRANDS: dict[int, str] = {
    getattr(pynvml, name): name.removeprefix("NVML_BRAND_").replace("_", " ").title()
    for name in sorted(dir(pynvml), reverse=True)  # the older alias of a value loses
    if name.startswith("NVML_BRAND_") and name != "NVML_BRAND_COUNT"
}

ARCHITECTURES: dict[int, str] = {
    pynvml.NVML_DEVICE_ARCH_KEPLER: "Kepler",
    pynvml.NVML_DEVICE_ARCH_MAXWELL: "Maxwell",
    pynvml.NVML_DEVICE_ARCH_PASCAL: "Pascal",
    pynvml.NVML_DEVICE_ARCH_VOLTA: "Volta",
    pynvml.NVML_DEVICE_ARCH_TURING: "Turing",
    pynvml.NVML_DEVICE_ARCH_AMPERE: "Ampere",
    pynvml.NVML_DEVICE_ARCH_ADA: "Ada Lovelace",
    pynvml.NVML_DEVICE_ARCH_HOPPER: "Hopper",
    pynvml.NVML_DEVICE_ARCH_BLACKWELL: "Blackwell",
    pynvml.NVML_DEVICE_ARCH_RUBIN: "Rubin",
}

# nvmlNvlinkVersion_t is an enum, not the generation: 4 is NVLink 3.0, 6 is 4.0.
NVLINK_VERSIONS: dict[int, str] = {1: "1.0", 2: "2.0", 3: "2.2", 4: "3.0", 5: "3.1",
                                   6: "4.0", 7: "5.0", 8: "6.0"}

REMOTE_TYPES: dict[int, str] = {
    pynvml.NVML_NVLINK_DEVICE_TYPE_GPU: "gpu",
    pynvml.NVML_NVLINK_DEVICE_TYPE_IBMNPU: "npu",
    pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH: "switch",
}

# Answers that mean "this GPU has no such feature", never a fault.
ABSENT = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT,
          pynvml.NVML_ERROR_NOT_FOUND)

# Enough for every GPU-instance profile's placements (at most 8 on current parts).
MAX_PLACEMENTS = 16


def discover(provider: Provider) -> Inventory:
    """Query every GPU of the provider once and return the node's Inventory."""
    nvml = provider.nvml
    nvml.nvmlInit()
    try:
        cuda = nvml.nvmlSystemGetCudaDriverVersion()
        readers = [_GpuReader(provider, index) for index in range(nvml.nvmlDeviceGetCount())]
        gpus = tuple(reader.read() for reader in readers)
        handles = [reader.handle for reader in readers]
        links = _pair_links(nvml, gpus, handles)
        return Inventory(
            driver_version=nvml.nvmlSystemGetDriverVersion(),
            cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
            gpus=gpus,
            links=links,
        )
    finally:
        nvml.nvmlShutdown()


def _pair_links(nvml: Any, gpus: tuple[Gpu, ...], handles: list[Any]) -> dict[tuple[int, int], str]:
    links: dict[tuple[int, int], str] = {}
    for (i, a), (j, b) in combinations(enumerate(gpus), 2):
        if not (a.healthy and b.healthy):
            continue
        try:
            level: int | None = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
        except pynvml.NVMLError:
            level = None
        label = link_class(a, b, level)
        if label is not None:
            links[(a.index, b.index)] = label
    return links


class _GpuReader:
    """Reads one GPU; the first failing required query becomes its health error."""

    def __init__(self, provider: Provider, index: int) -> None:
        self.nvml = provider.nvml
        self.host = provider.host
        self.index = index
        self.error: str | None = None
        try:
            self.handle: Any = self.nvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as err:
            self.handle = None
            self.error = f"nvmlDeviceGetHandleByIndex: {err}"

    def required(self, fn: Callable[..., T], *args: Any, default: T) -> T:
        try:
            return fn(self.handle, *args)
        except pynvml.NVMLError as err:
            if self.error is None:
                self.error = f"{fn.__name__}: {err}"
            return default

    def optional(self, fn: Callable[..., T], *args: Any, default: T) -> T:
        """A query whose 'not supported' answer is normal; other errors still count."""
        try:
            return fn(self.handle, *args)
        except pynvml.NVMLError as err:
            if err.value not in ABSENT and self.error is None:
                self.error = f"{fn.__name__}: {err}"
            return default

    def read(self) -> Gpu:
        if self.handle is None:
            return Gpu(index=self.index, minor=-1, uuid="", product_name="", brand="Unknown",
                       architecture="Unknown", cuda_compute_capability="0.0", memory_bytes=0,
                       pci_bus_id="", pcie_root=None, numa_node=None, mig_enabled=False,
                       mig_pending=False, health_error=self.error)
        nvml = self.nvml
        minor = self.required(nvml.nvmlDeviceGetMinorNumber, default=-1)
        cc = self.required(nvml.nvmlDeviceGetCudaComputeCapability, default=(0, 0))
        memory = self.required(nvml.nvmlDeviceGetMemoryInfo, default=None)
        pci = self.required(nvml.nvmlDeviceGetPciInfo, default=None)
        bus_id = pci.busId if pci is not None else ""
        mig_mode = self.optional(nvml.nvmlDeviceGetMigMode, default=[0, 0])
        profiles = self._mig_profiles() if self.error is None else ()
        mig_enabled = mig_mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE
        return Gpu(
            index=self.index,
            minor=minor,
            uuid=self.required(nvml.nvmlDeviceGetUUID, default=""),
            product_name=self.required(nvml.nvmlDeviceGetName, default=""),
            brand=BRANDS.get(self.required(nvml.nvmlDeviceGetBrand, default=0), "Unknown"),
            architecture=ARCHITECTURES.get(
                self.required(nvml.nvmlDeviceGetArchitecture, default=-1), "Unknown"),
            cuda_compute_capability=f"{cc[0]}.{cc[1]}",
            memory_bytes=memory.total if memory is not None else 0,
            pci_bus_id=bus_id,
            pcie_root=self.host.pcie_root(bus_id) if bus_id else None,
            numa_node=self.host.numa_node(bus_id) if bus_id else None,
            mig_enabled=mig_enabled,
            mig_pending=mig_mode[1] == pynvml.NVML_DEVICE_MIG_ENABLE,
            mig_profiles=profiles,
            mig_devices=self._mig_devices(minor, profiles) if mig_enabled else (),
            nvlinks=self._nvlinks(),
            health_error=self.error,
        )

    def _mig_profiles(self) -> tuple[MigProfile, ...]:
        profiles = []
        for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            info = self.optional(self.nvml.nvmlDeviceGetGpuInstanceProfileInfo, index, 2,
                                 default=None)
            if info is None:
                continue
            profiles.append(MigProfile(
                id=info.id,
                index=index,
                name=info.name.removeprefix("MIG "),
                memory_mb=info.memorySizeMB,
                multiprocessors=info.multiprocessorCount,
                slice_count=info.sliceCount,
                instance_count=info.instanceCount,
                copy_engines=info.copyEngineCount,
                decoders=info.decoderCount,
                encoders=info.encoderCount,
                jpeg_engines=info.jpegCount,
                ofa_engines=info.ofaCount,
                placements=self._placements(info.id),
            ))
        return tuple(profiles)

    def _placements(self, profile_id: int) -> tuple[Placement, ...]:
        # A sized buffer: a NULL placements pointer crashes some drivers.
        buffer = (pynvml.c_nvmlGpuInstancePlacement_t * MAX_PLACEMENTS)()
        count = ctypes.c_uint(MAX_PLACEMENTS)
        self.optional(self.nvml.nvmlDeviceGetGpuInstancePossiblePlacements, profile_id, buffer,
                      ctypes.byref(count), default=None)
        return tuple(Placement(buffer[i].start, buffer[i].size)
                     for i in range(min(count.value, MAX_PLACEMENTS)))

    def _mig_devices(self, minor: int, profiles: tuple[MigProfile, ...]) -> tuple[MigDevice, ...]:
        nvml = self.nvml
        names = {p.id: p.name for p in profiles}
        devices = []
        for i in range(self.optional(nvml.nvmlDeviceGetMaxMigDeviceCount, default=0)):
            mig = self.optional(nvml.nvmlDeviceGetMigDeviceHandleByIndex, i, default=None)
            if mig is None:
                continue
            try:
                gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
                ci_id = nvml.nvmlDeviceGetComputeInstanceId(mig)
                gi = nvml.nvmlDeviceGetGpuInstanceById(self.handle, gi_id)
                gi_info = nvml.nvmlGpuInstanceGetInfo(gi)
                ci_info = nvml.nvmlComputeInstanceGetInfo(
                    nvml.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id))
                uuid = nvml.nvmlDeviceGetUUID(mig)
            except pynvml.NVMLError as err:
                if self.error is None:
                    self.error = f"MIG device {i}: {err}"
                continue
            minors = self.host.mig_minors(minor, gi_id, ci_id)
            devices.append(MigDevice(
                uuid=uuid,
                gi_id=gi_id,
                ci_id=ci_id,
                profile_id=gi_info.profileId,
                profile=names.get(gi_info.profileId, f"profile-{gi_info.profileId}"),
                placement=Placement(gi_info.placement.start, gi_info.placement.size),
                ci_profile_id=ci_info.profileId,
                gi_cap_minor=minors[0] if minors else None,
                ci_cap_minor=minors[1] if minors else None,
            ))
        return tuple(sorted(devices, key=lambda d: (d.placement.start, d.gi_id, d.ci_id)))

    def _nvlinks(self) -> tuple[NvLink, ...]:
        nvml = self.nvml
        links = []
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                active = nvml.nvmlDeviceGetNvLinkState(self.handle, link)
            except pynvml.NVMLError:
                break
            if active != pynvml.NVML_FEATURE_ENABLED:
                continue
            version = self.optional(nvml.nvmlDeviceGetNvLinkVersion, link, default=0)
            remote = self.optional(nvml.nvmlDeviceGetNvLinkRemoteDeviceType, link,
                                   default=pynvml.NVML_NVLINK_DEVICE_TYPE_UNKNOWN)
            pci = self.optional(nvml.nvmlDeviceGetNvLinkRemotePciInfo, link, default=None)
            links.append(NvLink(
                link=link,
                version=NVLINK_VERSIONS.get(version, "unknown"),
                remote_type=REMOTE_TYPES.get(remote, "unknown"),
                remote_bus_id=pci.busId if pci is not None else "",
            ))
        return tuple(links)
