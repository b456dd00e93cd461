"""Start-up of `gpu-dra plugin --mock dgx-h100 --mig-mode dynamic --kubeconfig ...` on the
real kube-apiserver, as a whole process: from exec until the kubelet would see it
registered (its registration socket answers GetInfo and its DRA socket answers a call);
it publishes its ResourceSlices right after, in the background. The first start of a node
(a new Node, no slices yet) and a restart that finds its slices published by the run
before.

Run with `pytest tests/e2e/test_bench_startup_api.py --benchmark-enable` (10 starts each);
the numbers go to docs/benchmarks.md next to the local directory's
(tests/bench/test_bench_startup.py). Under the default test run each case starts once.
`GPU_DRA_STARTUP_BASELINE=/path/to/checkout pytest tests/e2e/test_bench_startup_api.py -s
-k baseline`: side by side with another checkout, alternating (see the local bench).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.devcluster.controlplane import FakeNodeKeeper
from driver.kube.api import api_request
from tests.support.apiserver import SLICES, ControlPlane, unique
from tests.support.plugin import Node, short_tmp
from tests.support.plugin_bench import (
    STARTUP_BASELINE,
    THIS_CHECKOUT,
    Start,
    bench_startup,
    compare_starts,
)

Starts = Callable[[str], Start]
"""A plugin's node and command line for the next start of a checkout, by its name."""


@pytest.fixture(params=["first start", "restart"])
def starts(request: pytest.FixtureRequest, control_plane: ControlPlane, device_classes: None,
           node_keeper: FakeNodeKeeper) -> Iterator[Starts]:
    """Each start of a checkout on a new Node (first start) or on the one it started on
    before (restart: its slices are there); the Nodes and slices removed at the end."""
    nodes: dict[str, list[str]] = {}

    def next_start(checkout: str) -> Start:
        names = nodes.setdefault(checkout, [])
        if request.param == "first start" or not names:
            names.append(unique("start-node"))
            node_keeper.add(names[-1])
        node = Node(root / f"{checkout}-{len(names)}")
        node.root.mkdir(exist_ok=True)
        return node, node.cli_args("dgx-h100", "--mig-mode", "dynamic", node_name=names[-1],
                                   kubeconfig=control_plane.kubeconfig)

    with short_tmp() as root:
        try:
            yield next_start
        finally:
            for name in (n for names in nodes.values() for n in names):
                api_request(control_plane.api, "DELETE", SLICES, query={
                    "fieldSelector": f"spec.nodeName={name}"}).expect(200, 404)
                node_keeper.remove(name)


def test_startup(benchmark: BenchmarkFixture, starts: Starts) -> None:
    bench_startup(benchmark, lambda: starts("this"))


@pytest.mark.skipif(not STARTUP_BASELINE, reason="GPU_DRA_STARTUP_BASELINE: a checkout")
def test_startup_against_baseline(starts: Starts, request: pytest.FixtureRequest) -> None:
    assert STARTUP_BASELINE is not None
    times = compare_starts({"baseline": Path(STARTUP_BASELINE), "this": THIS_CHECKOUT}, starts)
    print(f"\nAPI server, {request.node.callspec.params['starts']}, load {os.getloadavg()}: "
          f"{json.dumps({name: t.summary() for name, t in times.items()})}")
