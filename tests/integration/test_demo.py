"""`gpu-dra demo` as a user runs it: a process, its output, its exit code, what it leaves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

STEPS = ("discover", "start plugin", "register", "publish", "allocate", "prepare",
         "cdi spec", "gpu fails", "steer", "gpu recovers", "unprepare", "stop")
CDI_ID = re.compile(r"k8s\.gpu\.dra\.dev/claim=[0-9a-f-]{36}-gpu-\d+")


def demo(*args: str) -> tuple[int, str, str, Path]:
    """Run the demo; its exit code, stdout, stderr and its temporary folder. Fails if any
    process of its session is left behind."""
    process = subprocess.Popen([sys.executable, "-m", "driver.cli", "demo", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, cwd=Path(__file__).parents[2])
    out, err = process.communicate(timeout=120)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    match = re.search(r"folder (\S+)", out)
    return process.returncode, out, err, Path(match.group(1)) if match else Path("/nonexistent")


def step_lines(out: str) -> dict[str, str]:
    return {m.group(1): m.group(0)
            for m in re.finditer(r"^\[\d+/\d+\] (.+?)  (?:\d+\.\d+s|FAILED)  .*$", out,
                                 re.MULTILINE)}


def details(out: str, step: str) -> str:
    """The lines a step printed: its line and the details up to the next step."""
    match = re.search(rf"^\[\d+/\d+\] {step}  .*?(?=^\[|^done in)", out, re.MULTILINE | re.DOTALL)
    assert match, step
    return match.group(0)


def test_the_demo_runs_every_step_and_leaves_nothing() -> None:
    code, out, err, folder = demo()
    assert code == 0, err
    assert list(step_lines(out)) == list(STEPS)
    assert "8 GPUs on mock profile dgx-h100" in out and "NVLink islands" in out
    for claim, device in (("whole-gpu", "gpu-"), ("nvlink-pair", "gpu-"),
                          ("mig-1g", "-mig-1g10gb-"), ("time-sliced", "gpu-")):
        assert re.search(rf"^      demo/{claim}: \S*{device}", out, re.MULTILINE), claim
    assert "demo/too-big: does not fit; explain:" in out
    assert "nearest change that fits" in out
    assert len(set(CDI_ID.findall(out))) == 5  # 1 + 2 + 1 + 1 prepared devices
    assert re.search(r"k8s\.gpu\.dra\.dev/claim=\S+-mig-1g10gb-\d", out)
    assert '"cdiVersion"' in out
    assert folder.name.startswith("gpu-dra-demo-") and not folder.exists()


def test_a_gpu_fails_a_claim_is_steered_around_it_and_the_gpu_comes_back() -> None:
    code, out, err, _ = demo()
    assert code == 0, err
    failed = details(out, "gpu fails")
    # the GPU a new whole-GPU claim would get: the first one the example claims leave
    assert "XID 79 (GPU has fallen off the bus) on gpu-5" in failed
    assert "before the XID: demo/after-xid: gpu-5" in failed
    assert re.search(r"^      gpu-5: gpu\.dra\.dev/xid=79:NoSchedule since \d{4}-\d\d-\d\dT",
                     failed, re.MULTILINE)
    assert "and its 25 MIG placements" in failed
    assert "plugin log: GPU 5 (GPU-" in failed and "xid set (XID 79" in failed
    steered = details(out, "steer")
    assert re.search(r"^      demo/after-xid: gpu-(?!5$)\d$", steered, re.MULTILINE)
    assert "demo/gpu-5-only" in steered and "does not fit" in steered
    assert "xid=79:NoSchedule" in steered  # explain names the taint
    back = details(out, "gpu recovers")
    assert "gpu-5 reset: taints gone from the slices" in back
    assert "allocatable again: demo/after-xid: gpu-5\n" in back
    assert err == ""  # the monitor's log lines are in the steps, not on stderr


def test_keep_leaves_the_folder_to_inspect(tmp_path: Path) -> None:
    code, out, err, folder = demo("--keep", "--profile", "l4-8x")
    try:
        assert code == 0, err
        assert f"folder kept: {folder}" in out
        assert list((folder / "local" / "resourceslices").glob("*.yaml"))
        assert (folder / "local" / "resourceclaims" / "demo" / "whole-gpu.yaml").exists()
        assert not (folder / "plugin" / "dra.sock").exists()
        assert "demo/mig-1g: does not fit" in out  # no MIG on an L4
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=True)


def test_another_profile() -> None:
    code, out, err, folder = demo("--profile", "a100-pcie-4x")
    assert code == 0, err
    assert list(step_lines(out)) == list(STEPS)
    assert "4 GPUs on mock profile a100-pcie-4x" in out
    assert re.search(r"k8s\.gpu\.dra\.dev/claim=\S+-mig-1g5gb-\d", out)
    assert not folder.exists()


def claim(name: str, count: int, config: list[dict] | None = None) -> dict:
    devices: dict = {"requests": [{"name": "gpus", "exactly": {
        "deviceClassName": "gpu.dra.dev", "count": count}}]}
    if config:
        devices["config"] = config
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "team-a"}, "spec": {"devices": devices}}


def test_the_users_own_claims(tmp_path: Path) -> None:
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump_all([claim("four", 4),
                                                              claim("two", 2)]))
    code, out, err, folder = demo("--claims", str(tmp_path))
    assert code == 0, err
    assert "2 of 2 claims allocated" in out
    assert re.search(r"^      team-a/four: gpu-0, gpu-1, gpu-2, gpu-3$", out, re.MULTILINE)
    assert len(set(CDI_ID.findall(out))) == 6
    assert "demo/whole-gpu" not in out
    assert not folder.exists()


def test_a_claim_the_plugin_refuses_fails_the_prepare_step(tmp_path: Path) -> None:
    bad = [{"requests": ["gpus"], "opaque": {"driver": "gpu.dra.dev", "parameters": {
        "apiVersion": "gpu.dra.dev/v1alpha1", "kind": "GpuConfig",
        "sharing": {"strategy": "TimeSlice"}}}}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(claim("typo", 1, bad)))
    code, out, err, folder = demo("--claims", str(tmp_path / "bad.yaml"))
    assert code == 1
    assert "[6/12] prepare  FAILED  team-a/typo:" in out
    assert "step prepare failed" in err and "strategy" in err
    assert not folder.exists()


@pytest.mark.parametrize("args, message", [
    (["--profile", "no-such"], "--profile no-such: no such profile or file"),
    (["--claims", "/no/such/dir"], "--claims /no/such/dir: no such file or directory"),
])
def test_bad_input_exits_2_before_anything_starts(args: list[str], message: str) -> None:
    code, out, err, _ = demo(*args)
    assert (code, out) == (2, "")
    assert message in err
