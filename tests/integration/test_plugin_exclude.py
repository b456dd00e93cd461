"""`--exclude-gpus` through the plugin on real sockets (local mode, mock dgx-h100) and the
CLI: an excluded GPU is not in the slice files, a claim that names it (a stale allocation)
fails with an error naming the exclusion while others prepare; with dynamic MIG no MIG
device is created or destroyed on it, not even by the sweep at start; `discover` and
`slices` name it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from driver.cli.main import main
from driver.inventory.discovery import discover
from driver.inventory.exclude import parse_exclusion
from driver.nvml.faults import Fault
from driver.nvml.mock import inject as record
from driver.nvml.mock import mock_provider
from driver.plugin.mig import MigManager
from tests.support.plugin import (
    Node,
    Start,
    cdi_specs,
    live_mig,
    make_claim,
    mig_profile,
    result,
)

GPU0 = "GPU-6493d427-501d-5931-bd3f-97d1981f0fc8"  # dgx-h100 minor 0
GPU1 = "GPU-df0fc3e6-d2c7-5d85-984d-a4c26364deeb"  # minor 1
GPU3 = "GPU-68a37c14-cba3-5893-8527-70e1ada18b19"  # minor 3
PROFILE_1G = 19


def published(node: Node) -> set[str]:
    return {d["name"] for s in node.slices() for d in s["spec"].get("devices", [])}


def test_an_excluded_gpu_is_not_published_and_a_claim_for_it_fails(node: Node,
                                                                    start: Start) -> None:
    running = start("dgx-h100", exclude=parse_exclusion(f"5,{GPU3}"))
    assert published(node) == {f"gpu-{m}" for m in (0, 1, 2, 4, 6, 7)}
    stale = make_claim(node.local, [result("gpu-3")])
    fine = make_claim(node.local, [result("gpu-4")])
    answers = running.kubelet.prepare([stale, fine])
    assert f"device gpu-3 (request gpu) is on GPU {GPU3}, which this node excludes" in \
        answers[stale.uid].error
    assert answers[fine.uid].error == ""
    assert set(cdi_specs(node.cdi_root)) == {fine.uid}
    paths = {n["path"] for d in cdi_specs(node.cdi_root)[fine.uid]["devices"]
             for n in d["containerEdits"]["deviceNodes"]}
    assert "/dev/nvidia4" in paths and "/dev/nvidia3" not in paths


def test_dynamic_mig_leaves_an_excluded_gpu_alone(node: Node, start: Start) -> None:
    profile = mig_profile(node.root / "mig.yaml")  # MIG mode on GPUs 0 and 1
    outside = mock_provider(str(profile), node.mig_state)  # e.g. the device plugin's user
    gpus = {g.uuid: g for g in discover(outside).gpus}
    outside.nvml.nvmlInit()
    for uuid in (GPU0, GPU1):
        gpu = gpus[uuid]
        MigManager(outside).create(gpu, gpu.mig_profiles[0], gpu.mig_profiles[0].placements[2])
    running = start(str(profile), mock_state=node.mig_state, mig_mode="dynamic",
                    exclude=parse_exclusion(GPU0))
    # the sweep at start destroyed the stray on GPU 1 only
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_1G, 2, 1)]}
    assert not any(name.startswith("gpu-0") for name in published(node))
    stale = make_claim(node.local, [result("gpu-0-mig-1g10gb-0", request="mig")])
    assert "which this node excludes" in running.kubelet.prepare([stale])[stale.uid].error
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_1G, 2, 1)]}


def test_discover_marks_the_excluded_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["discover", "--mock", "dgx-h100", "--exclude-gpus", f"3,{GPU0}",
                 "-o", "json"]) == 0
    gpus = json.loads(capsys.readouterr().out)["gpus"]
    assert [g["minor"] for g in gpus if g["excluded"]] == [0, 3]
    assert main(["discover", "--mock", "dgx-h100", "--exclude-gpus", "3"]) == 0
    table = capsys.readouterr().out
    assert f"GPU 3 {GPU3}  EXCLUDED (--exclude-gpus)" in table
    assert "Excluded from this driver (--exclude-gpus): GPU 3 (minor 3)" in table


def test_slices_name_the_excluded_gpus_on_stderr(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXCLUDE_GPUS", "3")
    assert main(["slices", "--mock", "dgx-h100", "-o", "json"]) == 0
    captured = capsys.readouterr()
    names = {d["name"] for s in json.loads(captured.out) for d in s["spec"]["devices"]}
    assert "gpu-3" not in names and "gpu-2" in names
    assert captured.err == ("gpu-dra slices: not published, excluded by --exclude-gpus: "
                            f"gpu-3 ({GPU3})\n")


@pytest.mark.parametrize("command", ["discover", "slices", "allocate"])
def test_an_entry_that_names_no_gpu_is_an_error(command: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--claims", "/nonexistent"] if command == "allocate" else []
    assert main([command, "--mock", "dgx-h100", "--exclude-gpus", "3,8", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"gpu-dra {command}: --exclude-gpus (env EXCLUDE_GPUS): no GPU "
                            "has the minor number or UUID 8 (GPUs: 0, 1, 2, 3, 4, 5, 6, 7)\n")


def test_allocate_refuses_the_list_with_slices_given(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["slices", "--mock", "dgx-h100", "-o", "yaml"]) == 0
    (tmp_path / "slices.yaml").write_text(capsys.readouterr().out)
    assert main(["allocate", "--slices", str(tmp_path / "slices.yaml"), "--claims",
                 str(tmp_path), "--exclude-gpus", "3"]) == 2
    assert "--exclude-gpus applies to this node's GPUs" in capsys.readouterr().err


def test_an_entry_that_may_be_an_unreadable_gpu_is_a_warning_and_that_gpu_is_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lost = mig_profile(tmp_path / "lost.yaml", gpus=(),
                       faults={3: {"nvmlDeviceGetUUID": "GPU_IS_LOST"}})
    assert main(["discover", "--mock", str(lost), "--exclude-gpus", GPU3, "-o", "json"]) == 0
    captured = capsys.readouterr()
    # it may be the GPU named: left alone too, as the plugin leaves it (not published)
    assert [g["minor"] for g in json.loads(captured.out)["gpus"] if g["excluded"]] == [3]
    assert captured.err == (f"gpu-dra discover: warning: --exclude-gpus (env EXCLUDE_GPUS): "
                            f"no GPU has the minor number or UUID {GPU3} (GPUs: 0, 1, 2, 3, 4, "
                            "5, 6, 7); 1 GPU(s) could not be read and may be the ones named\n")


def until(ok: Callable[[], bool], bound: float = 10.0) -> None:
    deadline = time.monotonic() + bound
    while not ok():
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)


def test_rediscovery_keeps_an_excluded_gpu_out_whatever_happens_to_it(
        node: Node, start: Start) -> None:
    """Lost, recovered, removed, added back: the excluded GPU 5 never appears; the served
    GPU 4 that turns unreadable stays published (tainted), even while a UUID entry of the
    list names no GPU (which leaves GPUs of unknown identity alone)."""
    nowhere = "GPU-00000000-0000-0000-0000-000000000000"
    running = start("dgx-h100", mock_state=node.mig_state,
                    exclude=parse_exclusion(f"5,{nowhere}"))
    served = {f"gpu-{m}" for m in (0, 1, 2, 3, 4, 6, 7)}
    assert published(node) == served
    record(node.mig_state, 4, Fault("lost"))
    record(node.mig_state, 5, Fault("lost"))
    for fault in ("", "recover", "remove", "add"):
        if fault:
            record(node.mig_state, 5, Fault(fault))
        running.plugin.rediscover()
        assert running.plugin.state is not None
        assert set(running.plugin.state.published.index) == served, fault  # what it prepares
        until(lambda: published(node) == served)  # the slices, written by the republisher
    until(lambda: any(d["name"] == "gpu-4" and d.get("taints") for s in node.slices()
                      for d in s["spec"].get("devices", [])))
