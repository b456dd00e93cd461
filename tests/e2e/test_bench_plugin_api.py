"""Kubelet plugin cost with claims from the API server: NodePrepareResources and
NodeUnprepareResources over the unix socket of a real `gpu-dra plugin --mock dgx-h100
--kubeconfig ...` process, each claim a ResourceClaim in the real kube-apiserver that the
plugin GETs (and, off the call, whose status.devices it writes). The claims are allocated
by writing status.allocation directly (no scheduler), in the shapes of the
local-directory bench (tests/bench/test_bench_plugin.py).

Each prepare and unprepare case also runs against the Go kubelet plugin of tests/goplugin
(k8s.io/dynamic-resource-allocation's kubeletplugin helper, the same per-claim work), right
after ours, with the same claims and the same client; it is skipped where Go is missing
and not cached. `test_prepare_latency_in_turn` has the two prepare the one-claim cases in
turn, round by round, so that the load of a shared machine weighs on both alike; with
`GPU_DRA_BENCH_BASE=<another checkout>` a plugin run from that checkout takes its turn too
(`base`: before and after a change in one run). `test_prepare_floor_in_turn` adds both
plugins with their per-claim work taken out (they GET and check each claim, then answer it
with no devices): the floor of a call in each, and what the work on top of it costs each.

Run with `pytest tests/e2e/test_bench_plugin_api.py --benchmark-enable`; the numbers go to
docs/benchmarks.md (p50 is the median; p99 is in each benchmark's extra_info). Under the
default test run each benchmark runs once, as a smoke test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.inventory.discovery import discover
from driver.kube.api import api_request
from driver.nvml.mock import mock_provider
from driver.plugin.checkpoint import PreparedDevice
from driver.plugin.claims import ClaimRef
from driver.plugin.claimstatus import api_writer, apply_body, claim_entries
from driver.plugin.devices import device_index
from driver.plugin.monitor import HealthView
from tests.support import plugin_floor
from tests.support.apiserver import SLICES, ControlPlane, create, unique, wait_for
from tests.support.goplugin import goplugin_args, goplugin_binary
from tests.support.plugin import DRIVER, Claim, Node, short_tmp
from tests.support.plugin_bench import (
    Daemon,
    allocated_claim,
    bench_prepare,
    bench_prepare_in_turn,
    bench_unprepare,
    daemon_process,
)
from tests.support.plugin_bench import shapes as shapes_in

ADMIN_LABEL = "resource.kubernetes.io/admin-access"  # lets a namespace's claims use adminAccess


@pytest.fixture(scope="module")
def admin_namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = unique("bench")
    create(control_plane.api, "/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {ADMIN_LABEL: "true"}}})
    yield name
    api_request(control_plane.api, "DELETE", f"/api/v1/namespaces/{name}").expect(200, 202, 404)


@pytest.fixture(scope="module")
def daemon(control_plane: ControlPlane, device_classes: None, node_name: str) -> Iterator[Daemon]:
    with short_tmp() as root:
        node = Node(root)
        args = node.cli_args("dgx-h100", node_name=node_name,
                             kubeconfig=control_plane.kubeconfig)
        with daemon_process(node, args) as running:
            # Publishing at start-up would compete with the first timed calls.
            wait_for(lambda: api_request(control_plane.api, "GET", SLICES, query={
                "fieldSelector": f"spec.nodeName={node_name}"}).expect(200)["items"],
                f"{node_name}'s ResourceSlices")
            yield running
        api_request(control_plane.api, "DELETE", SLICES, query={
            "fieldSelector": f"spec.nodeName={node_name}"}).expect(200, 404)


@pytest.fixture(scope="module")
def base_daemon(control_plane: ControlPlane, device_classes: None,
                node_name: str) -> Iterator[dict[str, Daemon]]:
    """`base`: the plugin of the checkout GPU_DRA_BENCH_BASE names (run there, importing
    its own driver package), serving the same node; none without it."""
    checkout = os.environ.get("GPU_DRA_BENCH_BASE")
    if not checkout:
        yield {}
        return
    with short_tmp() as root:
        node = Node(root)
        args = node.cli_args("dgx-h100", node_name=node_name,
                             kubeconfig=control_plane.kubeconfig)
        program = ("env", "-C", checkout, f"PYTHONPATH={checkout}", sys.executable, "-m",
                   "driver.cli")
        with daemon_process(node, args, program=program) as running:
            yield {"base": running}


def _go_binary() -> Path:
    """The Go plugin (tests/goplugin), built if need be; the test is skipped without Go."""
    binary = goplugin_binary()
    if binary is None:
        pytest.skip("the Go plugin (tests/goplugin) is not built and Go is missing")
    return binary


@pytest.fixture(scope="module")
def go_daemon(control_plane: ControlPlane, node_name: str) -> Iterator[Daemon]:
    """The Go plugin serving the same node's pool, from the same API server."""
    binary = _go_binary()
    with short_tmp() as root:
        node = Node(root)
        with daemon_process(node, goplugin_args(node, node_name, control_plane.kubeconfig),
                            program=(str(binary),)) as running:
            yield running


@pytest.fixture(scope="module")
def floor_daemons(control_plane: ControlPlane, device_classes: None,
                  node_name: str) -> Iterator[dict[str, Daemon]]:
    """Ours and the Go plugin with their per-claim work taken out (`ours_floor`:
    tests/support/plugin_floor.py, `go_floor`: `goplugin --answer-only`): each still GETs
    and checks every claim and answers it, with no devices."""
    binary = _go_binary()
    with short_tmp() as ours_root, short_tmp() as go_root:
        ours, go = Node(ours_root), Node(go_root)
        ours_args = ours.cli_args("dgx-h100", node_name=node_name,
                                  kubeconfig=control_plane.kubeconfig)
        go_args = [*goplugin_args(go, node_name, control_plane.kubeconfig), "--answer-only"]
        with daemon_process(ours, ours_args, program=(sys.executable,
                                                      plugin_floor.__file__)) as o, \
                daemon_process(go, go_args, program=(str(binary),)) as g:
            yield {"ours_floor": o, "go_floor": g}


@pytest.fixture(scope="module")
def case_claims(control_plane: ControlPlane, admin_namespace: str,
                node_name: str) -> Callable[[str], list[Claim]]:
    """Each case's claims, created once: both plugins prepare the same objects."""
    made: dict[str, list[Claim]] = {}

    def claims(case: str) -> list[Claim]:
        if case not in made:
            made[case] = [allocated_claim(control_plane.api, admin_namespace, results)
                          for results in shapes_in(node_name)[case]]
        return made[case]

    return claims


CASES = list(shapes_in("pool"))
TARGETS = {"ours": "daemon", "go": "go_daemon"}  # the fixture of each plugin


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES)
def test_prepare_latency(benchmark: BenchmarkFixture, request: pytest.FixtureRequest,
                         case_claims: Callable[[str], list[Claim]], case: str,
                         target: str) -> None:
    bench_prepare(benchmark, request.getfixturevalue(TARGETS[target]), case_claims(case))


@pytest.mark.parametrize("case", CASES[:2])  # a round of the 100-claim case takes 0.1-1 s
def test_prepare_latency_in_turn(benchmark: BenchmarkFixture, daemon: Daemon,
                                 go_daemon: Daemon, base_daemon: dict[str, Daemon],
                                 case_claims: Callable[[str], list[Claim]], case: str) -> None:
    """Ours and the Go plugin (and `base_daemon`'s) prepare the same claims in turn, round
    by round: the two runs of test_prepare_latency follow each other, so a shared
    machine's load can differ between them; here it weighs on all alike. Ours / Go (and
    ours / base) in extra_info."""
    bench_prepare_in_turn(benchmark, {"ours": daemon, "go": go_daemon, **base_daemon},
                          case_claims(case))


NO_CLAIM = "0 claims"  # the call alone: the gRPC servers' share of the floor


@pytest.mark.parametrize("case", [NO_CLAIM, *CASES[:2]])
def test_prepare_floor_in_turn(benchmark: BenchmarkFixture, daemon: Daemon, go_daemon: Daemon,
                               floor_daemons: dict[str, Daemon],
                               case_claims: Callable[[str], list[Claim]], case: str) -> None:
    """Ours and the Go plugin in turn with their floors (`floor_daemons`): what a call
    costs each before any per-claim work, and so what that work costs each (the p50 less
    the floor's p50, `<name>_work_ms`) on the same claims in one run."""
    claims = [] if case == NO_CLAIM else case_claims(case)
    bench_prepare_in_turn(benchmark, {"ours": daemon, "go": go_daemon, **floor_daemons},
                          claims)
    info = benchmark.extra_info
    if "ours_floor_p50_ms" in info:  # absent when only the warm-up rounds ran
        info["ours_floor_go_floor_p50_ratio"] = round(
            info["ours_floor_p50_ms"] / info["go_floor_p50_ms"], 2)
        for name in ("ours", "go"):
            info[f"{name}_work_ms"] = round(info[f"{name}_p50_ms"]
                                            - info[f"{name}_floor_p50_ms"], 3)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES)
def test_unprepare_latency(benchmark: BenchmarkFixture, request: pytest.FixtureRequest,
                           case_claims: Callable[[str], list[Claim]], case: str,
                           target: str) -> None:
    bench_unprepare(benchmark, request.getfixturevalue(TARGETS[target]), case_claims(case))


def test_claim_status_write_latency(benchmark: BenchmarkFixture, control_plane: ControlPlane,
                                    admin_namespace: str, node_name: str) -> None:
    """What the plugin's writer thread spends per claim on the API server, off the prepare
    path: one server-side apply of the entries of an 8-GPU claim, and one of their
    removal."""
    [results] = shapes_in(node_name)["1 claim, 8 GPUs"]
    claim = allocated_claim(control_plane.api, admin_namespace, results)
    ref = ClaimRef(claim.namespace, claim.name, claim.uid)
    inventory = discover(mock_provider("dgx-h100"))
    devices = [PreparedDevice(("gpu",), r["pool"], r["device"], ("x",), "GPU-x")
               for r in results]
    entries = claim_entries(DRIVER, device_index(inventory, "static"),
                            inventory.driver_version, HealthView({}, {}, {}), devices,
                            datetime.now(UTC))
    write = api_writer(control_plane.api, DRIVER)
    benchmark(lambda: (write(ref, apply_body(ref, entries)), write(ref, apply_body(ref, []))))
