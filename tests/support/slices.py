"""ResourceSlices for the publisher's pure decisions: what the builder wants for some L4s
(:func:`desired`) and how the API server would return them (:func:`stored`)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from driver.inventory.model import Gpu, Inventory
from driver.resourceslice.build import SliceOptions, build_slices
from driver.resourceslice.plan import stamped

BASE = Gpu(index=0, minor=0, uuid="GPU-0", product_name="NVIDIA L4", brand="Nvidia",
           architecture="Ada Lovelace", cuda_compute_capability="8.9", memory_bytes=24 * 2**30,
           pci_bus_id="00000000:18:00.0", pcie_root="pci0000:15", numa_node=0,
           mig_enabled=False, mig_pending=False)
OPTIONS = SliceOptions(driver="gpu.dra.dev", node="node-a")
OWNER = {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "u-1", "controller": True}


def desired(gpus: int, **changes: Any) -> list[dict[str, Any]]:
    """The builder's slices for ``gpus`` L4s (over 128 GPUs: two slices), owned."""
    inventory = Inventory("580.159.04", "13.0", tuple(
        replace(BASE, index=i, minor=i, uuid=f"GPU-{i}", **changes) for i in range(gpus)), {})
    slices = build_slices(inventory, OPTIONS, generation=0)
    for s in slices:
        s["metadata"]["ownerReferences"] = [dict(OWNER)]
    return slices


def stored(slices: list[dict[str, Any]], generation: int) -> list[dict[str, Any]]:
    """``slices`` as the API server returns them: generation set, metadata filled in."""
    out: list[dict[str, Any]] = []
    for i, s in enumerate(slices):
        obj = copy.deepcopy(stamped(s, generation))
        obj["metadata"].update(uid=f"uid-{i}", resourceVersion=str(100 + i),
                               creationTimestamp="2026-11-26T00:00:00Z",
                               managedFields=[{"manager": "gpu-dra"}])
        out.append(obj)
    return out
