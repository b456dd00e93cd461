"""`gpu-dra explain` and `gpu-dra allocate` against a cluster of dgx-h100 nodes (issue 17,
item 2): N fake Nodes whose pools our ApiPublisher wrote into the real kube-apiserver
(static MIG: 4 whole GPUs and 28 1g.10gb devices per node; dynamic MIG: 208 devices per
node), a ResourceClaim, and each command timed as a whole process (exec to exit, the
kubernetes client's start-up and every list included) with its peak RSS. The upstream
allocator (tests/oracle, v1.37.2) gets the same objects read back from the API server in
the same run: its NewAllocator + Allocate over the nodes in name order, the scheduler's
work without its informers.

Claims: ``gpu`` (one GPU: the first node answers) and ``nine-gpus`` (nine GPUs in one
NVLink island: fits nowhere, so every node is tried and explained). The slices' list
alone, as explain reads it, is timed too: JSON against Kubernetes protobuf, each in a
fresh process, alternating.

The default run is small (10 nodes) so CI keeps it working; the scale runs are
``GPU_DRA_EXPLAIN_NODES=1000 pytest tests/e2e/test_bench_explain_scale.py
--benchmark-enable`` (``GPU_DRA_EXPLAIN_LAYOUTS=static-mig`` for one layout); numbers in
docs/benchmarks.md. ``GPU_DRA_EXPLAIN_BASELINE=DIR`` (a checkout of another commit, its
native modules built) runs that tree's commands too on the same objects, the order of the
two trees reversed each round: a before/after pair from one run
(``GPU_DRA_EXPLAIN_ROUNDS`` rounds).
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.kube.api import api_request, list_items, list_pages
from tests.support.apiserver import RESOURCE_V1, SLICES, ControlPlane, make_namespace, unique
from tests.support.claims import resource_claim
from tests.support.oracle import Oracle, oracle_binary
from tests.support.plugin import DRIVER
from tests.support.plugin_bench import OURS, THIS_CHECKOUT, rss_kib
from tests.support.schedcost import LAYOUTS, dgx_h100, published, ready_nodes

NODES = int(os.environ.get("GPU_DRA_EXPLAIN_NODES", "10"))
LAYOUT_NAMES = os.environ.get("GPU_DRA_EXPLAIN_LAYOUTS", "static-mig,dynamic-mig").split(",")
BASELINE = os.environ.get("GPU_DRA_EXPLAIN_BASELINE", "")
ROUNDS = int(os.environ.get("GPU_DRA_EXPLAIN_ROUNDS", "1"))
ISLAND = f"{DRIVER}/nvlinkIsland"

CLAIMS = {
    "gpu": resource_claim("gpu"),
    "nine-gpus": resource_claim("nine-gpus", count=9, match_attribute=ISLAND),
}


@dataclass(frozen=True)
class Process:
    """One command run to its end: its output, exit code, wall time and peak RSS."""

    code: int
    out: str
    err: str
    seconds: float
    peak_rss_mib: int


def run_process(args: Sequence[str], tree: str = "") -> Process:
    """``args`` from exec to exit; its peak RSS is the VmHWM of the process as last read
    before it exits (read every 20 ms: the kernel's own count for a child, from wait4,
    also holds what this process had when it forked). ``tree``: the checkout whose
    ``driver`` it imports (default: this one; ``-m`` puts the working directory first on
    the path, so it runs there)."""
    root = tree or str(THIS_CHECKOUT)
    env = {**os.environ, "PYTHONPATH": root}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=root)
        peak = 0
        while proc.poll() is None:
            with contextlib.suppress(OSError, StopIteration):  # exiting: no memory left
                peak = max(peak, rss_kib(proc.pid, "VmHWM"))
            time.sleep(0.02)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Process(proc.returncode, out.read().decode(), err.read().decode(), seconds,
                       peak // 1024)


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    """The bytecode of the trees timed, as an installed package has it (with
    PYTHONDONTWRITEBYTECODE every start would compile every module)."""
    for tree in (THIS_CHECKOUT, *([Path(BASELINE)] if BASELINE else [])):
        compileall.compile_dir(Path(tree) / "driver", quiet=1)


@pytest.fixture
def oracle() -> Iterator[Oracle]:
    """The Go oracle, one process per test: it keeps what a 1,000-node instance took."""
    binary = oracle_binary()
    if binary is None:
        pytest.skip("the Go oracle is not built and Go is missing (tests/oracle/build.sh)")
    with Oracle(binary) as running:
        yield running


@pytest.fixture(scope="module")
def nodes(control_plane: ControlPlane) -> Iterator[list[str]]:
    with ready_nodes(control_plane.cluster, unique("explain"), NODES) as names:
        yield names


@pytest.fixture(scope="module")
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A namespace with the claims of :data:`CLAIMS`, none of them allocated."""
    api = control_plane.api
    name = make_namespace(api, unique("explain"))
    for claim in CLAIMS.values():
        api_request(api, "POST", f"{RESOURCE_V1}/namespaces/{name}/resourceclaims",
                    claim).expect(201)
    yield name
    api_request(api, "DELETE", f"/api/v1/namespaces/{name}").expect(200, 202, 404)


@pytest.fixture(scope="module", params=LAYOUT_NAMES)
def pools(request: pytest.FixtureRequest, control_plane: ControlPlane, nodes: list[str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every node's pool in one layout; what publishing took."""
    layout = LAYOUTS[request.param]
    inventory = dgx_h100(layout, tmp_path_factory.mktemp(request.param))
    with published(control_plane.api, nodes, inventory, layout) as seconds:
        yield {"layout": request.param, "publish_s": round(seconds, 1)}


def go_answer(api: Any, oracle: Oracle, namespace: str, claim: str) -> tuple[dict[str, Any], float]:
    """The upstream allocator's answer on the objects the API server holds now (this
    driver's slices, the classes, the claim; no claim is allocated), trying the nodes in
    name order as explain does, and its NewAllocator + Allocate time in seconds.

    The slices go to the oracle as the API server's bytes, spliced into its input line:
    decoded whole here they would take gigabytes at 1,000 dynamic-MIG nodes."""
    pages: list[bytes] = []
    nodes: set[str] = set()
    for raw, page in list_pages(api, SLICES, field_selector=f"spec.driver={DRIVER}"):
        items = raw[raw.index(b'"items":[') + len(b'"items":['):raw.rindex(b"]")]
        if items.strip():
            pages.append(items)
        nodes.update(s["spec"]["nodeName"] for s in page["items"])
    instance = {
        "nodes": sorted(nodes),
        "classes": list_items(api, f"{RESOURCE_V1}/deviceclasses"),
        "claims": [api_request(api, "GET", f"{RESOURCE_V1}/namespaces/{namespace}/"
                                            f"resourceclaims/{claim}").expect(200)],
        "benchIterations": 1,
    }
    line = orjson.dumps(instance)[:-1] + b',"slices":[' + b",".join(pages) + b"]}"
    answer = oracle.run_line(line.decode())
    return answer, answer.get("nanosMedian", 0) / 1e9


@pytest.mark.parametrize("claim", list(CLAIMS))
def test_explain_and_allocate_from_the_cluster(
        benchmark: BenchmarkFixture, control_plane: ControlPlane, device_classes: None,
        pools: dict[str, Any], nodes: list[str], namespace: str, oracle: Oracle,
        claim: str) -> None:
    asked = ["--kubeconfig", str(control_plane.kubeconfig), "--claim", f"{namespace}/{claim}"]
    runs: dict[str, list[Process]] = {}

    def run(command: str, tree: str = "") -> None:
        extra = ["-o", "json"] if command == "allocate" else []
        runs.setdefault(f"{tree and 'baseline_'}{command}", []).append(
            run_process([*OURS, command, *asked, *extra], tree))

    trees = ["", *([BASELINE] if BASELINE else [])]
    order = [[("explain", tree) for tree in trees] + [("allocate", tree) for tree in trees],
             [("explain", tree) for tree in trees[::-1]]
             + [("allocate", tree) for tree in trees[::-1]]]
    rounds = [order[k % 2] for k in range(ROUNDS)]

    def before_ours(k: int) -> list[tuple[str, str]]:
        return rounds[k][:rounds[k].index(("explain", ""))]

    def after_ours(k: int) -> list[tuple[str, str]]:
        return rounds[k][rounds[k].index(("explain", "")) + 1:]

    def off_the_clock() -> None:
        """Round k's order is reversed in round k+1 (ours first, then the baseline's
        first), as a command's place in the round moves its time by seconds: the
        rest of the last round, then what comes before our explain in this one."""
        k = len(runs.get("explain", []))
        for command, tree in [*(after_ours(k - 1) if k else []), *before_ours(k)]:
            run(command, tree)

    benchmark.pedantic(run, ("explain",), setup=off_the_clock, rounds=ROUNDS, iterations=1)
    for command, tree in after_ours(ROUNDS - 1):
        run(command, tree)
    answer, go_seconds = go_answer(control_plane.api, oracle, namespace, claim)
    apiserver = control_plane.cluster.pids["kube-apiserver"]
    benchmark.extra_info.update(pools, nodes=NODES, claim=claim, rounds=ROUNDS,
                                go_allocate_ms=round(go_seconds * 1000, 1),
                                apiserver_rss_mib=rss_kib(apiserver) // 1024,
                                apiserver_peak_rss_mib=rss_kib(apiserver, "VmHWM") // 1024)
    for name, done in runs.items():
        seconds = sorted(p.seconds for p in done)
        benchmark.extra_info.update({f"{name}_s": [round(t, 2) for t in seconds],
                                     f"{name}_peak_rss_mib": max(p.peak_rss_mib for p in done)})
    explain, allocated = runs["explain"][0], runs["allocate"][0]
    if BASELINE:
        assert runs["baseline_explain"][0].out == explain.out

    # What a user checks: both commands give the upstream allocator's answer.
    ours = sorted(set(nodes))
    if answer["status"] == "allocated":
        result = answer["allocations"][0]["devices"]["results"][0]
        assert (explain.code, explain.err) == (0, ""), explain.err
        assert explain.out.splitlines() == [
            f"{namespace}/{claim} on {result['pool']}: fits"], explain.out
        assert (allocated.code, allocated.err) == (0, ""), allocated.err
        given = json.loads(allocated.out)["status"]["allocation"]["devices"]["results"]
        assert [(r["pool"], r["device"]) for r in given] == [
            (r["pool"], r["device"]) for r in answer["allocations"][0]["devices"]["results"]]
    else:
        assert answer["status"] == "unschedulable", answer
        assert (explain.code, explain.err) == (1, ""), explain.err
        verdicts = re.findall(rf"^{namespace}/{claim} on (\S+): does not fit$", explain.out,
                              re.MULTILINE)
        assert ours == [n for n in verdicts if n in ours], explain.out[:2000]
        assert (allocated.code, allocated.err) == (1, ""), allocated.err
        assert "allocation" not in (json.loads(allocated.out).get("status") or {})


LIST_ONLY = """
import sys, time
from pathlib import Path
from driver.gcpause import collector_paused
from driver.kube.api import api_client, list_items
api = api_client(Path(sys.argv[1]))
start = time.monotonic()
with collector_paused():  # as for the whole of explain (driver/cli/allocation.py)
    items = list_items(api, sys.argv[2], field_selector=sys.argv[3],
                       protobuf=sys.argv[4] == "1")
print(time.monotonic() - start, len(items))
"""


def test_list_the_slices_as_json_and_as_protobuf(
        benchmark: BenchmarkFixture, control_plane: ControlPlane, pools: dict[str, Any],
        nodes: list[str]) -> None:
    """The slices' list alone (the kubeconfig loaded first, off the clock; the collector
    paused, as explain has it), as JSON and as protobuf in turn: the seconds inside the
    process and its peak RSS."""
    runs: dict[str, list[tuple[float, int, int]]] = {"json": [], "protobuf": []}

    def run(encoding: str) -> None:
        done = run_process([OURS[0], "-c", LIST_ONLY, str(control_plane.kubeconfig), SLICES,
                            f"spec.driver={DRIVER}", "1" if encoding == "protobuf" else "0"])
        assert (done.code, done.err) == (0, ""), done.err
        seconds, count = done.out.split()
        runs[encoding].append((float(seconds), int(count), done.peak_rss_mib))

    def one_round() -> None:
        """Both encodings, JSON first in even rounds, protobuf first in odd ones (the
        benchmark's own time is the pair; each one's is in extra_info)."""
        order = ["json", "protobuf"]
        for encoding in order[::-1] if len(runs["json"]) % 2 else order:
            run(encoding)

    benchmark.pedantic(one_round, rounds=max(ROUNDS, 2), iterations=1)
    assert {c for done in runs.values() for _, c, _ in done} == {
        len(list_items(control_plane.api, SLICES, field_selector=f"spec.driver={DRIVER}"))}
    benchmark.extra_info.update(pools, nodes=NODES, load_average=os.getloadavg()[0])
    for encoding, done in runs.items():
        benchmark.extra_info.update({
            f"list_{encoding}_s": sorted(round(t, 2) for t, _, _ in done),
            f"list_{encoding}_peak_rss_mib": max(rss for _, _, rss in done)})
