"""`explain`'s nearest change "on node X": another node where the claim fits as it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from driver.allocator import Allocator, Ledger
from driver.allocator.allocate import Mode, Outcome, driver_classes
from driver.allocator.explain import explain_all
from driver.allocator.input import Claim
from driver.allocator.pools import Node

DRIVER = "gpu.dra.dev"


def node_slice(node: str, gpus: int) -> dict[str, Any]:
    return {"metadata": {"name": f"{node}-s"}, "spec": {
        "driver": DRIVER, "nodeName": node,
        "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
        "devices": [{"name": f"gpu-{i}", "attributes": {"type": {"string": "gpu"}}}
                    for i in range(gpus)]}}


def gpus(count: int) -> dict[str, Any]:
    return {"metadata": {"name": f"c{count}", "namespace": "default"}, "spec": {"devices": {
        "requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER, "count": count}}]}}}


ALLOCATOR = Allocator([node_slice("node-1", 2), node_slice("node-2", 4),
                       node_slice("node-3", 3)], driver_classes(DRIVER))


def test_a_claim_explained_on_one_node_names_the_first_node_where_it_fits() -> None:
    [got] = explain_all(ALLOCATOR, ALLOCATOR.parse([gpus(4)]), Ledger.of([]), ["node-1"])
    assert not got.fits
    assert got.nearest == ("request gpu: count 2 instead of 4", "on node node-2")


def test_a_claim_that_fits_on_no_node_names_no_other_node() -> None:
    got = explain_all(ALLOCATOR, ALLOCATOR.parse([gpus(5)]), Ledger.of([]),
                      ALLOCATOR.nodes())
    assert [e.node for e in got] == ["node-1", "node-2", "node-3"]
    assert [e.nearest for e in got] == [("request gpu: count 2 instead of 5",),
                                        ("request gpu: count 4 instead of 5",),
                                        ("request gpu: count 3 instead of 5",)]


def test_each_node_is_tried_once_with_the_claim_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """explain_all's own try of a node is the one explained: it is not run again."""
    [claim] = ALLOCATOR.parse([gpus(5)])
    tried: list[str] = []
    allocate = ALLOCATOR.allocate

    def counted(claims: Sequence[Claim], ledger: Ledger, node: str | Node,
                mode: Mode = "parity") -> Outcome:
        if claims == [claim]:
            tried.append(str(node))
        return allocate(claims, ledger, node, mode)

    monkeypatch.setattr(ALLOCATOR, "allocate", counted)
    explain_all(ALLOCATOR, [claim], Ledger.of([]), ALLOCATOR.nodes())
    assert tried == ["node-1", "node-2", "node-3"]
