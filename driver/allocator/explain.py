"""Why a claim does not fit on a node, with numbers, and the nearest change that would.

    4 devices match class gpu.dra.dev; 2 are allocated (gpu-0 to default/train-a, ...)
    matchAttribute gpu.dra.dev/nvlinkIsland leaves at most 2 in one value (0: 2, 1: 1);
    value 0 has 2 allocated to default/train-a
    gpu-3: tainted gpu.dra.dev/xid=79:NoSchedule since 2026-12-07T01:02:03Z
    nearest change: count 2 instead of 4

A device that a taint keeps from a request is named with the taint, when it was added
and, for one a DeviceTaintRule put there, the rule's name. One that cannot take the share
of its capacity a request asks (KEP-5075) is named with the amount as the request policy
rounds it, what the device has, and what allocated shares already consume:

    gpu-0: memory 30Gi asked, 81559Mi in all, 57222Mi consumed by 3 claims, 24337Mi free
    gpu-1: compute 150 asked, outside its request policy (validRange 0..100 step 1)
    nearest change: request gpu: memory at most 24337Mi instead of 30Gi

Each reason is counted over the same per-device facts the allocator uses; each
suggested change is checked by running the allocator on the changed claim.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from driver.allocator.allocate import Allocator, Mode, Outcome
from driver.allocator.input import Claim, DeviceClass, InputError, Request, Taint, parse_claim
from driver.allocator.ledger import DeviceRef, Ledger
from driver.allocator.model import (
    AllocationError,
    NodeModel,
    consumed_capacity,
    policy_amount,
    request_policies,
    selectable,
    violates_policy,
)
from driver.allocator.pools import Device, Node
from driver.kube.quantity import format_quantity, parse_quantity

MAX_LISTED = 4


@dataclass(frozen=True)
class Explanation:
    claim: str
    node: str
    fits: bool
    reasons: tuple[str, ...]
    nearest: tuple[str, ...]


def explain(allocator: Allocator, claim: Claim, ledger: Ledger, node: str,
            mode: Mode = "parity", unfit: Collection[str] = frozenset(),
            outcome: Outcome | None = None) -> Explanation:
    """Why the claim does (not) fit on `node`. `unfit`: nodes already tried with this
    ledger where it does not fit, not tried again for "on node X" (explain_all tries
    every node first: trying them all again per node explained was quadratic).
    `outcome`: the allocation of the claim on `node` with this ledger when the caller
    has it already (explain_all), so it is not run again."""
    if outcome is None:
        outcome = allocator.allocate([claim], ledger, node, mode)
    if outcome.status == "allocated":
        devices = [r["device"] for r in outcome.allocations[0]["devices"]["results"]]
        return Explanation(claim.key, node, True, (f"fits: {', '.join(devices)}",), ())
    if outcome.status == "error":
        return Explanation(claim.key, node, False, (f"error: {outcome.message}",), ())
    reasons, free_of = _reasons(allocator, claim, ledger, Node(node))
    if outcome.status == "gave-up":
        reasons.insert(0, outcome.message)
    if not reasons:
        reasons.append("each request has enough devices on its own, but no combination "
                       "satisfies all requests and constraints together")
    return Explanation(claim.key, node, False, tuple(reasons),
                       tuple(_nearest(allocator, claim, ledger, node, mode, unfit, free_of)))


def _reasons(allocator: Allocator, claim: Claim, ledger: Ledger, node: Node
             ) -> tuple[list[str], dict[str, int]]:
    """Why the claim does not fit; how many devices are free for each request (none
    counted where the claim's problem cannot be built)."""
    model = allocator.model(node)
    reasons = [f"pool {p} is {'incomplete' if p.incomplete else 'invalid: ' + p.invalid}"
               for p in model.pools if not p.usable]
    devices = model.devices
    try:
        problem = model.problem([claim], allocator.classes, ledger, allocator.evaluations)
    except AllocationError as err:
        return [*reasons, str(err)], {}
    free_of: dict[str, list[Device]] = {}
    named: set[DeviceRef] = set()  # tainted devices already named for an earlier request
    for group in claim.requests:
        for request in group.alternatives:
            free, line, tainted, by_capacity = _request_line(allocator, claim, request,
                                                             model, ledger, problem)
            free_of[request.name] = free
            reasons.append(line)
            reasons += _capacity_lines(by_capacity)
            reasons += _taint_lines([d for d in tainted if d.ref not in named], request)
            named.update(d.ref for d in tainted)
    for constraint in claim.constraints:
        # Across the requests it covers (firstAvailable: each one's first alternative).
        covered = [g.alternatives[0] for g in claim.requests
                   if constraint.applies(g.alternatives[0])]
        free = list({d.ref: d for r in covered for d in free_of[r.name]}.values())
        need = sum(len(free_of[r.name]) if r.all_devices else r.count for r in covered)
        text = _constraint_line(constraint.kind, constraint.attribute, covered, need, free,
                                devices, ledger, allocator, claim)
        if text:
            reasons.append(text)
    return reasons, {name: len(free) for name, free in free_of.items()}


def _request_line(allocator: Allocator, claim: Claim, request: Request, model: NodeModel,
                  ledger: Ledger, problem: Any
                  ) -> tuple[list[Device], str, list[Device], list[tuple[Device, str]]]:
    """The request's devices counted down to the free ones; returns those, the line,
    the devices its tolerations do not cover a taint of, and those left out by capacity
    with why."""
    devices = model.devices
    in_bits, selected_bits = _matching(allocator, model, request)
    in_class, selected = model.devices_in(in_bits), model.devices_in(selected_bits)
    parts = [f"request {request.name}: {len(in_class)} devices match class "
             f"{request.class_name}"]
    if request.selectors:
        parts.append(f"its selectors leave {len(selected)}")
    by_capacity = [(d, why) for d in selected
                   if (why := _capacity_short(claim.key, request, d, ledger)) is not None]
    if by_capacity:
        parts.append(f"{len(by_capacity)} left out by capacity")
    left_out = {d.ref for d, _ in by_capacity}
    fitting = [d for d in selected if d.ref not in left_out]
    tainted = [d for d in fitting if d.untolerated(request.tolerations)]
    if tainted:
        parts.append(f"{len(tainted)} tainted (not tolerated)")
    usable = [d for d in fitting if d not in tainted]
    taken = [d for d in usable if d.ref in ledger.exclusive and not request.admin_access]
    if taken:
        owners = ", ".join(f"{d.ref.device} to {ledger.exclusive[d.ref]}"
                           for d in taken[:MAX_LISTED])
        more = f", {len(taken) - MAX_LISTED} more" if len(taken) > MAX_LISTED else ""
        parts.append(f"{len(taken)} allocated ({owners}{more})")
    index = {d.ref: i for i, d in enumerate(problem.devices)}
    short = [d for d in usable if d not in taken and _short_of_counters(problem, index[d.ref])]
    if short:
        parts.append(f"{len(short)} short of shared counters "
                     f"({_counter_owners(short, devices, ledger)})")
    free = [d for d in usable if d not in taken and d not in short]
    want = "all of them" if request.all_devices else str(request.count)
    parts.append(f"{len(free)} free for {want}")
    return free, "; ".join(parts), tainted, by_capacity


def _capacity_short(claim_key: str, request: Request, device: Device, ledger: Ledger
                    ) -> str | None:
    """Why the device cannot take one more share of what the request asks (None: it can),
    by the allocator's own rounding and policy checks; a shared device's allocated
    shares count against it, as in the search."""
    consumed = consumed_capacity(claim_key, request, device)
    asked = dict(request.capacity)
    if isinstance(consumed, str):
        return consumed
    missing = [name for name in asked if name not in device.capacity]
    if missing:
        return f"no capacity {', '.join(missing)}"
    policies = request_policies(device)
    used = ledger.capacity.get(device.ref, {}) if device.multi else {}
    holders = len(ledger.shares.get(device.ref, {}))
    problems = []
    for name, value in sorted(device.capacity.items()):
        policy = policies.get(name)
        amount = policy_amount(asked.get(name), value, policy)
        taken = used.get(name, Fraction(0))
        if violates_policy(amount, policy):
            problems.append(f"{_asked(name, asked, amount)}, outside its request policy "
                            f"({_policy_text(policy)})")
        elif amount > value:
            problems.append(f"{_asked(name, asked, amount)}, more than its {_amount(value)}")
        elif amount > value - taken:
            total, held, left = _amounts(value, taken, value - taken)
            claims = f"{holders} claim{'s' if holders != 1 else ''}"
            problems.append(f"{_asked(name, asked, amount)}, {total} in all, {held} consumed "
                            f"by {claims}, {left} free")
    return "; ".join(problems) or None


def _asked(name: str, asked: Mapping[str, Fraction], amount: Fraction) -> str:
    """`memory 30Gi asked (rounded up to 32Gi by its request policy)`; written only for a
    capacity that falls short (a device has several, checked for every device)."""
    if name not in asked:
        return f"{name} not asked (default {_amount(amount)})"
    what = f"{name} {_amount(asked[name])} asked"
    if amount != asked[name]:
        what += f" (rounded up to {_amount(amount)} by its request policy)"
    return what


def _matching(allocator: Allocator, model: NodeModel, request: Request) -> tuple[int, int]:
    """The node's devices in the request's class, and of those the ones its own selectors
    select (bit sets over `model.devices`)."""
    verdicts = allocator.evaluations.verdicts
    in_class = model.selected(allocator.classes[request.class_name].selectors, verdicts,
                              model.node_ok_bits)
    return in_class, model.selected(request.selectors, verdicts, in_class)


def _capacity_lines(left_out: list[tuple[Device, str]]) -> list[str]:
    """`gpu-0: memory 90Gi asked, more than its 81559Mi`, the first few."""
    lines = [f"{d.ref.device}: {why}" for d, why in left_out[:MAX_LISTED]]
    if len(left_out) > MAX_LISTED:
        lines.append(f"and {len(left_out) - MAX_LISTED} more devices left out by capacity")
    return lines


def _policy_text(policy: Mapping[str, Any] | None) -> str:
    """`validRange 0..100 step 1` or `validValues 1Gi, 2Gi`, in readable units."""
    policy = policy or {}
    if policy.get("validValues"):
        return "validValues " + ", ".join(_amounts(*(_q(v) for v in policy["validValues"])))
    valid_range = policy.get("validRange") or {}
    low, high = (valid_range.get(k) for k in ("min", "max"))
    text = "validRange " + "..".join(
        _amounts(*(_q(v) for v in (low or 0, high) if v is not None)))
    if high is None:
        text += ".."
    if valid_range.get("step") is not None:
        text += f" step {_amount(_q(valid_range['step']))}"
    return text


_BINARY = (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20),
           ("Ki", 2**10))


def _amounts(*values: Fraction) -> list[str]:
    """Amounts in one binary unit where all are whole multiples of it (81559Mi, 61440Mi),
    else each in canonical form: exact, so a suggested amount can be asked as printed."""
    for suffix, unit in _BINARY:
        if all(v % unit == 0 for v in values) and any(v >= unit for v in values):
            return [f"{int(v // unit)}{suffix}" for v in values]
    return [format_quantity(v) for v in values]


def _amount(value: Fraction) -> str:
    return _amounts(value)[0]


def _q(text: Any) -> Fraction:
    return parse_quantity(str(text))


def _taint_lines(tainted: list[Device], request: Request) -> list[str]:
    """`gpu-3: tainted <taint> since <time> (DeviceTaintRule <name>)`, the first few."""
    lines = [f"{d.ref.device}: tainted "
             + ", ".join(_taint_text(t) for t in d.untolerated(request.tolerations))
             for d in tainted[:MAX_LISTED]]
    if len(tainted) > MAX_LISTED:
        lines.append(f"and {len(tainted) - MAX_LISTED} more tainted devices")
    return lines


def _taint_text(taint: Taint) -> str:
    since = f" since {taint.time_added}" if taint.time_added else ""
    rule = f" (DeviceTaintRule {taint.rule})" if taint.rule else ""
    return f"{taint}{since}{rule}"


def _short_of_counters(problem: Any, i: int) -> bool:
    if not problem.counted[i]:
        return False
    if problem.multi[i] and problem.base_shared[i]:
        return False
    return problem.blocked[i] or any(amount > problem.counter_avail[k]
                                     for k, amount in problem.dev_counters[i])


def _counter_owners(short: list[Device], devices: list[Device], ledger: Ledger) -> str:
    """Which allocated devices hold the counters the short devices need."""
    wanted = {(s, c) for d in short for s, c, _ in d.consumes}
    holders: Counter[str] = Counter()
    for device in devices:
        if ledger.allocated(device.ref) and any((s, c) in wanted for s, c, _ in device.consumes):
            holders[f"{device.ref.device} ({ledger.owner(device.ref)})"] += 1
    if not holders:
        return "the counters are exhausted"
    names = list(holders)[:MAX_LISTED]
    return "held by " + ", ".join(names) + (", ..." if len(holders) > MAX_LISTED else "")


def _constraint_line(kind: str, attribute: str, covered: list[Request], need: int,
                     free: list[Device], devices: list[Device], ledger: Ledger,
                     allocator: Allocator, claim: Claim) -> str:
    values = Counter(_value(d, attribute) for d in free)
    missing = values.pop(None, 0)
    label = f"{'matchAttribute' if kind == 'match' else 'distinctAttribute'} {attribute}"
    names = ", ".join(r.name for r in covered)
    lack = f"; {missing} free devices lack it" if missing else ""
    if kind == "match":
        best = max(values.values(), default=0)
        if best >= need:
            return ""
        by_value = ", ".join(f"{v}: {n}" for v, n in values.most_common(MAX_LISTED))
        text = (f"{label} needs {need} devices with one value for {names}; free devices "
                f"leave at most {best} in one value ({by_value or 'none'}){lack}")
        matching = [d for d in devices if d.ref in ledger.exclusive and any(
            selectable(claim.key, allocator.classes[r.class_name], r, d,
                       allocator.evaluations.verdicts) is True for r in covered)]
        held = Counter(_value(d, attribute) for d in matching)
        held.pop(None, None)
        for value, count in held.most_common(2):
            owners = sorted({ledger.exclusive[d.ref] for d in matching
                             if _value(d, attribute) == value})
            text += (f"; value {value} has {count} allocated to "
                     + ", ".join(owners[:MAX_LISTED]))
        return text
    if len(values) >= need:
        return ""
    return (f"{label} needs {need} distinct values for {names}; free devices have "
            f"{len(values)}{lack}")


def _value(device: Device, attribute: str) -> str | None:
    value = device.attribute(attribute)
    if not value:
        return None
    return str(next(iter(value.values())))


def _nearest(allocator: Allocator, claim: Claim, ledger: Ledger, node: str,
             mode: Mode, unfit: Collection[str], free_of: Mapping[str, int]) -> list[str]:
    """Single changes, smallest first, that make the claim fit; each one checked.
    `free_of`: the devices free for each request on the node (a smaller count above
    it cannot fit, so it is not tried)."""
    found: list[str] = []

    def fits(raw: Mapping[str, Any], with_ledger: Ledger = ledger) -> bool:
        try:
            changed = parse_claim(raw, allocator.classes)
        except InputError:
            return False
        return allocator.allocate([changed], with_ledger, node, mode).status == "allocated"

    def fits_edited(edit: tuple[Any, ...]) -> bool:
        changed = _edited(claim, allocator.classes, edit)
        return changed is not None and allocator.allocate(
            [changed], ledger, node, mode).status == "allocated"

    requests = claim.raw["spec"]["devices"].get("requests") or []
    for i, raw in enumerate(requests):
        exact = raw.get("exactly")
        if exact and exact.get("allocationMode", "ExactCount") == "ExactCount":
            count = exact.get("count", 1)
            for smaller in range(min(count - 1, free_of.get(raw["name"], count)), 0, -1):
                if fits_edited(("count", i, smaller)):
                    found.append(f"request {raw['name']}: count {smaller} instead of {count}")
                    break
        if exact:
            found += _capacity_changes(claim, i, allocator, ledger, Node(node), fits)
        if exact and exact.get("selectors") and fits_edited(("selectors", i)):
            found.append(f"request {raw['name']}: without its selectors")
    for j, constraint in enumerate(claim.raw["spec"]["devices"].get("constraints") or []):
        if fits_edited(("constraint", j)):
            name = constraint.get("matchAttribute") or constraint.get("distinctAttribute")
            kind = "matchAttribute" if "matchAttribute" in constraint else "distinctAttribute"
            found.append(f"without constraint {kind} {name}")
    for owner in ledger.claims():
        lighter = ledger.copy()
        lighter.remove(owner)
        if fits(claim.raw, lighter):
            found.append(f"after {owner} is released")
            if len(found) >= 6:
                break
    for other in allocator.nodes():
        if other != node and other not in unfit and allocator.allocate(
                [claim], ledger, other, mode).status == "allocated":
            found.append(f"on node {other}")
            break
    return found


# Claims explain edited (a smaller count, a request's selectors or a constraint dropped),
# parsed once per (claim, classes, edit) and not once per node explained: (the claim, the
# classes, the edited claim or None where it does not parse), the first two held so that
# their ids, the key, stay theirs.
_MAX_EDITED = 4096
_edited_claims: dict[tuple[Any, ...], tuple[Claim, Mapping[str, DeviceClass], Claim | None]] = {}


def _edited(claim: Claim, classes: Mapping[str, DeviceClass], edit: tuple[Any, ...]
            ) -> Claim | None:
    key = (id(claim), id(classes), *edit)
    known = _edited_claims.get(key)
    if known is None:
        raw = copy.deepcopy(claim.raw)
        devices = raw["spec"]["devices"]
        if edit[0] == "count":
            devices["requests"][edit[1]]["exactly"]["count"] = edit[2]
        elif edit[0] == "selectors":
            del devices["requests"][edit[1]]["exactly"]["selectors"]
        else:
            del devices["constraints"][edit[1]]
        try:
            changed: Claim | None = parse_claim(raw, classes)
        except InputError:
            changed = None
        if len(_edited_claims) >= _MAX_EDITED:
            _edited_claims.clear()
        known = _edited_claims[key] = (claim, classes, changed)
    return known[2]


def _capacity_changes(claim: Claim, index: int, allocator: Allocator, ledger: Ledger,
                      node: Node, fits: Callable[[Mapping[str, Any]], bool]) -> list[str]:
    """`memory at most 20119Mi`: per capacity, the most one request could ask and still
    get a share of as many devices it may take as it needs, if less than what it asks
    now; checked."""
    request = claim.requests[index].alternatives[0]
    model = allocator.model(node)
    devices = [d for d in model.devices_in(_matching(allocator, model, request)[1])
               if not d.untolerated(request.tolerations) and d.ref not in ledger.exclusive]
    asked = dict(request.capacity)
    need = len(devices) if request.all_devices else request.count
    if not 0 < need <= len(devices):
        return []  # fewer devices than it needs: no amount asked of each changes that
    found = []
    for name in sorted({n for d in devices for n in d.capacity}):
        room = sorted((m for d in devices if (m := _most(name, d, ledger)) is not None),
                      reverse=True)
        most = room[need - 1] if need <= len(room) else None
        if most is None or (name in asked and most >= asked[name]):
            continue
        edited = copy.deepcopy(claim.raw)
        exact = edited["spec"]["devices"]["requests"][index]["exactly"]
        exact.setdefault("capacity", {}).setdefault("requests", {})[name] = _amount(most)
        if fits(edited):
            before = _amount(asked[name]) if name in asked else "the default"
            found.append(f"request {request.name}: {name} at most {_amount(most)} "
                         f"instead of {before}")
    return found


def _most(name: str, device: Device, ledger: Ledger) -> Fraction | None:
    """The largest amount of one capacity that a request could ask of the device now: one
    the policy keeps as it is (on its step, a valid value, within range) and that fits
    in what allocated shares leave; None if there is none."""
    if name not in device.capacity:
        return None
    policy = request_policies(device).get(name) or {}
    value = device.capacity[name]
    left = value - (ledger.capacity.get(device.ref, {}).get(name, Fraction(0))
                    if device.multi else Fraction(0))
    valid_range = policy.get("validRange") or {}
    top = min(left, _q(valid_range["max"])) if valid_range.get("max") is not None else left
    options = [left, top, *(_q(v) for v in policy.get("validValues") or ())]
    if valid_range.get("step") is not None:
        low, step = _q(valid_range.get("min") or 0), _q(valid_range["step"])
        options.append(low + step * ((top - low) // step))
    kept = [o for o in options if 0 <= o <= left and policy_amount(o, value, policy) == o
            and not violates_policy(o, policy)]
    return max(kept, default=None)


def explain_all(allocator: Allocator, claims: Sequence[Claim], ledger: Ledger,
                nodes: Sequence[str], mode: Mode = "parity") -> list[Explanation]:
    """Claims in order, each seeing the allocations of the ones before it; a claim that
    fits is placed on the first node where it fits, one that does not is explained on
    every node."""
    done: list[Explanation] = []
    for claim in claims:
        placed = None
        outcomes: dict[str, Outcome] = {}
        for node in nodes:
            outcome = outcomes[node] = allocator.allocate([claim], ledger, node, mode)
            if outcome.status == "allocated":
                ledger.add(claim.key, outcome.allocations[0]["devices"]["results"])
                names = [r["device"] for r in outcome.allocations[0]["devices"]["results"]]
                placed = Explanation(claim.key, node, True,
                                     (f"fits: {', '.join(names)}",), ())
                break
        if placed is not None:
            done.append(placed)
            continue
        tried = set(nodes)
        done += [explain(allocator, claim, ledger, node, mode, tried, outcomes[node])
                 for node in nodes]
    return done
