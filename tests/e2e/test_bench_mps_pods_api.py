"""MPS per claim in a cluster, as the kubelet sees it: NodePrepareResources of MPS claims
from the real kube-apiserver (the claim GET, EXCLUSIVE_PROCESS set, the daemon's Pod
created, its daemon started by the Pod's runner and told its limits, `ready` seen, the CDI
spec written) and NodeUnprepareResources (`quit`, the Pod deleted with grace 0 and waited
for until the API server lets it go, the compute mode put back, the directory removed), over
the unix socket of a real `gpu-dra plugin --mock dgx-h100 --kubeconfig ... --pod-namespace
... --image ...` process. The kubelet that runs the daemon Pods is the tests' `PodRunner`
(tests/support/mpspods.py): it lists the node's daemon Pods every 0.1 s and runs each one's
`gpu-dra mps-daemon` on the host, whose `nvidia-cuda-mps-control -f` is the Python stand-in;
a real kubelet's Pod start (sandbox, image, container) is slower, a real daemon's start
differs. Per daemon, the resident memory of the Pod's process and of the stand-in daemon
goes to extra_info.

Run with `pytest tests/e2e/test_bench_mps_pods_api.py --benchmark-enable`; the numbers go
to docs/benchmarks.md next to the local-mode ones (tests/bench/test_bench_mps.py; p50 is
the median; p99 is in each benchmark's extra_info). Under the default test run each
benchmark runs once, as a smoke test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.kube.api import api_request
from driver.nvml.mpsstandin import PID_FILE
from tests.support.apiserver import ControlPlane, make_namespace, unique
from tests.support.mpspods import IMAGE, PodRunner
from tests.support.plugin import Claim, Node, gpu_config, opaque, result, short_tmp
from tests.support.plugin_bench import (
    Daemon,
    allocated_claim,
    bench_prepare,
    bench_unprepare,
    daemon_process,
    rss_kib,
)

MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 25,
                                            "defaultPinnedDeviceMemoryLimit": "20Gi"})
CASES = {"1 claim, 1 GPU": [[0]], "1 claim, 8 GPUs": [list(range(8))],
         "8 claims, 1 GPU each": [[i] for i in range(8)]}
ROUNDS = 20  # each starts or stops a Pod, a `gpu-dra mps-daemon` and a daemon per claim


@pytest.fixture(scope="module")
def pod_namespace(control_plane: ControlPlane) -> Iterator[str]:
    """The plugin's namespace (its daemon Pods) and the claims'."""
    name = make_namespace(control_plane.api, unique("bench-mps"))
    yield name
    api_request(control_plane.api, "DELETE", f"/api/v1/namespaces/{name}").expect(200, 202, 404)


@pytest.fixture(scope="module")
def runner(control_plane: ControlPlane, pod_namespace: str, node_name: str) -> Iterator[PodRunner]:
    running = PodRunner(control_plane.api, pod_namespace, node_name)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def daemon(control_plane: ControlPlane, pod_namespace: str, node_name: str,
           runner: PodRunner) -> Iterator[Daemon]:
    with short_tmp() as root:
        node = Node(root)
        args = node.cli_args("dgx-h100", "--pod-namespace", pod_namespace, "--image", IMAGE,
                             node_name=node_name, kubeconfig=control_plane.kubeconfig)
        with daemon_process(node, args) as running:
            yield running


def claims(control_plane: ControlPlane, pod_namespace: str, node_name: str, case: str
           ) -> list[Claim]:
    return [allocated_claim(control_plane.api, pod_namespace,
                            [result(f"gpu-{i}", pool=node_name) for i in gpus], [opaque(MPS)])
            for gpus in CASES[case]]


@pytest.mark.parametrize("case", list(CASES))
def test_mps_pod_prepare_latency(benchmark: BenchmarkFixture, control_plane: ControlPlane,
                                 daemon: Daemon, runner: PodRunner, pod_namespace: str,
                                 node_name: str, case: str) -> None:
    batch = claims(control_plane, pod_namespace, node_name, case)
    daemon.call("NodePrepareResources", batch)
    [pod] = [p for p in runner.pods() if p["metadata"]["name"] == f"mps-{batch[0].uid}"]
    pipe = daemon.node.plugin_dir / "mps" / batch[0].uid / "pipe"
    benchmark.extra_info["pod_process_rss_kib"] = rss_kib(
        runner.processes[pod["metadata"]["uid"]].pid)
    benchmark.extra_info["standin_daemon_rss_kib"] = rss_kib(
        int((pipe / PID_FILE).read_text()))
    daemon.call("NodeUnprepareResources", batch)
    bench_prepare(benchmark, daemon, batch, ROUNDS, warmup_rounds=1)
    assert runner.pods() == [] and list((daemon.node.plugin_dir / "mps").iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_mps_pod_unprepare_latency(benchmark: BenchmarkFixture, control_plane: ControlPlane,
                                   daemon: Daemon, runner: PodRunner, pod_namespace: str,
                                   node_name: str, case: str) -> None:
    bench_unprepare(benchmark, daemon, claims(control_plane, pod_namespace, node_name, case),
                    ROUNDS, warmup_rounds=1)
    assert runner.pods() == [] and list((daemon.node.plugin_dir / "mps").iterdir()) == []
