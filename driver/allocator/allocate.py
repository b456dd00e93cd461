"""Allocate ResourceClaims from ResourceSlices, as the v1.37 scheduler would, or better.

    allocator = Allocator(slices, classes)
    outcome = allocator.allocate(allocator.parse(claims), Ledger.of(allocated), node)

Two modes:
- parity: the answer the kube-scheduler v1.37.2 allocator (its default "incubating"
  variant, with the default feature gates) gives, device for device;
- topology: among the solutions the same search reaches, the best by
  `reference.score` (NVLink-connected sets with the most bandwidth, one NUMA
  node and PCIe root, MIG placements that rule out the fewest other placements on
  their GPU). It finds a solution exactly when parity does.

The search runs in the native kernel (`driver._alloc`) when it is built, else in the
pure-Python reference; both read the same `Problem` and give the same answers. A
node's model (devices, counters, topology, the kernel's tables: `model.NodeModel`) is
made once per version of its slices and shared by Allocators, as kube-scheduler's
informer decodes each object version once; an `Allocator` keeps, per list of parsed
claims, their compiled problem (`kernel.Plan`), and its selector results; a call
computes only the ledger's part and shapes the results from per-device parts.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from driver.allocator import reference
from driver.allocator.input import (
    Claim,
    DeviceClass,
    InputError,
    parse_claim,
    parse_classes,
    parse_taint_rules,
)
from driver.allocator.ledger import DeviceRef, Ledger
from driver.allocator.model import AllocationError, Evaluations, NodeModel, Problem, node_model
from driver.allocator.pools import (
    Device,
    Node,
    Pool,
    check_slices,
    gather_pools,
    pools_complete,
    slices_by_node,
)
from driver.allocator.versions import Recent, object_version
from driver.kube.quantity import format_quantity

Mode = Literal["parity", "topology"]
Backend = Literal["native", "reference"]

# Search nodes (allocateOne calls) before a search says "gave up". Upstream has no
# such limit, only its 10 s filter timeout; a node costs well under a microsecond
# in the kernel.
DEFAULT_BUDGET = 5_000_000
TOPOLOGY_BUDGET = 200_000
# Claims decoded per (uid, resourceVersion, the class names they were checked against),
# as the scheduler's informer decodes each claim version once; the least recently used
# dropped first.
_claims: Recent[tuple[str, str, tuple[str, ...]], Claim] = Recent(16384)
_MAX_PLANS = 256  # compiled claim lists kept per node and Allocator

try:
    from driver.allocator import kernel
except ImportError:  # the extension is not built: the reference does the work
    kernel = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Outcome:
    """allocated: one AllocationResult per claim; unschedulable: the claims do not fit
    on this node; error: what the scheduler reports as an error; gave-up: the search
    ran out of its budget before deciding."""

    status: str
    allocations: tuple[dict[str, Any], ...] = ()
    message: str = ""
    field: str = ""
    nodes: int = 0
    # Topology mode: False when the budget ended the search for a better placement
    # early (the placement returned is still valid, and the best one seen).
    complete: bool = True

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and this one is made on every decision.
    def __init__(self, status: str, allocations: tuple[dict[str, Any], ...] = (),
                 message: str = "", field: str = "", nodes: int = 0,
                 complete: bool = True) -> None:
        put = object.__setattr__  # frozen
        put(self, "status", status)
        put(self, "allocations", allocations)
        put(self, "message", message)
        put(self, "field", field)
        put(self, "nodes", nodes)
        put(self, "complete", complete)


NVIDIA_DRIVER = "gpu.nvidia.com"


def mig_class_name(driver: str) -> str:
    """`mig.<driver>`; for NVIDIA's driver name NVIDIA's class, `mig.nvidia.com` (the
    chart names it the same), so claims written for NVIDIA's driver find their class."""
    return "mig.nvidia.com" if driver == NVIDIA_DRIVER else f"mig.{driver}"


def driver_classes(driver: str) -> list[dict[str, Any]]:
    """The DeviceClasses the driver ships: whole GPUs and MIG devices."""
    def make(name: str, kind: str) -> dict[str, Any]:
        return {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
                "metadata": {"name": name},
                "spec": {"selectors": [{"cel": {"expression":
                    f'device.driver == "{driver}" && '
                    f'device.attributes["{driver}"].type == "{kind}"'}}]}}
    return [make(driver, "gpu"), make(mig_class_name(driver), "mig")]


class Allocator:
    """The slices, classes and DeviceTaintRules of one cluster snapshot; allocate against
    it many times.

    Per node, the model (shared with other Allocators for the same slice versions)
    and the compiled claims are kept, and each selector's result per group of devices
    that agree on what it reads (`evaluations`), for the snapshot's lifetime. Not
    thread-safe: give each thread its own, or hold a lock.
    """

    def __init__(self, slices: Sequence[Mapping[str, Any]],
                 classes: Sequence[Mapping[str, Any]],
                 taint_rules: Sequence[Mapping[str, Any]] = ()) -> None:
        check_slices(slices)
        self.slices = list(slices)
        self.classes: dict[str, DeviceClass] = parse_classes(list(classes))
        self.taint_rules = parse_taint_rules(taint_rules)
        self.evaluations = Evaluations()
        self._by_node: dict[str, list[Mapping[str, Any]]] | None = None
        self._models: dict[Node, NodeModel] = {}
        self._sites: dict[str | Node, _Site] = {}
        self._nodes: list[str] | None = None

    def nodes(self) -> list[str]:
        """The nodes the slices name, sorted (worked out once: explain asks per node)."""
        if self._nodes is None:
            self._nodes = sorted({s["spec"]["nodeName"] for s in self.slices
                                  if s["spec"].get("nodeName")})
        return list(self._nodes)

    def model(self, node: Node) -> NodeModel:
        """The node's pools and everything known about them before any claim."""
        found = self._models.get(node)
        if found is None:
            found = self._models[node] = node_model(gather_pools(
                self.slices, node, self.taint_rules, self._grouped()))
        return found

    def add(self, slices: Sequence[Mapping[str, Any]]) -> list[str]:
        """More slices of the same snapshot, as a paged list brings them; the nodes they
        name whose pools now hold every slice of their generation (`pools_complete`).
        What was built from fewer slices is dropped where these can change it: the
        models of the nodes they name and of the pools they belong to, every model for
        a slice that names no node."""
        check_slices(slices)
        self.slices += slices
        self._nodes = None
        grouped = self._grouped(slices)
        named = {s["spec"].get("nodeName") or "" for s in slices}
        pools = {(s["spec"]["driver"], s["spec"]["pool"]["name"]) for s in slices}

        def stale(node: Node, model: NodeModel) -> bool:
            return "" in named or node.name in named or any(
                (p.driver, p.name) in pools for p in model.pools)

        self._models = {n: m for n, m in self._models.items() if not stale(n, m)}
        self._sites = {key: site for key, site in self._sites.items()
                       if not stale(site.node, site.model)}
        return sorted(n for n in named if n and pools_complete(grouped[n]))

    def warm(self, node: str) -> None:
        """Build now what trying `node` needs before any claim (its model, its kernel):
        for a caller with time to spare, waiting for the rest of a list."""
        site = self._site(node)
        if kernel is not None:
            kernel.node_kernel(site.model)

    def _grouped(self, more: Sequence[Mapping[str, Any]] = ()
                 ) -> dict[str, list[Mapping[str, Any]]]:
        """The slices by node (`slices_by_node`), `more` (just added) put in."""
        if self._by_node is None:
            self._by_node = slices_by_node(self.slices)
        else:
            for s in more:
                self._by_node.setdefault(s["spec"].get("nodeName") or "", []).append(s)
        return self._by_node

    def _site(self, node: str | Node) -> _Site:
        site = self._sites.get(node)
        if site is None:
            where = node if isinstance(node, Node) else Node(node)
            site = self._sites[node] = _Site(where, self.model(where))
        return site

    def pools(self, node: Node) -> list[Pool]:
        return self.model(node).pools

    def parse(self, claims: Sequence[Mapping[str, Any]]) -> list[Claim]:
        """Checked claims; InputError names the first bad claim and field.

        A claim with a uid and a resourceVersion (as read from the API server) is
        decoded once per process for the class names it is checked against: the server
        gives a changed object a new resourceVersion. The same `Claim` object back also
        lets `allocate` reuse what it compiled for it.
        """
        parsed: list[Claim] = []
        names = tuple(self.classes)
        for raw in claims:
            version = object_version(raw)
            if version is None:
                parsed.append(parse_claim(raw, self.classes))
                continue
            key = (*version, names)
            found = _claims.get(key)
            if found is None:
                found = _claims.put(key, parse_claim(raw, self.classes))
            parsed.append(found)
        return parsed

    def allocate(self, claims: Sequence[Claim], ledger: Ledger, node: str | Node,
                 mode: Mode = "parity", backend: Backend = "native",
                 budget: int | None = None) -> Outcome:
        """All claims together, as the scheduler does for one pod's claims."""
        site = self._site(node)
        if backend == "native" and kernel is not None:
            fast = kernel.node_kernel(site.model)
            if fast is not None:
                outcome = self._kernel_path(site, fast, claims, ledger, mode, budget)
                if outcome is not None:
                    return outcome
        model = site.model
        pools = model.pools
        try:
            problem = model.problem(claims, self.classes, ledger, self.evaluations)
        except AllocationError as err:
            return Outcome("error", message=str(err), field=err.field)
        solve = _backend(backend)
        found = solve.solve(problem, budget or DEFAULT_BUDGET)
        if found.status == "ok" and mode == "topology":
            best = solve.optimize(problem, budget or TOPOLOGY_BUDGET)
            if best.status == "ok":
                best.nodes += found.nodes
                found = best
        return self._outcome(found, problem, claims, pools, site)

    def _kernel_path(self, site: _Site, fast: Any, claims: Sequence[Claim], ledger: Ledger,
                     mode: Mode, budget: int | None) -> Outcome | None:
        """The node's kernel with the claims' compiled problem; None where the ledger
        takes counters out of the kernel's range (the general path decides)."""
        key = tuple(map(id, claims))
        plan = site.plans.get(key)
        if plan is None:
            if len(site.plans) >= _MAX_PLANS:
                site.plans.clear()
            plan = site.plans[key] = fast.plan(claims, self.classes, self.evaluations)
        if plan.error is not None:
            return Outcome("error", message=str(plan.error), field=plan.error.field)
        state = fast.state(ledger)
        if state is None:
            return None
        found = fast.search(plan, state, False, budget or DEFAULT_BUDGET)
        if found.status == "ok" and mode == "topology":
            best = fast.search(plan, state, True, budget or TOPOLOGY_BUDGET)
            if best.status == "ok":
                best.nodes += found.nodes
                found = best
        return self._outcome(found, plan.problem, claims, site.model.pools, site)

    def _outcome(self, found: reference.Found, problem: Problem, claims: Sequence[Claim],
                 pools: list[Pool], site: _Site) -> Outcome:
        if found.status == "gave-up":
            return Outcome("gave-up", message=f"gave up after {found.nodes} search steps",
                           nodes=found.nodes)
        if found.status == "error":
            message, field_ = _error_text(found, problem, claims)
            return Outcome("error", message=message, field=field_, nodes=found.nodes)
        if found.status == "fail":
            invalid = [p for p in pools if p.invalid]
            if invalid:
                return Outcome("error", message="invalid resource pools were encountered: "
                               + "; ".join(f"{p}: {p.invalid}" for p in invalid),
                               nodes=found.nodes)
            return Outcome("unschedulable", message="cannot allocate all claims",
                           nodes=found.nodes)
        allocations = tuple(
            _allocation(claim, self.classes, problem, found.picks[c], found.alts[c], site.node,
                        site.model.parts)
            for c, claim in enumerate(claims))
        return Outcome("allocated", allocations, nodes=found.nodes, complete=found.complete)


def _backend(backend: Backend) -> Any:
    if backend == "native" and kernel is not None:
        return kernel
    return reference


def _error_text(found: reference.Found, problem: Problem, claims: Sequence[Claim]
                ) -> tuple[str, str]:
    if found.error_kind == "max-size":
        return reference.ABORTED_BY_MAX_SIZE, ""
    entry = problem.entries[found.error_entry]
    claim = claims[entry.claim]
    device = problem.devices[found.error_device]
    if found.error_kind == "selector":
        return entry.errors[found.error_device], f"{entry.request.field}.selectors"
    return (f"claim {claim.key}, request {entry.request.name}: cannot add device {device.ref} "
            "because a claim constraint would not be satisfied",
            "spec.devices.constraints")


class _Site:
    """One node as `allocate` names it, with what one Allocator keeps for it: its
    model, the plans of its claim lists (`kernel.Plan`, by the claims' ids; a plan
    keeps its claims alive)."""

    __slots__ = ("model", "node", "plans")

    def __init__(self, node: Node, model: NodeModel) -> None:
        self.node = node
        self.model = model
        self.plans: dict[tuple[int, ...], Any] = {}


class _Part(NamedTuple):
    """What a device puts in every result that picks it, worked out once per node model."""

    driver: str
    pool: str
    device: str
    binding: tuple[tuple[str, tuple[Any, ...]], ...]  # bindingConditions and the like, if set
    multi: bool
    local: bool  # its slice (or itself) names the node: the selector is the node's name


def _part(device: Device) -> _Part:
    spec = device.slice["spec"]
    source = device.raw if spec.get("perDeviceNodeSelection") else spec
    return _Part(
        device.ref.driver, device.ref.pool, device.ref.device,
        tuple((key, tuple(device.raw[key])) for key in ("bindingConditions",
              "bindingFailureConditions") if device.raw.get(key)),
        device.multi, bool(source.get("nodeName") or device.raw.get("bindsToNode")))


def _allocation(claim: Claim, classes: Mapping[str, DeviceClass], problem: Problem,
                picks: Sequence[tuple[int, int]], alts: Sequence[int], node: Node,
                parts: dict[int, Any]) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    local = False
    entries = problem.entries
    for e, d in picks:
        entry, part = entries[e], parts.get(d)
        if part is None:
            part = parts[d] = _part(problem.devices[d])
        result: dict[str, Any] = {"request": entry.request.name, "driver": part.driver,
                                  "pool": part.pool, "device": part.device}
        if entry.admin:
            result["adminAccess"] = True
        if entry.request.raw_tolerations:
            result["tolerations"] = [dict(t) for t in entry.request.raw_tolerations]
        for key, values in part.binding:
            result[key] = list(values)
        if part.multi:
            result["shareID"] = str(uuid.uuid4())
            consumed = entry.consumed.get(d) or {}
            if consumed:
                result["consumedCapacity"] = {k: format_quantity(v)
                                              for k, v in sorted(consumed.items())}
        local = local or part.local
        results.append(result)
    allocation: dict[str, Any] = {"devices": {"results": results}}
    if claim.configs or any(classes[r.class_name].configs
                            for group in claim.requests for r in group.alternatives):
        configs = _configs(claim, classes, alts)
        if configs:
            allocation["devices"]["config"] = configs
    selector = _node_name_selector(node) if local else \
        _node_selector(problem, [d for _, d in picks], node)
    if selector is not None:
        allocation["nodeSelector"] = selector
    return allocation


def _configs(claim: Claim, classes: Mapping[str, DeviceClass], alts: Sequence[int]
             ) -> list[dict[str, Any]]:
    """Class configs once per class, then the claim's, as the scheduler copies them."""
    chosen = [group.alternatives[alts[g]] for g, group in enumerate(claim.requests)]
    configs: list[dict[str, Any]] = []
    added: dict[str, tuple[int, int]] = {}
    for request in chosen:
        span = added.get(request.class_name)
        if span is not None:
            for i in range(*span):
                configs[i]["requests"].append(request.name)
            continue
        start = len(configs)
        for config in classes[request.class_name].configs:
            configs.append({"source": "FromClass", "requests": [request.name],
                            **{k: v for k, v in config.items() if k != "requests"}})
        added[request.class_name] = (start, len(configs))
    for config in claim.configs:
        names = list(config.get("requests") or [])
        body = {k: v for k, v in config.items() if k != "requests"}
        if not names or any(g.name in names or r.name in names
                            for g, r in zip(claim.requests, chosen, strict=True)):
            configs.append({"source": "FromClaim", "requests": names, **body})
    for config in configs:
        names = config["requests"]
        if names and all(g.name in names or r.name in names
                         for g, r in zip(claim.requests, chosen, strict=True)):
            config["requests"] = []
    for config in configs:
        if not config["requests"]:
            del config["requests"]
    return configs


def _node_selector(problem: Problem, devices: Sequence[int], node: Node
                   ) -> dict[str, Any] | None:
    requirements: dict[str, list[dict[str, Any]]] = {"matchFields": [], "matchExpressions": []}
    for d in devices:
        device = problem.devices[d]
        spec = device.slice["spec"]
        source = device.raw if spec.get("perDeviceNodeSelection") else spec
        if source.get("nodeName") or device.raw.get("bindsToNode"):
            return _node_name_selector(node)
        terms = (source.get("nodeSelector") or {}).get("nodeSelectorTerms") or []
        if len(terms) == 1:
            for kind in ("matchFields", "matchExpressions"):
                for requirement in terms[0].get(kind) or []:
                    if not any(_same_requirement(requirement, r) for r in requirements[kind]):
                        requirements[kind].append(dict(requirement))
    term = {k: v for k, v in requirements.items() if v}
    return {"nodeSelectorTerms": [term]} if term else None


def _node_name_selector(node: Node) -> dict[str, Any]:
    return {"nodeSelectorTerms": [{"matchFields": [
        {"key": "metadata.name", "operator": "In", "values": [node.name]}]}]}


def _same_requirement(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (a.get("key") == b.get("key") and a.get("operator") == b.get("operator")
            and set(a.get("values") or []) == set(b.get("values") or []))


def allocate_in_order(allocator: Allocator, claims: Sequence[Claim], ledger: Ledger,
                      nodes: Sequence[str], mode: Mode = "parity",
                      backend: Backend = "native") -> list[tuple[Claim, str, Outcome]]:
    """Each claim on the first node where it fits, seeing the claims before it.

    The ledger is updated with every allocation. Returns (claim, node, outcome) per
    claim; the node is "" when the claim fits nowhere.
    """
    done: list[tuple[Claim, str, Outcome]] = []
    for claim in claims:
        last: Outcome | None = None
        placed = ""
        for node in nodes:
            outcome = allocator.allocate([claim], ledger, node, mode, backend)
            if outcome.status == "allocated":
                ledger.add(claim.key, outcome.allocations[0]["devices"]["results"])
                last, placed = outcome, node
                break
            if last is None or outcome.status in ("error", "gave-up"):
                last = outcome
            if outcome.status == "error":
                break
        assert last is not None, "at least one node"
        done.append((claim, placed, last))
    return done


def prepare_conflicts(ledger: Ledger, key: str, results: Sequence[Mapping[str, Any]],
                      pools: Sequence[Pool]) -> list[str]:
    """Why preparing claim `key` with these allocation results would double-book the
    node: a device another claim in the ledger holds, or shared counters (MIG memory
    slices, ...) that the ledger's claims and this one together overdraw, or a shareID
    on a device that does not allow multiple allocations. Empty when the prepare may go
    ahead. `pools`: the node's, gathered once (`gather_pools`). The ledger holds what is
    prepared; `key` itself in it (a repeated prepare) is not a conflict. A device held
    whole by another claim is a conflict whatever the shareID.
    """
    problems: list[str] = []
    mine: set[DeviceRef] = set()
    for result in results:
        if result.get("adminAccess"):
            continue
        ref = DeviceRef(result["driver"], result["pool"], result["device"])
        share = result.get("shareID")
        owner = ledger.exclusive.get(ref)
        holder = owner if owner is not None and owner != key else \
            _other_holder(ledger, ref, key) if share is None else None
        if holder is not None:
            problems.append(f"device {ref} is taken by {holder}")
        if share is not None and not any(ref in pool.by_ref and pool.by_ref[ref].multi
                                         for pool in pools):
            problems.append(f"device {ref} does not allow multiple allocations: shareID "
                            f"{share} cannot be prepared")
        mine.add(ref)
    for pool in pools:
        if not any(ref.driver == pool.driver and ref.pool == pool.name for ref in mine):
            continue
        left = {(s, c): v for s, counters in pool.counters.items() for c, v in counters.items()}
        holders: dict[tuple[str, str], list[str]] = {}
        for ref in mine | ledger.held_in(pool.driver, pool.name):
            device = pool.by_ref.get(ref)
            holder = _other_holder(ledger, ref, key)
            if device is None or (holder is None and ref not in mine):
                continue
            for set_name, counter, amount in device.consumes:
                left[(set_name, counter)] -= amount
                if holder is not None:
                    holders.setdefault((set_name, counter), []).append(
                        f"{ref.device} ({holder})")
        wanted = {(s, c) for ref in mine if ref in pool.by_ref
                  for s, c, _ in pool.by_ref[ref].consumes}
        for (set_name, counter), value in sorted(left.items()):
            if value < 0 and (set_name, counter) in wanted:
                held = ", ".join(sorted(holders.get((set_name, counter), []))[:4]) \
                    or "nothing else"
                problems.append(f"counter {counter} of {pool}/{set_name} is overdrawn by "
                                f"{format_quantity(-value)} (also held by {held})")
    return problems


def _other_holder(ledger: Ledger, ref: DeviceRef, key: str) -> str | None:
    """A claim other than `key` that holds `ref`, whole or by a share."""
    owner = ledger.exclusive.get(ref)
    if owner is not None and owner != key:
        return owner
    return next((k for k in ledger.shares.get(ref, {}) if k != key), None)


__all__ = ["Allocator", "InputError", "Ledger", "Node", "Outcome", "allocate_in_order",
           "driver_classes", "prepare_conflicts"]
