"""Parity with kube-scheduler v1.37.2's allocator on a fixed sample of generated problems.

The oracle (tests/oracle/main.go) is built with Go on first use and cached outside
the clone. The full run is one command (docs/benchmarks.md records its result):

    .venv/bin/python -m tests.support.differential --count 10000 --seed 1
"""

from __future__ import annotations

import json

from tests.support.differential import run
from tests.support.oracle import Oracle, normalized

SAMPLE = 400
SEED = 20260


def test_parity_mode_agrees_with_the_scheduler_device_for_device(oracle: Oracle) -> None:
    report = run(oracle, SAMPLE, SEED)
    assert report.count == SAMPLE
    # The sample exercises every outcome, not only the easy ones.
    assert report.statuses["allocated"] >= SAMPLE // 10
    assert report.statuses["unschedulable"] >= SAMPLE // 10
    assert report.statuses["error"] >= 5
    assert not report.parity_mismatches, "\n".join(
        f"instance {i}:\n oracle {json.dumps(normalized(t))[:600]}\n ours   "
        f"{json.dumps(normalized(m))[:600]}" for i, t, m in report.parity_mismatches[:5])
    assert not report.topology_mismatches
    # Where the scheduler's allocator hits its time limit, ours still decides.
    assert "gave-up" not in report.timeouts
