"""Differential run: our allocator against the upstream oracle on generated problems.

    .venv/bin/python -m tests.support.differential --count 10000 --seed 1 [--versioned]

Parity mode must agree with the oracle device for device (status, every result,
configs, node selector); topology mode must agree on feasibility. Instances where
the oracle itself errors out are compared by status only (messages differ).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.oracle import Oracle, normalized, oracle_binary, ours
from tests.support.problems import instance


@dataclass
class Report:
    count: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    parity_mismatches: list[tuple[int, Any, Any]] = field(default_factory=list)
    topology_mismatches: list[tuple[int, str, str]] = field(default_factory=list)
    # The oracle hit its time limit (the scheduler's filter timeout): no verdict to
    # compare with; what we answered is counted by status.
    timeouts: Counter[str] = field(default_factory=Counter)
    nodes_oracle: int = 0
    nodes_ours: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.count} instances in {self.seconds:.1f}s; oracle statuses "
                f"{dict(sorted(self.statuses.items()))}; parity mismatches "
                f"{len(self.parity_mismatches)}; topology feasibility mismatches "
                f"{len(self.topology_mismatches)}; oracle timeouts (our answers) "
                f"{dict(self.timeouts)}; search steps oracle {self.nodes_oracle}, "
                f"ours {self.nodes_ours}")


def versioned(problem: dict[str, Any]) -> dict[str, Any]:
    """The problem with each slice, class and claim given a uid and resourceVersion
    derived from its content, as an API server gives each object version its own: our
    caches kept across Allocators (per object version) are then used, and shared by the
    instances that hold the same object."""
    def stamped(obj: dict[str, Any]) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
        return {**obj, "metadata": {**obj.get("metadata", {}), "uid": digest.hexdigest()[:32],
                                    "resourceVersion": "1"}}
    return {**problem, **{key: [stamped(o) for o in problem[key]]
                          for key in ("slices", "classes", "claims")}}


def run(oracle: Oracle, count: int, seed: int, backend: str = "native",
        topology: bool = True, keep: Path | None = None, timeout: float = 2.0,
        with_versions: bool = False) -> Report:
    report = Report()
    start = time.perf_counter()
    for i in range(count):
        rng = random.Random(f"{seed}-{i}")
        problem = instance(rng)
        theirs = oracle.run({**problem, "timeoutSeconds": timeout})
        if with_versions:
            problem = versioned(problem)
        mine = ours(problem, "parity", backend)
        report.count += 1
        report.statuses[theirs["status"]] += 1
        if theirs["status"] == "timeout":
            report.timeouts[mine["status"]] += 1
            continue
        report.nodes_oracle += theirs.get("nodes", 0)
        report.nodes_ours += mine.get("nodes", 0)
        if normalized(theirs) != normalized(mine):
            report.parity_mismatches.append((i, theirs, mine))
            if keep is not None:
                (keep / f"mismatch-{seed}-{i}.json").write_text(json.dumps(problem, indent=1))
        if topology:
            best = ours(problem, "topology", backend)
            if (best["status"] == "allocated") != (theirs["status"] == "allocated"):
                report.topology_mismatches.append((i, theirs["status"], best["status"]))
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backend", choices=["native", "reference"], default="native")
    parser.add_argument("--no-topology", action="store_true")
    parser.add_argument("--keep", type=Path, help="write mismatching instances here")
    parser.add_argument("--versioned", action="store_true",
                        help="give our side's objects a uid and resourceVersion by content")
    args = parser.parse_args(argv)
    binary = oracle_binary()
    if binary is None:
        print("differential: Go is not installed, cannot build the oracle", file=sys.stderr)
        return 2
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with Oracle(binary) as oracle:
        report = run(oracle, args.count, args.seed, args.backend, not args.no_topology,
                     args.keep, with_versions=args.versioned)
    print(report.summary())
    for i, theirs, mine in report.parity_mismatches[:20]:
        print(f"instance {i}: oracle {json.dumps(normalized(theirs))[:400]}\n"
              f"             ours {json.dumps(normalized(mine))[:400]}\n"
              f"             oracle error: {theirs.get('error', '')[:300]}\n"
              f"             our error: {mine.get('error', '')[:300]}")
    for i, theirs_status, best_status in report.topology_mismatches[:20]:
        print(f"instance {i}: oracle {theirs_status}, topology mode {best_status}")
    return 0 if not report.parity_mismatches and not report.topology_mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
