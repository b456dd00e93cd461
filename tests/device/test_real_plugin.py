"""`gpu-dra plugin` on real NVML: it publishes the GPUs NVML reports, and preparing a
whole GPU writes a CDI spec whose device nodes and driver files exist on this machine.

Read-only on the GPU: static MIG mode and no sharing config, so preparing touches no
GPU setting; the test checks MIG and compute mode are the same afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.device.gpus import gpu_settings
from tests.support.plugin import (
    NODE,
    Kubelet,
    Node,
    cdi_problems,
    cdi_specs,
    make_claim,
    result,
    short_tmp,
    wait_for_socket,
)


@pytest.fixture
def plugin() -> Iterator[tuple[Node, Kubelet]]:
    with short_tmp() as root:
        node = Node(root)
        node.prepare_dirs()
        process = subprocess.Popen(
            [sys.executable, "-m", "driver.cli", "plugin", "--driver-root", "/",
             "--node-name", NODE, "--local-dir", str(node.local),
             "--kubelet-registry-dir", str(node.registry),
             "--plugin-data-dir", str(node.plugin_dir), "--cdi-root", str(node.cdi_root),
             "--mig-mode", "static", "--health-port", "0", "--metrics-port", "0"],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        try:
            wait_for_socket(node.registration_socket, timeout=60)
            kubelet = Kubelet(node.dra_socket, node.registration_socket)
            yield node, kubelet
            kubelet.close()
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        assert not node.registration_socket.exists() and not node.dra_socket.exists()


def test_prepare_a_whole_gpu_writes_a_spec_of_real_files(plugin: tuple[Node, Kubelet]) -> None:
    node, kubelet = plugin
    before = gpu_settings()
    devices = {d["name"]: d for s in node.slices() for d in s["spec"].get("devices", [])}
    uuids = {d["attributes"]["uuid"]["string"]: name
             for name, d in devices.items() if d["attributes"]["type"]["string"] == "gpu"}
    assert set(uuids) <= {uuid for uuid, _, _ in before}
    # A GPU with MIG mode on is offered as its MIG devices in static mode, not whole.
    whole = [uuid for uuid, mig, _ in before if mig != 1]
    if not whole:
        pytest.skip("every GPU has MIG mode on: no whole GPU to prepare")
    assert set(whole) <= set(uuids)
    name = uuids[whole[0]]

    claim = make_claim(node.local, [result(name)])
    answer = kubelet.prepare([claim])[claim.uid]
    assert answer.error == ""
    assert [d["device"] for d in answer.devices] == [name]
    assert answer.devices[0]["cdiDeviceIDs"] == [f"k8s.gpu.dra.dev/claim={claim.uid}-{name}"]

    spec = cdi_specs(node.cdi_root)[claim.uid]
    assert cdi_problems(spec) == []
    edits = [spec.get("containerEdits", {}), *(d["containerEdits"] for d in spec["devices"])]
    nodes = [n.get("hostPath", n["path"]) for e in edits for n in e.get("deviceNodes", [])]
    minor = int(name.removeprefix("gpu-"))
    assert f"/dev/nvidia{minor}" in nodes and "/dev/nvidiactl" in nodes
    assert [n for n in nodes if not Path(n).exists()] == []
    mounts = [m["hostPath"] for e in edits for m in e.get("mounts", [])]
    assert any(Path(m).name.startswith("libnvidia-ml.so.") for m in mounts), mounts
    assert any(Path(m).name == "nvidia-smi" for m in mounts), mounts
    assert [m for m in mounts if not Path(m).exists()] == []

    assert kubelet.unprepare([claim]) == {claim.uid: ""}
    assert cdi_specs(node.cdi_root) == {}
    assert json.loads(node.checkpoint.read_text()).get("claims", {}) == {}
    assert gpu_settings() == before
