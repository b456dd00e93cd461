"""Sharing settings as a claim's containers get them: MPS where this node cannot run the
claim's daemon (a mock NVML with the host's driver root; dynamic MIG) is refused per claim
and leaves nothing behind (MPS itself: test_plugin_mps.py); time slicing runs the driver root's
nvidia-smi as in the pod (a stand-in that only starts where its environment leads the
loader to the root's libnvidia-ml.so.1, tests/support/smi_standin.py), puts Default back
when the last claim holding the GPU's time slice is unprepared, and refuses a claim
asking for another interval than the GPU has."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.plugin import checkpoint
from driver.plugin.checkpoint import ClaimRecord, PreparedDevice
from driver.plugin.driverfiles import nvml_library
from driver.plugin.sharing import tool_environment
from tests.support import smi_standin
from tests.support.plugin import (
    NODE,
    Claim,
    Daemon,
    Node,
    Start,
    cdi_specs,
    gpu_config,
    live_mig,
    make_claim,
    mig_profile,
    new_uid,
    opaque,
    result,
)

GPU2 = "GPU-6a97cacc-c0f8-54b8-97b2-00b046941b54"  # dgx-h100's gpu-2
MPS = gpu_config(strategy="MPS", mpsConfig={"defaultActiveThreadPercentage": 30,
                                            "defaultPinnedDeviceMemoryLimit": "8Gi"})


def sliced(interval: str) -> dict[str, object]:
    return gpu_config(strategy="TimeSlicing", timeSlicingConfig={"interval": interval})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> smi_standin.Built:
    return smi_standin.build(tmp_path_factory.mktemp("smi"))


@pytest.fixture
def root(built: smi_standin.Built, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A driver root with the stand-in nvidia-smi; the plugin's own environment carries a
    secret that nvidia-smi must not get."""
    monkeypatch.setenv("GPU_DRA_TEST_SECRET", "plugin-only")
    yield smi_standin.lay_out(built, tmp_path / "driver-root")


def test_an_mps_claim_is_refused_and_leaves_nothing(node: Node, start: Start) -> None:
    running = start()
    mps = make_claim(node.local, [result("gpu-1"), result("gpu-6", request="shared")],
                     [opaque(sliced("Long"), requests=["gpu"]),
                      opaque(MPS, requests=["shared"])])
    fine = make_claim(node.local, [result("gpu-3")], [opaque(sliced("Short"))])
    answers = running.kubelet.prepare([mps, fine])
    assert answers[mps.uid].error == (
        f"ResourceClaim ns/{mps.name}: device gpu-6 (request shared): sharing strategy MPS "
        "(status.allocation.devices.config[1]) is refused: MPS with a mock NVML needs a "
        "driver root of stand-in tools (--driver-root, or none for the mock's): the host's "
        "nvidia-cuda-mps-control serves real GPUs")
    assert answers[fine.uid].error == ""
    assert set(cdi_specs(node.cdi_root)) == set(node.records()) == {fine.uid}
    gpu_1 = running.plugin.state.published.index["gpu-1"].gpu.uuid
    assert gpu_1 not in running.provider.nvml.timeslices  # its other device untouched
    value = running.plugin.metrics.registry.get_sample_value
    assert value("gpu_dra_claim_errors_total", {"operation": "prepare",
                                                "reason": "unsupported"}) == 1


def test_an_mps_mig_claim_creates_no_mig_device(node: Node, start: Start) -> None:
    running = start(str(mig_profile(node.root / "mig.yaml")), mock_state=node.mig_state,
                    mig_mode="dynamic")
    claim = make_claim(node.local, [result("gpu-0-mig-3g40gb-4", request="mig")], [opaque(
        {"apiVersion": "gpu.dra.dev/v1alpha1", "kind": "MigDeviceConfig",
         "sharing": {"strategy": "MPS"}})])
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert error.endswith("device gpu-0-mig-3g40gb-4 (request mig): sharing strategy MPS "
                          "(status.allocation.devices.config[0]) is refused: not on a MIG "
                          "device created on demand (dynamic MIG), as in NVIDIA's driver")
    assert live_mig(node.mig_state) == {} and cdi_specs(node.cdi_root) == {}
    assert node.records() == {}


def test_the_standin_starts_only_where_its_environment_leads_to_the_roots_nvml(
        root: Path) -> None:
    smi = [str(root / smi_standin.BIN_DIR / "nvidia-smi"), "compute-policy", "-i", GPU2,
           "--set-timeslice", "1"]
    plugins_own = subprocess.run(smi, capture_output=True, text=True, env=dict(os.environ),
                                 check=False)
    assert plugins_own.returncode == 127 and "libnvidia-ml.so.1" in plugins_own.stderr
    library = nvml_library(root)
    assert library is not None
    assert subprocess.run(smi, env=tool_environment(library), check=False).returncode == 0


def test_time_slicing_runs_the_driver_roots_nvidia_smi_with_its_nvml(
        node: Node, start: Start, root: Path) -> None:
    running = start(driver_root=root)
    claim = make_claim(node.local, [result("gpu-2")], [opaque(sliced("Long"))])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert smi_standin.calls(root) == [["compute-policy", "-i", GPU2, "--set-timeslice", "3"]]
    env = smi_standin.environment(root)
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
        "LD_PRELOAD": f"{root}/{smi_standin.LIB_DIR}/libnvidia-ml.so.{smi_standin.VERSION}"}
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert smi_standin.calls(root)[1:] == [["compute-policy", "-i", GPU2, "--set-timeslice",
                                            "0"]]


def test_a_plugin_process_with_a_driver_root_runs_its_nvidia_smi(node: Node,
                                                                 root: Path) -> None:
    """`gpu-dra plugin --mock ... --driver-root DIR`: the mock GPUs, the root's tools."""
    daemon = Daemon(node, node.cli_args("dgx-h100", "--driver-root", str(root)))
    try:
        claim = make_claim(node.local, [result("gpu-2")], [opaque(sliced("Short"))])
        assert daemon.kubelet.prepare([claim])[claim.uid].error == ""
        assert daemon.kubelet.unprepare([claim]) == {claim.uid: ""}
    finally:
        assert daemon.stop() == 0
    assert [c[-1] for c in smi_standin.calls(root)] == ["1", "0"]
    assert "GPU_DRA_TEST_SECRET" not in smi_standin.environment(root)


def test_without_nvidia_smi_under_the_root_a_time_sliced_claim_fails_cleanly(
        node: Node, start: Start, root: Path) -> None:
    (root / smi_standin.BIN_DIR / "nvidia-smi").unlink()
    running = start(driver_root=root)
    claim = make_claim(node.local, [result("gpu-2")], [opaque(sliced("Long"))])
    assert running.kubelet.prepare([claim])[claim.uid].error == \
        "time slicing needs nvidia-smi, which is not under the driver root"
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}


def held_by_another(node: Node, interval: str) -> Claim:
    """A checkpoint in which another claim holds gpu-2's time slice, adminAccess so that a
    new claim may get the GPU too (this version's GPUs are held whole, and adminAccess sets
    no time slice: such a record is another release's or a hand edit's; GPUs shared by
    capacity will be the way two claims set one GPU's)."""
    other = Claim("ns", "other", new_uid())
    device = PreparedDevice(("gpu",), NODE, "gpu-2", (), GPU2, admin_access=True,
                            timeslice=interval)
    node.plugin_dir.mkdir(parents=True, exist_ok=True)
    node.prepare_dirs()
    checkpoint.save(node.checkpoint, checkpoint.Checkpoint(
        boot_id=node.boot_id.read_text().strip(),
        claims={other.uid: ClaimRecord(other.uid, other.namespace, other.name,
                                       "PrepareCompleted", (device,))}))
    return other


def test_another_interval_on_a_gpu_is_refused_and_default_waits_for_the_last_claim(
        node: Node, start: Start, root: Path) -> None:
    other = held_by_another(node, "Long")
    running = start(driver_root=root)  # the rule holds for what the checkpoint holds
    short = make_claim(node.local, [result("gpu-2")], [opaque(sliced("Short"))])
    assert running.kubelet.prepare([short])[short.uid].error == (
        f"cannot prepare ResourceClaim ns/{short.name}: device gpu-2 asks for time slice "
        f"Short, but its GPU {GPU2} has time slice Long for ResourceClaim ns/other "
        f"({other.uid}): a GPU has one time slice, kept until the last claim that set it "
        "is unprepared")
    assert smi_standin.calls(root) == [] and set(node.records()) == {other.uid}
    same = make_claim(node.local, [result("gpu-2")], [opaque(sliced("Long"))])
    assert running.kubelet.prepare([same])[same.uid].error == ""
    assert running.kubelet.unprepare([same]) == {same.uid: ""}
    assert [c[-1] for c in smi_standin.calls(root)] == ["3"]  # kept for the other claim
    assert running.kubelet.unprepare([other]) == {other.uid: ""}
    assert [c[-1] for c in smi_standin.calls(root)] == ["3", "0"]  # the last one: Default


def test_two_claims_unprepared_together_put_default_back(
        node: Node, start: Start, root: Path) -> None:
    other = held_by_another(node, "Medium")
    running = start(driver_root=root)
    same = make_claim(node.local, [result("gpu-2")], [opaque(sliced("Medium"))])
    assert running.kubelet.prepare([same])[same.uid].error == ""
    assert running.kubelet.unprepare([same, other]) == {same.uid: "", other.uid: ""}
    assert smi_standin.calls(root)[-1][-1] == "0"
