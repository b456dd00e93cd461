"""The Inventory as people and programs read it: `gpu-dra discover` output.

The JSON keys are a contract for scripts; the table is for people and imitates
`nvidia-smi` and `nvidia-smi topo -m`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from driver.inventory.model import Gpu, Inventory, MigDevice, MigProfile, NvLink
from driver.inventory.topology import nvlink_islands


def inventory_to_dict(inventory: Inventory, excluded: Collection[int] = ()) -> dict[str, Any]:
    """`excluded`: the NVML indexes of the GPUs `--exclude-gpus` keeps from the driver."""
    return {
        "driverVersion": inventory.driver_version,
        "cudaDriverVersion": inventory.cuda_driver_version,
        "gpus": [{**_gpu(gpu), "excluded": gpu.index in excluded} for gpu in inventory.gpus],
        "topology": [{"gpus": [a, b], "link": link}
                     for (a, b), link in sorted(inventory.links.items())],
        "nvlinkIslands": [list(island) for island in nvlink_islands(inventory)],
    }


def _gpu(gpu: Gpu) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "minor": gpu.minor,
        "uuid": gpu.uuid,
        "productName": gpu.product_name,
        "brand": gpu.brand,
        "architecture": gpu.architecture,
        "cudaComputeCapability": gpu.cuda_compute_capability,
        "memoryBytes": gpu.memory_bytes,
        "pciBusID": gpu.pci_bus_id,
        "pcieRoot": gpu.pcie_root,
        "numaNode": gpu.numa_node,
        "migEnabled": gpu.mig_enabled,
        "migPending": gpu.mig_pending,
        "migProfiles": [_profile(p) for p in gpu.mig_profiles],
        "migDevices": [_mig_device(d) for d in gpu.mig_devices],
        "nvlinks": [_nvlink(link) for link in gpu.nvlinks],
        "healthy": gpu.healthy,
        "healthError": gpu.health_error,
    }


def _profile(profile: MigProfile) -> dict[str, Any]:
    return {
        "id": profile.id,
        "name": profile.name,
        "memoryMB": profile.memory_mb,
        "multiprocessors": profile.multiprocessors,
        "sliceCount": profile.slice_count,
        "instanceCount": profile.instance_count,
        "copyEngines": profile.copy_engines,
        "decoders": profile.decoders,
        "encoders": profile.encoders,
        "jpegEngines": profile.jpeg_engines,
        "ofaEngines": profile.ofa_engines,
        "placements": [{"start": p.start, "size": p.size} for p in profile.placements],
    }


def _mig_device(device: MigDevice) -> dict[str, Any]:
    return {
        "uuid": device.uuid,
        "profile": device.profile,
        "profileId": device.profile_id,
        "gpuInstanceId": device.gi_id,
        "computeInstanceId": device.ci_id,
        "computeInstanceProfileId": device.ci_profile_id,
        "placement": {"start": device.placement.start, "size": device.placement.size},
        "capMinors": {"gpuInstance": device.gi_cap_minor, "computeInstance": device.ci_cap_minor},
    }


def _nvlink(link: NvLink) -> dict[str, Any]:
    return {"link": link.link, "version": link.version, "remoteType": link.remote_type,
            "remotePciBusID": link.remote_bus_id}


def inventory_table(inventory: Inventory, excluded: Collection[int] = ()) -> str:
    """A report for people: GPUs, MIG, and a `topo -m` style matrix; `excluded` as in
    `inventory_to_dict`."""
    lines = [f"Driver {inventory.driver_version}   CUDA {inventory.cuda_driver_version}   "
             f"{len(inventory.gpus)} GPU(s)", ""]
    lines += _table(
        ["GPU", "Minor", "Name", "Memory", "CC", "PCI bus", "PCIe root", "NUMA", "MIG", "NVLinks",
         "Health"],
        [[str(g.index), str(g.minor), g.product_name, f"{g.memory_bytes / 2**30:.1f} GiB",
          g.cuda_compute_capability, g.pci_bus_id, g.pcie_root or "N/A", _opt(g.numa_node),
          _mig_state(g), _links_summary(g), "ok" if g.healthy else f"UNHEALTHY: {g.health_error}"]
         for g in inventory.gpus])
    for gpu in inventory.gpus:
        lines += ["", f"GPU {gpu.index} {gpu.uuid}"
                  f"{'  EXCLUDED (--exclude-gpus)' if gpu.index in excluded else ''}"]
        if gpu.mig_profiles:
            lines += _table(
                ["  MIG profile", "ID", "Memory MiB", "SMs", "Slices", "Instances", "Placements"],
                [[f"  {p.name}", str(p.id), str(p.memory_mb), str(p.multiprocessors),
                  str(p.slice_count), str(p.instance_count),
                  " ".join(f"{pl.start}:{pl.size}" for pl in p.placements)]
                 for p in gpu.mig_profiles])
        else:
            lines.append("  no MIG support")
        if gpu.mig_devices:
            lines += _table(
                ["  MIG device", "GI", "CI", "Placement", "Caps", "UUID"],
                [[f"  {d.profile}", str(d.gi_id), str(d.ci_id),
                  f"{d.placement.start}:{d.placement.size}",
                  f"{_opt(d.gi_cap_minor)},{_opt(d.ci_cap_minor)}", d.uuid]
                 for d in gpu.mig_devices])
    if excluded:
        lines += ["", "Excluded from this driver (--exclude-gpus): " + ", ".join(
            f"GPU {g.index} (minor {g.minor})" for g in inventory.gpus if g.index in excluded)]
    lines += ["", "Topology", *_topology_matrix(inventory)]
    islands = nvlink_islands(inventory)
    lines.append("NVLink islands: " + (
        "  ".join("{" + ",".join(map(str, island)) + "}" for island in islands if len(island) > 1)
        or "none"))
    return "\n".join(lines)


def _topology_matrix(inventory: Inventory) -> list[str]:
    names = [f"GPU{g.index}" for g in inventory.gpus]
    rows = []
    for a in inventory.gpus:
        row = [f"GPU{a.index}"]
        for b in inventory.gpus:
            row.append("X" if a.index == b.index else inventory.link(a.index, b.index) or "N/A")
        row.append(_opt(a.numa_node))
        rows.append(row)
    return _table(["", *names, "NUMA"], rows)


def _mig_state(gpu: Gpu) -> str:
    if not gpu.mig_profiles:
        return "N/A"
    state = "on" if gpu.mig_enabled else "off"
    if gpu.mig_pending != gpu.mig_enabled:
        state += " (pending " + ("on" if gpu.mig_pending else "off") + ")"
    if gpu.mig_enabled:
        state += f", {len(gpu.mig_devices)} dev"
    return state


def _links_summary(gpu: Gpu) -> str:
    if not gpu.nvlinks:
        return "none"
    versions = sorted({link.version for link in gpu.nvlinks})
    return f"{len(gpu.nvlinks)}x v{'/'.join(versions)}"


def _opt(value: int | None) -> str:
    return "N/A" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]]
