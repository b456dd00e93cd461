"""Find, once at start, the NVIDIA driver files a container needs and the device nodes,
as NVIDIA's container toolkit (nvcdi) finds them for a spec of its own.

The plugin sees the driver install at `driver_root` (e.g. /driver-root in the pod); the
container runtime, on the host, sees the same files under `host_driver_root` (e.g. / or
/run/nvidia/driver), so paths found here are rewritten for the spec. Links inside the root
are followed as the host follows them (an absolute target stays inside the root). Device
nodes live under the driver root when a driver container provides them (it has
dev/nvidiactl), else under the host's /dev.

What a container gets: every library named with the driver's version (compute, utility,
video, graphics) in the folders where the driver's libraries are, and the few without it
(EGL platform libraries, legacy NVVM), mounted at their own paths; the GSP firmware; the
tools; the graphics configs (EGL, Vulkan, OpenCL, X) where present; the IPC sockets of
running daemons; and nvidia-cdi-hook's hooks, which create the links the libraries are
known by (libcuda.so.1, libcuda.so, ...) and run ldconfig on their folders. Without the
hook the host's own links are mounted as files instead, so libcuda.so.1 is still there,
but the folders reach the loader only through the image's LD_LIBRARY_PATH.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from driver.inventory.model import Gpu
from driver.nvml.real import LIBRARY, LIBRARY_DIRS, sysfs_bus_id
from driver.plugin.cdi import (
    HOOK_COMMANDS,
    IPC_MOUNT_OPTIONS,
    LIBRARY_MOUNT_OPTIONS,
    DeviceNode,
    DriverFiles,
    Mount,
    Symlink,
)

# Where distributions, the GPU operator and cloud images put the driver's libraries.
LIBRARY_SEARCH = (*LIBRARY_DIRS, "usr/local/nvidia/lib64", "usr/local/nvidia/lib",
                  "usr/lib/nvidia", "usr/lib/x86_64-linux-gnu/nvidia/current",
                  "usr/lib/aarch64-linux-gnu/nvidia/current", "lib/x86_64-linux-gnu",
                  "lib/aarch64-linux-gnu")
# Links that lead to the libraries' real folder wherever it is (e.g. /lib -> lib64).
ANCHORS = ("libcuda.so.1", LIBRARY)
# Driver libraries without the driver's version in their name.
UNVERSIONED = ("libnvidia-egl-gbm.so.*.*", "libnvidia-egl-wayland.so.*.*",
               "libnvidia-egl-wayland2.so.*.*", "libnvidia-egl-xcb.so.*.*",
               "libnvidia-egl-xlib.so.*.*", "libnvidia-nvvm70.so.*")
# Graphics configs found under etc, usr/local/share or usr/share (the first found), mounted
# where the loaders in any image look: (name, container folder).
CONFIGS = (*((name, "/usr/share") for name in (
    "glvnd/egl_vendor.d/10_nvidia.json", "egl/egl_external_platform.d/15_nvidia_gbm.json",
    "egl/egl_external_platform.d/10_nvidia_wayland.json",
    "egl/egl_external_platform.d/09_nvidia_wayland2.json",
    "egl/egl_external_platform.d/20_nvidia_xcb.json",
    "egl/egl_external_platform.d/20_nvidia_xlib.json", "nvidia/nvoptix.bin",
    "X11/xorg.conf.d/10-nvidia.conf", "X11/xorg.conf.d/nvidia-drm-outputclass.conf")),
           ("OpenCL/vendors/nvidia.icd", "/etc"))
CONFIG_SEARCH = ("etc", "usr/local/share", "usr/share")
# Vulkan's files may also be at the root itself (GKE: <root>/vulkan/icd.d).
VULKAN = ("vulkan/icd.d/nvidia_icd.json", "vulkan/icd.d/nvidia_layers.json",
          "vulkan/implicit_layer.d/nvidia_layers.json",
          f"vulkan/icd.d/nvidia_icd.{platform.machine()}.json")
BINARY_SEARCH = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin",
                 "usr/local/nvidia/bin")
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced",
            "nvidia-cuda-mps-control", "nvidia-cuda-mps-server", "nvidia-imex",
            "nvidia-imex-ctl", "nvidia-xconfig")
XORG_MODULES = ("nvidia/xorg", "xorg/modules/drivers", "xorg/modules/extensions",
                "xorg/modules/updates/drivers", "xorg/modules/updates/extensions")
# The kernel's firmware folders (drivers/base/firmware_loader), and where the H200
# machine's driver install keeps its own (shared/fixtures/nvml/h200-141gb-single).
FIRMWARE_SEARCH = ("lib/firmware/updates/{kernel}", "lib/firmware/updates",
                   "lib/firmware/{kernel}", "lib/firmware", "usr/local/nvidia/firmware")
SOCKETS = ("nvidia-persistenced/socket", "nvidia-fabricmanager/socket")
MPS_PIPES = "tmp/nvidia-mps"
HOOK = "nvidia-cdi-hook"
GPU_OPERATOR_TOOLKIT = "usr/local/nvidia/toolkit"  # where the GPU operator installs it
HOOK_SEARCH = (*BINARY_SEARCH, GPU_OPERATOR_TOOLKIT)
# Commands added to nvidia-cdi-hook after the first releases (toolkit 1.17.5 and 1.17.8): a
# hook that lacks one fails every container, so each is used only where the binary names it.
NEWER_HOOK_COMMANDS = ("enable-cuda-compat", "disable-device-node-modification")
REQUIRED_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
OPTIONAL_NODES = ("nvidia-modeset",)
MAX_LINKS = 40  # links followed for one path, as the kernel's limit
# Links the toolkit makes next to a library of the driver's version: the library (its name
# without the version) -> the link's target (None: the library) and name. Programs
# dlopen("libcuda.so"); GLVND's indirect GLX; GBM's backend; the X server's GLX module.
TOOLKIT_LINKS: dict[str, tuple[str | None, str]] = {
    "libcuda.so": ("libcuda.so.1", "libcuda.so"),
    "libGLX_nvidia.so": (None, "libGLX_indirect.so.0"),
    "libnvidia-opticalflow.so": ("libnvidia-opticalflow.so.1", "libnvidia-opticalflow.so"),
    "libnvidia-allocator.so": ("../libnvidia-allocator.so.1", "gbm/nvidia-drm_gbm.so"),
    "libnvidia-vulkan-producer.so": (None, "libnvidia-vulkan-producer.so"),
    "libglxserver_nvidia.so": (None, "libglxserver_nvidia.so"),
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostDevices:
    """Where device nodes are (plugin view and host view), the nvidia-caps major, and each
    GPU's DRM nodes by PCI address (sysfs form)."""

    dev_dir: Path  # as the plugin sees it
    host_dev_dir: str  # as the runtime sees it
    caps_major: int | None
    drm: dict[str, tuple[DeviceNode, ...]] = field(default_factory=dict, kw_only=True)
    # `gpu_nodes` by GPU minor and PCI address: the same for every claim (a prepare asks
    # once per device); a re-discovery makes another HostDevices, with none.
    _gpu_nodes: dict[tuple[int, str | None], tuple[DeviceNode, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def node(self, name: str, major: int | None = None, minor: int | None = None,
             links: tuple[Symlink, ...] = ()) -> DeviceNode:
        return DeviceNode(path=f"/dev/{name}", host_path=f"{self.host_dev_dir}/{name}",
                          major=major, minor=minor, links=links)

    def gpu_node(self, gpu: Gpu) -> DeviceNode:
        return self.node(f"nvidia{gpu.minor}")

    def gpu_nodes(self, gpu: Gpu) -> tuple[DeviceNode, ...]:
        """A whole GPU: its node and its /dev/dri card and render nodes where it has them."""
        key = (gpu.minor, gpu.pci_bus_id)
        nodes = self._gpu_nodes.get(key)
        if nodes is None:
            bus = sysfs_bus_id(gpu.pci_bus_id) if gpu.pci_bus_id else ""
            nodes = self._gpu_nodes[key] = (self.gpu_node(gpu), *self.drm.get(bus, ()))
        return nodes

    def mig_nodes(self, gpu: Gpu, cap_minors: tuple[int, int]) -> tuple[DeviceNode, ...]:
        """The parent GPU and the GI and CI capability nodes that grant the MIG device."""
        return (self.gpu_node(gpu), *(self.node(f"nvidia-caps/nvidia-cap{m}", self.caps_major, m)
                                      for m in cap_minors))


def host_devices(driver_root: Path, host_driver_root: Path,
                 proc_devices: Path = Path("/proc/devices"), gpus: Sequence[Gpu] = (),
                 sysfs: Path = Path("/sys")) -> HostDevices:
    if (driver_root / "dev/nvidiactl").exists():
        dev_dir, host_dev = driver_root / "dev", _host(host_driver_root, "dev")
    else:
        dev_dir, host_dev = Path("/dev"), "/dev"
    devices = HostDevices(dev_dir, host_dev, _char_major(proc_devices, "nvidia-caps"))
    drm = {bus: _drm_nodes(devices, sysfs, bus)
           for bus in sorted({sysfs_bus_id(g.pci_bus_id) for g in gpus if g.pci_bus_id})}
    return dataclasses.replace(devices, drm={bus: nodes for bus, nodes in drm.items() if nodes})


def _drm_nodes(devices: HostDevices, sysfs: Path, bus: str) -> tuple[DeviceNode, ...]:
    """The GPU's DRM nodes (sysfs names them under its PCI device) that exist in /dev/dri,
    each with the /dev/dri/by-path link to it."""
    try:
        names = sorted(p.name for p in (sysfs / "bus/pci/devices" / bus / "drm").iterdir()
                       if p.name.startswith(("card", "renderD")))
    except OSError:
        return ()
    links: dict[str, list[Symlink]] = {}
    for kind in ("card", "render"):
        by_path = f"dri/by-path/pci-{bus}-{kind}"
        try:
            target = os.readlink(devices.dev_dir / by_path)
        except OSError:
            continue
        links.setdefault(PurePosixPath(target).name, []).append(Symlink(target, f"/dev/{by_path}"))
    return tuple(devices.node(f"dri/{name}", links=tuple(links.get(name, ())))
                 for name in names if (devices.dev_dir / "dri" / name).exists())


def _host(host_root: Path, relative: str) -> str:
    return str(Path("/") / host_root / relative)


def _char_major(proc_devices: Path, name: str) -> int | None:
    try:
        text = proc_devices.read_text()
    except OSError:
        return None
    char_part = text.split("Block devices:")[0]
    match = re.search(rf"^\s*(\d+)\s+{re.escape(name)}$", char_part, re.MULTILINE)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Root:
    """A driver root as the plugin sees it (`path`) and as the host does (`host`). Paths in
    it are relative (`usr/lib64/libcuda.so.1`)."""

    path: Path
    host: Path

    def real(self, relative: str) -> str | None:
        """`relative` with every link followed as the host would (an absolute target is
        inside the root); None where nothing is, or links loop."""
        parts = list(PurePosixPath(relative).parts)
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part in ("/", ".", ".."):
                done = [] if part == "/" else done[:-1] if part == ".." else done
                continue
            here = self.path.joinpath(*done, part)
            if here.is_symlink():
                hops += 1
                try:
                    target = os.readlink(here)
                except OSError:
                    return None
                if hops > MAX_LINKS:
                    return None
                parts = [*PurePosixPath(target).parts, *parts]
            elif here.exists():
                done.append(part)
            else:
                return None
        return "/".join(done)

    def is_file(self, relative: str) -> bool:
        return (self.path / relative).is_file()

    def glob(self, folder: str, pattern: str) -> list[str]:
        """What matches `pattern` in `folder` (a real path), sorted."""
        return sorted(str(p.relative_to(self.path)) for p in (self.path / folder).glob(pattern))

    def mount(self, relative: str, container: str | None = None,
              options: tuple[str, ...] = LIBRARY_MOUNT_OPTIONS) -> Mount:
        """`relative` mounted at `container` (default: the same path)."""
        return Mount(_host(self.host, relative), container or f"/{relative}", options)


def driver_files(driver_root: Path, host_driver_root: Path, devices: HostDevices, *,
                 version: str | None = None, hook: Path | None = None,
                 sysfs: Path = Path("/sys"), kernel: str | None = None) -> DriverFiles:
    """The common edits of every claim spec: control nodes (the required ones always, so a
    missing node fails the container loudly instead of starting it without a GPU) and the
    driver's files for `version` (NVML's; where no library carries it, the version the
    libraries do). `hook`: nvidia-cdi-hook's host path, else found under the root."""
    root = Root(driver_root, host_driver_root)
    nodes = [devices.node(n) for n in REQUIRED_NODES]
    nodes += [devices.node(n) for n in OPTIONAL_NODES if (devices.dev_dir / n).exists()]
    folders = _library_folders(root)
    version = _version(root, folders, version)
    libraries = _libraries(root, folders, version) if version else []
    host_links = _host_links(root, libraries)
    hook_path, commands = _hook(root, hook)
    mounts = [root.mount(lib) for lib in libraries]
    if hook_path is None:  # the links as files: libcuda.so.1 is there, no ldconfig though
        mounts += [root.mount(link) for link, _ in host_links]
    versioned = [lib for lib in libraries if lib.endswith(f".so.{version}")]
    xorg = _xorg_modules(root, _unique(_parent(lib) for lib in versioned), version)
    mounts += [root.mount(path) for path in (*xorg, *_firmware(root, version, sysfs, kernel))]
    mounts += _configs(root) + _binaries(root) + _ipc(root)
    libcuda_dirs = _unique(f"/{_parent(lib)}" for lib in versioned
                           if PurePosixPath(lib).parent.name != "vdpau")
    return DriverFiles(
        tuple(nodes), tuple(mounts),
        ldcache_folders=tuple(_unique(f"/{_parent(lib)}" for lib in libraries)),
        hook=hook_path,
        links=() if hook_path is None else tuple(_unique_links(
            [link for _, link in host_links] + _toolkit_links([*libraries, *xorg], version))),
        driver_version=version,
        env=(f"NVIDIA_CTK_LIBCUDA_DIR={':'.join(libcuda_dirs)}",) if libcuda_dirs else (),
        hook_commands=commands)


def hook_missing(files: DriverFiles) -> str:
    """What a container lacks when no nvidia-cdi-hook was found, for the log and an event."""
    folders = ", ".join(files.ldcache_folders) or "the driver's library folders"
    return (f"no {HOOK} under the driver root (looked in "
            f"{', '.join(HOOK_SEARCH)}; set --nvidia-cdi-hook or NVIDIA_CDI_HOOK to its host "
            f"path): GPU containers get no ldconfig update, so the libraries in {folders} "
            "load only where the image's LD_LIBRARY_PATH names that folder; no libcuda.so "
            "and other links beyond the host's own files; no CUDA forward compatibility; "
            "and nothing keeps NVML from creating device nodes in them")


def nvml_library(driver_root: Path) -> Path | None:
    """The driver's NVML library as this process sees it (links followed inside the root),
    from the first of the driver's library folders that holds it; None if none does. The
    tools the plugin runs from the root load it (`sharing`): the image has none."""
    root = Root(driver_root, driver_root)
    for folder in _library_folders(root):
        real = root.real(f"{folder}/{LIBRARY}")
        if real is not None and root.is_file(real):
            return driver_root / real
    return None


def _library_folders(root: Root) -> list[str]:
    """The real folders of LIBRARY_SEARCH and those its anchor links lead to."""
    found = [root.real(folder) for folder in LIBRARY_SEARCH]
    for folder in LIBRARY_SEARCH:
        for anchor in ANCHORS:
            target = root.real(f"{folder}/{anchor}")
            if target is not None and root.is_file(target):
                found.append(_parent(target))
    return _unique(f for f in found if f is not None and (root.path / f).is_dir())


def _version(root: Root, folders: Sequence[str], nvml: str | None) -> str | None:
    """NVML's version where libraries carry it, else what libcuda or libnvidia-ml carry."""
    if nvml and any(root.glob(f, f"lib*.so.{nvml}") for f in folders):
        return nvml
    carried = [PurePosixPath(p).name.split(".so.", 1)[1] for f in folders
               for lib in ("libcuda", "libnvidia-ml") for p in root.glob(f, f"{lib}.so.*.*")]
    if not carried:
        return nvml
    if nvml:
        log.warning("NVML reports driver %s but the libraries under the driver root are "
                    "%s: containers get those", nvml, carried[0])
    return carried[0]


def _libraries(root: Root, folders: Sequence[str], version: str) -> list[str]:
    """The real files of the driver's libraries: the version-named ones in the folders
    (and their vdpau folder), the unversioned ones the toolkit takes by name."""
    candidates = [p for f in folders for p in (*root.glob(f, f"*.so.{version}"),
                                               *root.glob(f"{f}/vdpau", f"*.so.{version}"))]
    candidates += [p for f in folders for pattern in UNVERSIONED for p in root.glob(f, pattern)]
    return _unique(real for real in map(root.real, candidates)
                   if real is not None and root.is_file(real))


def _host_links(root: Root, libraries: Sequence[str]) -> list[tuple[str, Symlink]]:
    """The host's own links to each library in its folder (libcuda.so.1 -> libcuda.so.<v>,
    libcuda.so -> libcuda.so.1: the SONAME and development links the toolkit makes too),
    as (link path, the same link for the container)."""
    found: list[tuple[str, Symlink]] = []
    for library in libraries:
        folder, name = _parent(library), PurePosixPath(library).name
        stem = name.split(".so", 1)[0] + ".so"
        links = []
        for entry in (root.path / folder).glob(f"{stem}*"):
            link = f"{folder}/{entry.name}"
            if not entry.is_symlink() or root.real(link) != library:
                continue
            target = PurePosixPath(os.readlink(entry)).name
            if root.real(f"{folder}/{target}") == library:
                links.append((link, Symlink(target, f"/{link}")))
        # the SONAME link (to the file itself) before the development link (to the SONAME)
        found += sorted(links, key=lambda pair: (pair[1].target != name, pair[0]))
    return found


def _toolkit_links(libraries: Sequence[str], version: str | None) -> list[Symlink]:
    """The links the toolkit makes whether or not the host has them, next to the library
    of that version."""
    links = []
    for library in libraries:
        folder, name = _parent(library), PurePosixPath(library).name
        stem = name.removesuffix(f".{version}")
        if version and stem != name and stem in TOOLKIT_LINKS:
            target, link = TOOLKIT_LINKS[stem]
            links.append(Symlink(target or name, f"/{folder}/{link}"))
    return links


def _xorg_modules(root: Root, lib_folders: Sequence[str], version: str | None) -> list[str]:
    """The X server's driver and GLX modules, the first of each found."""
    if not version:
        return []
    search = [f"{lib}/{sub}" for lib in lib_folders for sub in XORG_MODULES] + \
        [f"{lib}/{sub}" for lib in ("usr/lib", "usr/lib64") for sub in XORG_MODULES[1:]]
    names = ("nvidia_drv.so", f"libglxserver_nvidia.so.{version}")
    return [found for found in (_first_file(root, [f"{d}/{name}" for d in search])
                                for name in names) if found is not None]


def _first_file(root: Root, candidates: Iterable[str]) -> str | None:
    """The real path of the first candidate that is a file."""
    return next((real for real in map(root.real, candidates)
                 if real is not None and root.is_file(real)), None)


def _firmware(root: Root, version: str | None, sysfs: Path, kernel: str | None) -> list[str]:
    """The GSP firmware of `version` in the kernel's firmware folders (a custom one first,
    from the firmware loader's `path` parameter)."""
    if not version:
        return []
    try:
        custom = (sysfs / "module/firmware_class/parameters/path").read_text().strip()
    except OSError:
        custom = ""
    release = kernel or os.uname().release
    folders = ([custom.lstrip("/")] if custom else []) + \
        [f.format(kernel=release) for f in FIRMWARE_SEARCH]
    files = [root.real(p) for f in folders if (real := root.real(f)) is not None
             for p in root.glob(real, f"nvidia/{version}/gsp*.bin")]
    return _unique(f for f in files if f is not None and root.is_file(f))


def _configs(root: Root) -> list[Mount]:
    """EGL, GBM, OpenCL and X configs, and Vulkan's ICD and layer files."""
    found: list[Mount] = []
    wanted = [*CONFIGS, *((name, "/etc") for name in VULKAN)]
    for name, container_folder in wanted:
        search = CONFIG_SEARCH + (("",) if name in VULKAN else ())
        real = _first_file(root, (f"{d}/{name}".lstrip("/") for d in search))
        if real is not None:
            found.append(root.mount(real, f"{container_folder}/{name}"))
    return found


def _binaries(root: Root) -> list[Mount]:
    """The driver's tools, at /usr/bin where every image's PATH has them."""
    found = []
    for name in BINARIES:
        real = _first_file(root, (f"{d}/{name}" for d in BINARY_SEARCH))
        if real is not None:
            found.append(root.mount(real, f"/usr/bin/{name}"))
    return found


def _ipc(root: Root) -> list[Mount]:
    """The sockets of nvidia-persistenced and nvidia-fabricmanager and the MPS pipe
    folder, where those daemons run."""
    paths = [root.real(f"{run}/{socket}") for socket in SOCKETS for run in ("run", "var/run")]
    paths.append(root.real(MPS_PIPES))
    return [root.mount(path, options=IPC_MOUNT_OPTIONS)
            for path in _unique(p for p in paths if p is not None)]


def _hook(root: Root, explicit: Path | None) -> tuple[str | None, frozenset[str]]:
    """nvidia-cdi-hook's host path (the one given, else the first executable one under the
    root) and the commands it knows."""
    if explicit is not None:
        seen = _visible(root, explicit)
        return str(explicit), _commands(seen) if seen else frozenset(HOOK_COMMANDS)
    for folder in HOOK_SEARCH:
        real = root.real(f"{folder}/{HOOK}")
        if real is not None and root.is_file(real) and os.access(root.path / real, os.X_OK):
            return _host(root.host, real), _commands(root.path / real)
    return None, frozenset(HOOK_COMMANDS)


def _visible(root: Root, host_path: Path) -> Path | None:
    """Where the plugin sees a host path, if it is under the driver root."""
    if not host_path.is_relative_to(Path("/") / root.host):
        return None
    seen = root.path / host_path.relative_to(Path("/") / root.host)
    return seen if seen.is_file() else None


def _commands(hook: Path) -> frozenset[str]:
    """The commands a hook program knows: an ELF binary (Go keeps each command's name as
    a string) lacks the newer ones it does not name; anything else is taken at its word."""
    try:
        data = hook.read_bytes()
    except OSError:
        return frozenset(HOOK_COMMANDS)
    return frozenset(c for c in HOOK_COMMANDS if not data.startswith(b"\x7fELF") or
                     c not in NEWER_HOOK_COMMANDS or c.encode() in data)


def _parent(relative: str) -> str:
    return str(PurePosixPath(relative).parent)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _unique_links(links: Iterable[Symlink]) -> list[Symlink]:
    """One link per container path, the first given."""
    first: dict[str, Symlink] = {}
    for link in links:
        first.setdefault(link.link, link)
    return list(first.values())
