"""The driver files a claim's containers get, found in a driver root laid out like the real
H200 machine's (shared/fixtures/nvml/h200-141gb-single/extra.txt: libraries in
/usr/local/nvidia/lib64 with their SONAME links, tools in /usr/local/nvidia/bin, device
nodes with nvidia-caps at major 241), the hooks a plugin on it gives containers, and what
it says when nvidia-cdi-hook is missing."""

from __future__ import annotations

import logging
import os
import queue
from pathlib import Path

import pytest

from driver.inventory.model import Gpu
from driver.nvml.mock import mock_provider
from driver.plugin import cdi
from driver.plugin.daemon import Plugin
from driver.plugin.driverfiles import driver_files, host_devices
from tests.support.plugin import (
    PROC_DEVICES,
    Node,
    Start,
    cdi_problems,
    cdi_specs,
    make_claim,
    result,
)

VERSION = "580.159.04"
LIBS = "usr/local/nvidia/lib64"


def driver_root(root: Path, with_dev: bool = True, with_hook: bool = False) -> Path:
    lib = root / LIBS
    lib.mkdir(parents=True)
    for name, soname in [("libcuda", "1"), ("libnvidia-ml", "1"),
                         ("libnvidia-ptxjitcompiler", "1"), ("libnvidia-nvvm", "4"),
                         ("libnvidia-glcore", None), ("libEGL_nvidia", "0")]:
        (lib / f"{name}.so.{VERSION}").write_text("elf")
        if soname:
            os.symlink(f"{name}.so.{VERSION}", lib / f"{name}.so.{soname}")
        os.symlink(f"{name}.so.{soname or VERSION}", lib / f"{name}.so")
    (root / "usr/local/nvidia/bin").mkdir(parents=True)
    for tool in ("nvidia-smi", "nvidia-persistenced"):
        (root / "usr/local/nvidia/bin" / tool).write_text("elf")
    if with_dev:
        (root / "dev").mkdir()
        for node in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia0"):
            (root / "dev" / node).write_text("")
    if with_hook:
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/nvidia-cdi-hook").write_text("elf")
        (root / "usr/bin/nvidia-cdi-hook").chmod(0o755)
    (root / "proc-devices").write_text(PROC_DEVICES)
    return root


def test_libraries_and_tools_are_mounted_from_the_host_path(tmp_path: Path) -> None:
    root = driver_root(tmp_path)
    devices = host_devices(root, Path("/run/nvidia/driver"), root / "proc-devices")
    files = driver_files(root, Path("/run/nvidia/driver"), devices, version=VERSION)
    mounts = {m.container_path: m.host_path for m in files.mounts}
    assert mounts == {
        # every library of the driver's version, and without the hook (none under this
        # root) the host's links to them as the files they lead to
        **{f"/{LIBS}/{n}": f"/run/nvidia/driver/{LIBS}/{n}" for n in (
            f"libcuda.so.{VERSION}", "libcuda.so.1", "libcuda.so",
            f"libnvidia-ml.so.{VERSION}", "libnvidia-ml.so.1", "libnvidia-ml.so",
            f"libnvidia-ptxjitcompiler.so.{VERSION}", "libnvidia-ptxjitcompiler.so.1",
            "libnvidia-ptxjitcompiler.so", f"libnvidia-nvvm.so.{VERSION}",
            "libnvidia-nvvm.so.4", "libnvidia-nvvm.so", f"libnvidia-glcore.so.{VERSION}",
            "libnvidia-glcore.so", f"libEGL_nvidia.so.{VERSION}", "libEGL_nvidia.so.0",
            "libEGL_nvidia.so")},
        "/usr/bin/nvidia-smi": "/run/nvidia/driver/usr/local/nvidia/bin/nvidia-smi",
        "/usr/bin/nvidia-persistenced":
            "/run/nvidia/driver/usr/local/nvidia/bin/nvidia-persistenced"}
    assert files.ldcache_folders == (f"/{LIBS}",)
    assert files.hook is None  # no nvidia-cdi-hook under this root: no hook in the spec


def test_device_nodes_come_from_a_driver_container_when_it_has_them(tmp_path: Path) -> None:
    root = driver_root(tmp_path)
    devices = host_devices(root, Path("/run/nvidia/driver"), root / "proc-devices")
    files = driver_files(root, Path("/run/nvidia/driver"), devices, version=VERSION)
    assert [(n.path, n.host_path) for n in files.device_nodes] == [
        (f"/dev/{n}", f"/run/nvidia/driver/dev/{n}")
        for n in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")]  # no modeset on this machine
    assert devices.caps_major == 241
    gpu = Gpu(index=0, minor=0, uuid="GPU-1", product_name="", brand="", architecture="",
              cuda_compute_capability="9.0", memory_bytes=0, pci_bus_id="", pcie_root=None,
              numa_node=None, mig_enabled=True, mig_pending=False)
    spec = cdi.build_spec("gpu.dra.dev", [cdi.CdiDevice(
        "af6a0f57-3c1e-4f1b-9d2a-0c5b8e7f6a11-gpu-0-mig-1g18gb-0",
        devices.mig_nodes(gpu, (12, 13)))], files)
    assert cdi_problems(spec) == []
    assert spec["cdiVersion"] == "0.5.0"  # hostPath
    assert spec["devices"][0]["containerEdits"]["deviceNodes"][1] == {
        "path": "/dev/nvidia-caps/nvidia-cap12",
        "hostPath": "/run/nvidia/driver/dev/nvidia-caps/nvidia-cap12",
        "type": "c", "major": 241, "minor": 12}


def test_without_a_driver_container_nodes_are_the_hosts_dev(tmp_path: Path) -> None:
    root = driver_root(tmp_path, with_dev=False, with_hook=True)
    (tmp_path / "dev").mkdir()
    devices = host_devices(root, root, root / "no-such-file")
    files = driver_files(root, root, devices)
    assert [n.to_json() for n in files.device_nodes] == [
        {"path": "/dev/nvidiactl"}, {"path": "/dev/nvidia-uvm"}, {"path": "/dev/nvidia-uvm-tools"}]
    assert devices.caps_major is None
    assert files.hook == f"{root}/usr/bin/nvidia-cdi-hook"


def test_an_empty_root_gives_only_the_control_nodes(tmp_path: Path) -> None:
    files = driver_files(tmp_path, tmp_path, host_devices(tmp_path, tmp_path))
    assert files.mounts == () and files.hook is None
    assert [n.path for n in files.device_nodes] == ["/dev/nvidiactl", "/dev/nvidia-uvm",
                                                   "/dev/nvidia-uvm-tools"]


def test_libraries_are_taken_from_where_the_linkers_links_lead(tmp_path: Path) -> None:
    """On the real H200 machine /lib holds only links into /usr/local/nvidia/lib64."""
    root = driver_root(tmp_path)
    (root / "lib").mkdir()
    for name in ("libnvidia-ml.so.1", "libcuda.so.1"):
        os.symlink(f"../{LIBS}/{name}", root / "lib" / name)
    files = driver_files(root, root, host_devices(root, root))
    assert files.ldcache_folders == (f"/{LIBS}",)
    assert f"/{LIBS}/libcuda.so.{VERSION}" in {m.container_path for m in files.mounts}


def test_a_plugin_without_the_hook_says_so_in_its_log_its_metrics_and_a_node_event(
        tmp_path: Path, node: Node, caplog: pytest.LogCaptureFixture) -> None:
    root = driver_root(tmp_path)
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    plugin = Plugin(node.options(driver_root=root), mock_provider("h200-141gb"),
                    node_events=lambda reason, message: events.put((reason, message)))
    with caplog.at_level(logging.WARNING, logger="driver.plugin"):
        plugin.start()
    try:
        assert plugin.metrics.registry.get_sample_value("gpu_dra_cdi_hook_available") == 0
        reason, message = events.get(timeout=10)
        assert reason == "NvidiaCDIHookMissing"
        assert "no nvidia-cdi-hook under the driver root" in message
        assert f"the libraries in /{LIBS} load only where" in message
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [message]
    finally:
        plugin.stop()


def test_a_plugin_with_the_hook_gives_every_container_its_hooks(
        tmp_path: Path, node: Node, start: Start) -> None:
    root = driver_root(tmp_path, with_hook=True)
    running = start("h200-141gb", driver_root=root)
    assert running.plugin.metrics.registry.get_sample_value("gpu_dra_cdi_hook_available") == 1
    claim = make_claim(node.local, [result("gpu-0")])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    spec = cdi_specs(node.cdi_root)[claim.uid]
    assert cdi_problems(spec) == []
    hooks = spec["containerEdits"]["hooks"]
    assert {h["path"] for h in hooks} == {f"{root}/usr/bin/nvidia-cdi-hook"}
    assert [h["args"][1] for h in hooks] == [
        "create-symlinks", "enable-cuda-compat", "update-ldcache",
        "disable-device-node-modification"]
    assert f"libcuda.so.1::/{LIBS}/libcuda.so" in hooks[0]["args"]
    assert hooks[1]["args"][2] == f"--host-driver-version={VERSION}"  # NVML's
