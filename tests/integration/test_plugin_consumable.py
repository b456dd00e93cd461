"""`--gpu-sharing consumable` in local mode: claims sharing one GPU by capacity each get an
MPS daemon of their own whose limits are what the scheduler counted for them
(consumedCapacity), the GPU keeps its compute mode, a share of all the memory is a whole
GPU with no daemon, and a cluster-mode plugin refuses the mode at start."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver.cli.main import main
from tests.integration.test_plugin_mps import (
    alive,
    compute_modes,
    control,
    daemon_pid,
    mock_root,
    no_daemon_left,
)
from tests.support.plugin import (
    Node,
    Running,
    Start,
    cdi_specs,
    gpu_config,
    make_claim,
    opaque,
    result,
)

__all__ = ["no_daemon_left"]  # the autouse fixture: no stand-in daemon outlives a test
GIB = 1 << 30
WHOLE_H100 = "81559Mi"


def share(device: str, memory: str, compute: str = "0") -> dict[str, Any]:
    entry = result(device)
    entry["shareID"] = str(uuid.uuid4())
    entry["consumedCapacity"] = {"memory": memory, "compute": compute}
    return entry


@pytest.fixture
def running(node: Node, start: Start) -> Iterator[Running]:
    yield start(mock_driver_root=mock_root(node), gpu_sharing="consumable")


def test_two_claims_share_a_gpu_each_with_its_own_daemon_and_limits(
        node: Node, running: Running) -> None:
    published = [d for s in node.slices() for d in s["spec"]["devices"]]
    assert published and all(d["allowMultipleAllocations"] for d in published)
    first = make_claim(node.local, [share("gpu-0", "20Gi", "25")])
    second = make_claim(node.local, [share("gpu-0", "30Gi")])
    answers = running.kubelet.prepare([first, second])
    assert {uid: a.error for uid, a in answers.items()} == {first.uid: "", second.uid: ""}
    pids = [daemon_pid(node, c.uid) for c in (first, second)]
    assert len(set(pids)) == 2 and all(alive(p) for p in pids)
    assert control(node, first.uid, "get_default_device_pinned_mem_limit 0") == "20G"
    assert control(node, first.uid, "get_default_active_thread_percentage") == "25.0"
    assert control(node, second.uid, "get_default_device_pinned_mem_limit 0") == "30G"
    # no compute share asked: not limited (MPS's default, 100)
    assert control(node, second.uid, "get_default_active_thread_percentage") == "100.0"
    gpu_0 = running.plugin.state.published.index["gpu-0"].gpu.uuid
    # EXCLUSIVE_PROCESS would let only one claim's daemon on the GPU
    assert compute_modes(running.provider.nvml, gpu_0) == [pynvml.NVML_COMPUTEMODE_DEFAULT]
    specs = cdi_specs(node.cdi_root)
    for claim in (first, second):
        pipe = str(node.plugin_dir / "mps" / claim.uid / "pipe")
        mounts = specs[claim.uid]["devices"][0]["containerEdits"]["mounts"]
        assert mounts[0]["hostPath"] == pipe

    assert running.kubelet.unprepare([first]) == {first.uid: ""}
    assert not alive(pids[0]) and alive(pids[1])  # the other claim's daemon is untouched
    assert running.kubelet.unprepare([second]) == {second.uid: ""}
    assert not alive(pids[1]) and not any((node.plugin_dir / "mps").iterdir())


def test_a_share_of_all_the_memory_is_a_whole_gpu_without_a_daemon(
        node: Node, running: Running) -> None:
    claim = make_claim(node.local, [share("gpu-1", WHOLE_H100)])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert not (node.plugin_dir / "mps" / claim.uid).exists()
    edits = cdi_specs(node.cdi_root)[claim.uid]["devices"][0]["containerEdits"]
    assert "mounts" not in edits and "env" not in edits


def test_a_share_with_a_sharing_config_of_its_own_is_refused(
        node: Node, running: Running) -> None:
    claim = make_claim(node.local, [share("gpu-2", "20Gi")],
                       [opaque(gpu_config(strategy="TimeSlicing"))])
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert "sharing does not apply: the GPU is shared by capacity" in error
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}


def test_a_cluster_mode_plugin_without_pod_settings_refuses_consumable_sharing(
        node: Node, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["plugin", "--mock", "dgx-h100", "--gpu-sharing", "consumable",
                 "--plugin-data-dir", str(tmp_path), "--kubeconfig", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--gpu-sharing consumable (env GPU_SHARING) in a cluster needs " \
        "--pod-namespace and --image" in err
