"""ResourceClaims, DeviceClasses and DeviceTaintRules (resource.k8s.io/v1 dicts) -> checked,
typed values.

Every rule the API server would enforce on create and every problem the scheduler
would report as an error is found here, before anything is allocated, with a
message naming the object and the field: `ResourceClaim default/train:
spec.devices.requests[0].exactly.count: must be at least 1`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from driver.allocator.cel import Selector, SelectorError, compile_selector
from driver.allocator.versions import Recent, object_version
from driver.errors import AllocatorError
from driver.kube.names import is_c_identifier, is_label, is_subdomain
from driver.kube.quantity import QuantityError, parse_quantity

# resource.k8s.io/v1 limits.
MAX_REQUESTS = 32
MAX_SUBREQUESTS = 8
MAX_SELECTORS = 32
MAX_CONSTRAINTS = 32
MAX_CONFIGS = 32
MAX_TOLERATIONS = 16
MAX_RESULTS = 32  # AllocationResultsMaxSize

# The effects that keep a claim that does not tolerate them off a device. None and any
# effect this version does not know are informational: the API tells consumers to treat
# unknown effects like None.
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")


class InputError(AllocatorError, ValueError):
    """Bad input: the message names the object and the field."""


@dataclass(frozen=True)
class Taint:
    """A device taint as the allocator weighs it: the slice's own, or one a DeviceTaintRule
    adds (`rule` names it, so `explain` can say where a taint came from)."""

    key: str
    value: str
    effect: str
    time_added: str = ""  # RFC 3339, as the API server stamps it; "" when not set
    rule: str = ""

    @classmethod
    def of(cls, raw: Mapping[str, Any], rule: str = "") -> Taint:
        return cls(str(raw.get("key") or ""), str(raw.get("value") or ""),
                   str(raw.get("effect") or ""), str(raw.get("timeAdded") or ""), rule)

    @property
    def blocks(self) -> bool:
        return self.effect in BLOCKING_EFFECTS

    def __str__(self) -> str:
        """kubectl's form: key=value:effect, or key:effect without a value."""
        return f"{self.key}{'=' + self.value if self.value else ''}:{self.effect}"


@dataclass(frozen=True)
class TaintRule:
    """A DeviceTaintRule: its taint goes on every device its selector's set fields match
    (driver, pool, device name), as if the driver had published it in the slice."""

    name: str
    driver: str | None
    pool: str | None
    device: str | None
    taint: Taint

    def applies(self, driver: str, pool: str, device: str) -> bool:
        return all(want is None or want == have for want, have in (
            (self.driver, driver), (self.pool, pool), (self.device, device)))


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: str  # Equal | Exists
    value: str
    effect: str  # "" = all effects

    def tolerates(self, taint: Taint) -> bool:
        """resourceclaim.ToleratesTaint: effect, then key, then operator."""
        if self.effect and self.effect != taint.effect:
            return False
        if self.key and self.key != taint.key:
            return False
        if self.operator == "Exists":
            return True
        return self.value == taint.value


@dataclass(frozen=True)
class Request:
    """One `exactly` request or one `firstAvailable` subrequest."""

    name: str  # as results name it: `req` or `req/sub`
    class_name: str
    selectors: tuple[Selector, ...]
    all_devices: bool
    count: int
    admin_access: bool
    tolerations: tuple[Toleration, ...]
    raw_tolerations: tuple[Mapping[str, Any], ...]
    capacity: tuple[tuple[str, Fraction], ...]
    field: str  # where it is in the claim, for messages


@dataclass(frozen=True)
class RequestGroup:
    """A claim's request: one alternative for `exactly`, up to 8 for `firstAvailable`."""

    name: str
    alternatives: tuple[Request, ...]
    first_available: bool


@dataclass(frozen=True)
class Constraint:
    kind: str  # match | distinct
    attribute: str
    requests: frozenset[str]  # empty: all requests of the claim
    field: str

    def applies(self, request: Request) -> bool:
        if not self.requests:
            return True
        return request.name in self.requests or request.name.split("/", 1)[0] in self.requests


@dataclass(frozen=True)
class Claim:
    key: str  # namespace/name
    uid: str
    requests: tuple[RequestGroup, ...]
    constraints: tuple[Constraint, ...]
    configs: tuple[Mapping[str, Any], ...]
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class DeviceClass:
    name: str
    selectors: tuple[Selector, ...]
    configs: tuple[Mapping[str, Any], ...]


def claim_key(claim: Mapping[str, Any]) -> str:
    meta = claim.get("metadata") or {}
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '<unnamed>')}"


def _named(obj: Mapping[str, Any], kind: str) -> tuple[str, str]:
    """A cluster-scoped object's name, and how messages name the object."""
    name = (obj.get("metadata") or {}).get("name", "")
    where = f"{kind} {name or '<unnamed>'}"
    if not is_subdomain(name):
        raise InputError(f"{where}: metadata.name: must be a DNS subdomain")
    return str(name), where


# DeviceClasses decoded per object version (`object_version`).
_classes: Recent[tuple[str, str], DeviceClass] = Recent(1024)


def parse_classes(objects: list[Mapping[str, Any]]) -> dict[str, DeviceClass]:
    """The classes by name; a class read from the API server is decoded once per
    version."""
    classes: dict[str, DeviceClass] = {}
    for obj in objects:
        version = object_version(obj)
        found = _classes.get(version) if version is not None else None
        if found is None:
            found = _device_class(obj)
            if version is not None:
                _classes.put(version, found)
        classes[found.name] = found
    return classes


def _device_class(obj: Mapping[str, Any]) -> DeviceClass:
    name, where = _named(obj, "DeviceClass")
    spec = obj.get("spec") or {}
    selectors = _selectors(spec.get("selectors") or [], f"{where}: spec.selectors")
    configs = tuple(spec.get("config") or ())
    if len(configs) > MAX_CONFIGS:
        raise InputError(f"{where}: spec.config: at most {MAX_CONFIGS} entries")
    return DeviceClass(name, selectors, configs)


def parse_taint_rules(objects: Sequence[Mapping[str, Any]]) -> tuple[TaintRule, ...]:
    """DeviceTaintRules (v1, v1beta2 or v1alpha3: one shape), by name.

    A rule without `spec.deviceSelector` matches no device and is left out; an empty
    selector matches every device. The selector fields deviceClassName and selectors
    were removed in 1.35: the API server drops them, which would widen the rule to
    every device of its driver and pool, so a rule naming them is refused here.
    """
    if not objects:
        return ()
    rules: dict[str, TaintRule] = {}
    for obj in objects:
        name, where = _named(obj, "DeviceTaintRule")
        if name in rules:
            raise InputError(f"{where}: metadata.name: listed twice")
        spec = obj.get("spec")
        if not isinstance(spec, Mapping):
            raise InputError(f"{where}: spec: required")
        taint = spec.get("taint")
        if not isinstance(taint, Mapping) or not taint.get("key"):
            raise InputError(f"{where}: spec.taint.key: required")
        if not taint.get("effect"):
            raise InputError(f"{where}: spec.taint.effect: required (None, NoSchedule or "
                             "NoExecute)")
        selector = spec.get("deviceSelector")
        if selector is None:
            continue
        if not isinstance(selector, Mapping):
            raise InputError(f"{where}: spec.deviceSelector: must be a mapping")
        for gone in ("deviceClassName", "selectors"):
            if gone in selector:
                raise InputError(f"{where}: spec.deviceSelector.{gone}: removed in "
                                 "Kubernetes 1.35; select by driver, pool and device")
        fields = {key: selector.get(key) for key in ("driver", "pool", "device")}
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise InputError(f"{where}: spec.deviceSelector.{key}: must be a string")
        rules[name] = TaintRule(name, fields["driver"], fields["pool"], fields["device"],
                                Taint.of(taint, rule=name))
    return tuple(rules[name] for name in sorted(rules))


def parse_claim(obj: Mapping[str, Any], classes: Mapping[str, DeviceClass]) -> Claim:
    """A claim the API server would accept and whose classes exist."""
    key = claim_key(obj)
    where = f"ResourceClaim {key}"
    if obj.get("kind", "ResourceClaim") != "ResourceClaim":
        raise InputError(f"{where}: kind: expected ResourceClaim, got {obj.get('kind')}")
    devices = ((obj.get("spec") or {}).get("devices")) or {}
    raw_requests = devices.get("requests") or []
    if not isinstance(raw_requests, list):
        raise InputError(f"{where}: spec.devices.requests: must be a list")
    if len(raw_requests) > MAX_REQUESTS:
        raise InputError(f"{where}: spec.devices.requests: {len(raw_requests)} requests, "
                         f"at most {MAX_REQUESTS}")
    groups: list[RequestGroup] = []
    names: set[str] = set()
    for i, raw in enumerate(raw_requests):
        field = f"spec.devices.requests[{i}]"
        name = _label(raw.get("name"), f"{where}: {field}.name")
        if name in names:
            raise InputError(f"{where}: {field}.name: duplicate request name {name}")
        names.add(name)
        exactly, first = raw.get("exactly"), raw.get("firstAvailable")
        if (exactly is None) == (first is None):
            raise InputError(f"{where}: {field}: exactly one of exactly or firstAvailable "
                             "must be set")
        if exactly is not None:
            groups.append(RequestGroup(name, (_request(
                exactly, name, f"{field}.exactly", where, classes, subrequest=False),), False))
            continue
        if not isinstance(first, list) or not 1 <= len(first) <= MAX_SUBREQUESTS:
            raise InputError(f"{where}: {field}.firstAvailable: 1 to {MAX_SUBREQUESTS} "
                             "subrequests")
        subs: list[Request] = []
        sub_names: set[str] = set()
        for j, sub in enumerate(first):
            sub_field = f"{field}.firstAvailable[{j}]"
            sub_name = _label(sub.get("name"), f"{where}: {sub_field}.name")
            if sub_name in sub_names:
                raise InputError(f"{where}: {sub_field}.name: duplicate subrequest name")
            sub_names.add(sub_name)
            subs.append(_request(sub, f"{name}/{sub_name}", sub_field, where, classes,
                                 subrequest=True))
        groups.append(RequestGroup(name, tuple(subs), True))
    constraints = _constraints(devices.get("constraints") or [], groups, where)
    configs = tuple(devices.get("config") or ())
    if len(configs) > MAX_CONFIGS:
        raise InputError(f"{where}: spec.devices.config: at most {MAX_CONFIGS} entries")
    uid = str((obj.get("metadata") or {}).get("uid", ""))
    return Claim(key, uid, tuple(groups), constraints, configs, obj)


def _request(raw: Mapping[str, Any], name: str, field: str, where: str,
             classes: Mapping[str, DeviceClass], subrequest: bool) -> Request:
    class_name = raw.get("deviceClassName")
    if not class_name:
        raise InputError(f"{where}: {field}.deviceClassName: required")
    if class_name not in classes:
        known = ", ".join(sorted(classes)) or "none"
        raise InputError(f"{where}: {field}.deviceClassName: no DeviceClass {class_name} "
                         f"(known: {known})")
    if raw.get("derivedAttributes"):
        raise InputError(f"{where}: {field}.derivedAttributes: needs the alpha "
                         "DRADerivedAttributes feature, which v1.37 has off")
    selectors = _selectors(raw.get("selectors") or [], f"{where}: {field}.selectors")
    mode = raw.get("allocationMode") or "ExactCount"
    if mode not in ("ExactCount", "All"):
        raise InputError(f"{where}: {field}.allocationMode: must be ExactCount or All, "
                         f"not {mode}")
    count = raw.get("count")
    if mode == "All":
        if count is not None:
            raise InputError(f"{where}: {field}.count: must not be set with allocationMode All")
        count = 0
    else:
        count = 1 if count is None else count
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InputError(f"{where}: {field}.count: must be an integer of at least 1")
    admin = raw.get("adminAccess")
    if admin is not None and (subrequest or not isinstance(admin, bool)):
        raise InputError(f"{where}: {field}.adminAccess: "
                         + ("not allowed in a subrequest" if subrequest else "must be a bool"))
    raw_tolerations = tuple(raw.get("tolerations") or ())
    if len(raw_tolerations) > MAX_TOLERATIONS:
        raise InputError(f"{where}: {field}.tolerations: at most {MAX_TOLERATIONS}")
    tolerations = tuple(_toleration(t, f"{where}: {field}.tolerations[{k}]")
                        for k, t in enumerate(raw_tolerations))
    capacity: list[tuple[str, Fraction]] = []
    for cap_name, text in sorted(((raw.get("capacity") or {}).get("requests") or {}).items()):
        try:
            capacity.append((cap_name, parse_quantity(str(text))))
        except QuantityError as err:
            raise InputError(f"{where}: {field}.capacity.requests[{cap_name}]: {err}") from None
    return Request(name, class_name, selectors, mode == "All", count, bool(admin),
                   tolerations, raw_tolerations, tuple(capacity), field)


def _toleration(raw: Mapping[str, Any], where: str) -> Toleration:
    operator = raw.get("operator") or "Equal"
    if operator not in ("Equal", "Exists"):
        raise InputError(f"{where}.operator: must be Equal or Exists")
    if operator == "Exists" and raw.get("value"):
        raise InputError(f"{where}.value: must be empty with operator Exists")
    if not raw.get("key") and operator != "Exists":
        raise InputError(f"{where}.operator: must be Exists when key is empty")
    return Toleration(raw.get("key") or "", operator, raw.get("value") or "",
                      raw.get("effect") or "")


def _selectors(raw: list[Any], where: str) -> tuple[Selector, ...]:
    if len(raw) > MAX_SELECTORS:
        raise InputError(f"{where}: at most {MAX_SELECTORS} selectors")
    selectors: list[Selector] = []
    for i, selector in enumerate(raw):
        expression = ((selector or {}).get("cel") or {}).get("expression")
        if not isinstance(expression, str) or not expression.strip():
            raise InputError(f"{where}[{i}].cel.expression: required")
        try:
            selectors.append(compile_selector(expression))
        except SelectorError as err:
            raise InputError(f"{where}[{i}].cel.expression: {err}") from None
    return tuple(selectors)


def _constraints(raw: list[Any], groups: list[RequestGroup], where: str
                 ) -> tuple[Constraint, ...]:
    if len(raw) > MAX_CONSTRAINTS:
        raise InputError(f"{where}: spec.devices.constraints: at most {MAX_CONSTRAINTS}")
    known = {g.name for g in groups} | {r.name for g in groups for r in g.alternatives}
    constraints: list[Constraint] = []
    for i, item in enumerate(raw):
        field = f"spec.devices.constraints[{i}]"
        match, distinct = item.get("matchAttribute"), item.get("distinctAttribute")
        if (match is None) == (distinct is None):
            raise InputError(f"{where}: {field}: exactly one of matchAttribute or "
                             "distinctAttribute must be set")
        attribute = match if match is not None else distinct
        attr_field = f"{field}.{'matchAttribute' if match is not None else 'distinctAttribute'}"
        domain, sep, ident = str(attribute).partition("/")
        if not sep or not is_subdomain(domain) or not is_c_identifier(ident):
            raise InputError(f"{where}: {attr_field}: {attribute!r} is not a fully qualified "
                             "attribute name (domain/name)")
        requests = item.get("requests") or []
        for j, name in enumerate(requests):
            if name not in known:
                raise InputError(f"{where}: {field}.requests[{j}]: no request {name}")
        constraints.append(Constraint("match" if match is not None else "distinct",
                                      str(attribute), frozenset(requests), field))
    return tuple(constraints)


def _label(value: Any, where: str) -> str:
    if not is_label(value):
        raise InputError(f"{where}: {value!r} is not a DNS label")
    return str(value)
