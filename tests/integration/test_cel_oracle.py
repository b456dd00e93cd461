"""Our CEL against kube-scheduler v1.37.2's (cel-go with the Kubernetes environment, in
the Go oracle's CEL mode) on generated selectors: the same verdict, compile error,
runtime error, true or false, for each.

The sample runs in the normal suite; the full run (several thousand selectors, recorded
in docs/benchmarks.md) is `CEL_DIFFERENTIAL_COUNT=5000 pytest tests/integration/
test_cel_oracle.py` or `.venv/bin/python -m tests.support.celdiff --count 5000 --seed 1`.
"""

from __future__ import annotations

import os

from tests.support.celdiff import TEMPLATES, Report, run
from tests.support.oracle import Oracle

SAMPLE = 400
SEED = 16


def explain(report: Report) -> str:
    return "\n".join(f"{expression}\n  scheduler {theirs}\n  ours      {mine}"
                     for expression, _, theirs, mine in report.mismatches[:10])


def test_generated_selectors_get_the_schedulers_verdict(oracle: Oracle) -> None:
    count = int(os.environ.get("CEL_DIFFERENTIAL_COUNT", SAMPLE))
    report = run(oracle, count, SEED)
    assert report.count == count
    # The sample reaches every verdict, not only compile errors.
    for verdict in ("compile-error", "runtime-error", "true", "false"):
        assert report.verdicts[verdict] >= count // 20, report.summary()
    assert not report.mismatches, f"{report.summary()}\n{explain(report)}"


def test_the_generator_covers_every_library() -> None:
    text = "\n".join(TEMPLATES)
    for function in ("isSorted", "sum", "max", "min", "indexOf", "lastIndexOf", "includes",
                     "find", "findAll", "sets.contains", "sets.equivalent", "sets.intersects",
                     "ip(", "cidr(", "isIP", "isCIDR", "containsIP", "containsCIDR", "url(",
                     "format", "strings.quote", "transformList", "transformMap", "all(i, v",
                     "exists(i, v", "existsOne", "lists.range", "reverse", "distinct",
                     "flatten", "slice", "sort", "sortBy", "quantity", "semver", "cel.bind",
                     ".?", "math.", "base64."):
        assert function in text, function
