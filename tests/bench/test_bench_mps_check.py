"""The recurring costs of a prepared MPS claim, one of 8 whole GPUs of the mock dgx-h100,
its daemon the mock driver root's stand-in: the two parts of the plugin's check of it every
2 s (`ensure`), the daemon's answer to `get_server_list` (`running`: a control client
process) and what the compute-mode fix added, that its GPUs are still in EXCLUSIVE_PROCESS
(`hold_exclusive`: claim.json read, one NVML get per GPU), and its Pod's liveness
probe (`gpu-dra mps-daemon --probe`: a Python start-up of the driver's CLI and a control
client, every 10 s per claim).

Run with `pytest tests/bench/test_bench_mps_check.py --benchmark-enable`; the numbers go to
docs/benchmarks.md (p50 is the median; p99 is in each benchmark's extra_info).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from driver.nvml.mock import MockNvml, load_profile
from driver.plugin import mockroot
from driver.plugin.claims import ClaimRef
from driver.plugin.driverfiles import nvml_library
from driver.plugin.mps import EXCLUSIVE_PROCESS, Limits, MpsDaemons, MpsDevice, control_in
from tests.support.plugin import new_uid, short_tmp
from tests.support.plugin_bench import measure

ROUNDS = 50


@dataclass(frozen=True)
class Prepared:
    daemons: MpsDaemons
    uid: str
    driver_root: Path


@pytest.fixture(scope="module")
def prepared() -> Iterator[Prepared]:
    """A claim of the 8 GPUs with its daemon running, stopped at the end."""
    with short_tmp() as root:
        driver_root = root / "driver-root"
        mockroot.set_up(driver_root, driver_root, list(range(8)), "580.65.06")
        nvml = MockNvml(load_profile("dgx-h100"))
        nvml.nvmlInit()
        uuids = [nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(8)]
        daemons = MpsDaemons(root / "mps", control_in(driver_root), nvml_library(driver_root),
                             nvml)
        ref = ClaimRef("default", "bench", new_uid())
        daemons.start(ref, [MpsDevice(f"gpu-{i}", u, u, True) for i, u in enumerate(uuids)],
                      Limits(25, ()))
        try:
            yield Prepared(daemons, ref.uid, driver_root)
        finally:
            assert daemons.stop(ref.uid) == []


CHECKS: dict[str, Callable[[MpsDaemons, str], Any]] = {
    "daemon answers (running)": lambda d, uid: d.running(uid),
    "GPUs still exclusive (hold_exclusive, 8 GPUs)": lambda d, uid: d.hold_exclusive(uid),
}


@pytest.mark.parametrize("check", list(CHECKS))
def test_mps_check_latency(benchmark: BenchmarkFixture, prepared: Prepared, check: str
                           ) -> None:
    def timed() -> None:
        CHECKS[check](prepared.daemons, prepared.uid)

    measure(benchmark, timed, lambda: None, ROUNDS)
    modes = [prepared.daemons.nvml.nvmlDeviceGetComputeMode(
        prepared.daemons.nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(8)]
    assert modes == [EXCLUSIVE_PROCESS] * 8


def test_mps_liveness_probe_latency(benchmark: BenchmarkFixture, prepared: Prepared) -> None:
    command = [sys.executable, "-m", "driver.cli", "mps-daemon", "--probe", "--claim-dir",
               str(prepared.daemons.directory(prepared.uid)), "--driver-root",
               str(prepared.driver_root)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def timed() -> None:
        subprocess.run(command, env=env, check=True, timeout=30)

    measure(benchmark, timed, lambda: None, 20, warmup_rounds=2)
