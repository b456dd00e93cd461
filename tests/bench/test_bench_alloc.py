"""Allocation benchmarks: the native kernel, the Python reference and the Go oracle
(kube-scheduler v1.37.2's allocator), median time per allocation.

    .venv/bin/pytest tests/bench/test_bench_alloc.py --benchmark-enable
    .venv/bin/pytest tests/bench/test_bench_alloc.py -k kernel_search --benchmark-enable
                                  # the kernel's search alone, parity and topology mode
    GPU_DRA_ALLOC_REPORT=/tmp/alloc.md .venv/bin/pytest tests/bench/test_bench_alloc.py \
        -k side_by_side -s        # all three in one run, a markdown table
                                  # (GPU_DRA_ALLOC_ROUNDS: Go and ours alternate, 3 rounds)

One allocation = what the scheduler does for one pod on one node (NewAllocator +
Allocate in Go, from the allocated claims and the claim already decoded from JSON;
in Python: look the claim up among the parsed ones by uid and resourceVersion, read
the allocated claims into a `Ledger`, allocate, shape the results), except the
cluster scenario, which filters all 64 nodes for one pod. "warm" keeps one
`Allocator` per snapshot, as the driver does (pools gathered, CEL results, each
node's kernel tables, parsed claims and their compiled problems kept); "cold"
builds a new one for every allocation: what it takes from earlier ones is only what
is derived from one version of an object (a node's model per version of its slices, a
claim or class decoded per version: the informer's decode) and compiled CEL; selector
results, classifications and compiled claims start empty.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from driver.allocator import DEFAULT_BUDGET, Allocator, Ledger, driver_classes
from driver.allocator import kernel as allocator_kernel
from driver.allocator.pools import Node
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices

DRIVER = "gpu.dra.dev"


@dataclass(frozen=True)
class Step:
    claims: tuple[dict[str, Any], ...]
    allocated: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Scenario:
    name: str
    slices: tuple[dict[str, Any], ...]
    steps: tuple[Step, ...]
    nodes: tuple[str, ...]


@cache
def _slices(profile: str, mig_mode: str, node: str) -> tuple[dict[str, Any], ...]:
    """The slices as read from the API server: with a uid and a resourceVersion."""
    built = build_slices(discover(mock_provider(profile)),
                         SliceOptions(driver=DRIVER, node=node, mig_mode=mig_mode), 1)
    return tuple({**s, "metadata": {**s["metadata"], "uid": f"{profile}-{mig_mode}-{node}-{i}",
                                    "resourceVersion": "1"}} for i, s in enumerate(built))


def _classes() -> list[dict[str, Any]]:
    """The driver's DeviceClasses as read from the API server (a uid, a resourceVersion)."""
    return [{**c, "metadata": {**c["metadata"], "uid": f"class-{c['metadata']['name']}",
                               "resourceVersion": "1"}} for c in driver_classes(DRIVER)]


def _claim(name: str, request: dict[str, Any], constraints: list[Any] | None = None
           ) -> dict[str, Any]:
    devices: dict[str, Any] = {"requests": [{"name": "r", "exactly": request}]}
    if constraints:
        devices["constraints"] = constraints
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "bench", "uid": f"uid-{name}",
                         "resourceVersion": "1"},
            "spec": {"devices": devices}}


def _held(name: str, pool: str, *devices: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "bench"}, "status": {"allocation": {
        "devices": {"results": [{"request": "r", "driver": DRIVER, "pool": pool, "device": d}
                                for d in devices]}}}}


ISLAND = [{"matchAttribute": f"{DRIVER}/nvlinkIsland"}]
ONE_G = {"deviceClassName": f"mig.{DRIVER}", "count": 1, "selectors": [{"cel": {
    "expression": f'device.attributes["{DRIVER}"].profile == "1g.10gb"'}}]}


@cache
def scenarios() -> tuple[Scenario, ...]:
    static = _slices("dgx-h100", "static", "node-0")
    dynamic = _slices("dgx-h100", "dynamic", "node-0")
    one_gpu = Step((_claim("one", {"deviceClassName": DRIVER, "count": 1}),), ())
    four = Step((_claim("four", {"deviceClassName": DRIVER, "count": 4}, ISLAND),),
                (_held("busy", "node-0", "gpu-0", "gpu-3", "gpu-5"),))
    one_g = Step((_claim("mig", ONE_G),), ())
    packing = _mig_sequence(dynamic)
    impossible = Step((_claim("five", {"deviceClassName": DRIVER, "count": 5}, [
        {"matchAttribute": f"{DRIVER}/productName"}]),), ())
    cluster_slices = tuple(s for i in range(64)
                           for s in _slices("dgx-h100", "dynamic", f"node-{i:02d}"))
    busy = tuple(_held(f"busy-{i}", f"node-{i:02d}", *[f"gpu-{g}" for g in range(7)])
                 for i in range(63))
    cluster = Step((_claim("pair", {"deviceClassName": DRIVER, "count": 2}, ISLAND),), busy)
    return (
        Scenario("1 GPU of 8 (dgx-h100)", static, (one_gpu,), ("node-0",)),
        Scenario("4 NVLink-connected of 8, 3 busy", static, (four,), ("node-0",)),
        Scenario("1g MIG on dgx-h100, dynamic (208 devices)", dynamic, (one_g,), ("node-0",)),
        Scenario("packing 56 MIG claims, one at a time", dynamic, packing, ("node-0",)),
        Scenario("impossible: 5 of 4 under a constraint", _slices("a100-pcie-4x", "static",
                                                                  "node-0"),
                 (impossible,), ("node-0",)),
        Scenario("cluster: 64 dgx-h100 nodes, 63 nearly full", cluster_slices, (cluster,),
                 tuple(f"node-{i:02d}" for i in range(64))),
    )


def _mig_sequence(slices: tuple[dict[str, Any], ...]) -> tuple[Step, ...]:
    """56 1g claims on 8 GPUs, each step seeing the allocations before it."""
    allocator = Allocator(list(slices), _classes())
    ledger = Ledger()
    steps: list[Step] = []
    held: list[dict[str, Any]] = []
    for i in range(56):
        claim = _claim(f"mig-{i}", ONE_G)
        steps.append(Step((claim,), tuple(held)))
        outcome = allocator.allocate(allocator.parse([claim]), ledger, "node-0")
        assert outcome.status == "allocated", outcome.message
        results = outcome.allocations[0]["devices"]["results"]
        ledger.add(f"bench/mig-{i}", results)
        held.append({**claim, "status": {"allocation": outcome.allocations[0]}})
    return tuple(steps)


def allocate_once(allocator: Allocator, step: Step, nodes: tuple[str, ...], backend: str
                  ) -> str:
    """One scheduling decision: the first node where the claims fit."""
    claims = allocator.parse(step.claims)
    ledger = Ledger.of(step.allocated)
    status = ""
    for node in nodes:
        status = allocator.allocate(claims, ledger, node, backend=backend).status  # type: ignore[arg-type]
        if status != "unschedulable":
            break
    return status


def _median_ns(run: Callable[[], object], budget_s: float = 0.4, rounds: int = 15) -> float:
    """Median ns per call over rounds of enough calls to take about a millisecond, as the
    Go oracle times itself (tests/oracle/main.go, `bench`): the calibration warms up, and
    each round's mean takes in the garbage collections its calls cause."""
    calls = 1
    while True:
        start = time.perf_counter_ns()
        for _ in range(calls):
            run()
        if time.perf_counter_ns() - start > 1_000_000 or calls > 1 << 20:
            break
        calls *= 2
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < rounds or (time.perf_counter() < deadline and len(samples) < 2000):
        start = time.perf_counter_ns()
        for _ in range(calls):
            run()
        samples.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(samples)


def _search(allocator: Allocator, step: Step, nodes: tuple[str, ...], optimize: int
            ) -> Callable[[], None]:
    """`Prepared.run` on the claims' compiled problem and the ledger's state (both made
    here, before timing), node after node as in `allocate_once`; optimize 1: topology
    mode (every solution the search reaches is scored)."""
    claims = allocator.parse(step.claims)
    ledger = Ledger.of(step.allocated)
    prepared = []
    for node in nodes:
        fast = allocator_kernel.node_kernel(allocator.model(Node(node)))
        assert fast is not None, "the scenarios have no shared devices"
        prepared.append((fast.plan(claims, allocator.classes,
                                  allocator.evaluations).prepared, fast.state(ledger)))
        if allocator.allocate(claims, ledger, node).status != "unschedulable":
            break

    def search() -> None:
        for plan, state in prepared:
            plan.run(state, optimize, DEFAULT_BUDGET)
    return search


def kernel_median(scenario: Scenario, optimize: int = 0) -> float:
    """The native search alone, in ns: the median over the steps of `_search`."""
    allocator = Allocator(list(scenario.slices), _classes())
    return statistics.median(_median_ns(_search(allocator, step, scenario.nodes, optimize))
                             for step in scenario.steps)


def python_median(scenario: Scenario, backend: str, warm: bool) -> float:
    """Median over the steps of each step's median time, in ns."""
    per_step = []
    for step in scenario.steps:
        classes = _classes()
        if warm:
            allocator = Allocator(list(scenario.slices), classes)
            allocate_once(allocator, step, scenario.nodes, backend)
            per_step.append(_median_ns(
                lambda a=allocator, s=step: allocate_once(a, s, scenario.nodes, backend)))
        else:
            per_step.append(_median_ns(lambda s=step, c=classes: allocate_once(
                Allocator(list(scenario.slices), c), s, scenario.nodes, backend),
                budget_s=0.2, rounds=GO_ITERATIONS))
    return statistics.median(per_step)


def _middle(index: int) -> tuple[Scenario, Allocator, Step]:
    """Scenario `index`, a warm allocator of its slices, and its middle step."""
    scenario = scenarios()[index]
    allocator = Allocator(list(scenario.slices), _classes())
    return scenario, allocator, scenario.steps[len(scenario.steps) // 2]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("index", range(6), ids=lambda i: scenarios()[i].name)
def test_bench_allocation(benchmark: Any, index: int, backend: str) -> None:
    scenario, allocator, step = _middle(index)
    status = benchmark(allocate_once, allocator, step, scenario.nodes, backend)
    assert status == ("unschedulable" if "impossible" in scenario.name else "allocated")


@pytest.mark.parametrize("mode", ["parity", "topology"])
@pytest.mark.parametrize("index", range(6), ids=lambda i: scenarios()[i].name)
def test_bench_kernel_search(benchmark: Any, index: int, mode: str) -> None:
    """The search alone on the scenario's middle step, in either mode."""
    scenario, allocator, step = _middle(index)
    benchmark(_search(allocator, step, scenario.nodes, int(mode == "topology")))


GO_ITERATIONS = 15  # Go's timed rounds per instance (each about 1 ms of calls), median


def go_median(oracle: Any, scenario: Scenario) -> tuple[float, list[int]]:
    """Go's time in ns (median over the steps of each step's median) and the search
    steps of each step."""
    go, steps = [], []
    for step in scenario.steps:
        instance = {"node": {"name": scenario.nodes[0]}, "nodes": list(scenario.nodes),
                    "classes": _classes(), "slices": list(scenario.slices),
                    "allocated": list(step.allocated), "claims": list(step.claims),
                    "benchIterations": GO_ITERATIONS, "timeoutSeconds": 60}
        answer = oracle.run(instance)
        go.append(answer["nanosMedian"])
        steps.append(answer["nodes"])
    return statistics.median(go), steps


def test_side_by_side(tmp_path: Path) -> None:
    """Go, ours warm and ours cold timed in alternation, `GPU_DRA_ALLOC_ROUNDS` rounds
    per scenario (default 3): on a shared machine the load moves between rounds, so each
    time is the median over the rounds and each ratio the median of the rounds' ratios
    (Go and ours of one round ran seconds apart)."""
    report = os.environ.get("GPU_DRA_ALLOC_REPORT")
    if not report:
        pytest.skip("set GPU_DRA_ALLOC_REPORT=<file> to run the side-by-side benchmark")
    from tests.support.oracle import Oracle, oracle_binary

    binary = oracle_binary()
    if binary is None:
        pytest.skip("Go is not installed: no oracle to compare with")
    rows = ["| scenario | Go oracle | ours, kernel (warm) | ours, kernel (cold) | ours, Python "
            "reference (warm) | kernel search alone | Go / ours warm | Go / ours cold | "
            "Go / kernel alone | search steps Go / kernel |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    rounds = int(os.environ.get("GPU_DRA_ALLOC_ROUNDS", "3"))
    with Oracle(binary) as oracle:
        for scenario in scenarios():
            runs = []
            for _ in range(rounds):
                go_ns, steps_go = go_median(oracle, scenario)
                runs.append((go_ns, python_median(scenario, "native", warm=True),
                             python_median(scenario, "native", warm=False)))
            go_ns, warm, cold = (statistics.median(run[i] for run in runs) for i in range(3))
            warm_ratio = statistics.median(run[0] / run[1] for run in runs)
            cold_ratio = statistics.median(run[0] / run[2] for run in runs)
            reference = python_median(scenario, "reference", warm=True)
            alone = kernel_median(scenario)
            allocator = Allocator(list(scenario.slices), _classes())
            step = scenario.steps[-1]
            ours_steps = allocator.allocate(allocator.parse(step.claims),
                                            Ledger.of(step.allocated), scenario.nodes[-1]).nodes
            rows.append(f"| {scenario.name} | {_us(go_ns)} | {_us(warm)} | {_us(cold)} | "
                        f"{_us(reference)} | {_us(alone)} | {warm_ratio:.1f}x | "
                        f"{cold_ratio:.2f}x | {go_ns / alone:.1f}x | "
                        f"{steps_go[-1]} / {ours_steps} |")
    table = "\n".join(rows) + "\n"
    Path(report).write_text(table)
    print("\n" + table)


def _us(ns: float) -> str:
    return f"{ns / 1000:,.1f} µs" if ns < 10_000_000 else f"{ns / 1e6:,.1f} ms"
