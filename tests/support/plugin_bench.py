"""Kubelet-side latency benches of a `gpu-dra plugin` process: the claim shapes, the
process with a gRPC client of its socket, and p50/p99 timing with pytest-benchmark.
Shared by the local-directory bench (tests/bench) and the API-server one (tests/e2e)."""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture

import driver
from driver._proto.dra_v1 import api_pb2 as dra_v1
from driver.kube.api import api_request
from tests.support.apiserver import RESOURCE_V1, create, unique
from tests.support.plugin import (
    DRIVER,
    Claim,
    Kubelet,
    Node,
    result,
    short_tmp,
    wait_for_socket,
)

ROUNDS = 200

Shape = list[list[dict[str, Any]]]
"""Each claim's allocation results."""


def shapes(pool: str) -> dict[str, Shape]:
    """The claims of one call, by case; only 8 GPUs exist, so 100 claims share them with
    adminAccess."""
    return {
        "1 claim, 1 GPU": [[result("gpu-0", pool=pool)]],
        "1 claim, 8 GPUs": [[result(f"gpu-{i}", pool=pool) for i in range(8)]],
        "100 claims, 1 GPU each": [[result(f"gpu-{i % 8}", pool=pool, admin=True)]
                                   for i in range(100)],
    }


@dataclass
class Daemon:
    node: Node
    proc: subprocess.Popen[bytes]
    kubelet: Kubelet

    def call(self, method: str, claims: Sequence[Claim]) -> Any:
        request_type = getattr(dra_v1, f"{method}Request")
        request = request_type(claims=[dra_v1.Claim(namespace=c.namespace, name=c.name,
                                                    uid=c.uid) for c in claims])
        response = getattr(self.kubelet.v1, method)(request, timeout=45)
        assert all(not entry.error for entry in response.claims.values()), response
        return response

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)


def cpu_ms(pid: int) -> float:
    """The CPU time (user + system) the process has used so far: unlike the wall time, it
    hardly depends on how loaded the machine is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """The process's resident memory (VmRSS), or its peak so far with ``field="VmHWM"``."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith(f"{field}:")))


OURS = (sys.executable, "-m", "driver.cli")
STARTUP_BASELINE = os.environ.get("GPU_DRA_STARTUP_BASELINE")
"""A checkout whose start-up the start-up benches compare with this one's; unset: none."""
THIS_CHECKOUT = Path(driver.__file__).parents[1]


@contextmanager
def daemon_process(node: Node, args: Sequence[str],
                   program: Sequence[str] = OURS) -> Iterator[Daemon]:
    """`<program> <args>` (ours: `python -m driver.cli`) logging to the node's plugin.log,
    once it answers the kubelet's GetInfo; terminated at the end."""
    with open(node.root / "plugin.log", "wb") as log:
        proc = subprocess.Popen([*program, *args], stdout=log, stderr=log)
    try:
        wait_for_socket(node.registration_socket, alive=lambda: proc.poll() is None)
        kubelet = Kubelet(node.dra_socket, node.registration_socket)
        kubelet.get_info(timeout=10, wait_for_ready=True)
        yield Daemon(node, proc, kubelet)
        kubelet.close()
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def dgx_h100_process() -> Iterator[Daemon]:
    """`gpu-dra plugin --mock dgx-h100` in local mode on a node of its own."""
    with short_tmp() as root:
        node = Node(root)
        with daemon_process(node, node.cli_args("dgx-h100")) as running:
            yield running


def started(node: Node, args: Sequence[str], checkout: Path | None = None,
            ) -> subprocess.Popen[bytes]:
    """`python -m driver.cli <args>` from exec to registered as the kubelet sees it: its
    registration socket answers GetInfo and its DRA socket a (claimless) call. The caller
    stops the process. `checkout`: run that checkout's driver (its working directory)."""
    node.registration_socket.unlink(missing_ok=True)  # the last run's, or a killed one's
    with open(node.root / "plugin.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "driver.cli", *args],
                                stdout=log, stderr=log, cwd=checkout)
    wait_for_socket(node.registration_socket, alive=lambda: proc.poll() is None)
    kubelet = Kubelet(node.dra_socket, node.registration_socket)
    try:
        kubelet.get_info(timeout=10, wait_for_ready=True)
        kubelet.v1.NodePrepareResources(dra_v1.NodePrepareResourcesRequest(), timeout=10,
                                        wait_for_ready=True)
    finally:
        kubelet.close()
    return proc


Start = tuple[Node, list[str]]
"""A plugin's node and command line."""


def bench_startup(benchmark: BenchmarkFixture, next_start: Callable[[], Start],
                  rounds: int = 10) -> None:
    """Time `started` over `rounds` starts (after one untimed), each on the node and with
    the arguments `next_start()` gives (the plugin of the round before stopped, off the
    clock). The driver's bytecode is compiled first, as an installed package has it (a
    checkout run with PYTHONDONTWRITEBYTECODE would compile every module at each start).
    extra_info gets the median CPU time a start used until registered (`cpu_ms`)."""
    compileall.compile_dir(Path(driver.__file__).parent, quiet=1)
    running: list[tuple[Node, subprocess.Popen[bytes]]] = []
    cpu: list[float] = []

    def stop() -> None:
        while running:
            node, proc = running.pop()
            proc.terminate()
            assert proc.wait(30) == 0, (node.root / "plugin.log").read_text()[-2000:]

    def start(node: Node, args: list[str]) -> None:
        running.append((node, started(node, args)))
        cpu.append(cpu_ms(running[-1][1].pid))

    def setup() -> tuple[Start, dict[str, Any]]:
        stop()
        return next_start(), {}

    try:
        benchmark.pedantic(start, setup=setup, rounds=rounds, iterations=1,
                           warmup_rounds=1)
    finally:
        stop()
    record_p99(benchmark)
    benchmark.extra_info["cpu_ms"] = round(statistics.median(cpu[-rounds:]))


@dataclass(frozen=True)
class StartTimes:
    """Of `rounds` starts: exec to registered (ms), and the CPU time each used (ms)."""

    wall: tuple[float, ...]
    cpu: tuple[float, ...]

    def summary(self) -> dict[str, int]:
        wall = sorted(self.wall)
        return {"p50_ms": round(statistics.median(wall)),
                "p99_ms": round(wall[int(0.99 * (len(wall) - 1))]),
                "min_ms": round(wall[0]), "cpu_p50_ms": round(statistics.median(self.cpu))}


def compare_starts(checkouts: Mapping[str, Path], next_start: Callable[[str], Start],
                   rounds: int = 10) -> dict[str, StartTimes]:
    """`started` with each checkout's driver in turn, the order swapped each round, so
    that the machine's load falls on all alike: `rounds` starts of each after one untimed,
    each on the node and with the arguments `next_start(name)` gives (the plugin stopped
    off the clock). Each checkout's bytecode is compiled first, as `bench_startup` does."""
    for checkout in checkouts.values():
        compileall.compile_dir(checkout / "driver", quiet=1)
    wall: dict[str, list[float]] = {name: [] for name in checkouts}
    cpu: dict[str, list[float]] = {name: [] for name in checkouts}
    names = list(checkouts)
    for round_ in range(rounds + 1):
        for name in names if round_ % 2 == 0 else names[::-1]:
            node, args = next_start(name)
            begin = time.perf_counter()
            proc = started(node, args, checkouts[name])
            took, used = (time.perf_counter() - begin) * 1000, cpu_ms(proc.pid)
            proc.terminate()
            assert proc.wait(30) == 0, (node.root / "plugin.log").read_text()[-2000:]
            if round_ > 0:
                wall[name].append(took)
                cpu[name].append(used)
    return {name: StartTimes(tuple(wall[name]), tuple(cpu[name])) for name in checkouts}


def allocated_claim(api: Any, namespace: str, results: list[dict[str, Any]],
                    configs: Sequence[dict[str, Any]] = ()) -> Claim:
    """A ResourceClaim for len(results) GPUs of the driver's class with `configs`, created
    and then allocated to `results` as the scheduler would (PUT of the status subresource,
    the configs copied into the allocation)."""
    admin = all(r.get("adminAccess") for r in results)
    exactly: dict[str, Any] = {"deviceClassName": DRIVER, "count": len(results)}
    if admin:
        exactly["adminAccess"] = True
    path = f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims"
    claim = create(api, path, {
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": unique("claim")},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}],
                             "config": list(configs)}}})
    claim["status"] = {"allocation": {"devices": {"results": results,
                                                  "config": list(configs)}}}
    meta = claim["metadata"]
    api_request(api, "PUT", f"{path}/{meta['name']}/status", claim).expect(200)
    return Claim(namespace, meta["name"], meta["uid"])


def _ms(sorted_seconds: Sequence[float], quantile: float) -> float:
    return round(sorted_seconds[int(quantile * (len(sorted_seconds) - 1))] * 1000, 3)


def record_p99(benchmark: BenchmarkFixture) -> None:
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.rounds:
        benchmark.extra_info["p99_ms"] = _ms(stats.sorted_data, 0.99)


def measure(benchmark: BenchmarkFixture, timed: Callable[[], Any],
            untimed: Callable[[], Any], rounds: int = ROUNDS, warmup_rounds: int = 5) -> None:
    """Time `timed`; `untimed` runs before each round and puts the state back."""

    def setup() -> None:  # pytest-benchmark would take a returned value as arguments
        untimed()

    benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1,
                       warmup_rounds=warmup_rounds)
    record_p99(benchmark)


def bench_prepare(benchmark: BenchmarkFixture, daemon: Daemon, claims: Sequence[Claim],
                  rounds: int = ROUNDS, warmup_rounds: int = 5) -> None:
    """Time NodePrepareResources of `claims` (unprepared before each round and after)."""
    measure(benchmark, lambda: daemon.call("NodePrepareResources", claims),
            lambda: daemon.call("NodeUnprepareResources", claims), rounds, warmup_rounds)
    daemon.call("NodeUnprepareResources", claims)


def bench_unprepare(benchmark: BenchmarkFixture, daemon: Daemon, claims: Sequence[Claim],
                    rounds: int = ROUNDS, warmup_rounds: int = 5) -> None:
    """Time NodeUnprepareResources of `claims` (prepared before each round)."""
    measure(benchmark, lambda: daemon.call("NodeUnprepareResources", claims),
            lambda: daemon.call("NodePrepareResources", claims), rounds, warmup_rounds)


def bench_prepare_in_turn(benchmark: BenchmarkFixture, daemons: Mapping[str, Daemon],
                          claims: Sequence[Claim], rounds: int = ROUNDS,
                          warmup_rounds: int = 5) -> None:
    """NodePrepareResources of `claims` by each of `daemons` in turn, every round (the
    order reversed each round; each unprepares right after, untimed), so that what else
    runs on a shared machine weighs on all of them alike: `<name>_p50_ms`, `<name>_p99_ms`
    and, against the first, `<name>_p50_ratio`, `<name>_p99_ratio` in extra_info. The
    benchmark's own time is of a whole round."""
    times: dict[str, list[float]] = {name: [] for name in daemons}
    order = list(daemons)

    def one_round() -> None:
        for name in order:
            started = time.perf_counter()
            daemons[name].call("NodePrepareResources", claims)
            times[name].append(time.perf_counter() - started)
            daemons[name].call("NodeUnprepareResources", claims)
        order.reverse()

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    first, *others = daemons
    quantiles = {name: (_ms(sorted(values[warmup_rounds:]), 0.5),
                        _ms(sorted(values[warmup_rounds:]), 0.99))
                 for name, values in times.items() if len(values) > warmup_rounds}
    for name, (p50, p99) in quantiles.items():
        benchmark.extra_info[f"{name}_p50_ms"] = p50
        benchmark.extra_info[f"{name}_p99_ms"] = p99
    for name in others:
        if name in quantiles and first in quantiles:
            for i, which in enumerate(("p50", "p99")):
                benchmark.extra_info[f"{first}_{name}_{which}_ratio"] = round(
                    quantiles[first][i] / quantiles[name][i], 2)
