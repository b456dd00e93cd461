"""The upstream oracle (tests/oracle/main.go) as a Python object, and our side of a run.

`oracle_binary()` builds the oracle with Go (cached outside the clone by
build.sh) or returns None where Go is missing. `Oracle` keeps one process and
sends it one instance per line. `ours()` runs the same instance through
driver.allocator and `normalized()` puts both answers in one comparable form.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

from driver.allocator import Allocator, InputError, Ledger, Node
from driver.kube.quantity import parse_quantity
from tests.support.gobuild import built_binary

HERE = Path(__file__).parents[1] / "oracle"  # the Go oracle: build.sh, main.go


def oracle_binary() -> Path | None:
    """The cached oracle (also on a machine without Go), else built now; None when it is
    not cached and Go is missing."""
    return built_binary(HERE / "build.sh")


class Oracle:
    def __init__(self, binary: Path) -> None:
        self._proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, instance: Mapping[str, Any]) -> dict[str, Any]:
        return self.run_line(json.dumps(instance))

    def run_line(self, line: str) -> dict[str, Any]:
        """The answer to one instance already encoded as one line of JSON."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the oracle exited")
        return json.loads(line)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=30)

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ours(instance: Mapping[str, Any], mode: str = "parity", backend: str = "native"
         ) -> dict[str, Any]:
    """Our answer in the oracle's output shape."""
    try:
        allocator = Allocator(instance["slices"], instance["classes"],
                              instance.get("taintRules") or ())
        claims = allocator.parse(instance["claims"])
    except InputError as err:
        return {"status": "error", "error": str(err)}
    node = instance["node"]
    outcome = allocator.allocate(claims, Ledger.of(instance.get("allocated") or []),
                                 Node(node["name"], tuple(sorted((node.get("labels") or {})
                                                                 .items()))),
                                 mode=mode, backend=backend)  # type: ignore[arg-type]
    return {"status": outcome.status, "error": outcome.message,
            "allocations": list(outcome.allocations), "nodes": outcome.nodes}


def normalized(answer: Mapping[str, Any]) -> dict[str, Any]:
    """Status, and for an allocation everything a user sees, shareIDs as presence only
    and quantities by value."""
    status = answer["status"]
    if status != "allocated":
        return {"status": status}
    return {"status": status,
            "allocations": [_allocation(a) for a in answer.get("allocations") or []]}


def _allocation(allocation: Mapping[str, Any]) -> dict[str, Any]:
    devices = allocation.get("devices") or {}
    results = []
    for r in devices.get("results") or []:
        results.append({
            "request": r["request"], "driver": r["driver"], "pool": r["pool"],
            "device": r["device"], "adminAccess": bool(r.get("adminAccess")),
            "tolerations": [{k: v for k, v in t.items() if v not in ("", None)}
                            for t in r.get("tolerations") or []],
            "shared": r.get("shareID") is not None,
            "consumedCapacity": {k: str(_value(v)) for k, v in
                                 sorted((r.get("consumedCapacity") or {}).items())},
            "bindingConditions": list(r.get("bindingConditions") or []),
        })
    configs = [{"source": c.get("source"), "requests": list(c.get("requests") or []),
                "opaque": c.get("opaque")} for c in devices.get("config") or []]
    return {"results": results, "config": configs,
            "nodeSelector": allocation.get("nodeSelector")}


def _value(text: Any) -> Fraction:
    return parse_quantity(str(text))
