"""Allocate ResourceClaims from ResourceSlices, as the v1.37 scheduler would, or better.

The data flow, one module each: `input` checks claims and classes, `pools` gathers a
node's devices from its slices, `ledger` holds what is already allocated, `model`
turns claims + pools + ledger into a `Problem`, `reference` (pure Python) and `kernel`
(the Cython `driver._alloc`) search it, `allocate` shapes the answer as the API does,
`explain` says why a claim does not fit, `cli` is `gpu-dra allocate` / `explain`.
"""

from driver.allocator.allocate import (
    DEFAULT_BUDGET,
    Allocator,
    Mode,
    Outcome,
    allocate_in_order,
    driver_classes,
    prepare_conflicts,
)
from driver.allocator.input import InputError
from driver.allocator.ledger import DeviceRef, Ledger
from driver.allocator.pools import Node

__all__ = ["DEFAULT_BUDGET", "Allocator", "DeviceRef", "InputError", "Ledger", "Mode", "Node",
           "Outcome", "allocate_in_order", "driver_classes", "prepare_conflicts"]
