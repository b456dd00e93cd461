"""Real discovery against the machine's own nvidia-smi (read-only queries only)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.nvml.real import real_provider


def smi(*args: str) -> str:
    return subprocess.run(["nvidia-smi", *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout


@pytest.fixture(scope="module")
def inventory() -> Inventory:
    return discover(real_provider())


@pytest.fixture(scope="module")
def smi_xml() -> ET.Element:
    return ET.fromstring(smi("-q", "-x"))


def smi_gpu(root: ET.Element, bus_id: str) -> ET.Element:
    for gpu in root.findall("gpu"):
        if gpu.get("id", "").lower() == bus_id.lower():
            return gpu
    raise AssertionError(f"nvidia-smi has no GPU {bus_id}")


def text(element: ET.Element, path: str) -> str:
    found = element.find(path)
    assert found is not None and found.text is not None, path
    return found.text.strip()


def test_versions(inventory: Inventory, smi_xml: ET.Element) -> None:
    assert inventory.driver_version == text(smi_xml, "driver_version")
    assert inventory.cuda_driver_version == text(smi_xml, "cuda_version")
    assert len(inventory.gpus) == int(text(smi_xml, "attached_gpus"))


def test_identity_matches_nvidia_smi(inventory: Inventory, smi_xml: ET.Element) -> None:
    for gpu in inventory.gpus:
        assert gpu.healthy, gpu.health_error
        node = smi_gpu(smi_xml, gpu.pci_bus_id)
        assert gpu.uuid == text(node, "uuid")
        assert gpu.product_name == text(node, "product_name")
        assert gpu.architecture == text(node, "product_architecture")
        assert gpu.minor == int(text(node, "minor_number"))
        total_mib = int(text(node, "fb_memory_usage/total").split()[0])
        # nvidia-smi's FB total leaves out memory the driver reserves: NVML's total is larger.
        assert total_mib <= gpu.memory_bytes // 2**20 <= total_mib + 2048
        assert gpu.mig_enabled == (text(node, "mig_mode/current_mig") == "Enabled")
        assert gpu.mig_pending == (text(node, "mig_mode/pending_mig") == "Enabled")


def test_minor_is_the_device_node(inventory: Inventory) -> None:
    for gpu in inventory.gpus:
        node = os.stat(f"/dev/nvidia{gpu.minor}")
        assert stat.S_ISCHR(node.st_mode)
        assert os.major(node.st_rdev) == 195
        assert os.minor(node.st_rdev) == gpu.minor


def parse_lgip(output: str) -> dict[tuple[int, int], tuple[str, int, float, int]]:
    """(gpu, profile id) -> (name, total instances, memory GiB, SMs) from `mig -lgip`."""
    rows = {}
    pattern = re.compile(
        r"^\|\s+(\d+)\s+MIG\s+(\S+)\s+(\d+)\s+\d+/(\d+)\s+([\d.]+)\s+\w+\s+(\d+)", re.MULTILINE)
    for m in pattern.finditer(output):
        rows[(int(m[1]), int(m[3]))] = (m[2], int(m[4]), float(m[5]), int(m[6]))
    return rows


def parse_lgipp(output: str) -> dict[tuple[int, int], list[tuple[int, int]]]:
    rows = {}
    pattern = re.compile(r"GPU\s+(\d+)\s+Profile ID\s+(\d+)\s+Placements?\s*:\s*\{([\d,]+)\}:(\d+)")
    for m in pattern.finditer(output):
        rows[(int(m[1]), int(m[2]))] = [(int(s), int(m[4])) for s in m[3].split(",")]
    return rows


def test_mig_profiles_match_lgip_and_lgipp(inventory: Inventory) -> None:
    mig_capable = [gpu for gpu in inventory.gpus if gpu.mig_profiles]
    if not mig_capable:
        pytest.skip("no MIG-capable GPU on this machine")
    lgip = parse_lgip(smi("mig", "-lgip"))
    lgipp = parse_lgipp(smi("mig", "-lgipp"))
    for gpu in mig_capable:
        ours = {p.id: p for p in gpu.mig_profiles}
        theirs = {pid: row for (index, pid), row in lgip.items() if index == gpu.index}
        assert set(ours) == set(theirs)
        for pid, (name, instances, memory_gib, sms) in theirs.items():
            profile = ours[pid]
            assert profile.name == name
            assert profile.instance_count == instances
            assert abs(profile.memory_mb / 1024 - memory_gib) < 0.01
            assert profile.multiprocessors == sms
            assert [(p.start, p.size) for p in profile.placements] == lgipp[(gpu.index, pid)]


def test_live_mig_devices_match_nvidia_smi(inventory: Inventory) -> None:
    listed = smi("-L")
    for gpu in inventory.gpus:
        for device in gpu.mig_devices:
            assert device.uuid in listed
            caps = Path(f"/proc/driver/nvidia/capabilities/gpu{gpu.minor}/mig/gi{device.gi_id}")
            assert device.gi_cap_minor is not None and caps.exists()
