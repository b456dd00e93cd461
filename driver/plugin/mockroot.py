"""A mock NVIDIA driver root for `--mock`: files and device nodes a container runtime injects.

With mock NVML the GPUs exist only in the plugin; a CDI spec naming /dev/nvidiactl on a
host without it makes a real runtime fail the container ("failed to stat CDI host device",
reference/real-node.md trap 8). So, unless `--driver-root` is given, the plugin lays out at
start a driver root under its data dir (a hostPath the runtime sees at the same path),
shaped like the H200 capture's (tests/fixtures/nvml/h200-141gb-single/extra.txt): the driver's
libraries in usr/local/nvidia/lib64 as small placeholder files named with the profile's
driver version and their SONAME link chains, usr/local/nvidia/lib -> lib64, links in lib/
as the capture's ldconfig lists them, nvidia-smi and nvidia-persistenced in
usr/local/nvidia/bin (placeholders that fail), nvidia-cuda-mps-control and
nvidia-cuda-mps-server there as working stand-ins (`driver.nvml.mpsstandin`, run by the
interpreter that laid the root out), GSP firmware, proc/devices with the capture's
majors, and a stand-in nvidia-cdi-hook where the GPU operator installs the real one.
Driver-file discovery then takes the same paths on it as on a real node.

Device nodes (dev/): made with mknod where the process may (root or CAP_MKNOD: the chart's
privileged pod, CI), numbered as in the capture, so the spec carries hostPaths the runtime
stats exactly as for a driver container. Where mknod is refused (an unprivileged
`gpu-dra demo`) none are made and the spec's nodes carry type "c", major and minor, which
a runtime creates with no host file (trap 8 saw both work).

Laying out is idempotent: a start that finds the tree as planned writes nothing, and one
that finds it partial (a start killed midway), damaged or of another profile repairs it
under an flock on the root, so two pods of a rolling update starting together agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import shutil
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driver.atomicfile import folder_locked, write_atomically
from driver.nvml import mpsstandin
from driver.plugin.cdi import DeviceNode
from driver.plugin.driverfiles import HostDevices, host_devices
from driver.plugin.modes import SHARED_DIR, make_dir

log = logging.getLogger(__name__)

LIB64 = "usr/local/nvidia/lib64"
HOOK = "usr/local/nvidia/toolkit/nvidia-cdi-hook"  # where the GPU operator installs it
HOOK_LOG = "var/log/nvidia-cdi-hook.log"
PROC_DEVICES = "proc/devices"
NVIDIA_MAJOR, UVM_MAJOR, CAPS_MAJOR = 195, 238, 241  # the capture's /dev and nvidia-caps

# The capture's driver libraries (lib64 listing and ldconfig): name and SONAME suffix; None:
# the SONAME is the versioned file itself (only the .so link points at it).
LIBRARIES: tuple[tuple[str, str | None], ...] = (
    ("libcuda", "1"), ("libcudadebugger", "1"), ("libEGL_nvidia", "0"),
    ("libGLESv1_CM_nvidia", "1"), ("libGLESv2_nvidia", "2"), ("libGLX_nvidia", "0"),
    ("libnvcuvid", "1"), ("libnvidia-allocator", "1"), ("libnvidia-cfg", "1"),
    ("libnvidia-eglcore", None), ("libnvidia-encode", "1"), ("libnvidia-fbc", "1"),
    ("libnvidia-glcore", None), ("libnvidia-glsi", None), ("libnvidia-glvkspirv", None),
    ("libnvidia-gpucomp", None), ("libnvidia-ml", "1"), ("libnvidia-nvvm", "4"),
    ("libnvidia-opencl", "1"), ("libnvidia-opticalflow", "1"),
    ("libnvidia-pkcs11-openssl3", None), ("libnvidia-ptxjitcompiler", "1"),
    ("libnvidia-rtcore", None), ("libnvidia-tls", None), ("libnvoptix", "1"),
    ("libvdpau_nvidia", "1"))
NOT_IN_LIB = ("libnvcuvid", "libnvoptix")  # the capture's ldconfig finds these in lib64 only
BINARIES = ("nvidia-smi", "nvidia-persistenced")
MPS_BINARIES = {"nvidia-cuda-mps-control": "control", "nvidia-cuda-mps-server": "server"}
BIN = "usr/local/nvidia/bin"
FIRMWARE = ("gsp_ga10x.bin", "gsp_tu10x.bin")

HOOK_SCRIPT = """#!/bin/sh
# nvidia-cdi-hook stand-in of the gpu-dra mock driver root: appends one line per call to
# var/log/nvidia-cdi-hook.log of its root (the container id from the OCI state on stdin,
# "-" without one, then its arguments, tab-separated) and does nothing else, whatever the
# command: create-symlinks, enable-cuda-compat, update-ldcache,
# disable-device-node-modification (the plugin uses those a hook binary names).
root=${0%/usr/local/nvidia/toolkit/nvidia-cdi-hook}
id=-
if [ ! -t 0 ]; then
  IFS= read -r state
  case $state in
    *'"id":'*) id=${state#*\\"id\\":}; id=${id# }; id=${id#\\"}; id=${id%%\\"*} ;;
  esac
fi
{ printf '%s' "$id"; printf '\\t%s' "$0" "$@"; printf '\\n'; } >>"$root/var/log/nvidia-cdi-hook.log"
exit 0
"""


@dataclass(frozen=True)
class Dir:
    path: str
    prune: bool = True  # remove what the plan does not list (a GPU of another profile)
    mode: int = 0o755


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Link:
    path: str
    target: str


@dataclass(frozen=True)
class CharDevice:
    path: str
    major: int
    minor: int
    mode: int = 0o666


Entry = Dir | File | Link | CharDevice
Mknod = Callable[[str, int, int], None]


def mock_tree(gpu_minors: Sequence[int], driver_version: str, python: str = sys.executable
              ) -> tuple[Entry, ...]:
    """The mock driver root of a machine with these GPU minors and driver version, each
    directory before what it holds; `python` runs the MPS stand-ins."""
    v = driver_version
    libs: list[Entry] = []
    links_in_lib: list[Entry] = []
    for name, soname in LIBRARIES:
        real = f"{name}.so.{v}"
        libs.append(File(f"{LIB64}/{real}", _placeholder(f"the library {real}"), 0o755))
        chain = [f"{name}.so.{soname}"] if soname else []
        libs += [Link(f"{LIB64}/{link}", real) for link in chain]
        libs.append(Link(f"{LIB64}/{name}.so", chain[0] if chain else real))
        if name not in NOT_IN_LIB:
            links_in_lib += [Link(f"lib/{link}", f"../{LIB64}/{link}")
                             for link in [*chain, f"{name}.so"]]
    nodes = [CharDevice(f"dev/nvidia{m}", NVIDIA_MAJOR, m) for m in sorted(gpu_minors)]
    return (
        Dir("usr"), Dir("usr/local"), Dir("usr/local/nvidia"), Dir(LIB64), *libs,
        Link("usr/local/nvidia/lib", "lib64"),
        File("usr/local/nvidia/version", v.encode()),
        Dir(BIN), *(File(f"{BIN}/{b}", _tool_script(b, v), 0o755) for b in BINARIES),
        *(File(f"{BIN}/{b}", _mps_script(b, role, python), 0o755)
          for b, role in MPS_BINARIES.items()),
        Dir("usr/local/nvidia/toolkit"), File(HOOK, HOOK_SCRIPT.encode(), 0o755),
        Dir("lib"), *links_in_lib, Dir("lib/firmware"), Dir("lib/firmware/nvidia"),
        Dir(f"lib/firmware/nvidia/{v}"),
        *(File(f"lib/firmware/nvidia/{v}/{f}", _placeholder(f"the GSP firmware {f}"))
          for f in FIRMWARE),
        Dir("proc"), File(PROC_DEVICES, _proc_devices()),
        Dir("var"), Dir("var/log", prune=False),  # the hook's log
        Dir("dev"), *nodes,
        CharDevice("dev/nvidiactl", NVIDIA_MAJOR, 255),
        CharDevice("dev/nvidia-uvm", UVM_MAJOR, 0),
        CharDevice("dev/nvidia-uvm-tools", UVM_MAJOR, 1),
        Dir("dev/nvidia-caps"),  # MIG's config and monitor capabilities, as with MIG off
        CharDevice("dev/nvidia-caps/nvidia-cap1", CAPS_MAJOR, 1, 0o400),
        CharDevice("dev/nvidia-caps/nvidia-cap2", CAPS_MAJOR, 2, 0o444),
    )


def _placeholder(what: str) -> bytes:
    return f"gpu-dra mock driver root: a placeholder of {what}, not the real one\n".encode()


def _tool_script(name: str, version: str) -> bytes:
    return (f"#!/bin/sh\necho '{name}: a placeholder of the gpu-dra mock driver root (driver "
            f"{version}): no GPU here' >&2\nexit 1\n").encode()


def _mps_script(name: str, role: str, python: str) -> bytes:
    return (f"#!/bin/sh\n# {name} stand-in of the gpu-dra mock driver root: see "
            f"{mpsstandin.__name__}\nexec {shlex.quote(python)} -m {mpsstandin.__name__} "
            f"{role} \"$@\"\n").encode()


def _proc_devices() -> bytes:
    return (f"Character devices:\n  1 mem\n{NVIDIA_MAJOR} nvidia-frontend\n"
            f"{UVM_MAJOR} nvidia-uvm\n{CAPS_MAJOR} nvidia-caps\n\nBlock devices:\n"
            "  8 sd\n").encode()


def device_numbers(tree: Sequence[Entry]) -> dict[str, tuple[int, int]]:
    """Major and minor of each device node of the tree, by its name under dev/."""
    return {e.path.removeprefix("dev/"): (e.major, e.minor)
            for e in tree if isinstance(e, CharDevice)}


@dataclass(frozen=True)
class NumberedDevices(HostDevices):
    """Device nodes that carry their type, major and minor, so that the runtime creates
    them in the container with no host file to stat (where mknod was refused)."""

    numbers: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def node(self, name: str, *args: Any, **kwargs: Any) -> DeviceNode:
        made = super().node(name, *args, **kwargs)
        if made.major is None and name in self.numbers:
            major, minor = self.numbers[name]
            return dataclasses.replace(made, major=major, minor=minor)
        return made


def mock_devices(root: Path, host_root: Path, tree: Sequence[Entry], nodes_made: bool
                 ) -> HostDevices:
    """The device nodes of specs on the mock root: its dev/ (hostPaths, as for a driver
    container) when its nodes were made, else numbered nodes at /dev."""
    found = host_devices(root, host_root, root / PROC_DEVICES)
    if nodes_made:
        return found
    return NumberedDevices(root / "dev", "/dev", found.caps_major, device_numbers(tree))


def lay_out(root: Path, tree: Sequence[Entry], mknod: Mknod | None = None) -> bool:
    """Make `root` (its parent exists) hold exactly `tree`, the hook's log aside; whether
    its device nodes are there: not where `mknod` (default os.mknod) fails."""
    if all(_matches(root, e) for e in tree):
        return True  # a restart: nothing to write, even on a read-only data dir
    make_dir(root, SHARED_DIR)
    with folder_locked(root):
        nodes = True
        for entry in tree:
            if isinstance(entry, CharDevice) and not nodes:
                continue
            if not _matches(root, entry):
                nodes = _make(root, entry, mknod or os.mknod) and nodes
        _prune(root, tree)
    return nodes


def _matches(root: Path, entry: Entry) -> bool:
    try:
        st = os.lstat(root / entry.path)
    except OSError:
        return False
    if isinstance(entry, Link):
        return stat.S_ISLNK(st.st_mode) and os.readlink(root / entry.path) == entry.target
    if stat.S_IMODE(st.st_mode) != entry.mode:
        return False
    if isinstance(entry, Dir):
        return stat.S_ISDIR(st.st_mode)
    if isinstance(entry, CharDevice):
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(entry.major, entry.minor)
    return stat.S_ISREG(st.st_mode) and (root / entry.path).read_bytes() == entry.content


def _make(root: Path, entry: Entry, mknod: Mknod) -> bool:
    """Replace what is at the entry's path with the entry; False where mknod fails."""
    path = root / entry.path
    if isinstance(entry, Dir) and path.is_dir() and not path.is_symlink():
        os.chmod(path, entry.mode)  # only its mode was wrong: keep what it holds
        return True
    _remove(path)
    if isinstance(entry, Dir):
        path.mkdir(mode=entry.mode)
    elif isinstance(entry, Link):
        path.symlink_to(entry.target)
        return True
    elif isinstance(entry, File):
        write_atomically(path, entry.content, durable=False)
    else:
        try:
            mknod(str(path), entry.mode | stat.S_IFCHR, os.makedev(entry.major, entry.minor))
        except OSError as err:  # EPERM without CAP_MKNOD
            log.info("mock driver root %s: no device nodes (mknod: %s); CDI specs give "
                     "their type, major and minor instead", root, err.strerror)
            return False
    os.chmod(path, entry.mode)  # the umask took bits away (mkdir, mknod; mkstemp's 0600)
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _prune(root: Path, tree: Sequence[Entry]) -> None:
    """Remove what the plan's folders hold beyond it: nodes of GPUs another profile had,
    temp files of a write that was killed."""
    planned = {root / e.path for e in tree}
    for folder in [root, *(root / e.path for e in tree if isinstance(e, Dir) and e.prune)]:
        for path in folder.iterdir():
            if path not in planned:
                _remove(path)


def set_up(root: Path, host_root: Path, gpu_minors: Sequence[int], driver_version: str
           ) -> HostDevices:
    """Lay out (or repair) the mock driver root at `root` for these GPUs; the device nodes
    its specs give."""
    tree = mock_tree(gpu_minors, driver_version)
    return mock_devices(root, host_root, tree, lay_out(root, tree))
