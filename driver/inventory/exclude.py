"""GPUs kept out of this driver (`--exclude-gpus`, the Node annotation): the node's GPUs
split into those the driver serves and those it leaves alone, for a device plugin or
anything else to use.

An entry is a GPU's minor number (`gpu-<minor>`, /dev/nvidia<minor>; not nvidia-smi's
index, which can differ) or its UUID. The split is pure: every consumer downstream (slices,
device index, MIG management, health, CDI device nodes) sees only the served inventory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from driver.inventory.model import Gpu, Inventory

GPU_UUID = re.compile(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                      re.IGNORECASE)


class ExclusionError(ValueError):
    """An exclusion list that names something other than a GPU."""


@dataclass(frozen=True)
class Exclusion:
    """GPUs to leave alone, by minor number and by UUID (`uuid_key`)."""

    minors: frozenset[int] = frozenset()
    uuids: frozenset[str] = frozenset()

    def __or__(self, other: Exclusion) -> Exclusion:
        return Exclusion(self.minors | other.minors, self.uuids | other.uuids)

    def __bool__(self) -> bool:
        return bool(self.minors or self.uuids)

    def matches(self, gpu: Gpu) -> bool:
        return (gpu.minor >= 0 and gpu.minor in self.minors) or \
            (bool(gpu.uuid) and uuid_key(gpu.uuid) in self.uuids)

    @property
    def entries(self) -> tuple[str, ...]:
        """The entries, minors first, as a list would give them."""
        return tuple(str(m) for m in sorted(self.minors)) + tuple(sorted(self.uuids))


def uuid_key(uuid: str) -> str:
    """A GPU UUID as NVML spells it (`GPU-` and lower-case hex), whatever case it was
    written in."""
    return "GPU-" + uuid[4:].lower()


def parse_exclusion(text: str) -> Exclusion:
    """A comma-separated list of GPU minors and UUIDs; blank entries are skipped."""
    minors: set[int] = set()
    uuids: set[str] = set()
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if entry.isascii() and entry.isdigit():
            minors.add(int(entry))
        elif GPU_UUID.fullmatch(entry):
            uuids.add(uuid_key(entry))
        elif entry.upper().startswith("MIG-"):
            raise ExclusionError(f"{entry!r} is a MIG device: exclude its GPU (its minor "
                                 "or GPU UUID)")
        else:
            raise ExclusionError(f"{entry!r} is neither a GPU minor number nor a GPU UUID "
                                 "(GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return Exclusion(frozenset(minors), frozenset(uuids))


@dataclass(frozen=True)
class Split:
    """The inventory the driver serves, the GPUs it leaves alone, the entries that named
    no GPU discovery could read (a typo, a GPU gone, or one NVML cannot read now), and how
    many GPUs it could not identify (an unmatched entry may be one of them)."""

    served: Inventory
    excluded: tuple[Gpu, ...]
    unmatched: tuple[str, ...]
    unreadable: int = 0


def _unknown(gpu: Gpu) -> bool:
    return not gpu.uuid or gpu.minor < 0


def split(inventory: Inventory, exclusion: Exclusion) -> Split:
    """`inventory` less the GPUs `exclusion` names, and their links. While a UUID entry
    names no GPU, a GPU whose UUID NVML cannot read (lost, needing a reset) is left alone
    too: it may be that one, and unreadable it could serve no claim anyway."""
    unreadable = sum(1 for g in inventory.gpus if _unknown(g))
    named = {uuid_key(g.uuid) for g in inventory.gpus if g.uuid}
    doubtful = bool(exclusion.uuids - named)
    excluded = tuple(g for g in inventory.gpus
                     if exclusion.matches(g) or (doubtful and _unknown(g)))
    if not excluded:
        return Split(inventory, (), exclusion.entries, unreadable)
    gone = {g.index for g in excluded}
    served = replace(
        inventory, gpus=tuple(g for g in inventory.gpus if g.index not in gone),
        links={pair: link for pair, link in inventory.links.items() if not gone & set(pair)})
    minors = {g.minor for g in excluded}
    uuids = {uuid_key(g.uuid) for g in excluded}
    unmatched = tuple(str(m) for m in sorted(exclusion.minors - minors)) + \
        tuple(sorted(exclusion.uuids - uuids))
    return Split(served, excluded, unmatched, unreadable)


def describe(gpus: tuple[Gpu, ...]) -> str:
    """`gpu-3 (GPU-...), gpu-5 (GPU-...)`, as messages name excluded GPUs."""
    return ", ".join(f"gpu-{g.minor} ({g.uuid})" for g in gpus)
