"""A GPU's conditions as resource.k8s.io/v1 device taints.

Every device that uses the GPU carries the same taints: the whole GPU `gpu-<minor>` and
each of its MIG devices, static or dynamic placements, since a fault of the GPU is a
fault of every slice of it. Keys are in the driver's domain, one per kind of condition:

- `<driver>/xid`: every XID collapses into one taint: the most severe effect among them,
  the value the XID that most recently began with that effect, timeAdded the earliest
  of those began (how long the GPU has been out at that severity);
- `<driver>/gpu-lost`, `<driver>/ecc` (value `double-bit`), `<driver>/recovery` (value
  `reset`, `reboot` or `drain`), `<driver>/remap-failure`: the fatal effect;
- `<driver>/unmonitored`: effect None, the GPU's events cannot be watched;
- `<driver>/out-of-service`: the admin's, the value the reason.

timeAdded is when the condition began, so re-publishing an unchanged condition writes the
same taint. At most `MAX_TAINTS` per device: the most severe effect first, then the
order of `RANK`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from driver.health.classify import meaning
from driver.health.model import SEVERITY, Condition, Effect, GpuHealth, Kind

# resource.k8s.io/v1 allows 16 taints per device since Kubernetes 1.35 and 4 in 1.34;
# 4 holds on every version the driver supports.
MAX_TAINTS = 4
RANK: tuple[Kind, ...] = ("out-of-service", "gpu-lost", "xid", "ecc", "recovery",
                          "remap-failure", "unmonitored")


@dataclass(frozen=True)
class Taint:
    key: str
    effect: Effect
    time_added: datetime
    value: str = ""

    def to_api(self) -> dict[str, str]:
        """The taint as a ResourceSlice device carries it."""
        taint = {"key": self.key, "effect": self.effect, "timeAdded": rfc3339(self.time_added)}
        if self.value:
            taint["value"] = self.value
        return taint


def gpu_taints(health: GpuHealth, driver: str, *, effect_none: bool = True
               ) -> tuple[Taint, ...]:
    """The taints of every device that uses this GPU. `effect_none=False` is for a
    Kubernetes 1.34 API server, which refuses effect None: the informational taints
    are left out, which changes no scheduling decision."""
    by_kind: dict[Kind, list[Condition]] = {}
    for condition in health.conditions:
        by_kind.setdefault(condition.kind, []).append(condition)
    taints = [(kind, _merge(f"{driver}/{kind}", conditions))
              for kind, conditions in by_kind.items()]
    if not effect_none:
        taints = [(kind, t) for kind, t in taints if t.effect != "None"]
    taints.sort(key=lambda kind_taint: (-SEVERITY[kind_taint[1].effect],
                                        RANK.index(kind_taint[0])))
    return tuple(t for _, t in taints[:MAX_TAINTS])


def _merge(key: str, conditions: list[Condition]) -> Taint:
    """One taint for conditions of one kind (only XIDs have several)."""
    top = max(SEVERITY[c.effect] for c in conditions)
    worst = [c for c in conditions if SEVERITY[c.effect] == top]
    latest = max(worst, key=lambda c: (c.since, c.xid or 0))
    return Taint(key, latest.effect, min(c.since for c in worst), latest.value)


def rfc3339(at: datetime) -> str:
    """UTC to the second, as the API server writes a metav1.Time."""
    if at.tzinfo is None:
        raise ValueError(f"{at}: a time without a timezone")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions_text(health: GpuHealth) -> str:
    """Every condition of the GPU in words, the most severe first, for the health
    stream's message: the XID is named even when a later check set another condition."""
    ordered = sorted(health.conditions, key=lambda c: (-SEVERITY[c.effect], RANK.index(c.kind),
                                                       c.since))
    return "; ".join(
        f"{c.kind}{'=' + c.value if c.value else ''}"
        f"{f' ({meaning(c.xid)})' if c.xid is not None else ''}:{c.effect} since "
        f"{rfc3339(c.since)}" for c in ordered)
