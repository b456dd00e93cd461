"""Inventory -> resource.k8s.io/v1 ResourceSlice objects (plain dicts).

A pure function of the inventory and the options: the same inventory gives
byte-identical slices, so the publisher can compare and write only changes.

Device names are stable across restarts: `gpu-<minor>` and
`gpu-<minor>-mig-<profile>-<start>`, never NVML indexes. The scheduler is
first-fit in slice and device order, so whole GPUs come before MIG devices and
MIG devices follow NVML's profile order and ascending placements.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from driver.health.model import GpuHealth
from driver.health.taints import gpu_taints
from driver.inventory.model import Gpu, Inventory, MigDevice, MigProfile, Placement
from driver.inventory.topology import nvlink_islands
from driver.kube.names import is_label, is_subdomain
from driver.kube.quantity import canonical
from driver.nvml.real import sysfs_bus_id

MigMode = Literal["static", "dynamic"]
CounterLayout = Literal["split", "combined"]
GpuSharing = Literal["exclusive", "consumable"]

K8S_DOMAIN = "resource.kubernetes.io"

# API limits (resource.k8s.io/v1, Kubernetes 1.35+).
MAX_DEVICES = 128
MAX_DEVICES_WITH_COUNTERS_OR_TAINTS = 64
MAX_COUNTER_SETS_PER_SLICE = 8
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_STRING = 64

# Bidirectional GB/s of one NVLink by version (NVIDIA's quoted per-GPU totals / links).
NVLINK_GBPS_PER_LINK = {"1.0": 40, "2.0": 50, "2.2": 50, "3.0": 50, "3.1": 50, "4.0": 50,
                        "5.0": 100, "6.0": 200}

# Consumable mode (KEP-5075): what a claim that asks for no capacity consumes, and the grid
# requests are rounded up onto. Memory steps in MiB, MPS's unit for pinned memory limits, so
# the limit a claim gets is what the scheduler counted; under 1Gi no CUDA context fits, so a
# smaller request is raised to 1Gi; the default is all of it, so a claim that asks for no
# memory gets the whole GPU to itself, as in exclusive mode. The compute share is a
# percentage of the SMs (MPS's active thread percentage); the default, 0, reserves none and
# leaves the claim's clients unlimited, so claims that ask for memory alone pack by memory.
SHARED_MEMORY_MIN = 1 << 30
SHARED_MEMORY_STEP = 1 << 20
COMPUTE_CAPACITY = "compute"
COMPUTE_PERCENT = 100
COMPUTE_DEFAULT = 0

# MIG profile capacity -> (device capacity name, counter name).
MIG_CAPACITIES: tuple[tuple[str, str, str], ...] = (
    ("multiprocessors", "multiprocessors", "multiprocessors"),
    ("copy_engines", "copyEngines", "copy-engines"),
    ("decoders", "decoders", "decoders"),
    ("encoders", "encoders", "encoders"),
    ("jpeg_engines", "jpegEngines", "jpeg-engines"),
    ("ofa_engines", "ofaEngines", "ofa-engines"),
)


@dataclass(frozen=True)
class SliceOptions:
    driver: str
    node: str
    mig_mode: MigMode = "static"
    # split: counter sets in device-less slices (Kubernetes 1.35+);
    # combined: each slice carries its own counter sets (1.34).
    counter_layout: CounterLayout = "split"
    # consumable: whole GPUs (not in MIG mode) with allowMultipleAllocations, shared by the
    # memory and compute share each claim asks for; MIG devices of GPUs in MIG mode stay
    # whole. Not with dynamic MIG: a shared GPU cannot also be split into MIG devices.
    gpu_sharing: GpuSharing = "exclusive"

    def __post_init__(self) -> None:
        if self.gpu_sharing == "consumable" and self.mig_mode == "dynamic":
            raise ValueError("--gpu-sharing consumable (env GPU_SHARING) and --mig-mode "
                             "dynamic (env MIG_MODE) cannot be combined: a GPU shared by "
                             "capacity cannot also be split into MIG devices on demand")

    @property
    def effect_none(self) -> bool:
        """Whether the API server takes taints with effect None: 1.35+, the servers that
        take the split layout (1.34 refuses both)."""
        return self.counter_layout == "split"


@dataclass
class _Group:
    """Devices that travel together: one GPU's partitions and its counter set."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    counter_set: dict[str, Any] | None = None


def gpu_device_name(gpu: Gpu) -> str:
    return f"gpu-{gpu.minor}"


def mig_device_name(gpu: Gpu, profile: str, placement: Placement) -> str:
    return f"gpu-{gpu.minor}-mig-{profile_label(profile)}-{placement.start}"


def profile_label(profile: str) -> str:
    """A MIG profile name as a DNS label part: `1g.10gb+me` -> `1g10gb-me`."""
    return re.sub(r"[^a-z0-9-]", "", profile.lower().replace("+", "-"))


def counter_set_name(gpu: Gpu) -> str:
    return f"gpu-{gpu.minor}-counter-set"


def semver(version: str) -> str:
    """NVIDIA's `580.159.04` or `9.0` as semver 2.0.0: `580.159.4`, `9.0.0`."""
    parts = [str(int(p)) for p in re.findall(r"\d+", version)[:3]]
    return ".".join(parts + ["0"] * (3 - len(parts)))


def build_slices(inventory: Inventory, options: SliceOptions, generation: int,
                 health: Mapping[int, GpuHealth] | None = None) -> list[dict[str, Any]]:
    """All ResourceSlices of this node's pool, named and numbered; `health` (by GPU
    minor) is what the plugin's health monitor knows of the GPUs it watches."""
    groups = _groups(inventory, options, health or {})
    specs: list[dict[str, Any]] = []
    if options.counter_layout == "split":
        sets = [g.counter_set for g in groups if g.counter_set]
        for start in range(0, len(sets), MAX_COUNTER_SETS_PER_SLICE):
            specs.append({"sharedCounters": sets[start:start + MAX_COUNTER_SETS_PER_SLICE]})
        specs += [{"devices": chunk} for chunk in _pack([g.devices for g in groups])]
    else:
        plain = [g.devices for g in groups if not g.counter_set]
        specs += [{"devices": chunk} for chunk in _pack(plain)]
        for g in groups:
            if g.counter_set:
                specs.append({"sharedCounters": [g.counter_set], "devices": g.devices})
    if not specs:
        specs.append({"devices": []})  # an empty pool is published, not absent
    return [_slice(options, index, len(specs), generation, spec)
            for index, spec in enumerate(specs)]


def slice_name(options: SliceOptions, index: int) -> str:
    """`<node>-<driver>-<index>`, hashed down where a long node name would exceed 253."""
    name = f"{options.node}-{options.driver}-{index}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(f"{options.node}/{options.driver}".encode()).hexdigest()[:12]
    return f"{options.node[:200]}-{digest}-{index}"


def _slice(options: SliceOptions, index: int, count: int, generation: int,
           content: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "driver": options.driver,
        "nodeName": options.node,
        "pool": {"name": options.node, "generation": generation, "resourceSliceCount": count},
    }
    spec.update(content)
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": slice_name(options, index)}, "spec": spec}


def _pack(groups: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """Fill slices in order; a group moves whole to the next slice where it would not
    fit, and is split only when it alone exceeds the limit."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    for devices in groups:
        if current and len(current) + len(devices) > _limit([*current, *devices]):
            chunks.append(current)
            current = []
        for device in devices:
            if len(current) >= _limit([*current, device]):
                chunks.append(current)
                current = []
            current.append(device)
    if current:
        chunks.append(current)
    return chunks


def _limit(devices: list[dict[str, Any]]) -> int:
    if any("consumesCounters" in d or "taints" in d for d in devices):
        return MAX_DEVICES_WITH_COUNTERS_OR_TAINTS
    return MAX_DEVICES


def _groups(inventory: Inventory, options: SliceOptions, health: Mapping[int, GpuHealth]
            ) -> list[_Group]:
    islands = {index: (number, len(members))
               for number, members in enumerate(
                   island for island in nvlink_islands(inventory) if len(island) > 1)
               for index in members}
    groups: list[_Group] = []
    for gpu in sorted(inventory.gpus, key=lambda g: g.minor):
        if gpu.minor < 0:
            continue  # NVML could not even name it; nothing can be allocated
        identity = _identity(inventory, gpu, options)
        taints = _taints(gpu, options, health.get(gpu.minor))
        if options.mig_mode == "dynamic" and gpu.mig_profiles:
            groups.append(_partitionable(gpu, identity, islands.get(gpu.index), taints))
        elif gpu.mig_enabled:
            groups.append(_Group([_static_mig(gpu, d, identity, taints)
                                  for d in gpu.mig_devices]))
        else:
            device = _whole_gpu(gpu, identity, islands.get(gpu.index), taints)
            if options.gpu_sharing == "consumable":
                _make_shareable(device, gpu)
            groups.append(_Group([device]))
    return groups


def _identity(inventory: Inventory, gpu: Gpu, options: SliceOptions) -> dict[str, Any]:
    """Attributes a GPU and each of its MIG devices share."""
    attrs: dict[str, Any] = {
        "productName": _string(gpu.product_name),
        "brand": _string(gpu.brand),
        "architecture": _string(gpu.architecture),
        "cudaComputeCapability": {"version": semver(gpu.cuda_compute_capability)},
        "driverVersion": {"version": semver(inventory.driver_version)},
        "cudaDriverVersion": {"version": semver(inventory.cuda_driver_version)},
    }
    if gpu.pci_bus_id:
        attrs[f"{K8S_DOMAIN}/pciBusID"] = _string(sysfs_bus_id(gpu.pci_bus_id))
    if gpu.pcie_root:
        attrs[f"{K8S_DOMAIN}/pcieRoot"] = _string(gpu.pcie_root)
    if gpu.numa_node is not None:
        attrs[f"{K8S_DOMAIN}/numaNode"] = {"int": gpu.numa_node}
    return attrs


def _whole_gpu(gpu: Gpu, identity: dict[str, Any], island: tuple[int, int] | None,
               taints: list[dict[str, Any]], capacity: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    attributes = {"type": _string("gpu"), "uuid": _string(gpu.uuid), **identity,
                  **_nvlink_attributes(gpu, island)}
    return _device(gpu_device_name(gpu), attributes,
                   {**(capacity or {}), "memory": {"value": canonical(gpu.memory_bytes)}},
                   taints)


def whole_gpu_memory(gpu: Gpu) -> int:
    """What a claim that asks for no memory consumes of a shared GPU: all of it, down to
    the step grid (the API wants the default on it), which leaves less than any request."""
    low = min(SHARED_MEMORY_MIN, gpu.memory_bytes)
    return gpu.memory_bytes - (gpu.memory_bytes - low) % SHARED_MEMORY_STEP


def _make_shareable(device: dict[str, Any], gpu: Gpu) -> None:
    """Consumable mode: several claims may share the GPU, each consuming the memory and
    compute share it asks for, or the defaults (see `SHARED_MEMORY_MIN`)."""
    memory = gpu.memory_bytes
    device["allowMultipleAllocations"] = True
    device["capacity"] = {
        "memory": {"value": canonical(memory), "requestPolicy": {
            "default": canonical(whole_gpu_memory(gpu)),
            "validRange": {"min": canonical(min(SHARED_MEMORY_MIN, memory)),
                           "step": canonical(SHARED_MEMORY_STEP)}}},
        COMPUTE_CAPACITY: {"value": canonical(COMPUTE_PERCENT), "requestPolicy": {
            "default": canonical(COMPUTE_DEFAULT),
            "validRange": {"min": "0", "max": canonical(COMPUTE_PERCENT), "step": "1"}}},
    }


def _nvlink_attributes(gpu: Gpu, island: tuple[int, int] | None) -> dict[str, Any]:
    """Ours alone: `matchAttribute: gpu.dra.dev/nvlinkIsland` keeps a claim's GPUs all
    NVLink-connected to each other; the rest say how well."""
    if not gpu.nvlinks:
        return {}
    version = max(link.version for link in gpu.nvlinks)
    attrs: dict[str, Any] = {
        "nvlinkLinks": {"int": len(gpu.nvlinks)},
        "nvlinkVersion": {"version": semver(version)},
        "nvlinkBandwidthGBps": {"int": len(gpu.nvlinks) * NVLINK_GBPS_PER_LINK.get(version, 0)},
        "nvlinkSwitched": {"bool": any(link.remote_type == "switch" for link in gpu.nvlinks)},
    }
    if island is not None:
        attrs["nvlinkIsland"] = {"int": island[0]}
        attrs["nvlinkIslandSize"] = {"int": island[1]}
    return attrs


def _static_mig(gpu: Gpu, mig: MigDevice, identity: dict[str, Any],
                taints: list[dict[str, Any]]) -> dict[str, Any]:
    profile = next((p for p in gpu.mig_profiles if p.id == mig.profile_id), None)
    attributes = {"type": _string("mig"), "uuid": _string(mig.uuid),
                  **_mig_attributes(gpu, mig.profile, mig.placement), **identity}
    capacity = _mig_capacity(profile) if profile else {}
    # NVIDIA's static MIG devices name the memory slices they hold (memorySlice<i>: 1)
    capacity.update({f"memorySlice{i}": {"value": "1"}
                     for i in range(mig.placement.start, mig.placement.end)})
    return _device(mig_device_name(gpu, mig.profile, mig.placement), attributes, capacity,
                   taints)


def _mig_attributes(gpu: Gpu, profile: str, placement: Placement) -> dict[str, Any]:
    return {"parentUUID": _string(gpu.uuid), "profile": _string(profile),
            "placementStart": {"int": placement.start}, "placementSize": {"int": placement.size}}


def _mig_capacity(profile: MigProfile) -> dict[str, Any]:
    capacity = {name: {"value": canonical(getattr(profile, field_))}
                for field_, name, _ in MIG_CAPACITIES}
    capacity["memory"] = {"value": canonical(profile.memory_mb * 2**20)}
    return capacity


def _partitionable(gpu: Gpu, identity: dict[str, Any], island: tuple[int, int] | None,
                   taints: list[dict[str, Any]]) -> _Group:
    """KEP-4815: the whole GPU and every profile x placement, all drawing on one
    counter set, so the scheduler can never co-allocate overlapping placements."""
    totals = _counter_totals(gpu.mig_profiles)
    memory_slices = max(p.end for profile in gpu.mig_profiles for p in profile.placements)
    counters = {name: value for name, value in totals.items() if value}
    counters.update({f"memory-slice-{i}": 1 for i in range(memory_slices)})
    counter_set = {"name": counter_set_name(gpu),
                   "counters": {k: {"value": canonical(v)} for k, v in counters.items()}}
    # as NVIDIA's partitionable GPU: each MIG capacity at its largest over the profiles
    whole = _whole_gpu(gpu, identity, island, taints,
                       {name: {"value": canonical(totals[counter])}
                        for _, name, counter in MIG_CAPACITIES})
    whole["consumesCounters"] = [_consumption(gpu, counters)]
    devices = [whole]
    for profile in gpu.mig_profiles:
        use = {name: value for name, value in _profile_counters(profile).items() if value}
        for placement in profile.placements:
            slots = {f"memory-slice-{i}": 1 for i in range(placement.start, placement.end)}
            attributes = {"type": _string("mig"), **_mig_attributes(gpu, profile.name, placement),
                          **identity}
            device = _device(mig_device_name(gpu, profile.name, placement), attributes,
                             _mig_capacity(profile), taints)
            device["consumesCounters"] = [_consumption(gpu, {**use, **slots})]
            devices.append(device)
    return _Group(devices, counter_set)


def _profile_counters(profile: MigProfile) -> dict[str, int]:
    counters = {counter: getattr(profile, field_) for field_, _, counter in MIG_CAPACITIES}
    counters["memory"] = profile.memory_mb * 2**20
    return counters


def _counter_totals(profiles: tuple[MigProfile, ...]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for profile in profiles:
        for name, value in _profile_counters(profile).items():
            totals[name] = max(totals.get(name, 0), value)
    return totals


def _consumption(gpu: Gpu, counters: dict[str, int]) -> dict[str, Any]:
    return {"counterSet": counter_set_name(gpu),
            "counters": {k: {"value": canonical(v)} for k, v in counters.items()}}


def _taints(gpu: Gpu, options: SliceOptions, health: GpuHealth | None
            ) -> list[dict[str, Any]]:
    """An unhealthy GPU stays visible, tainted, so `kubectl get resourceslices` shows why
    claims avoid it; the scheduler does not allocate it. The monitor's conditions where it
    watches the GPU; else discovery's verdict (a GPU it could not read is not watched)."""
    if health is not None:
        return [t.to_api() for t in gpu_taints(health, options.driver,
                                               effect_none=options.effect_none)]
    if gpu.healthy:
        return []
    return [{"key": f"{options.driver}/unhealthy", "effect": "NoSchedule"}]


def _device(name: str, attributes: dict[str, Any], capacity: dict[str, Any],
            taints: list[dict[str, Any]]) -> dict[str, Any]:
    if len(attributes) + len(capacity) > MAX_ATTRIBUTES_AND_CAPACITIES:
        raise ValueError(f"device {name}: {len(attributes) + len(capacity)} attributes and "
                         f"capacities, at most {MAX_ATTRIBUTES_AND_CAPACITIES}")
    device: dict[str, Any] = {"name": name, "attributes": attributes}
    if capacity:
        device["capacity"] = capacity
    if taints:
        device["taints"] = [dict(t) for t in taints]
    return device


def _string(value: str) -> dict[str, str]:
    """A string attribute, cut to the API's 64 characters."""
    return {"string": value[:MAX_STRING]}


def limit_violations(slices: list[dict[str, Any]]) -> list[str]:
    """API rules the OpenAPI schemas do not encode, as messages naming the field.

    The publisher refuses to write a pool with any, so a bad slice never reaches
    the API server half-published.
    """
    problems: list[str] = []
    device_names: set[str] = set()
    counter_sets: dict[str, set[str]] = {}
    for s in slices:
        for counter_set in s["spec"].get("sharedCounters", []):
            counter_sets[counter_set["name"]] = set(counter_set["counters"])
    for s in slices:
        where = f"ResourceSlice {s['metadata']['name']}"
        spec = s["spec"]
        devices = spec.get("devices", [])
        problems += _name_problems(f"{where}: metadata.name", s["metadata"]["name"], 253,
                                   is_subdomain)
        if len(spec.get("sharedCounters", [])) > MAX_COUNTER_SETS_PER_SLICE:
            problems.append(f"{where}: spec.sharedCounters: more than "
                            f"{MAX_COUNTER_SETS_PER_SLICE} counter sets")
        if len(devices) > _limit(devices):
            problems.append(f"{where}: spec.devices: {len(devices)} devices, at most "
                            f"{_limit(devices)}")
        for i, device in enumerate(devices):
            field_ = f"{where}: spec.devices[{i}]"
            problems += _name_problems(f"{field_}.name", device["name"], 63, is_label)
            if device["name"] in device_names:
                problems.append(f"{field_}.name: {device['name']} is not unique in the pool")
            device_names.add(device["name"])
            keys = [*device.get("attributes", {}), *device.get("capacity", {})]
            if len(keys) > MAX_ATTRIBUTES_AND_CAPACITIES:
                problems.append(f"{field_}: {len(keys)} attributes and capacities, at most "
                                f"{MAX_ATTRIBUTES_AND_CAPACITIES}")
            for key, value in device.get("attributes", {}).items():
                text = value.get("string", value.get("version", ""))
                if len(text) > MAX_STRING:
                    problems.append(f"{field_}.attributes[{key}]: longer than {MAX_STRING}")
            for use in device.get("consumesCounters", []):
                known = counter_sets.get(use["counterSet"])
                if known is None:
                    problems.append(f"{field_}.consumesCounters: no counter set "
                                    f"{use['counterSet']} in the pool")
                elif set(use["counters"]) - known:
                    problems.append(f"{field_}.consumesCounters: unknown counters "
                                    f"{sorted(set(use['counters']) - known)}")
    return problems


def _name_problems(field_: str, name: str, limit: int,
                   valid: Callable[[object, int], bool]) -> list[str]:
    if not valid(name, limit):
        return [f"{field_}: {name!r} is not a valid DNS name of at most {limit} characters"]
    return []
