"""GPU interconnect: pairwise link classes and NVLink islands.

The link class uses `nvidia-smi topo -m` labels so people can compare the two:
`NV<n>` for n bonded NVLinks, else the PCIe distance PIX, PXB, PHB, NODE or SYS.
"""

from __future__ import annotations

from collections.abc import Sequence

from driver._native import clique_partition
from driver.inventory.model import Gpu, Inventory

# nvmlGpuTopologyLevel_t -> topo -m label. INTERNAL (both GPUs on one board) has no
# label of its own in nvidia-smi; it is at most one bridge away, so PIX.
PCIE_LEVEL_LABELS: dict[int, str] = {
    0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def nvlink_count(a: Gpu, b: Gpu) -> int:
    """Number of NVLinks joining a and b, directly or through NVSwitches.

    Through switches every switch-attached GPU reaches every other, with the
    bandwidth of the narrower side, which is what nvidia-smi prints (NV18 on a
    DGX H100).
    """
    direct = sum(1 for link in a.nvlinks
                 if link.remote_type == "gpu" and link.remote_bus_id == b.pci_bus_id)
    if direct:
        return direct
    a_switched = sum(1 for link in a.nvlinks if link.remote_type == "switch")
    b_switched = sum(1 for link in b.nvlinks if link.remote_type == "switch")
    return min(a_switched, b_switched)


def link_class(a: Gpu, b: Gpu, pcie_level: int | None) -> str | None:
    """The topo -m label of a GPU pair; None when NVML could not tell."""
    links = nvlink_count(a, b)
    if links:
        return f"NV{links}"
    if pcie_level is None:
        return None
    return PCIE_LEVEL_LABELS.get(pcie_level)


def nvlink_islands(inventory: Inventory) -> list[tuple[int, ...]]:
    """GPU indexes grouped so that every two GPUs of a group share NVLinks.

    One group on an NVSwitch board, pairs on bridged boards, singletons without
    NVLink; on a partial mesh the largest all-to-all groups, lowest index first.
    """
    linked = [g for g in inventory.gpus
              if any((inventory.link(g.index, o.index) or "").startswith("NV")
                     for o in inventory.gpus if o is not g)]
    groups = [tuple(linked[i].index for i in range(len(linked)) if mask >> i & 1)
              for mask in clique_partition(_nvlink_adjacency(linked, inventory))]
    lone = {g.index for g in inventory.gpus} - {g.index for g in linked}
    groups += [(index,) for index in lone]
    return sorted(groups)


def _nvlink_adjacency(gpus: Sequence[Gpu], inventory: Inventory) -> list[int]:
    masks = [0] * len(gpus)
    for i, a in enumerate(gpus):
        for j, b in enumerate(gpus):
            if i != j and (inventory.link(a.index, b.index) or "").startswith("NV"):
                masks[i] |= 1 << j
    return masks
