"""NVIDIA's quickstart claims, unchanged (tests/fixtures/nvidia-quickstart, copied from
NVIDIA/k8s-dra-driver-gpu demo/specs/quickstart/v1 with their commit in each file's
header), on a node whose driver is named `gpu.nvidia.com`: `gpu-dra allocate` fits each
on the mock machine it was written for, and the plugin prepares the allocation over real
gRPC with what NVIDIA's driver would give (the whole GPU, one GPU shared by the pods of a
claim, a MIG set on one parent GPU, the time slice, an MPS daemon with the claim's limits).

gpu-test6 is left out: it selects on an `index` attribute that NVIDIA's driver no longer
publishes (deviceinfo.go at that commit has none), so it fits no node of theirs either."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.cli.main import main
from driver.nvml.mpsstandin import PID_FILE
from driver.plugin import cdi
from tests.support.plugin import NODE, Claim, Node, Start, new_uid

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-quickstart"
DRIVER = "gpu.nvidia.com"
LONG = 3  # nvidia-smi compute-policy --set-timeslice value of interval Long


def allocated(name: str, profile: str, *extra: str,
              capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The file's one claim (or template) as `gpu-dra allocate` allocates it."""
    code = main(["allocate", "--mock", profile, "--driver-name", DRIVER, "--node-name", NODE,
                 *extra, "--claims", str(FIXTURES / f"{name}.yaml"), "-o", "json"])
    out = capsys.readouterr().out
    assert code == 0, f"{name} does not fit on {profile}"
    claim: dict[str, Any] = yaml.safe_load(out)
    return claim


def results(claim: dict[str, Any]) -> dict[str, str]:
    return {r["request"]: r["device"] for r in claim["status"]["allocation"]["devices"]["results"]}


@pytest.mark.parametrize(("name", "profile", "extra", "requests"), [
    ("gpu-test1", "dgx-h100", (), {"gpu"}),
    ("gpu-test2", "dgx-h100", (), {"gpu"}),
    ("gpu-test3", "dgx-h100", (), {"gpu"}),
    ("gpu-test4", "a100-mig", (), {"mig-1g-5gb-0", "mig-1g-5gb-1", "mig-2g-10gb", "mig-3g-20gb"}),
    ("gpu-test4", "a100-mig", ("--mig-mode", "dynamic"),
     {"mig-1g-5gb-0", "mig-1g-5gb-1", "mig-2g-10gb", "mig-3g-20gb"}),
    ("gpu-test5", "dgx-h100", (), {"ts-gpu", "mps-gpu"}),
    ("gpu-test-mps", "dgx-h100", (), {"mps-gpu"}),
])
def test_each_quickstart_claim_allocates(name: str, profile: str, extra: tuple[str, ...],
                                        requests: set[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    claim = allocated(name, profile, *extra, capsys=capsys)
    got = results(claim)
    assert set(got) == requests and len(set(got.values())) == len(requests)
    assert {r["driver"] for r in claim["status"]["allocation"]["devices"]["results"]} == {DRIVER}


@pytest.fixture
def mock_root(node: Node) -> Iterator[Path]:
    """The mock driver root (stand-in MPS daemon); no stand-in daemon outlives the test."""
    yield node.plugin_dir / "mock-driver-root"
    for pid_file in (node.plugin_dir / "mps").glob(f"*/pipe/{PID_FILE}"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def stored(node: Node, claim: dict[str, Any]) -> Claim:
    """The allocated claim as the API server would hold it, where the plugin reads it."""
    ref = Claim(claim["metadata"]["namespace"], claim["metadata"]["name"], new_uid())
    claim["metadata"]["uid"] = ref.uid
    path = node.local / "resourceclaims" / ref.namespace / f"{ref.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(claim))
    return ref


def mps_control(root: Path, pipe: Path, command: str) -> str:
    done = subprocess.run([str(root / "usr/local/nvidia/bin/nvidia-cuda-mps-control")],
                          input=command + "\n", capture_output=True, text=True, timeout=30,
                          check=True, env={"PATH": os.environ["PATH"],
                                           "CUDA_MPS_PIPE_DIRECTORY": str(pipe)})
    return done.stdout.strip()


def test_whole_and_shared_gpus_prepare_as_nvidias(node: Node, start: Start, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    running = start(driver=DRIVER)
    first = allocated("gpu-test1", "dgx-h100", capsys=capsys)
    (tmp_path / "running.yaml").write_text(yaml.safe_dump(first))
    whole = stored(node, first)
    shared = stored(node, allocated("gpu-test3", "dgx-h100", "--allocated",
                                    str(tmp_path / "running.yaml"), capsys=capsys))
    answers = running.kubelet.prepare([whole, shared])
    for claim in (whole, shared):
        assert answers[claim.uid].error == ""
        (device,) = answers[claim.uid].devices
        assert device["cdiDeviceIDs"] == [f"k8s.{DRIVER}/claim={claim.uid}-{device['device']}"]
    # the second pod of the shared claim gets the same GPU
    assert running.kubelet.prepare([shared])[shared.uid] == answers[shared.uid]
    assert set(cdi.claim_specs(node.cdi_root, DRIVER)) == {whole.uid, shared.uid}
    assert running.kubelet.unprepare([whole, shared]) == {whole.uid: "", shared.uid: ""}


def test_a_mig_set_on_one_parent_prepares(node: Node, start: Start,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    running = start("a100-mig", driver=DRIVER)
    claim = stored(node, allocated("gpu-test4", "a100-mig", capsys=capsys))
    answer = running.kubelet.prepare([claim])[claim.uid]
    assert answer.error == ""
    index = running.plugin.state.published.index
    devices = {d["requestNames"][0]: d["device"] for d in answer.devices}
    assert devices == results(yaml.safe_load(
        (node.local / "resourceclaims/gpu-test4/mig-devices.yaml").read_text()))
    assert {index[d].gpu.uuid for d in devices.values()} == {index["gpu-0-mig-3g20gb-4"].gpu.uuid}
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}


@pytest.mark.parametrize("name", ["gpu-test5", "gpu-test-mps"])
def test_time_slicing_and_mps_configs_prepare_with_their_settings(
        name: str, node: Node, start: Start, mock_root: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    running = start(driver=DRIVER, mock_driver_root=mock_root)
    claim = stored(node, allocated(name, "dgx-h100", capsys=capsys))
    answer = running.kubelet.prepare([claim])[claim.uid]
    assert answer.error == ""
    devices = {d["requestNames"][0]: d["device"] for d in answer.devices}
    index = running.plugin.state.published.index
    if "ts-gpu" in devices:
        assert running.provider.nvml.timeslices[index[devices["ts-gpu"]].gpu.uuid] == LONG
    pipe = node.plugin_dir / "mps" / claim.uid / "pipe"
    assert mps_control(mock_root, pipe, "get_default_active_thread_percentage") == "50.0"
    assert mps_control(mock_root, pipe, "get_default_device_pinned_mem_limit 0") == "10G"
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert not (node.plugin_dir / "mps" / claim.uid).exists()
