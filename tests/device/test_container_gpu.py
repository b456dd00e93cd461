"""A container gets a working GPU from our CDI spec alone: `gpu-dra plugin` on real NVML
prepares a whole GPU, the upstream CDI library (cdi-resolve) edits a `runc spec` config
from the claim's spec, and runc runs it in a minimal root file system made here (busybox,
the CUDA probe tests/support/cuda_probe.c built with this machine's cc, and the host's C
library for it and nvidia-smi; no NVIDIA file but the spec's mounts). In the container,
`nvidia-smi -L` lists the claimed GPU, and the probe, through libcuda.so.1 from the
mounts, initializes CUDA, reads the GPU's name and UUID and allocates and frees 1 MiB.

Read-only on the GPU: static MIG mode, no sharing config; MIG and compute mode read the
same afterwards. runc, cdi-resolve and busybox come from build/device-tools
(scripts/device-tools.sh, carried here) or PATH; the test skips, saying which is missing,
where one is, or where it cannot run containers (not root).
"""

from __future__ import annotations

import pytest

from tests.device.gpus import gpu_settings
from tests.support.container import Tools, container_tools, run_in_container
from tests.support.plugin import (
    NODE,
    Daemon,
    Node,
    cdi_specs,
    make_claim,
    result,
    short_tmp,
)
from tests.support.standin import cdi_resolve

TOOLS = container_tools()
pytestmark = pytest.mark.skipif(isinstance(TOOLS, str), reason=f"no container: {TOOLS}")


def test_a_container_runs_cuda_on_the_claimed_gpu() -> None:
    assert isinstance(TOOLS, Tools)
    before = gpu_settings()
    whole = [uuid for uuid, mig, _ in before if mig != 1]
    if not whole:
        pytest.skip("every GPU has MIG mode on: no whole GPU to prepare")
    with short_tmp() as root:
        node = Node(root)
        daemon = Daemon(node, [
            "plugin", "--driver-root", "/", "--node-name", NODE, "--local-dir", str(node.local),
            "--kubelet-registry-dir", str(node.registry),
            "--plugin-data-dir", str(node.plugin_dir), "--cdi-root", str(node.cdi_root),
            "--mig-mode", "static", "--health-port", "0", "--metrics-port", "0"])
        try:
            names = {d["attributes"]["uuid"]["string"]: d["name"] for s in node.slices()
                     for d in s["spec"].get("devices", [])}
            claim = make_claim(node.local, [result(names[whole[0]])])
            answer = daemon.kubelet.prepare([claim])[claim.uid]
            assert answer.error == ""
            edits = cdi_resolve(TOOLS.cdi_resolve, [node.cdi_root],
                                answer.devices[0]["cdiDeviceIDs"])
            ran = run_in_container(TOOLS, root / "bundle", edits,
                                   "nvidia-smi -L && /cuda-probe")
            assert daemon.kubelet.unprepare([claim]) == {claim.uid: ""}
            assert cdi_specs(node.cdi_root) == {}
        finally:
            assert daemon.stop() == 0

    out = ran.result.stdout.splitlines()
    assert ran.result.returncode == 0, f"{ran.result.stdout}\n{ran.result.stderr}"
    smi = [line for line in out if line.startswith("GPU ")]
    assert len(smi) == 1 and smi[0].endswith(f"(UUID: {whole[0]})"), out
    probe = dict(line.split(" ", 1) for line in out if not line.startswith("GPU "))
    assert probe["devices"] == "1"
    assert probe["uuid"] == whole[0]
    assert probe["name"] and f": {probe['name']} (UUID" in smi[0]
    assert probe["memory"] == "1 MiB allocated and freed"
    assert gpu_settings() == before
