"""Types of driver._alloc, the allocation kernel built from native/_alloc.pyx.

The array parameters are typed memoryviews there (`const int8_t[::1]` and the like):
they take any C-contiguous buffer of the right item type and raise ValueError for
another one (or a short one). driver/allocator/kernel.py hands them `array.array`s,
so that is their type here; each alias names the typecode its C type needs. Lengths
are in the sizes of native/_alloc_types.pxd.

The classes are cdef classes: their constructors are `__cinit__`, which runs in
`__new__`; each has a C layout of its own (`disjoint_base`).
"""

from array import array
from typing import Self, TypeAlias

from typing_extensions import disjoint_base

from driver.allocator.model import ConstraintPlan, Entry

_Int8Array: TypeAlias = array[int]  # typecode "b"  (const int8_t[::1])
_Int32Array: TypeAlias = array[int]  # typecode "i"  (const int32_t[::1])
_Int64Array: TypeAlias = array[int]  # typecode "q"  (const int64_t[::1])
_UInt32Array: TypeAlias = array[int]  # typecode "I"  (const uint32_t[::1])
_UInt64Array: TypeAlias = array[int]  # typecode "Q"  (const uint64_t[::1])

# What a search returns: (status: 1 ok, 0 no solution, -1 result limit exceeded,
# -2 error, -3 gave up; picks per claim as [(entry, device)], empty unless ok;
# alternative per request, empty unless ok; (error entry, error device, error kind);
# search steps; whether a best solution was kept).
_RunResult: TypeAlias = tuple[
    int, list[list[tuple[int, int]]], list[int], tuple[int, int, int], int, bool]

@disjoint_base
class DeviceArrays:
    """The node's devices, counters and topology as the search reads them."""

    @property
    def n_devices(self) -> int: ...
    @property
    def words(self) -> int: ...
    def __new__(
        cls,
        *,
        n_devices: int,
        multi: _Int8Array,
        counted: _Int8Array,
        dc_start: _Int32Array,
        dc_idx: _Int32Array,
        dc_amt: _Int64Array,
        island: _Int32Array,
        bandwidth: _Int32Array,
        numa: _Int32Array,
        pcie: _Int32Array,
        slice_set: _Int32Array,
        slice_mask: _UInt32Array,
        set_full: _UInt32Array,
        set_island: _Int32Array,
        set_dev_start: _Int32Array,
        set_dev: _Int32Array,
    ) -> Self: ...

@disjoint_base
class ClaimArrays:
    """The claims' entries, request groups and constraints as the search reads them."""

    @property
    def n_devices(self) -> int: ...
    @property
    def words(self) -> int: ...
    @property
    def n_entries(self) -> int: ...
    @property
    def n_claims(self) -> int: ...
    @property
    def n_groups(self) -> int: ...
    @property
    def n_constraints(self) -> int: ...

AMOUNT_LIMIT: int  # amounts at or beyond it (either sign) leave the kernel's range

def pack_claims(
    entries: list[Entry],
    claims: list[list[list[int]]],
    constraints: list[list[ConstraintPlan]],
    n_devices: int,
    multi_bits: int,
) -> ClaimArrays:
    """ClaimArrays read straight from compiled claims (entries, request groups of entry
    indexes per claim, constraint plans per claim) for a node of `n_devices` devices,
    `multi_bits` its devices that allow multiple allocations; OverflowError where a
    capacity amount leaves the kernel's range."""

@disjoint_base
class Dynamic:
    """What the allocated claims decide, as C arrays; made zeroed (`Tables.state` and
    `dynamic()` fill it)."""

    @property
    def n_devices(self) -> int: ...
    @property
    def words(self) -> int: ...
    @property
    def n_counters(self) -> int: ...
    @property
    def n_dims(self) -> int: ...
    @property
    def n_slice_sets(self) -> int: ...
    @property
    def n_islands(self) -> int: ...
    def __new__(
        cls, n_devices: int, n_counters: int, n_dims: int, n_slice_sets: int, n_islands: int
    ) -> Self: ...

def dynamic(
    *,
    n_devices: int,
    base_inuse: _UInt64Array,
    base_shared: _Int8Array,
    blocked: _Int8Array,
    counter_avail: _Int64Array,
    dim_avail: _Int64Array,
    set_free: _UInt32Array,
    island_free: _Int32Array,
) -> Dynamic:
    """The ledger's part of a problem from its arrays; each size is its array's length."""

@disjoint_base
class Tables:
    """One node's counters and topology as the ledger sees them; `state` computes a
    `Dynamic` in C. Devices: the node's, then those of its pools on other nodes."""

    def __new__(
        cls,
        n_devices: int,
        uses: list[list[tuple[int, int]]],  # per device: (counter, amount)
        declared: list[int],  # per counter
        counter_pool: list[int],  # per counter: its pool
        dev_pool: list[int],  # per device of the node: its pool
        counted: list[bool],  # per device of the node: consumes counters
        set_slots: list[list[tuple[int, int]]],  # per slice set: (slice, counter)
        set_full: list[int],  # per slice set: every slice, as a mask
        slice_set: list[int],  # per device of the node: its slice set, -1 none
        islands: list[list[int]],  # per NVLink island: its whole GPUs
    ) -> Self: ...
    def state(self, exclusive: list[int], shared: list[int]) -> Dynamic | None:
        """The `Dynamic` for claims holding `exclusive` devices whole and shares of
        `shared` ones; None where a counter leaves the kernel's range."""

@disjoint_base
class Prepared:
    """ClaimArrays bound to their node's DeviceArrays, once."""

    @property
    def devices(self) -> DeviceArrays: ...
    @property
    def claims(self) -> ClaimArrays: ...
    def __new__(cls, devices: DeviceArrays, claims: ClaimArrays) -> Self: ...
    def run(self, d: Dynamic, optimize: int, budget: int, prune: int = 1) -> _RunResult:
        """Search against `d` (1: keep the best solution by score, 0: the first)."""

def run(
    devices: DeviceArrays,
    claims: ClaimArrays,
    ledger: Dynamic,
    optimize: int,
    budget: int,
    prune: int = 1,
) -> _RunResult:
    """`Prepared(devices, claims).run(ledger, optimize, budget, prune)`."""
