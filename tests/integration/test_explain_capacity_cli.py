"""`gpu-dra explain --gpu-sharing consumable`: a claim whose memory does not fit in what
the claims before it left is told which GPU, how much is consumed and by how many, and the
most it could ask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.cli.main import main


def claim(name: str, memory: str, count: int = 1) -> dict[str, Any]:
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
                "deviceClassName": "gpu.dra.dev", "count": count,
                "capacity": {"requests": {"memory": memory}}}}]}}}


def test_explain_names_the_gpu_short_of_memory_and_the_most_that_fits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # three 20G claims (19074Mi each on the 1Mi grid) share gpu-0; eight GPUs of 30Gi
    # then find 7 with room
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump_all([*(claim(f"c{i}", "20G") for i in range(3)),
                                        claim("all8", "30Gi", count=8)]))
    code = main(["explain", "--mock", "dgx-h100", "--node-name", "node-1",
                 "--gpu-sharing", "consumable", "--claims", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert out.split("default/all8 on node-1: does not fit\n")[1].splitlines()[:5] == [
        "  - request gpu: 8 devices match class gpu.dra.dev; 1 left out by capacity; "
        "7 free for 8",
        "  - gpu-0: memory 30Gi asked, 81559Mi in all, 57222Mi consumed by 3 claims, "
        "24337Mi free",
        "  nearest change that fits:",
        "  * request gpu: count 7 instead of 8",
        "  * request gpu: memory at most 24337Mi instead of 30Gi"]
