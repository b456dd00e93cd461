"""The real host reader over a sysfs/procfs tree laid out as on a DGX node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from driver.nvml.real import SysfsHost, sysfs_bus_id


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    devices = tmp_path / "sys/bus/pci/devices"
    devices.mkdir(parents=True)
    real = tmp_path / "sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:18:00.0"
    real.mkdir(parents=True)
    (real / "numa_node").write_text("1\n")
    os.symlink("../../../devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:18:00.0",
               devices / "0000:18:00.0")
    vm = tmp_path / "sys/devices/pci0000:00/0000:00:06.0"
    vm.mkdir(parents=True)
    (vm / "numa_node").write_text("-1\n")
    os.symlink("../../../devices/pci0000:00/0000:00:06.0", devices / "0000:00:06.0")
    caps = tmp_path / "proc/driver/nvidia/capabilities/gpu4/mig/gi7"
    (caps / "ci0").mkdir(parents=True)
    (caps / "access").write_text("DeviceFileMinor: 606\nDeviceFileMode: 292\nDeviceFileModify: 1\n")
    (caps / "ci0/access").write_text("DeviceFileMinor: 607\nDeviceFileMode: 292\n")
    return tmp_path


def test_bus_id_spelling() -> None:
    assert sysfs_bus_id("00000000:18:00.0") == "0000:18:00.0"
    assert sysfs_bus_id("00000001:AB:00.0") == "0001:ab:00.0"


def test_pcie_root_is_the_root_complex_of_the_device_path(host_root: Path) -> None:
    host = SysfsHost(host_root)
    assert host.pcie_root("00000000:18:00.0") == "pci0000:15"
    assert host.pcie_root("00000000:00:06.0") == "pci0000:00"
    assert host.pcie_root("00000000:99:00.0") is None


def test_numa_node_minus_one_means_none(host_root: Path) -> None:
    host = SysfsHost(host_root)
    assert host.numa_node("00000000:18:00.0") == 1
    assert host.numa_node("00000000:00:06.0") is None
    assert host.numa_node("00000000:99:00.0") is None


def test_mig_cap_minors_from_proc(host_root: Path) -> None:
    host = SysfsHost(host_root)
    assert host.mig_minors(4, 7, 0) == (606, 607)
    assert host.mig_minors(4, 7, 1) is None
    assert host.mig_minors(0, 7, 0) is None
