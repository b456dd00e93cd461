"""CDI specs as the container runtime reads them: valid against the official schema, with
the names and the lowest version the CDI rules ask for."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from driver.plugin import cdi
from driver.plugin.cdi import CdiDevice, DeviceNode, DriverFiles, Mount
from tests.support.plugin import cdi_problems

UID = "4f6a0f57-3c1e-4f1b-9d2a-0c5b8e7f6a11"  # starts with a digit
UID_LETTER = "af6a0f57-3c1e-4f1b-9d2a-0c5b8e7f6a11"

FILES = DriverFiles(
    device_nodes=(DeviceNode("/dev/nvidiactl"), DeviceNode("/dev/nvidia-uvm"),
                  DeviceNode("/dev/nvidia-uvm-tools"), DeviceNode("/dev/nvidia-modeset")),
    mounts=(Mount("/usr/local/nvidia/lib64/libcuda.so.580.159.04",
                  "/usr/local/nvidia/lib64/libcuda.so.580.159.04"),
            Mount("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi")),
    ldcache_folders=("/usr/local/nvidia/lib64",),
    hook="/usr/bin/nvidia-cdi-hook")


def whole_gpu(uid: str = UID) -> CdiDevice:
    return CdiDevice(cdi.device_name(uid, "gpu-0"), (DeviceNode("/dev/nvidia0"),))


def mig_device(uid: str = UID) -> CdiDevice:
    return CdiDevice(cdi.device_name(uid, "gpu-1-mig-1g10gb-3"), (
        DeviceNode("/dev/nvidia1"),
        DeviceNode("/dev/nvidia-caps/nvidia-cap219", major=241, minor=219),
        DeviceNode("/dev/nvidia-caps/nvidia-cap220", major=241, minor=220)))


def test_a_claim_spec_with_gpu_and_mig_devices_is_valid() -> None:
    spec = cdi.build_spec("gpu.dra.dev", [whole_gpu(), mig_device()], FILES)
    assert cdi_problems(spec) == []
    assert spec["kind"] == "k8s.gpu.dra.dev/claim"
    assert [d["name"] for d in spec["devices"]] == [f"{UID}-gpu-0", f"{UID}-gpu-1-mig-1g10gb-3"]
    caps = spec["devices"][1]["containerEdits"]["deviceNodes"]
    assert caps[1] == {"path": "/dev/nvidia-caps/nvidia-cap219", "type": "c", "major": 241,
                       "minor": 219}


def test_common_edits_hold_control_nodes_libraries_and_the_ldcache_hook() -> None:
    edits = cdi.build_spec("gpu.dra.dev", [whole_gpu()], FILES)["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == [
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
    assert edits["mounts"][0]["options"] == ["ro", "nosuid", "nodev", "rbind", "rprivate"]
    assert edits["hooks"] == [{"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook",
                               "args": ["nvidia-cdi-hook", "update-ldcache", "--folder",
                                        "/usr/local/nvidia/lib64"]}]
    assert "NVIDIA_VISIBLE_DEVICES=void" in edits["env"]


def test_no_hook_without_the_hook_binary() -> None:
    files = DriverFiles(FILES.device_nodes, FILES.mounts, FILES.ldcache_folders, hook=None)
    assert "hooks" not in cdi.build_spec("gpu.dra.dev", [whole_gpu()], files)["containerEdits"]


@pytest.mark.parametrize(("uid", "files", "version"), [
    (UID_LETTER, FILES, "0.3.0"),  # nothing newer than 0.3.0 used
    (UID, FILES, "0.5.0"),  # a device name starting with a digit
    (UID_LETTER, DriverFiles((DeviceNode("/dev/nvidiactl", host_path="/run/nvidia/driver/dev/"
                                                                      "nvidiactl"),)), "0.5.0"),
])
def test_the_spec_declares_the_lowest_version_its_fields_need(uid: str, files: DriverFiles,
                                                              version: str) -> None:
    spec = cdi.build_spec("gpu.dra.dev", [whole_gpu(uid)], files)
    assert spec["cdiVersion"] == version
    assert cdi_problems(spec) == []


def _with(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    target = out
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    target[last] = value
    return out


@pytest.mark.parametrize(("path", "value", "version"), [
    ("containerEdits.mounts", [{"hostPath": "/a", "containerPath": "/a", "type": "bind"}],
     "0.4.0"),
    ("annotations", {"a": "b"}, "0.6.0"),
    ("devices.0.annotations", {"a": "b"}, "0.6.0"),
    ("kind", "k8s.gpu.dra.dev/claim.v2", "0.6.0"),
    ("containerEdits.additionalGids", [44], "0.7.0"),
    ("containerEdits.intelRdt", {"closID": "x"}, "0.7.0"),
    ("containerEdits.netDevices", [{"hostInterfaceName": "eth1", "name": "net1"}], "1.1.0"),
])
def test_minimum_version_follows_the_cdi_version_rules(path: str, value: Any,
                                                       version: str) -> None:
    base = cdi.build_spec("gpu.dra.dev", [whole_gpu(UID_LETTER)], DriverFiles(()))
    assert base["cdiVersion"] == "0.3.0"
    assert cdi.minimum_version(_with(base, path, value)) == version


@pytest.mark.parametrize(("path", "value", "problem"), [
    ("cdiVersion", "0.9.0", "not a known CDI version"),
    ("cdiVersion", "0.3.0", "lower than 0.5.0"),  # the name starts with a digit
    ("kind", "k8s.gpu.dra.dev", "not <vendor>/<class>"),
    ("kind", "vendor.com/foo/bar", "not <vendor>/<class>"),
    ("kind", "k8s.gpu.dra.dev/" + "c" * 64, "class longer than 63"),
    ("devices.0.name", "-gpu-0", "not a valid CDI device name"),
    ("devices.0.name", "gpu/0", "not a valid CDI device name"),
    ("devices", [], "at least one device"),
])
def test_our_checks_catch_what_the_schema_lets_through(path: str, value: Any,
                                                       problem: str) -> None:
    spec = cdi.build_spec("gpu.dra.dev", [whole_gpu()], FILES)
    problems = cdi_problems(_with(spec, path, value))
    assert any(problem in p for p in problems), problems


def test_device_names_must_be_unique() -> None:
    spec = cdi.build_spec("gpu.dra.dev", [whole_gpu(), whole_gpu()], FILES)
    assert "devices: names are not unique" in cdi.spec_problems(spec)


def test_the_schema_itself_rejects_a_device_without_edits() -> None:
    spec = cdi.build_spec("gpu.dra.dev", [whole_gpu()], FILES)
    del spec["devices"][0]["containerEdits"]
    assert any("containerEdits" in p for p in cdi_problems(spec))


def test_names_the_kubelet_and_the_runtime_see() -> None:
    assert cdi.qualified_name("gpu.dra.dev", f"{UID}-gpu-0") == \
        f"k8s.gpu.dra.dev/claim={UID}-gpu-0"
    assert cdi.spec_file_name("gpu.dra.dev", UID) == f"k8s.gpu.dra.dev-claim_{UID}.json"


def test_host_path_is_written_only_where_it_differs() -> None:
    assert DeviceNode("/dev/nvidia0", host_path="/dev/nvidia0").to_json() == \
        {"path": "/dev/nvidia0"}
    assert DeviceNode("/dev/nvidia0", host_path="/run/nvidia/driver/dev/nvidia0").to_json() == \
        {"path": "/dev/nvidia0", "hostPath": "/run/nvidia/driver/dev/nvidia0"}


def test_the_schema_checks_fields_through_its_definitions_file() -> None:
    spec = cdi.build_spec("gpu.dra.dev", [mig_device()], FILES)
    spec["devices"][0]["containerEdits"]["deviceNodes"][1]["major"] = "241"
    assert any("is not of type 'integer'" in p for p in cdi_problems(spec))
