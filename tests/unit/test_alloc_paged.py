"""An Allocator fed a list page by page (`Allocator.add`), its nodes warmed between pages
as `gpu-dra explain --kubeconfig` warms them, answers as one given every slice at once,
wherever the pages split the list: a pool's other slice, a newer generation, a counter
set or a slice for every node may come after a node looked complete."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from driver.allocator import Allocator, Ledger
from driver.allocator.explain import explain_all
from driver.allocator.pools import pools_complete
from tests.unit.test_alloc_semantics import CLASSES, DRIVER, claim, device, pool_slice, request


def on(node: str, s: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(s)
    out["spec"]["nodeName"] = node
    return out


def everywhere(s: dict[str, Any]) -> dict[str, Any]:
    """`s` for every node (allNodes), as a network or storage driver publishes."""
    out = copy.deepcopy(s)
    del out["spec"]["nodeName"]
    out["spec"]["allNodes"] = True
    return out


def served(slices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The slices as read from the API server: each with a uid and resourceVersion."""
    out = copy.deepcopy(slices)
    for k, s in enumerate(out):
        s["metadata"].update(uid=f"paged-{k}-{s['metadata']['name']}", resourceVersion="7")
    return out


COUNTERS = [{"name": "gpu-0", "counters": {"memory": {"value": "2"}}}]


def _uses(amount: str) -> list[dict[str, Any]]:
    return [{"counterSet": "gpu-0", "counters": {"memory": {"value": amount}}}]


# Each: the slices in list order, the claims asked about.
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    # n1's pool has two slices: its first alone holds one of the two devices asked for.
    "pool-in-two-slices": ([
        on("n1", pool_slice("n1-a", [device("a", kind="gpu")], pool="n1", count=2)),
        on("n2", pool_slice("n2-a", [device("x", kind="gpu")], pool="n2")),
        on("n1", pool_slice("n1-b", [device("b", kind="gpu")], pool="n1", count=2)),
    ], [claim("two", request("r", 2))]),
    # The device asked for is in a pool for every node, listed last.
    "slice-for-every-node-last": ([
        on("n1", pool_slice("n1-a", [device("a", kind="gpu")], pool="n1")),
        on("n2", pool_slice("n2-a", [device("x", kind="gpu")], pool="n2")),
        everywhere(pool_slice("net", [device("nic", kind="nic")], pool="net")),
    ], [claim("nic", request("r", selectors=[
        {"cel": {"expression": f'device.attributes["{DRIVER}"].kind == "nic"'}}]))]),
    # n1's pool is replaced by a newer generation after it looked complete.
    "newer-generation-later": ([
        on("n1", pool_slice("n1-old", [device("a", kind="gpu")], pool="n1")),
        on("n2", pool_slice("n2-a", [device("x", kind="gpu")], pool="n2")),
        on("n1", pool_slice("n1-new", [device("b", kind="gpu"), device("c", kind="gpu")],
                            pool="n1", generation=2)),
    ], [claim("two", request("r", 2)), claim("one", request("r"))]),
    # Two MIG-like devices share a counter set published in its own slice, listed last:
    # only one of them fits in it.
    "counters-in-a-later-slice": ([
        on("n1", pool_slice("n1-dev", [device("m0", consumesCounters=_uses("2")),
                                       device("m1", consumesCounters=_uses("2"))],
                            pool="n1", count=2)),
        on("n2", pool_slice("n2-a", [device("x", kind="gpu")], pool="n2")),
        on("n1", pool_slice("n1-counters", [], pool="n1", count=2, sharedCounters=COUNTERS)),
    ], [claim("two", request("r", 2)), claim("one", request("r"))]),
}


def answers(allocator: Allocator, claims: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What explain says of the claims, node by node, and each node's own outcome."""
    parsed = allocator.parse(claims)
    said = [(e.claim, e.node, e.fits, e.reasons, e.nearest)
            for e in explain_all(allocator, parsed, Ledger.of([]), allocator.nodes())]
    outcomes = [(node, o.status, o.allocations)
                for node in allocator.nodes()
                for o in [allocator.allocate(parsed, Ledger.of([]), node)]]
    return [*said, *outcomes]


def page_splits(n: int) -> list[list[int]]:
    """Every way to cut a list of n into pages: the page sizes."""
    if n == 0:
        return [[]]
    return [[first, *rest] for first in range(1, n + 1) for rest in page_splits(n - first)]


@pytest.mark.parametrize("versioned", [False, True], ids=["local", "served"])
@pytest.mark.parametrize("case", list(CASES))
def test_pages_warmed_between_answer_as_the_whole_list(case: str, versioned: bool) -> None:
    slices, claims = CASES[case]
    slices = served(slices) if versioned else slices
    whole = answers(Allocator(slices, CLASSES), claims)
    for sizes in page_splits(len(slices)):
        paged = Allocator([], CLASSES)
        start = 0
        for size in sizes:
            paged.add(slices[start:start + size])
            start += size
            for node in paged.nodes():  # every node so far, complete or not
                paged.warm(node)
        assert answers(paged, claims) == whole, sizes


def test_add_names_the_nodes_it_completes() -> None:
    first = on("n1", pool_slice("n1-a", [device("a")], pool="n1", count=2))
    second = on("n1", pool_slice("n1-b", [device("b")], pool="n1", count=2))
    other = on("n2", pool_slice("n2-a", [device("x")], pool="n2"))
    allocator = Allocator([], CLASSES)
    assert allocator.add([first, other]) == ["n2"]
    assert allocator.add([second]) == ["n1"]
    assert allocator.nodes() == ["n1", "n2"]


def test_a_pool_is_complete_with_every_slice_of_its_newest_generation() -> None:
    old = pool_slice("old", [device("a")], count=1)
    new = [pool_slice(f"new-{k}", [device(f"b{k}")], count=2, generation=2) for k in range(2)]
    assert pools_complete([old])
    assert not pools_complete([old, new[0]])  # the newer generation is not all there
    assert pools_complete([old, *new])
    assert pools_complete([])
