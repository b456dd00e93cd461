"""Find, once at start, the NVIDIA driver files a container needs and the device nodes.

The plugin sees the driver install at `driver_root` (e.g. /driver-root in the pod); the
container runtime, on the host, sees the same files under `host_driver_root` (e.g. / or
/run/nvidia/driver), so paths found here are rewritten for the spec. Device nodes live
under the driver root when a driver container provides them (it has dev/nvidiactl), else
under the host's /dev.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from driver.inventory.model import Gpu
from driver.nvml.real import LIBRARY, LIBRARY_DIRS
from driver.plugin.cdi import DeviceNode, DriverFiles, Mount

# Where distributions and the GPU operator put the driver's libraries.
LIBRARY_SEARCH = (*LIBRARY_DIRS, "usr/local/nvidia/lib64", "usr/lib/nvidia")
# The compute and utility libraries NVIDIA's container toolkit injects.
LIBRARIES = ("libcuda", "libcudadebugger", "libnvidia-ml", "libnvidia-cfg",
             "libnvidia-ptxjitcompiler", "libnvidia-nvvm", "libnvidia-opencl",
             "libnvidia-gpucomp", "libnvidia-allocator", "libnvidia-pkcs11",
             "libnvidia-pkcs11-openssl3", "libnvidia-fatbinaryloader", "libnvidia-compiler")
BINARY_SEARCH = ("usr/bin", "usr/local/bin", "usr/local/nvidia/bin", "bin")
BINARIES = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced",
            "nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
HOOK = "nvidia-cdi-hook"
HOOK_SEARCH = ("usr/bin", "usr/local/bin", "usr/local/nvidia/toolkit")
REQUIRED_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
OPTIONAL_NODES = ("nvidia-modeset",)


@dataclass(frozen=True)
class HostDevices:
    """Where device nodes are (plugin view and host view) and the nvidia-caps major."""

    dev_dir: Path  # as the plugin sees it
    host_dev_dir: str  # as the runtime sees it
    caps_major: int | None

    def node(self, name: str, major: int | None = None, minor: int | None = None
             ) -> DeviceNode:
        return DeviceNode(path=f"/dev/{name}", host_path=f"{self.host_dev_dir}/{name}",
                          major=major, minor=minor)

    def gpu_node(self, gpu: Gpu) -> DeviceNode:
        return self.node(f"nvidia{gpu.minor}")

    def mig_nodes(self, gpu: Gpu, cap_minors: tuple[int, int]) -> tuple[DeviceNode, ...]:
        """The parent GPU and the GI and CI capability nodes that grant the MIG device."""
        return (self.gpu_node(gpu), *(self.node(f"nvidia-caps/nvidia-cap{m}", self.caps_major, m)
                                      for m in cap_minors))


def host_devices(driver_root: Path, host_driver_root: Path,
                 proc_devices: Path = Path("/proc/devices")) -> HostDevices:
    if (driver_root / "dev/nvidiactl").exists():
        dev_dir, host_dev = driver_root / "dev", _host(host_driver_root, "dev")
    else:
        dev_dir, host_dev = Path("/dev"), "/dev"
    return HostDevices(dev_dir, host_dev, _char_major(proc_devices, "nvidia-caps"))


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


def _library_dir(driver_root: Path) -> str | None:
    """The folder (relative to the root) of the driver's libraries: where libnvidia-ml.so.1
    really is, following links such as /lib/libnvidia-ml.so.1 -> /usr/local/nvidia/lib64."""
    found = next((d for d in LIBRARY_SEARCH if (driver_root / d / LIBRARY).exists()), None)
    if found is None:
        return None
    real = (driver_root / found / LIBRARY).resolve().parent
    if real.is_relative_to(driver_root.resolve()):
        return str(real.relative_to(driver_root.resolve()))
    return found


def driver_files(driver_root: Path, host_driver_root: Path, devices: HostDevices,
                 hook: Path | None = None) -> DriverFiles:
    """The common edits of every claim spec: control nodes (the required ones always, so a
    missing node fails the container loudly instead of starting it without a GPU),
    libraries, binaries and the ldcache hook."""
    nodes = [devices.node(n) for n in REQUIRED_NODES]
    nodes += [devices.node(n) for n in OPTIONAL_NODES if (devices.dev_dir / n).exists()]
    mounts: list[Mount] = []
    folders: list[str] = []
    lib_dir = _library_dir(driver_root)
    if lib_dir is not None:
        for name in LIBRARIES:
            for path in sorted((driver_root / lib_dir).glob(f"{name}.so.*")):
                mounts.append(Mount(_host(host_driver_root, f"{lib_dir}/{path.name}"),
                                    f"/{lib_dir}/{path.name}"))
        if mounts:
            folders.append(f"/{lib_dir}")
    for name in BINARIES:
        where = next((d for d in BINARY_SEARCH if (driver_root / d / name).is_file()), None)
        if where is not None:
            mounts.append(Mount(_host(host_driver_root, f"{where}/{name}"), f"/usr/bin/{name}"))
    hook_path = str(hook) if hook is not None else next(
        (_host(host_driver_root, f"{d}/{HOOK}") for d in HOOK_SEARCH
         if (driver_root / d / HOOK).is_file()), None)
    return DriverFiles(tuple(nodes), tuple(mounts), tuple(folders), hook_path)
