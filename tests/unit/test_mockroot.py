"""The mock driver root `gpu-dra plugin --mock` lays out: the H200 capture's driver files
(tests/fixtures/nvml/h200-141gb-single/extra.txt), device nodes numbered as there, a
layout that a restart, a second plugin at the same time or a refused mknod leaves right."""

from __future__ import annotations

import multiprocessing
import os
import re
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from driver.nvml.mock import load_profile
from driver.plugin import cdi
from driver.plugin.mockroot import (
    HOOK,
    HOOK_LOG,
    LIB64,
    CharDevice,
    Entry,
    File,
    Link,
    lay_out,
    mock_devices,
    mock_tree,
)

VERSION = "580.159.04"
CAPTURE = Path(__file__).resolve().parents[1] / "fixtures/nvml/h200-141gb-single/extra.txt"
can_mknod = pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root (CAP_MKNOD)")


def refuse(path: str, mode: int, device: int) -> None:
    raise PermissionError(1, "Operation not permitted", path)


def listing(root: Path) -> dict[str, str]:
    """Every path under `root`: 'dir', 'file <mode>', '-> target' or 'chr major:minor'."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif stat.S_ISCHR(st.st_mode):
            found[name] = f"chr {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} " \
                          f"{stat.S_IMODE(st.st_mode):o}"
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = f"file {stat.S_IMODE(st.st_mode):o}"
    return found


def test_the_library_folder_is_the_captures() -> None:
    """Same names, same SONAME chains, with the profile's driver version."""
    text = CAPTURE.read_text()
    captured = dict(re.findall(r"^l\S+ .* (lib\S+) -> (\S+)$", text, re.MULTILINE))
    files = set(re.findall(r"^-rwx\S+ .* (lib\S+\.so\.[\d.]+)$", text, re.MULTILINE))
    ldconfig = set(re.findall(r"=> (/\S+)$", text, re.MULTILINE))
    assert len(captured) > 30 and len(files) > 15 and len(ldconfig) > 80
    tree = mock_tree([0], VERSION)
    links = {e.path: e.target for e in tree if isinstance(e, Link)}
    lib64 = {p.removeprefix(f"{LIB64}/"): t for p, t in links.items()
             if p.startswith(f"{LIB64}/")}
    # the capture's listing is cut short after libnvidia-pkcs11-openssl3: what it shows
    assert captured.items() <= lib64.items()
    assert files <= {e.path.removeprefix(f"{LIB64}/") for e in tree
                     if isinstance(e, File) and e.path.startswith(LIB64)}
    # and ldconfig's list has the rest: every driver library path it names exists
    paths = {f"/{e.path}" for e in tree}
    assert {p for p in ldconfig if "/cuda/" not in p} <= paths
    assert links["usr/local/nvidia/lib"] == "lib64"
    assert links["lib/libcuda.so.1"] == "../usr/local/nvidia/lib64/libcuda.so.1"


def test_device_nodes_per_profile() -> None:
    """A node per GPU of the profile at its minor, the control nodes and MIG's config and
    monitor capabilities at the capture's majors."""
    profile = load_profile("dgx-h100")
    tree = mock_tree([g.minor for g in profile.gpus], profile.driverVersion)
    nodes = {e.path: (e.major, e.minor, e.mode) for e in tree if isinstance(e, CharDevice)}
    assert nodes == {
        **{f"dev/nvidia{m}": (195, m, 0o666) for m in range(8)},
        "dev/nvidiactl": (195, 255, 0o666), "dev/nvidia-uvm": (238, 0, 0o666),
        "dev/nvidia-uvm-tools": (238, 1, 0o666),
        "dev/nvidia-caps/nvidia-cap1": (241, 1, 0o400),
        "dev/nvidia-caps/nvidia-cap2": (241, 2, 0o444)}
    assert f"usr/local/nvidia/lib64/libcuda.so.{profile.driverVersion}" in \
        {e.path for e in tree}


@can_mknod
def test_laid_out_with_device_nodes_the_specs_name_them_by_host_path(tmp_path: Path) -> None:
    root = tmp_path / "mock-driver-root"
    tree = mock_tree([0, 3], VERSION)
    assert lay_out(root, tree) is True
    found = listing(root)
    assert found["dev/nvidia3"] == "chr 195:3 666"
    assert found["dev/nvidiactl"] == "chr 195:255 666"
    assert found["dev/nvidia-caps/nvidia-cap1"] == "chr 241:1 400"
    assert found[f"usr/local/nvidia/lib64/libcuda.so.{VERSION}"] == "file 755"
    assert (root / "usr/local/nvidia/lib64/libcuda.so").read_bytes().startswith(b"gpu-dra")
    devices = mock_devices(root, root, tree, nodes_made=True)
    assert devices.node("nvidiactl").to_json() == {
        "path": "/dev/nvidiactl", "hostPath": f"{root}/dev/nvidiactl"}
    assert devices.caps_major == 241  # from the mock root's proc/devices


def test_where_mknod_is_refused_the_specs_give_type_major_and_minor(tmp_path: Path) -> None:
    root = tmp_path / "mock-driver-root"
    tree = mock_tree([0, 3], VERSION)
    assert lay_out(root, tree, mknod=refuse) is False
    assert [p for p, kind in listing(root).items() if kind.startswith("chr")] == []
    assert (root / HOOK).is_file()  # the rest is there
    devices = mock_devices(root, root, tree, nodes_made=False)
    assert devices.node("nvidiactl").to_json() == {
        "path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255}
    assert devices.node("nvidia3").to_json() == {
        "path": "/dev/nvidia3", "type": "c", "major": 195, "minor": 3}
    assert devices.node("nvidia-uvm-tools").to_json()["major"] == 238
    gpu_caps = devices.node("nvidia-caps/nvidia-cap30", devices.caps_major, 30)
    assert gpu_caps.to_json() == {"path": "/dev/nvidia-caps/nvidia-cap30", "type": "c",
                                  "major": 241, "minor": 30}
    spec = cdi.build_spec("gpu.dra.dev", [cdi.CdiDevice("d-gpu-3", (devices.node("nvidia3"),))],
                          cdi.DriverFiles((devices.node("nvidiactl"),)))
    assert spec["cdiVersion"] == "0.3.0" and cdi.spec_problems(spec) == []


@can_mknod
def test_a_restart_writes_nothing_and_repairs_what_was_damaged(tmp_path: Path) -> None:
    root = tmp_path / "mock-driver-root"
    tree = mock_tree([0, 1], VERSION)
    lay_out(root, tree)
    first = listing(root)
    stamps = {p: p.lstat().st_mtime_ns for p in root.rglob("*")}
    assert lay_out(root, tree) is True
    assert {p: p.lstat().st_mtime_ns for p in root.rglob("*")} == stamps

    (root / "dev/nvidia1").unlink()
    (root / "dev/nvidiactl").unlink()
    (root / "dev/nvidiactl").write_text("not a device")
    (root / "usr/local/nvidia/lib64/libcuda.so.1").unlink()
    (root / HOOK).chmod(0o644)
    (root / "usr/local/nvidia/bin/nvidia-smi").write_text("changed")
    (root / "dev/.nvidia0.x.tmp").write_text("")  # a write that was killed
    (root / HOOK_LOG).write_text("a call\n")
    assert lay_out(root, tree) is True
    assert listing(root) == {**first, HOOK_LOG: "file 644"}
    assert (root / HOOK_LOG).read_text() == "a call\n"  # the hook's log is kept


@can_mknod
def test_another_profile_replaces_the_nodes_and_libraries(tmp_path: Path) -> None:
    root = tmp_path / "mock-driver-root"
    lay_out(root, mock_tree(range(8), "535.129.03"))
    assert lay_out(root, mock_tree([0, 1], VERSION)) is True
    found = listing(root)
    assert [p for p in found if re.fullmatch(r"dev/nvidia\d+", p)] == ["dev/nvidia0",
                                                                       "dev/nvidia1"]
    assert not [p for p in found if "535.129.03" in p]
    assert found == listing_of(tmp_path / "fresh", mock_tree([0, 1], VERSION))


def listing_of(root: Path, tree: Sequence[Entry]) -> dict[str, str]:
    """The listing of `tree` laid out afresh at `root`."""
    lay_out(root, tree)
    return listing(root)


def start_at(root: Path) -> bool | str:
    """One plugin's start on the mock root: whether its nodes are there, or its error."""
    try:
        return lay_out(root, mock_tree(range(8), VERSION))
    except Exception as err:  # reported by the assertion, whatever it is
        return repr(err)


@can_mknod
def test_two_plugins_starting_together_make_one_tree(tmp_path: Path) -> None:
    """A rolling update's two pods (four here): all start at once on a fresh node; none
    fails on what another made, and the tree is whole."""
    root = tmp_path / "mock-driver-root"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        assert pool.map(start_at, [root] * 4) == [True] * 4
    assert listing(root) == listing_of(tmp_path / "alone", mock_tree(range(8), VERSION))


def test_the_stand_in_hook_records_each_call_and_does_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "mock-driver-root"
    lay_out(root, mock_tree([0], VERSION), mknod=refuse)
    before = listing(root)
    hook = root / HOOK
    state = '{"ociVersion":"1.3.0","id":"ctr-42","status":"creating","pid":7,"bundle":"/b"}'
    first = subprocess.run([str(hook), "update-ldcache", "--folder", "/usr/local/nvidia/lib64"],
                           input=state, capture_output=True, text=True, timeout=10)
    second = subprocess.run([str(hook), "create-symlinks", "--link", "a b::/c"],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=10)
    assert (first.returncode, first.stdout, first.stderr) == (0, "", "")
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    lines = (root / HOOK_LOG).read_text().splitlines()
    assert [line.split("\t") for line in lines] == [
        ["ctr-42", str(hook), "update-ldcache", "--folder", "/usr/local/nvidia/lib64"],
        ["-", str(hook), "create-symlinks", "--link", "a b::/c"]]
    assert listing(root) == {**before, HOOK_LOG: listing(root)[HOOK_LOG]}
