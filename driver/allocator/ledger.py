"""What is already allocated: devices, shares of shared devices, consumed capacity.

The allocator reads it as the scheduler reads its allocated-device cache; the
plugin asks it whether a claim's devices or counters are still free before it
prepares them (`conflicts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, NamedTuple

from driver.allocator.input import claim_key
from driver.kube.quantity import parse_quantity

_NOTHING: set[Any] = set()


class DeviceRef(NamedTuple):
    driver: str
    pool: str
    device: str

    def __str__(self) -> str:
        return f"{self.driver}/{self.pool}/{self.device}"


_ref = DeviceRef._make


@dataclass
class Ledger:
    """Allocation results by claim (namespace/name).

    Admin-access results take nothing, as in the scheduler. A result with a
    shareID is one share of a device that allows multiple allocations. Change it
    through `add` and `remove` only: they keep the per-pool index (`held_in`) that
    the allocator reads in step. A device that several claims hold whole (inconsistent
    input: a plugin's damaged checkpoint) stays taken until the last of them is removed;
    `exclusive` names the last one added.
    """

    _results: dict[str, list[Mapping[str, Any]]] = field(default_factory=dict)
    exclusive: dict[DeviceRef, str] = field(default_factory=dict)
    shares: dict[DeviceRef, dict[str, int]] = field(default_factory=dict)
    capacity: dict[DeviceRef, dict[str, Fraction]] = field(default_factory=dict)
    # (driver, pool) -> the devices of that pool held whole or shared: the allocator
    # reads one node's pools without scanning every claim of the cluster.
    _pools: dict[tuple[str, str], set[DeviceRef]] = field(default_factory=dict, repr=False,
                                                          compare=False)
    # A device held whole by more than one claim: the others than `exclusive`'s, in order.
    _displaced: dict[DeviceRef, list[str]] = field(default_factory=dict, repr=False,
                                                   compare=False)

    # Written out: mypyc compiles an __init__ in the class body (the dataclass's runs
    # interpreted), and one is made per decision.
    def __init__(self) -> None:
        self._results = {}
        self.exclusive = {}
        self.shares = {}
        self.capacity = {}
        self._pools = {}
        self._displaced = {}

    @classmethod
    def of(cls, claims: Iterable[Mapping[str, Any]]) -> Ledger:
        """From ResourceClaims with `status.allocation` (others are ignored)."""
        ledger = cls()
        for claim in claims:
            allocation = (claim.get("status") or {}).get("allocation")
            if allocation:
                ledger.add(claim_key(claim),
                           (allocation.get("devices") or {}).get("results") or [])
        return ledger

    def copy(self) -> Ledger:
        other = Ledger()
        for key, results in self._results.items():
            other.add(key, results)
        return other

    def claims(self) -> list[str]:
        return list(self._results)

    def results(self, key: str) -> list[Mapping[str, Any]]:
        return list(self._results.get(key, ()))

    def add(self, key: str, results: Iterable[Mapping[str, Any]]) -> None:
        if key in self._results:
            self.remove(key)
        kept = list(results)
        self._results[key] = kept
        pools, exclusive = self._pools, self.exclusive
        for result in kept:
            if result.get("adminAccess"):
                continue
            driver, pool = result["driver"], result["pool"]
            ref = _ref((driver, pool, result["device"]))
            held = pools.get((driver, pool))
            if held is None:
                held = pools[(driver, pool)] = set()
            held.add(ref)
            if result.get("shareID") is None:
                owner = exclusive.get(ref)
                if owner is not None and owner != key:
                    self._displaced.setdefault(ref, []).append(owner)
                exclusive[ref] = key
                continue
            owners = self.shares.setdefault(ref, {})
            owners[key] = owners.get(key, 0) + 1
            used = self.capacity.setdefault(ref, {})
            for name, text in (result.get("consumedCapacity") or {}).items():
                used[name] = used.get(name, Fraction(0)) + parse_quantity(str(text))

    def remove(self, key: str) -> None:
        for result in self._results.pop(key, []):
            if result.get("adminAccess"):
                continue
            ref = DeviceRef(result["driver"], result["pool"], result["device"])
            if result.get("shareID") is None:
                self._unbook(ref, key)
                self._release(ref)
                continue
            owners = self.shares.get(ref, {})
            owners[key] = owners.get(key, 0) - 1
            if owners[key] <= 0:
                del owners[key]
            used = self.capacity.get(ref, {})
            for name, text in (result.get("consumedCapacity") or {}).items():
                used[name] = used.get(name, Fraction(0)) - parse_quantity(str(text))
            if not owners:
                self.shares.pop(ref, None)
                self.capacity.pop(ref, None)
            self._release(ref)

    def _unbook(self, ref: DeviceRef, key: str) -> None:
        """`key` no longer holds `ref` whole; another claim that does takes it back."""
        others = self._displaced.get(ref, [])
        if self.exclusive.get(ref) == key:
            if others:
                self.exclusive[ref] = others.pop()
            else:
                del self.exclusive[ref]
        elif key in others:
            others.remove(key)
        if not others:
            self._displaced.pop(ref, None)

    def _release(self, ref: DeviceRef) -> None:
        if ref not in self.exclusive and ref not in self.shares:
            held = self._pools.get((ref.driver, ref.pool))
            if held is not None:
                held.discard(ref)

    def held_in(self, driver: str, pool: str) -> set[DeviceRef]:
        """The devices of one pool that claims hold, whole or shared (do not modify)."""
        return self._pools.get((driver, pool)) or _NOTHING

    def allocated(self, ref: DeviceRef) -> bool:
        """The scheduler's IsDeviceAllocated: taken whole or by at least one share."""
        return ref in self.exclusive or ref in self.shares

    def owner(self, ref: DeviceRef) -> str | None:
        if ref in self.exclusive:
            return self.exclusive[ref]
        owners = self.shares.get(ref)
        return next(iter(owners)) if owners else None
