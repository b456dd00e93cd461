"""`Allocator(...)` + `explain_all` of one claim over N dgx-h100 nodes, in-process: the
allocator's share of `gpu-dra explain --kubeconfig` without the API server or the lists
(docs/benchmarks.md, explain at 1,000 nodes, second pass). The slices are our builder's
for each node, given a uid and resourceVersion as the API server gives them and decoded
from JSON as the CLI decodes its lists; the collector is off, as in the CLI.

    PYTHONPATH=<checkout> python tests/support/explain_inprocess.py 1000 static-mig nine-gpus

imports `driver` from <checkout>: two checkouts in turn give a before/after pair.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from driver.allocator.allocate import Allocator, Ledger, driver_classes
from driver.allocator.explain import explain_all
from driver.resourceslice.build import SliceOptions, build_slices
from tests.support.claims import resource_claim
from tests.support.plugin import DRIVER
from tests.support.schedcost import LAYOUTS, dgx_h100

CLAIMS = {"gpu": resource_claim("gpu"),
          "nine-gpus": resource_claim("nine-gpus", count=9,
                                      match_attribute=f"{DRIVER}/nvlinkIsland")}


def served_slices(nodes: int, layout_name: str) -> list[dict[str, Any]]:
    """Every node's slices as a list from the API server would give them."""
    layout = LAYOUTS[layout_name]
    inventory = dgx_h100(layout, Path(tempfile.mkdtemp()))
    slices = []
    for i in range(nodes):
        options = SliceOptions(DRIVER, f"node-{i:04d}", layout.mig_mode, layout.counter_layout)
        for j, s in enumerate(build_slices(inventory, options, 1)):
            s["metadata"].update(uid=f"node-{i:04d}-{j}", resourceVersion="1")
            slices.append(s)
    decoded: list[dict[str, Any]] = orjson.loads(orjson.dumps(slices))
    return decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nodes", type=int)
    parser.add_argument("layout", choices=sorted(LAYOUTS))
    parser.add_argument("claim", choices=sorted(CLAIMS))
    args = parser.parse_args()
    slices = served_slices(args.nodes, args.layout)
    claim = {**CLAIMS[args.claim], "metadata": {
        "name": args.claim, "namespace": "default", "uid": "c", "resourceVersion": "1"}}
    gc.disable()
    start = time.perf_counter()
    allocator = Allocator(slices, driver_classes(DRIVER))
    built = time.perf_counter()
    explain_all(allocator, allocator.parse([claim]), Ledger.of([]), allocator.nodes())
    done = time.perf_counter()
    print(f"{args.nodes} {args.layout} {args.claim}: Allocator {built - start:.3f} s, "
          f"explain {done - built:.3f} s, total {done - start:.3f} s")


if __name__ == "__main__":
    main()
