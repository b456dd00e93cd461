"""CDI specs as the container runtime reads them: valid against the official schema, with
the names and the lowest version the CDI rules ask for."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from driver.plugin import cdi
from driver.plugin.cdi import (
    IPC_MOUNT_OPTIONS,
    CdiDevice,
    DeviceNode,
    DriverFiles,
    Mount,
    Symlink,
)
from tests.support.plugin import cdi_problems

UID = "4f6a0f57-3c1e-4f1b-9d2a-0c5b8e7f6a11"  # starts with a digit
UID_LETTER = "af6a0f57-3c1e-4f1b-9d2a-0c5b8e7f6a11"

LIB64 = "/usr/local/nvidia/lib64"
FILES = DriverFiles(
    device_nodes=(DeviceNode("/dev/nvidiactl"), DeviceNode("/dev/nvidia-uvm"),
                  DeviceNode("/dev/nvidia-uvm-tools"), DeviceNode("/dev/nvidia-modeset")),
    mounts=(Mount(f"{LIB64}/libcuda.so.580.159.04", f"{LIB64}/libcuda.so.580.159.04"),
            Mount("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi"),
            Mount("/run/nvidia-persistenced/socket", "/run/nvidia-persistenced/socket",
                  IPC_MOUNT_OPTIONS)),
    ldcache_folders=(LIB64,),
    hook="/usr/bin/nvidia-cdi-hook",
    links=(Symlink("libcuda.so.580.159.04", f"{LIB64}/libcuda.so.1"),
           Symlink("libcuda.so.1", f"{LIB64}/libcuda.so")),
    driver_version="580.159.04",
    env=(f"NVIDIA_CTK_LIBCUDA_DIR={LIB64}",))


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


def test_common_edits_hold_control_nodes_files_and_the_toolkits_hooks_in_its_order() -> None:
    edits = cdi.build_spec("gpu.dra.dev", [whole_gpu()], FILES)["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == [
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
    assert [m["options"] for m in edits["mounts"]] == [
        ["ro", "nosuid", "nodev", "rbind", "rprivate"]] * 2 + [
        ["nosuid", "nodev", "rbind", "rprivate", "noexec"]]  # a socket: written to, never run
    assert {h["hookName"] for h in edits["hooks"]} == {"createContainer"}
    assert {h["path"] for h in edits["hooks"]} == {"/usr/bin/nvidia-cdi-hook"}
    assert [h["args"] for h in edits["hooks"]] == [
        ["nvidia-cdi-hook", "create-symlinks",
         "--link", f"libcuda.so.580.159.04::{LIB64}/libcuda.so.1",
         "--link", f"libcuda.so.1::{LIB64}/libcuda.so"],
        ["nvidia-cdi-hook", "enable-cuda-compat", "--host-driver-version=580.159.04"],
        ["nvidia-cdi-hook", "update-ldcache", "--folder", LIB64],
        ["nvidia-cdi-hook", "disable-device-node-modification"]]
    assert edits["env"] == ["NVIDIA_VISIBLE_DEVICES=void", f"NVIDIA_CTK_LIBCUDA_DIR={LIB64}"]


def test_no_hook_without_the_hook_binary() -> None:
    files = dataclasses.replace(FILES, hook=None)
    assert "hooks" not in cdi.build_spec("gpu.dra.dev", [whole_gpu()], files)["containerEdits"]


def test_a_hook_older_than_a_command_is_not_asked_to_run_it() -> None:
    """nvidia-cdi-hook before toolkit 1.17.5 fails a container given enable-cuda-compat."""
    files = dataclasses.replace(FILES, hook_commands=frozenset({"create-symlinks",
                                                                "update-ldcache"}))
    hooks = cdi.build_spec("gpu.dra.dev", [whole_gpu()], files)["containerEdits"]["hooks"]
    assert [h["args"][1] for h in hooks] == ["create-symlinks", "update-ldcache"]


def test_hooks_with_nothing_to_do_are_left_out() -> None:
    files = dataclasses.replace(FILES, links=(), ldcache_folders=(), driver_version=None)
    hooks = cdi.build_spec("gpu.dra.dev", [whole_gpu()], files)["containerEdits"]["hooks"]
    assert [h["args"] for h in hooks] == [["nvidia-cdi-hook", "enable-cuda-compat"],
                                          ["nvidia-cdi-hook", "disable-device-node-modification"]]


def test_nvidia_ctk_runs_the_same_hooks_under_its_hook_command() -> None:
    files = dataclasses.replace(FILES, hook="/usr/bin/nvidia-ctk")
    hooks = cdi.build_spec("gpu.dra.dev", [whole_gpu()], files)["containerEdits"]["hooks"]
    assert hooks[2]["args"] == ["nvidia-ctk", "hook", "update-ldcache", "--folder", LIB64]


def test_a_gpus_drm_nodes_and_their_by_path_links_are_that_devices_own() -> None:
    card = DeviceNode("/dev/dri/card1", links=(
        Symlink("../card1", "/dev/dri/by-path/pci-0000:06:00.0-card"),))
    render = DeviceNode("/dev/dri/renderD128", links=(
        Symlink("../renderD128", "/dev/dri/by-path/pci-0000:06:00.0-render"),))
    gpu = CdiDevice(cdi.device_name(UID_LETTER, "gpu-0"),
                    (DeviceNode("/dev/nvidia0"), card, render))
    spec = cdi.build_spec("gpu.dra.dev", [gpu, mig_device(UID_LETTER)], FILES)
    assert cdi_problems(spec) == []
    whole, mig = (d["containerEdits"] for d in spec["devices"])
    assert whole == {
        "deviceNodes": [{"path": "/dev/nvidia0"}, {"path": "/dev/dri/card1"},
                        {"path": "/dev/dri/renderD128"}],
        "hooks": [{"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook", "args": [
            "nvidia-cdi-hook", "create-symlinks",
            "--link", "../card1::/dev/dri/by-path/pci-0000:06:00.0-card",
            "--link", "../renderD128::/dev/dri/by-path/pci-0000:06:00.0-render"]}]}
    assert "hooks" not in mig
    without_hook = cdi.build_spec("gpu.dra.dev", [gpu], dataclasses.replace(FILES, hook=None))
    assert "hooks" not in without_hook["devices"][0]["containerEdits"]


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


@pytest.mark.parametrize("files", [FILES, DriverFiles((DeviceNode("/dev/nvidiactl"),))])
def test_a_spec_file_holds_the_spec_as_compact_json(files: DriverFiles) -> None:
    """The common edits are encoded once per DriverFiles and spliced in: the file's bytes
    are still exactly the whole spec's JSON, for one device or several."""
    files = dataclasses.replace(files)  # nothing encoded yet
    for devices in ([whole_gpu()], [whole_gpu(), mig_device()]):
        spec = cdi.build_spec("gpu.dra.dev", devices, files)
        assert cdi.encode_spec(spec, files) == json.dumps(spec, separators=(",", ":")).encode()
        assert json.loads(cdi.encode_spec(spec, files)) == spec


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
