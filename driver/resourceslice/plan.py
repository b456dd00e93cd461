"""The publishers' pure decisions: the writes that make the published pool match what the
builder wants (:func:`plan`), the API server's counter layout, which watch events are
someone else's, whether a resync yields to another publisher (:func:`stance`), and how long
to back off.

Generation: consumers use only the slices of a pool's highest generation and wait
until they see ``resourceSliceCount`` of them, so every content change (ours, or
someone else's edit being undone) moves every slice to max(existing) + 1, and an
unchanged pool is left alone: a restart with the same inventory writes nothing.

Two publishers of one pool (a rolling update: the old and the new plugin pod side by side)
whose versions build different slices would undo each other's writes for as long as both
run; the one that finds the pool moved past its own last write, to other content, yields
(:func:`stance`) while the other pod lives.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from driver.health.model import GpuHealth
from driver.inventory.model import Inventory
from driver.resourceslice.build import CounterLayout, SliceOptions, build_slices, limit_violations
from driver.resourceslice.errors import PublishError


def desired(inventory: Inventory, options: SliceOptions,
            health: Mapping[int, GpuHealth] | None = None) -> list[dict[str, Any]]:
    """The pool a publisher makes of `inventory` and the GPUs' `health`; PublishError if
    it breaks the API's limits (no write could succeed, so none is tried)."""
    slices = build_slices(inventory, options, generation=0, health=health)
    if problems := limit_violations(slices):
        raise PublishError("; ".join(problems))
    return slices


@dataclass(frozen=True)
class Plan:
    """The writes that turn ``existing`` into ``desired``; ``generation`` is the pool's
    generation once they are done. ``update`` objects carry the resourceVersion they
    replace, ``delete`` objects are the existing ones (uid and resourceVersion are the
    delete preconditions)."""

    create: tuple[dict[str, Any], ...]
    update: tuple[dict[str, Any], ...]
    delete: tuple[Mapping[str, Any], ...]
    generation: int

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.update) + len(self.delete)


@dataclass(frozen=True)
class PublishResult:
    """What one publish wrote, by slice name, and the pool's generation afterwards."""

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    generation: int = 0

    @property
    def writes(self) -> int:
        return len(self.created) + len(self.updated) + len(self.deleted)


def result_of(todo: Plan) -> PublishResult:
    """What carrying out ``todo`` wrote."""
    def names(objs: tuple[Mapping[str, Any], ...]) -> tuple[str, ...]:
        return tuple(o["metadata"]["name"] for o in objs)

    return PublishResult(names(todo.create), names(todo.update), names(todo.delete),
                         todo.generation)


def generation_of(slice_obj: Mapping[str, Any]) -> int:
    return int(slice_obj["spec"]["pool"].get("generation", 0))


def content(slice_obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a slice says, without its generation or what the server adds (a taint's
    ``timeAdded``): two slices with equal content need no write between them."""
    spec = dict(slice_obj["spec"])
    spec["pool"] = {k: v for k, v in spec["pool"].items() if k != "generation"}
    if any("taints" in d for d in spec.get("devices", [])):
        spec["devices"] = [_without_time_added(d) for d in spec["devices"]]
    owners = slice_obj.get("metadata", {}).get("ownerReferences") or []
    return {"spec": spec, "owners": owners}


def _without_time_added(device: Mapping[str, Any]) -> Mapping[str, Any]:
    if "taints" not in device:
        return device
    return {**device, "taints": [{k: v for k, v in t.items() if k != "timeAdded"}
                                 for t in device["taints"]]}


def stamped(slice_obj: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """A copy of ``slice_obj`` in pool generation ``generation``: its own metadata and
    pool, the devices shared (nothing changes those)."""
    spec = slice_obj["spec"]
    return {**slice_obj, "metadata": dict(slice_obj["metadata"]),
            "spec": {**spec, "pool": {**spec["pool"], "generation": generation}}}


def plan(existing: Sequence[Mapping[str, Any]], desired: Sequence[Mapping[str, Any]]) -> Plan:
    """Writes that make the pool ``existing`` equal to ``desired`` (whose generations are
    ignored): none when the content is the same and the pool is in one generation;
    otherwise every desired slice in generation max(existing) + 1 (existing ones
    updated in place, missing ones created) and the rest deleted."""
    by_name = {s["metadata"]["name"]: s for s in existing}
    wanted = {s["metadata"]["name"]: s for s in desired}
    if len(wanted) != len(desired):
        raise ValueError("desired slices: duplicate metadata.name")
    current = max((generation_of(s) for s in existing), default=0)
    unchanged = (
        bool(existing)
        and by_name.keys() == wanted.keys()
        and len({generation_of(s) for s in existing}) == 1
        and all(content(by_name[n]) == content(d) for n, d in wanted.items())
    )
    if unchanged:
        return Plan((), (), (), current)
    generation = current + 1
    create: list[dict[str, Any]] = []
    update: list[dict[str, Any]] = []
    for name, slice_obj in wanted.items():
        new = stamped(slice_obj, generation)
        if name in by_name:
            new["metadata"]["resourceVersion"] = by_name[name]["metadata"].get(
                "resourceVersion", "")
            update.append(new)
        else:
            create.append(new)
    delete = [by_name[n] for n in sorted(by_name.keys() - wanted.keys())]
    return Plan(tuple(create), tuple(update), tuple(delete), generation)


def counter_layout_for(git_version: str) -> CounterLayout:
    """Where counter sets go for an API server of ``git_version`` (``v1.37.2``):
    1.34 accepts them only beside the devices, 1.35+ only in device-less slices."""
    match = re.match(r"v?(\d+)\.(\d+)", git_version)
    if not match:
        raise PublishError(f"API server version {git_version!r}: not a Kubernetes version")
    major, minor = int(match[1]), int(match[2])
    if (major, minor) < (1, 34):
        raise PublishError(f"API server {git_version}: resource.k8s.io/v1 ResourceSlices "
                           "need Kubernetes 1.34 or newer")
    return "combined" if (major, minor) == (1, 34) else "split"


def dropped_fields(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Paths set in ``sent`` that ``stored`` lacks: fields the API server dropped because
    it does not know them or their feature gate is off."""
    if isinstance(sent, Mapping) and isinstance(stored, Mapping):
        return [p for key, value in sent.items()
                for p in ([f"{path}.{key}".lstrip(".")] if key not in stored
                          else dropped_fields(value, stored[key], f"{path}.{key}"))]
    if isinstance(sent, list) and isinstance(stored, list):
        return [p for i, (a, b) in enumerate(zip(sent, stored, strict=False))
                for p in dropped_fields(a, b, f"{path}[{i}]")]
    return []


def foreign_change(event: Mapping[str, Any], expected: Mapping[str, Mapping[str, Any]],
                   generation: int) -> str | None:
    """Why a watch event shows the pool differs from what we last wrote (``expected``
    slices by name, in ``generation``), or None if it is our own write."""
    kind = event.get("type")
    obj = event.get("object") or {}
    name = obj.get("metadata", {}).get("name", "")
    if kind == "ERROR":
        return f"watch error: {obj.get('message', obj)}"
    if kind not in ("ADDED", "MODIFIED", "DELETED"):
        return None
    if kind == "DELETED":
        return f"ResourceSlice {name} was deleted" if name in expected else None
    if name not in expected:
        return f"ResourceSlice {name} is not one of ours"
    if generation_of(obj) != generation or content(obj) != content(expected[name]):
        return f"ResourceSlice {name} was changed"
    return None


Stance = Literal["write", "yield", "wait"]
"""What a resync does about a difference: write (restore), yield to a newer publisher of the
pool, or wait a little for that publisher's pod to show it is alive."""


def overtaken(existing: Sequence[Mapping[str, Any]], todo: Plan, last_generation: int) -> bool:
    """Another publisher moved the pool past ``last_generation`` (the one we last wrote) to
    content other than ours. A deleted slice or an edit that keeps the generation (a
    person's ``kubectl edit``) is not that: it is restored as any other difference."""
    top = max((generation_of(s) for s in existing), default=0)
    return bool(todo.writes) and 0 < last_generation < top


def stance(overtaken: bool, others_alive: bool, yielding: bool, alone_for: float,
           grace: float) -> Stance:
    """Whether a resync restores our content. Overtaken while another plugin pod of the
    driver is alive on the node: yield, so the newer version's slices stand. Overtaken
    with no other pod in sight: a new pod publishes before it opens its sockets, so wait up
    to ``grace`` seconds (``alone_for``: how long we have seen nobody) for them, unless we
    were already yielding, which means the other pod has just gone: restore at once."""
    if not overtaken:
        return "write"
    if others_alive:
        return "yield"
    return "wait" if not yielding and alone_for < grace else "write"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: try n waits ``initial * factor**n`` capped at
    ``cap``, of which a random ``jitter`` fraction is taken off, so a fleet of nodes
    that lost the API server at once does not come back in step."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 16.0
    jitter: float = 0.5

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rng = rng or random.Random()
        for attempt in itertools.count():
            base = min(self.cap, self.initial * self.factor ** min(attempt, 64))
            yield base * (1 - self.jitter * rng.random())
