"""`explain`'s nearest change "on node X": another node where the claim fits as it is."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from driver.allocator import Allocator, Ledger, explain
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
    """explain_all's own try of a node is the one explained: it is not run again. Run
    from the module's source with a spy in place of the Allocator: built, the module's
    call goes straight to the compiled method, past any spy."""
    source = Path(explain.__file__).with_name("explain.py")
    spec = importlib.util.spec_from_file_location("explain_source", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    [claim] = ALLOCATOR.parse([gpus(5)])
    tried: list[str] = []

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(ALLOCATOR, name)

        def allocate(self, claims: Sequence[Claim], ledger: Ledger, node: str | Node,
                     mode: Mode = "parity") -> Outcome:
            if claims == [claim]:
                tried.append(str(node))
            return ALLOCATOR.allocate(claims, ledger, node, mode)

    module.explain_all(Spy(), [claim], Ledger.of([]), ALLOCATOR.nodes())
    assert tried == ["node-1", "node-2", "node-3"]
