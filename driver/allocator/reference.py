"""The search in plain Python: the specification the native kernel is held to.

A line-by-line reading of the v1.37 scheduler's incubating allocator over a
`Problem`: claims in order, requests in order, firstAvailable alternatives in
order, one device slot after another; candidates in pool/slice/device order, the
next slot of the same request starting after the previous pick (combinations);
the first complete assignment wins. No pruning: every node the upstream search
visits is visited here, and counted.

Topology mode enumerates every solution the same search reaches and keeps the one
with the best `score` (ties: the first found).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from driver.allocator.input import MAX_RESULTS
from driver.allocator.model import MATCH, Problem

OK, FAIL, MAXSIZE, ERROR = 1, 0, -1, -2

ABORTED_BY_MAX_SIZE = "allocation max size exceeded"


@dataclass
class Found:
    """A search's answer: picks per claim as (entry, device), in result order."""

    status: str  # ok | fail | error | gave-up
    picks: list[list[tuple[int, int]]] = field(default_factory=list)
    alts: list[list[int]] = field(default_factory=list)
    error_entry: int = -1
    error_device: int = -1
    error_kind: str = ""  # selector | constraint | max-size
    nodes: int = 0
    complete: bool = True  # topology: False when the budget ended the search early

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and this one is made on every decision.
    def __init__(self, status: str, picks: list[list[tuple[int, int]]] | None = None,
                 alts: list[list[int]] | None = None, error_entry: int = -1,
                 error_device: int = -1, error_kind: str = "", nodes: int = 0,
                 complete: bool = True) -> None:
        self.status = status
        self.picks = [] if picks is None else picks
        self.alts = [] if alts is None else alts
        self.error_entry, self.error_device, self.error_kind = error_entry, error_device, error_kind
        self.nodes, self.complete = nodes, complete


class _GaveUp(Exception):
    pass


class _Search:
    def __init__(self, p: Problem, budget: int, optimize: bool) -> None:
        self.p = p
        self.budget = budget
        self.optimize = optimize
        self.nodes = 0
        self.allocating: dict[int, set[int]] = {}
        self.shares = [0] * p.n
        self.counter_used = [0] * len(p.counter_avail)
        self.dim_used = [0] * len(p.dim_avail)
        self.match = [[(0, -1) for _ in cons] for cons in p.constraints]
        self.distinct: list[list[list[int]]] = [[[] for _ in cons] for cons in p.constraints]
        self.picks: list[list[tuple[int, int]]] = [[] for _ in p.claims]
        self.alts = [[0] * len(groups) for groups in p.claims]
        self.error = (-1, -1, "")
        self.best: tuple[tuple[int, ...], list[list[tuple[int, int]]], list[list[int]]] | None \
            = None

    # -- the recursion (allocateOne) --

    def one(self, c: int, g: int, a: int, k: int, in_sub: bool, start: int) -> int:
        self.nodes += 1
        if self.nodes > self.budget:
            raise _GaveUp
        p = self.p
        if c >= len(p.claims):
            if not self.optimize:
                return OK
            self._keep()
            return FAIL
        groups = p.claims[c]
        if g >= len(groups):
            result = self.one(c + 1, 0, 0, 0, False, 0)
            return FAIL if result == MAXSIZE else result
        if not in_sub and p.entries[groups[g][0]].first_available:
            all_exceeded = True
            for alt in range(len(groups[g])):
                result = self.one(c, g, alt, 0, True, 0)
                if result == MAXSIZE:
                    continue
                all_exceeded = False
                if result == ERROR:
                    return ERROR
                if result == OK:
                    self.alts[c][g] = alt
                    return OK
            return MAXSIZE if all_exceeded else FAIL
        e = groups[g][a]
        entry = p.entries[e]
        if entry.all_mode and entry.count == 0:
            return FAIL
        if k >= entry.count:
            self.alts[c][g] = a
            return self.one(c, g + 1, 0, 0, False, 0)
        if entry.count - k > MAX_RESULTS - len(self.picks[c]):
            return MAXSIZE
        if entry.all_mode:
            d = entry.all_list[k]
            undo = self.allocate(c, e, d, must=True, soft_fail=entry.all_soft[k])
            if undo is None:
                return ERROR if self.error[0] >= 0 else FAIL
            result = self.one(c, g, a, k + 1, in_sub, 0)
            if result != OK:
                undo()
            return result
        for d in range(start, p.n):
            if entry.admin:
                if c in self.allocating.get(d, ()):
                    continue
            elif self.in_use(d):
                continue
            if entry.err >> d & 1:
                self.error = (e, d, "selector")
                return ERROR
            if not entry.cand >> d & 1:
                continue
            if p.multi[d] and not self.capacity_fits(e, d):
                continue
            undo = self.allocate(c, e, d, must=False, soft_fail=False)
            if undo is None:
                continue
            result = self.one(c, g, a, k + 1, in_sub, d + 1)
            if result == OK:
                return OK
            undo()
            if result != FAIL:
                return result
        return FAIL

    def in_use(self, d: int) -> bool:
        return bool(self.p.base_inuse >> d & 1) or bool(self.allocating.get(d))

    def capacity_fits(self, e: int, d: int) -> bool:
        return all(self.dim_used[k] + amount <= self.p.dim_avail[k]
                   for k, amount in self.p.entries[e].cons.get(d, ()))

    # -- allocateDevice, with its single rollback --

    def allocate(self, c: int, e: int, d: int, must: bool, soft_fail: bool
                 ) -> Callable[[], None] | None:
        p = self.p
        entry = p.entries[e]
        multi = p.multi[d]
        if not multi and entry.admin and c in self.allocating.get(d, ()):
            return None
        if not entry.admin and self.in_use(d):
            return None
        reserved = False
        if p.counted[d] and not (multi and (p.base_shared[d] or self.shares[d] > 0)):
            if p.blocked[d]:
                return None
            uses = p.dev_counters[d]
            for k, amount in uses:
                self.counter_used[k] += amount
            if any(self.counter_used[k] > p.counter_avail[k] for k, _ in uses):
                for k, amount in uses:
                    self.counter_used[k] -= amount
                return None
            reserved = True
        added: list[int] = []

        def rollback() -> None:
            for j in reversed(added):
                self._constraint_remove(c, j)
            if reserved:
                for k, amount in p.dev_counters[d]:
                    self.counter_used[k] -= amount

        if soft_fail:
            rollback()
            return None
        for j in range(len(p.constraints[c])):
            if entry.cmask >> j & 1:
                if not self._constraint_add(c, j, d):
                    rollback()
                    if must:
                        self.error = (e, d, "constraint")
                    return None
                added.append(j)
        if multi and not self.capacity_fits(e, d):
            rollback()
            return None
        if multi:
            for k, amount in entry.cons.get(d, ()):
                self.dim_used[k] += amount
            self.shares[d] += 1
        else:
            self.allocating.setdefault(d, set()).add(c)
        self.picks[c].append((e, d))

        def undo() -> None:
            self.picks[c].pop()
            if multi:
                self.shares[d] -= 1
                for k, amount in entry.cons.get(d, ()):
                    self.dim_used[k] -= amount
            else:
                self.allocating[d].discard(c)
            rollback()

        return undo

    def _constraint_add(self, c: int, j: int, d: int) -> bool:
        plan = self.p.constraints[c][j]
        value = plan.values[d]
        if value < 0:
            return False
        if plan.kind == MATCH:
            count, fixed = self.match[c][j]
            if count and value != fixed:
                return False
            self.match[c][j] = (count + 1, value if not count else fixed)
            return True
        seen = self.distinct[c][j]
        if value in seen:
            return False
        seen.append(value)
        return True

    def _constraint_remove(self, c: int, j: int) -> None:
        if self.p.constraints[c][j].kind == MATCH:
            count, fixed = self.match[c][j]
            self.match[c][j] = (count - 1, fixed)
        else:
            self.distinct[c][j].pop()

    def _keep(self) -> None:
        value = score(self.p, self.picks, self.alts)
        if self.best is None or value > self.best[0]:
            self.best = (value, [list(x) for x in self.picks], [list(x) for x in self.alts])


def solve(p: Problem, budget: int) -> Found:
    """Parity: the first solution in upstream order, or why there is none."""
    search = _Search(p, budget, optimize=False)
    try:
        result = search.one(0, 0, 0, 0, False, 0)
    except _GaveUp:
        return Found("gave-up", nodes=search.nodes)
    if result == OK:
        return Found("ok", search.picks, search.alts, nodes=search.nodes)
    if result == ERROR:
        e, d, kind = search.error
        return Found("error", error_entry=e, error_device=d, error_kind=kind, nodes=search.nodes)
    if result == MAXSIZE:
        return Found("error", error_kind="max-size", nodes=search.nodes)
    return Found("fail", nodes=search.nodes)


def optimize(p: Problem, budget: int) -> Found:
    """Topology: the best-scoring solution among those found within the budget.

    Callers run `solve` first: selector errors are not candidates here.
    """
    cleaned = _without_errors(p)
    search = _Search(cleaned, budget, optimize=True)
    complete = True
    try:
        search.one(0, 0, 0, 0, False, 0)
    except _GaveUp:
        complete = False
    if search.best is None:
        return Found("gave-up" if not complete else "fail", nodes=search.nodes,
                     complete=complete)
    _, picks, alts = search.best
    return Found("ok", picks, alts, nodes=search.nodes, complete=complete)


def _without_errors(p: Problem) -> Problem:
    if not p.has_errors:
        return p
    entries = [replace(e, err=0) for e in p.entries]
    return replace(p, entries=entries, has_errors=False)


def score(p: Problem, picks: list[list[tuple[int, int]]], alts: list[list[int]]
          ) -> tuple[int, ...]:
    """The topology score, higher is better, compared component by component:

    0. earlier firstAvailable alternatives (the scheduler's own preference);
    1. fewer NVLink islands per claim (a device without an island is its own);
    2. more NVLink bandwidth (claims of two or more devices);
    3. fewer NUMA nodes per claim;  4. fewer PCIe roots per claim;
    5. MIG: fewer placements ruled out on each GPU the picks draw slices from
       (`ruled_out`), so a profile goes where it blocks the least of what larger
       ones could still take, and onto GPUs already split rather than whole ones;
    6. packing whole GPUs into NVLink islands already in use (sum of squares of
       the free GPUs per island), so that whole islands stay free.
    """
    s = [0] * 7
    s[0] = -sum(sum(row) for row in alts)
    used_sets: dict[int, int] = {}
    island_loss: dict[int, int] = {}
    for claim_picks in picks:
        devices = [d for _, d in claim_picks]
        if not devices:
            continue
        s[1] -= len({p.island[d] if p.island[d] >= 0 else -1 - d for d in devices}) - 1
        if len(devices) > 1:
            s[2] += sum(p.bandwidth[d] for d in devices)
        s[3] -= len({p.numa[d] if p.numa[d] >= 0 else -1 - d for d in devices}) - 1
        s[4] -= len({p.pcie[d] if p.pcie[d] >= 0 else -1 - d for d in devices}) - 1
        for d in devices:
            owner = p.slice_set[d]
            if owner >= 0:
                used_sets[owner] = used_sets.get(owner, 0) | p.slice_mask[d]
    for owner, mask in used_sets.items():
        s[5] -= ruled_out(p, owner, mask)
    counted_sets: set[int] = set()
    for claim_picks in picks:
        for _, d in claim_picks:
            owner = p.slice_set[d]
            island = p.island[d] if p.island[d] >= 0 else (
                p.set_island[owner] if owner >= 0 else -1)
            if island < 0:
                continue
            whole_free = owner < 0 or p.set_free[owner] == p.set_full[owner]
            if owner >= 0:
                if owner in counted_sets:
                    continue
                counted_sets.add(owner)
            if whole_free:
                island_loss[island] = island_loss.get(island, 0) + 1
    for island, loss in island_loss.items():
        free = p.island_free[island]
        s[6] += (free - loss) ** 2 - free * free
    return tuple(s)


def ruled_out(p: Problem, owner: int, used: int) -> int:
    """The memory slices of every placement on slice set `owner` (each MIG device of
    every profile, and the whole GPU) that could be allocated now and overlaps the
    slices `used`: what taking `used` costs the GPU, each placement weighted by what
    it could hold. Free now: not in use, not blocked (an overdrawn pool), its counters
    available; taints and selectors aside."""
    lost = 0
    for d in range(p.n):
        if (p.slice_set[d] == owner and p.slice_mask[d] & used
                and not p.base_inuse >> d & 1 and not p.blocked[d]
                and all(amount <= p.counter_avail[k] for k, amount in p.dev_counters[d])):
            lost += p.slice_mask[d].bit_count()
    return lost
