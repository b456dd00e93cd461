"""Start-up of `gpu-dra plugin --mock dgx-h100 --mig-mode dynamic --kubeconfig ...` on the
real kube-apiserver, as a whole process: from exec until the kubelet would see it
registered (its registration socket answers GetInfo and its DRA socket answers a call),
which is after its ResourceSlices are published. The first start of a node (a new Node,
no slices yet) and a restart that finds its slices published by the run before.

Run with `pytest tests/e2e/test_bench_startup_api.py --benchmark-enable` (10 starts each);
the numbers go to docs/benchmarks.md next to the local directory's
(tests/bench/test_bench_startup.py). Under the default test run each case starts once.
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.devcluster.controlplane import FakeNodeKeeper
from driver.kube.api import api_request
from tests.support.apiserver import SLICES, ControlPlane, unique
from tests.support.plugin import Node, short_tmp
from tests.support.plugin_bench import Start, bench_startup


@pytest.mark.parametrize("case", ["first start", "restart"])
def test_startup(benchmark: BenchmarkFixture, control_plane: ControlPlane,
                 device_classes: None, node_keeper: FakeNodeKeeper, case: str) -> None:
    names: list[str] = []

    def next_start() -> Start:
        if case == "first start" or not names:
            names.append(unique("start-node"))
            node_keeper.add(names[-1])
        node = Node(root / str(len(names)))
        node.root.mkdir(exist_ok=True)
        return node, node.cli_args("dgx-h100", "--mig-mode", "dynamic", node_name=names[-1],
                                   kubeconfig=control_plane.kubeconfig)

    with short_tmp() as root:
        try:
            bench_startup(benchmark, next_start)
        finally:
            for name in names:
                api_request(control_plane.api, "DELETE", SLICES, query={
                    "fieldSelector": f"spec.nodeName={name}"}).expect(200, 404)
                node_keeper.remove(name)


