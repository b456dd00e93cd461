"""A GPU's health as a fold of its observations, in time order, into its conditions.

Conditions come from events (an XID, a double-bit ECC error), from the periodic check
(lost, a recovery the driver asks for, a remapped-row failure), from NVML's support for
events (unmonitored) and from the admin (out of service). They go away by these rules:

- reset: fatal event conditions stay until the GPU has shown a need for recovery (it was
  lost, had a remapped-row failure, or the driver asked for a reset, reboot or drain,
  with the event or in a check) and a later check finds it answering with no recovery
  asked for. A fatal event while the GPU no longer shows that need starts over: a GPU
  that fails again after its reset is not given back.
- return: a GPU lost and then answering again is no longer lost; a check that no
  longer finds a remapped-row failure or a recovery to do removes that condition.
- quiet window: informational XIDs (those NVML reports as recovered: the driver asks for
  no recovery, or the table says the GPU is fine) go after `quiet_window_s` seconds
  without that XID again.
- the admin wins: out of service stays until the admin returns the GPU (which removes
  that condition alone) or clears it: a manual clear removes every condition but
  `unmonitored` (a fact about NVML, not a fault).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timedelta

from driver.health.classify import HealthSettings, classify, meaning
from driver.health.model import (
    SEVERITY,
    Check,
    Condition,
    EccEvent,
    Effect,
    GpuHealth,
    Kind,
    Manual,
    Observation,
    RecoveryAction,
    Transition,
    Unmonitored,
    XidEvent,
)

_Key = tuple[Kind, int | None]
_FATAL_EVENTS: frozenset[Kind] = frozenset({"xid", "ecc"})
# Conditions that show a need for recovery while they last.
_NEEDS: frozenset[Kind] = frozenset({"gpu-lost", "recovery", "remap-failure"})


def fold(health: GpuHealth, observations: Iterable[Observation],
         settings: HealthSettings) -> tuple[GpuHealth, tuple[Transition, ...]]:
    """`observe` over observations in time order; all the transitions, in order."""
    transitions: list[Transition] = []
    for observation in observations:
        health, more = observe(health, observation, settings)
        transitions += more
    return health, tuple(transitions)


def observe(health: GpuHealth, observation: Observation,
            settings: HealthSettings) -> tuple[GpuHealth, tuple[Transition, ...]]:
    """The GPU's health after one more observation (of this GPU, not earlier than the
    ones before), and the conditions it set or cleared."""
    if observation.gpu != health.gpu:
        raise ValueError(f"an observation of GPU {observation.gpu} given to GPU {health.gpu}")
    at = observation.at
    conditions = {_key(c): c for c in health.conditions}
    transitions: list[Transition] = []
    quiet = {k: c for k, c in conditions.items() if c.kind == "xid" and c.effect == "None"
             and at - c.last >= timedelta(seconds=settings.quiet_window_s)}
    if quiet:
        after = {k: c for k, c in conditions.items() if k not in quiet}
        transitions += _transitions(health.gpu, conditions, after,
                                    f"quiet for {settings.quiet_window_s:g}s", at)
        conditions = after
    recovery_seen = health.recovery_seen
    if isinstance(observation, XidEvent):
        after, cause, recovery_seen = _xid(conditions, observation, settings, recovery_seen)
    elif isinstance(observation, EccEvent):
        after = _set(conditions, "ecc", settings.fatal_effect, at, "double-bit")
        cause, recovery_seen = "double-bit ECC error", _shows_need(conditions)
    elif isinstance(observation, Check):
        after, cause, recovery_seen = _check(conditions, observation, settings, recovery_seen)
    elif isinstance(observation, Unmonitored):
        if observation.supported:
            after = {k: c for k, c in conditions.items() if c.kind != "unmonitored"}
            cause = "NVML delivers this GPU's events again"
        else:
            after = _set(conditions, "unmonitored", "None", at)
            cause = "NVML cannot deliver this GPU's events"
    else:
        after, cause, recovery_seen = _manual(conditions, observation, settings, recovery_seen)
    transitions += _transitions(health.gpu, conditions, after, cause, at)
    ordered = tuple(sorted(after.values(), key=lambda c: (c.kind, c.xid or 0)))
    return GpuHealth(health.gpu, ordered, recovery_seen), tuple(transitions)


def _xid(conditions: dict[_Key, Condition], event: XidEvent, settings: HealthSettings,
         recovery_seen: bool) -> tuple[dict[_Key, Condition], str, bool]:
    verdict = classify(event.xid, event.recovery, settings)
    where = f" on GI {event.gi} CI {event.ci}" if event.gi is not None else ""
    cause = f"XID {event.xid} ({verdict.meaning}){where}: {verdict.why}"
    after = _set(conditions, "xid", verdict.effect, event.at, str(event.xid), event.xid)
    if verdict.fatal:
        recovery_seen = event.recovery in ("reset", "reboot", "drain") \
            or _shows_need(conditions)
    return after, cause, recovery_seen


def _check(conditions: dict[_Key, Condition], check: Check, settings: HealthSettings,
           recovery_seen: bool) -> tuple[dict[_Key, Condition], str, bool]:
    """Lost, a recovery to do and a remapped-row failure are what the latest check says;
    answering with nothing to do after a need for recovery gives the GPU back."""
    at, fatal = check.at, settings.fatal_effect
    action: RecoveryAction | None = "reset" if check.liveness == "requires-reset" else \
        check.recovery if check.recovery in ("reset", "reboot", "drain") else None
    after = dict(conditions)
    if action is not None:
        after = _set(after, "recovery", fatal, at, action, replace_on_value=True)
        recovery_seen = True
    else:
        after.pop(("recovery", None), None)
    if check.liveness == "lost":
        after = _set(after, "gpu-lost", fatal, at)
        recovery_seen = True
    elif check.liveness == "remap-failure":
        after = _set(after, "remap-failure", fatal, at)
        recovery_seen = True
    elif check.liveness == "answers":
        after.pop(("gpu-lost", None), None)
        after.pop(("remap-failure", None), None)
        if action is None and recovery_seen:
            after = {k: c for k, c in after.items()
                     if c.kind not in _FATAL_EVENTS or c.effect == "None"}
            return after, "the GPU answers again after a reset or loss, no recovery to do", False
    if check.liveness == "answers":
        cause = "the GPU answers" + (f", the driver asks for recovery: {action}" if action
                                     else ", no recovery to do")
    else:
        cause = {"lost": "the GPU is lost", "remap-failure": "remapped-row failure",
                 "requires-reset": "the GPU needs a reset"}[check.liveness]
    return after, cause, recovery_seen


def _manual(conditions: dict[_Key, Condition], request: Manual, settings: HealthSettings,
            recovery_seen: bool) -> tuple[dict[_Key, Condition], str, bool]:
    cause = f"manual {request.action}" + (f": {request.reason}" if request.reason else "")
    if request.action == "clear":
        return {k: c for k, c in conditions.items() if c.kind == "unmonitored"}, cause, False
    if request.action == "return":
        return {k: c for k, c in conditions.items() if c.kind != "out-of-service"}, cause, \
            recovery_seen
    return (_set(conditions, "out-of-service", settings.fatal_effect, request.at,
                 label_value(request.reason), replace_on_value=True), cause, recovery_seen)


def _set(conditions: dict[_Key, Condition], kind: Kind, effect: Effect, at: datetime,
         value: str = "", xid: int | None = None, *,
         replace_on_value: bool = False) -> dict[_Key, Condition]:
    """Add a condition, or confirm the one there (it keeps its `since`, so its taint's
    timeAdded stays); a more severe effect, or a new value where the value is the cause,
    starts it over."""
    key: _Key = (kind, xid)
    old = conditions.get(key)
    if old is None or SEVERITY[effect] > SEVERITY[old.effect] \
            or (replace_on_value and value != old.value):
        condition = Condition(kind, effect, at, at, value, xid)
    else:
        condition = Condition(kind, old.effect, old.since, at, old.value, xid)
    return {**conditions, key: condition}


def _transitions(gpu: int, before: dict[_Key, Condition], after: dict[_Key, Condition],
                 cause: str, at: datetime) -> list[Transition]:
    """One transition per condition set (new, or a new effect or value) or cleared, each
    with the GPU's status just before and after it."""
    transitions: list[Transition] = []
    current = dict(before)
    changes = [k for k in before if k not in after] + \
        [k for k, c in after.items()
         if k not in before or (before[k].effect, before[k].value) != (c.effect, c.value)]
    for key in changes:
        status = GpuHealth(gpu, tuple(current.values())).status
        if key in after:
            current[key] = after[key]
        else:
            del current[key]
        kind, xid = key
        transitions.append(Transition(
            gpu, kind, "set" if key in after else "cleared", status,
            GpuHealth(gpu, tuple(current.values())).status, cause, at, xid,
            meaning(xid) if xid is not None else None))
    return transitions


def _shows_need(conditions: dict[_Key, Condition]) -> bool:
    """A fatal event while the GPU is lost or waits for a recovery is covered by it."""
    return any(kind in _NEEDS for kind, _ in conditions)


def _key(condition: Condition) -> _Key:
    return condition.kind, condition.xid


def label_value(text: str) -> str:
    """Free text as a Kubernetes label value (taint values are label values): at most 63
    characters of [A-Za-z0-9._-], starting and ending with a letter or digit."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("._-")
