"""`gpu-dra allocate --gpu-sharing consumable`: claims packed onto shared GPUs by the memory
they ask, as our allocator and the upstream one (the oracle) do it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.allocator.allocate import driver_classes
from driver.cli.main import main
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices
from tests.integration.test_readme_claims import as_claim, readme_objects
from tests.support.oracle import Oracle, normalized, ours

MIB = 1 << 20
# 20G (decimal): four fit in an H100's 81559 MiB, a fifth does not; four of 20Gi (81920
# MiB) would not fit at all. Rounded up onto the 1 MiB grid: 19074 MiB.
TWENTY_G = "20G"


def claim(name: str, memory: str | None = None) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": "gpu.dra.dev", "count": 1}
    if memory is not None:
        exactly["capacity"] = {"requests": {"memory": memory}}
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}


def results(out: str) -> list[dict[str, Any]]:
    return [c["status"]["allocation"]["devices"]["results"][0]
            for c in yaml.safe_load_all(out)]


def allocate(tmp_path: Path, capsys: pytest.CaptureFixture[str], *claims: dict[str, Any],
             sharing: list[str]) -> tuple[int, str]:
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump_all(claims))
    code = main(["allocate", "--mock", "dgx-h100", "--node-name", "node-1", *sharing,
                 "--claims", str(path)])
    return code, capsys.readouterr().out


def test_four_claims_of_20g_share_one_h100_and_a_fifth_goes_to_the_next(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = [claim(f"c{i}", TWENTY_G) for i in range(5)] + [claim("whole")]
    code, out = allocate(tmp_path, capsys, *claims,
                         sharing=["--gpu-sharing", "consumable"])
    assert code == 0
    got = results(out)
    assert [r["device"] for r in got] == ["gpu-0"] * 4 + ["gpu-1", "gpu-2"]
    assert len({r["shareID"] for r in got}) == 6
    assert [r["consumedCapacity"] for r in got[:5]] == \
        [{"memory": str(19074 * MIB), "compute": "0"}] * 5
    # no capacity asked: all the memory, so nobody else fits on gpu-2
    assert got[5]["consumedCapacity"]["memory"] == str(81559 * MIB)


def test_the_environment_variable_sets_the_mode_and_exclusive_gives_whole_gpus(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    claims = [claim(f"c{i}", TWENTY_G) for i in range(2)]
    monkeypatch.setenv("GPU_SHARING", "consumable")
    assert [r["device"] for r in results(allocate(tmp_path, capsys, *claims, sharing=[])[1])] \
        == ["gpu-0", "gpu-0"]
    monkeypatch.setenv("GPU_SHARING", "exclusive")
    code, out = allocate(tmp_path, capsys, *claims, sharing=[])
    assert code == 0 and [r["device"] for r in results(out)] == ["gpu-0", "gpu-1"]


def test_the_readmes_20gi_claim_shares_an_h100_three_times(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = next(o for o in readme_objects() if o["metadata"]["name"] == "gpu-20gi")
    claims = [as_claim(template) for _ in range(4)]
    for i, c in enumerate(claims):
        c["metadata"]["name"] = f"c{i}"
    code, out = allocate(tmp_path, capsys, *claims, sharing=["--gpu-sharing", "consumable"])
    assert code == 0
    got = results(out)
    assert [r["device"] for r in got] == ["gpu-0"] * 3 + ["gpu-1"]
    assert got[0]["consumedCapacity"] == {"memory": str(20 << 30), "compute": "25"}


def test_the_upstream_allocator_packs_the_shared_gpus_as_ours_does(oracle: Oracle) -> None:
    slices = build_slices(discover(mock_provider("dgx-h100")),
                          SliceOptions("gpu.dra.dev", "node-1", gpu_sharing="consumable"), 1)
    claims = [claim(f"c{i}", memory) for i, memory in
              enumerate([TWENTY_G] * 5 + ["70Gi", "512Mi", None, "81559Mi"])]
    instance = {"slices": slices, "classes": driver_classes("gpu.dra.dev"), "claims": claims,
                "node": {"name": "node-1", "labels": {}}}
    theirs, mine = oracle.run(instance), ours(instance)
    assert mine["status"] == "allocated"
    assert normalized(theirs) == normalized(mine)
    too_big = {**instance, "claims": [claim("big", "81560Mi")]}  # more than any GPU has
    theirs, mine = oracle.run(too_big), ours(too_big)
    assert mine["status"] == theirs["status"] == "unschedulable"
