"""Pairwise link classes as nvidia-smi topo -m labels them."""

from __future__ import annotations

from dataclasses import replace

from driver.inventory.model import Gpu, Inventory, NvLink
from driver.inventory.topology import link_class, nvlink_count, nvlink_islands

BASE = Gpu(index=0, minor=0, uuid="GPU-0", product_name="X", brand="Nvidia",
           architecture="Hopper", cuda_compute_capability="9.0", memory_bytes=1,
           pci_bus_id="00000000:18:00.0", pcie_root="pci0000:15", numa_node=0,
           mig_enabled=False, mig_pending=False)


def gpu(index: int, bus: str, links: list[tuple[str, str]]) -> Gpu:
    return replace(BASE, index=index, minor=index, uuid=f"GPU-{index}", pci_bus_id=bus,
                   nvlinks=tuple(NvLink(i, "4.0", kind, remote)
                                 for i, (kind, remote) in enumerate(links)))


def test_direct_links_count_only_those_to_the_peer() -> None:
    a = gpu(0, "A", [("gpu", "B")] * 4 + [("gpu", "C")] * 2)
    b = gpu(1, "B", [("gpu", "A")] * 4)
    c = gpu(2, "C", [("gpu", "A")] * 2)
    assert nvlink_count(a, b) == 4
    assert link_class(a, b, 50) == "NV4"
    assert link_class(a, c, 50) == "NV2"
    assert link_class(b, c, 30) == "PHB"


def test_switched_gpus_reach_each_other_with_the_narrower_side() -> None:
    a = gpu(0, "A", [("switch", "S1")] * 18)
    b = gpu(1, "B", [("switch", "S2")] * 12)
    assert link_class(a, b, 20) == "NV12"


def test_pcie_levels_and_unknown() -> None:
    a, b = gpu(0, "A", []), gpu(1, "B", [])
    assert [link_class(a, b, level) for level in (0, 10, 20, 30, 40, 50)] == [
        "PIX", "PIX", "PXB", "PHB", "NODE", "SYS"]
    assert link_class(a, b, None) is None


def test_islands_follow_the_link_matrix() -> None:
    gpus = tuple(gpu(i, f"B{i}", []) for i in range(4))
    ring = {(0, 1): "NV4", (1, 2): "NV4", (2, 3): "NV4", (0, 3): "NV4", (0, 2): "SYS",
            (1, 3): "SYS"}
    inv = Inventory("580", "13.0", gpus, ring)
    assert nvlink_islands(inv) == [(0, 1), (2, 3)]
    assert nvlink_islands(Inventory("580", "13.0", gpus, {})) == [(0,), (1,), (2,), (3,)]
