"""`gpu-dra plugin --mock` gives mock GPUs a container runtime can inject: its CDI specs
name files that exist in the mock driver root it lays out (device nodes made with mknod,
or numbered in the spec where mknod is refused), and its hook is the stand-in that records
its calls. Where root, runc and cdi-resolve are at hand, a container runc runs from the
spec as the CDI library edits it gets the mock GPU."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from driver.plugin.mockroot import HOOK, HOOK_LOG
from tests.support.container import Tools, container_tools, run_in_container
from tests.support.plugin import (
    Daemon,
    Node,
    Start,
    cdi_problems,
    cdi_specs,
    make_claim,
    result,
)
from tests.support.standin import cdi_resolve

PROFILE, VERSION = "dgx-h100", "535.129.03"
NODES = {"/dev/nvidia3": (195, 3), "/dev/nvidiactl": (195, 255), "/dev/nvidia-uvm": (238, 0),
         "/dev/nvidia-uvm-tools": (238, 1)}  # the H200 capture's numbers, GPU 3's minor


def refuse(path: str, mode: int, device: int) -> None:
    raise PermissionError(1, "Operation not permitted", path)


def prepared_spec(node: Node, kubelet: Any) -> tuple[str, dict[str, Any]]:
    """gpu-3 prepared for a new claim: its CDI device id and the claim's spec."""
    claim = make_claim(node.local, [result("gpu-3")])
    answer = kubelet.prepare([claim])[claim.uid]
    assert answer.error == ""
    spec = cdi_specs(node.cdi_root)[claim.uid]
    assert cdi_problems(spec) == []
    return answer.devices[0]["cdiDeviceIDs"][0], spec


def all_edits(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["containerEdits"], *(d["containerEdits"] for d in spec["devices"])]


def node_numbers(spec: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Each device node's numbers as the runtime takes them: from the spec where it gives
    them (no file needed), else from the host file it stats, which must be a char device."""
    found = {}
    for node in [n for e in all_edits(spec) for n in e.get("deviceNodes", [])]:
        if "major" in node:
            assert node["type"] == "c"
            found[node["path"]] = (node["major"], node["minor"])
        else:
            st = os.stat(node.get("hostPath", node["path"]))
            assert stat.S_ISCHR(st.st_mode), node
            found[node["path"]] = (os.major(st.st_rdev), os.minor(st.st_rdev))
    return found


def test_the_specs_name_files_of_the_mock_driver_root(node: Node) -> None:
    """The plugin as the chart runs it with mockProfile: no --driver-root."""
    daemon = Daemon(node, node.cli_args(PROFILE))
    try:
        _, spec = prepared_spec(node, daemon.kubelet)
    finally:
        assert daemon.stop() == 0
    root = node.plugin_dir / "mock-driver-root"
    assert node_numbers(spec) == NODES
    nodes = [n for e in all_edits(spec) for n in e.get("deviceNodes", [])]
    if os.geteuid() == 0:  # mknod allowed: host paths, as for a driver container
        assert [n.get("hostPath") for n in nodes] == [f"{root}{n['path']}" for n in nodes]
        assert not [n for n in nodes if "major" in n]
    mounts = {m["containerPath"]: Path(m["hostPath"]) for e in all_edits(spec)
              for m in e.get("mounts", [])}
    assert [p for p in mounts.values() if not (p.is_relative_to(root) and p.is_file())] == []
    assert mounts[f"/usr/local/nvidia/lib64/libcuda.so.{VERSION}"] == \
        root / f"usr/local/nvidia/lib64/libcuda.so.{VERSION}"
    assert mounts["/usr/bin/nvidia-smi"] == root / "usr/local/nvidia/bin/nvidia-smi"
    assert f"/lib/firmware/nvidia/{VERSION}/gsp_ga10x.bin" in mounts
    hooks = [h for e in all_edits(spec) for h in e.get("hooks", [])]
    assert {h["path"] for h in hooks} == {str(root / HOOK)}
    assert "update-ldcache" in [h["args"][1] for h in hooks]

    # each hook as runc runs it: the arguments after argv[0], the state on stdin
    state = json.dumps({"ociVersion": "1.3.0", "id": "pod-ctr", "status": "creating",
                        "pid": 1, "bundle": "/run/b"})
    for hook in hooks:
        done = subprocess.run([hook["path"], *hook["args"][1:]], input=state, text=True,
                              capture_output=True, timeout=10)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    lines = (root / HOOK_LOG).read_text().splitlines()
    assert [line.split("\t") for line in lines] == [
        ["pod-ctr", hook["path"], *hook["args"][1:]] for hook in hooks]


def test_where_mknod_is_refused_the_spec_gives_the_numbers(
        node: Node, start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for an unprivileged `gpu-dra demo`: no device nodes in the mock root, so the
    runtime needs no host file."""
    monkeypatch.setattr(os, "mknod", refuse)
    root = node.plugin_dir / "mock-driver-root"
    running = start(PROFILE, mock_driver_root=root)
    _, spec = prepared_spec(node, running.kubelet)
    nodes = [n for e in all_edits(spec) for n in e.get("deviceNodes", [])]
    assert [n for n in nodes if "hostPath" in n or n.get("type") != "c"] == []
    assert node_numbers(spec) == NODES
    assert not (root / "dev/nvidiactl").exists()
    mounts = [Path(m["hostPath"]) for e in all_edits(spec) for m in e.get("mounts", [])]
    assert mounts and [p for p in mounts if not p.is_file()] == []


# --- a container runc runs from the spec -----------------------------------------------------

TOOLS = container_tools()
needs_runc = pytest.mark.skipif(isinstance(TOOLS, str), reason=str(TOOLS))
SCRIPT = f"""stat -c '%n %F %t:%T' {' '.join(NODES)}
cat /usr/local/nvidia/lib64/libcuda.so.{VERSION}
/cuda-probe
echo probe exit $?
"""


@needs_runc
@pytest.mark.parametrize("mknod", ["made", "refused"])
def test_a_container_gets_the_mock_gpu(node: Node, start: Start, mknod: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(TOOLS, Tools)
    if mknod == "refused":
        monkeypatch.setattr(os, "mknod", refuse)
    root = node.plugin_dir / "mock-driver-root"
    running = start(PROFILE, mock_driver_root=root)
    device_id, _ = prepared_spec(node, running.kubelet)
    edits = cdi_resolve(TOOLS.cdi_resolve, [node.cdi_root], [device_id])
    ran = run_in_container(TOOLS, node.root / "bundle", edits, SCRIPT)

    devices = {d["path"]: (d["type"], d["major"], d["minor"])
               for d in ran.config["linux"]["devices"]}
    assert devices == {path: ("c", *numbers) for path, numbers in NODES.items()}
    sources = [m["source"] for m in ran.config["mounts"] if m["source"].startswith(str(root))]
    assert f"{root}/usr/local/nvidia/lib64/libcuda.so.{VERSION}" in sources
    hooks = ran.config["hooks"]["createContainer"]
    assert {h["path"] for h in hooks} == {str(root / HOOK)}

    assert ran.result.returncode == 0, ran.result.stderr
    out = ran.result.stdout.splitlines()
    assert out[:len(NODES)] == [f"{path} character special file {major:x}:{minor:x}"
                                for path, (major, minor) in NODES.items()]
    assert out[len(NODES)].startswith("gpu-dra mock driver root: a placeholder of the "
                                      f"library libcuda.so.{VERSION}")
    # the probe ran on the copied C library; the stand-in hook made no libcuda.so.1 link
    assert out[-1] == "probe exit 2" and "libcuda.so.1" in ran.result.stderr
    logged = [line.split("\t") for line in (root / HOOK_LOG).read_text().splitlines()]
    assert logged == [[ran.id, str(root / HOOK), *h["args"][1:]] for h in hooks]
