"""The driver files a claim's containers get, found in fake driver roots as NVIDIA's
container toolkit finds them: one laid out like the real H200 machine
(shared/fixtures/nvml/h200-141gb-single/extra.txt: driver 580.159.04 in
/usr/local/nvidia/lib64 with its SONAME links, links to them in /lib, the tools in
/usr/local/nvidia/bin, the GSP firmware, no /dev/dri) and one laid out like a Debian
package install with graphics files, DRM nodes and running daemons' sockets."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from driver.inventory.model import Gpu
from driver.plugin import cdi
from driver.plugin.driverfiles import HostDevices, driver_files, hook_missing, host_devices
from driver.plugin.mockroot import LIBRARIES
from tests.support.plugin import PROC_DEVICES, cdi_problems

V = "580.159.04"
LIB64 = "usr/local/nvidia/lib64"
# The capture's libraries and their SONAME suffix (the mock root's table, which
# tests/unit/test_mockroot.py checks against the capture).
H200_LIBRARIES = LIBRARIES
NOT_IN_LIB = ("libnvcuvid", "libnvoptix")  # ldconfig finds these in lib64 only
ALL_HOOKS = b"\x7fELF create-symlinks enable-cuda-compat update-ldcache " \
            b"disable-device-node-modification"
BUS = "0000:06:00.0"


def gpu(bus: str = "00000000:06:00.0") -> Gpu:
    return Gpu(index=0, minor=0, uuid="GPU-d94418e6", product_name="NVIDIA H200", brand="",
               architecture="Hopper", cuda_compute_capability="9.0", memory_bytes=0,
               pci_bus_id=bus, pcie_root=None, numa_node=None, mig_enabled=False,
               mig_pending=False)


def write(path: Path, content: bytes = b"elf", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(mode)
    return path


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def h200_root(root: Path) -> Path:
    """The capture's layout: /usr/local/nvidia holds the driver (lib -> lib64), /lib only
    links into it (absolute here), no hook."""
    for name, soname in H200_LIBRARIES:
        write(root / LIB64 / f"{name}.so.{V}", mode=0o755)
        chain = [f"{name}.so.{soname}"] if soname else []
        if chain:
            link(root / LIB64 / chain[0], f"{name}.so.{V}")
        link(root / LIB64 / f"{name}.so", chain[0] if chain else f"{name}.so.{V}")
        if name not in NOT_IN_LIB:
            for one in [*chain, f"{name}.so"]:
                link(root / "lib" / one, f"/{LIB64}/{one}")
    link(root / "usr/local/nvidia/lib", "lib64")
    for tool in ("nvidia-smi", "nvidia-persistenced"):
        write(root / "usr/local/nvidia/bin" / tool, mode=0o755)
    for firmware in ("gsp_ga10x.bin", "gsp_tu10x.bin"):
        write(root / f"usr/local/nvidia/firmware/nvidia/{V}/{firmware}")
    for node in ("nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools",
                 "nvidia-caps/nvidia-cap1", "nvidia-caps/nvidia-cap2"):
        write(root / "dev" / node, b"")
    write(root / "proc-devices", PROC_DEVICES.encode())
    return root


def debian_root(root: Path) -> Path:
    """A distribution's packages: libraries in the multiarch folder, merged /usr, graphics
    configs, a GPU with DRM nodes, persistenced and MPS running, the hook in /usr/bin."""
    lib = root / "usr/lib/x86_64-linux-gnu"
    for name, soname in (("libcuda", "1"), ("libnvidia-ml", "1"), ("libnvidia-allocator", "1"),
                         ("libGLX_nvidia", "0"), ("vdpau/libvdpau_nvidia", "1")):
        write(lib / f"{name}.so.{V}")
        link(lib / f"{name}.so.{soname}", f"{Path(name).name}.so.{V}")
    link(lib / "libcuda.so", "libcuda.so.1")
    for name, version in (("libnvidia-egl-gbm", "1.1.2"), ("libnvidia-egl-wayland", "1.1.13")):
        write(lib / f"{name}.so.{version}")
        link(lib / f"{name}.so.1", f"{name}.so.{version}")
    write(lib / "nvidia/xorg/nvidia_drv.so")
    write(lib / f"nvidia/xorg/libglxserver_nvidia.so.{V}")
    link(root / "lib", "usr/lib")
    write(root / f"usr/lib/firmware/nvidia/{V}/gsp_ga10x.bin")
    for config in ("glvnd/egl_vendor.d/10_nvidia.json",
                   "egl/egl_external_platform.d/15_nvidia_gbm.json",
                   "vulkan/icd.d/nvidia_icd.json", "vulkan/implicit_layer.d/nvidia_layers.json"):
        write(root / "usr/share" / config, b"{}")
    write(root / "etc/vulkan/icd.d/nvidia_icd.json", b"{}")  # etc comes before usr/share
    write(root / "etc/OpenCL/vendors/nvidia.icd", b"libnvidia-opencl.so.1")
    for tool in ("nvidia-smi", "nvidia-debugdump", "nvidia-cuda-mps-control",
                 "nvidia-cuda-mps-server"):
        write(root / "usr/bin" / tool, mode=0o755)
    write(root / "usr/bin/nvidia-cdi-hook", ALL_HOOKS, 0o755)
    write(root / "run/nvidia-persistenced/socket", b"")
    link(root / "var/run", "../run")
    (root / "tmp/nvidia-mps").mkdir(parents=True)
    for node in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset", "nvidia0",
                 "dri/card1", "dri/renderD128", "dri/card2"):
        write(root / "dev" / node, b"")
    link(root / f"dev/dri/by-path/pci-{BUS}-card", "../card1")
    link(root / f"dev/dri/by-path/pci-{BUS}-render", "../renderD128")
    for drm in ("card1", "renderD128"):
        (root / f"sys/bus/pci/devices/{BUS}/drm" / drm).mkdir(parents=True)
    write(root / "proc-devices", PROC_DEVICES.encode())
    return root


def found(root: Path, host: str = "/", version: str | None = V, hook: Path | None = None,
          gpus: Iterable[Gpu] = ()) -> tuple[HostDevices, cdi.DriverFiles]:
    devices = host_devices(root, Path(host), root / "proc-devices", tuple(gpus),
                           sysfs=root / "sys")
    files = driver_files(root, Path(host), devices, version=version, hook=hook,
                         sysfs=root / "sys", kernel="6.8.0-test")
    return devices, files


def mounts(files: cdi.DriverFiles) -> dict[str, str]:
    return {m.container_path: m.host_path for m in files.mounts}


def links(files: cdi.DriverFiles) -> dict[str, str]:
    return {s.link: s.target for s in files.links}


# --- the H200 machine ------------------------------------------------------------------------


def test_h200_every_library_of_the_driver_version_is_mounted_at_its_own_path(
        tmp_path: Path) -> None:
    _, files = found(h200_root(tmp_path))
    libraries = {p: h for p, h in mounts(files).items() if p.endswith(f".so.{V}")}
    assert libraries == {f"/{LIB64}/{name}.so.{V}": f"/{LIB64}/{name}.so.{V}"
                         for name, _ in H200_LIBRARIES}
    assert files.ldcache_folders == (f"/{LIB64}",)
    assert files.env == (f"NVIDIA_CTK_LIBCUDA_DIR=/{LIB64}",)
    assert files.driver_version == V


def test_h200_firmware_and_tools(tmp_path: Path) -> None:
    _, files = found(h200_root(tmp_path))
    others = {p: h for p, h in mounts(files).items() if not p.startswith(f"/{LIB64}/")}
    firmware = f"/usr/local/nvidia/firmware/nvidia/{V}"
    tools = "/usr/local/nvidia/bin"
    assert others == {f"{firmware}/gsp_ga10x.bin": f"{firmware}/gsp_ga10x.bin",
                      f"{firmware}/gsp_tu10x.bin": f"{firmware}/gsp_tu10x.bin",
                      "/usr/bin/nvidia-smi": f"{tools}/nvidia-smi",
                      "/usr/bin/nvidia-persistenced": f"{tools}/nvidia-persistenced"}
    assert all(m.options == cdi.LIBRARY_MOUNT_OPTIONS for m in files.mounts)  # read-only


def test_h200_links_are_made_by_the_hook_from_where_the_gpu_operator_installs_it(
        tmp_path: Path) -> None:
    root = h200_root(tmp_path)
    write(root / "usr/local/nvidia/toolkit/nvidia-cdi-hook", ALL_HOOKS, 0o755)
    _, files = found(root, host="/run/nvidia/driver")
    assert files.hook == "/run/nvidia/driver/usr/local/nvidia/toolkit/nvidia-cdi-hook"
    made = links(files)
    lib = f"/{LIB64}"
    assert made[f"{lib}/libcuda.so.1"] == f"libcuda.so.{V}"  # the SONAME link
    assert made[f"{lib}/libcuda.so"] == "libcuda.so.1"  # what programs dlopen
    assert made[f"{lib}/libnvidia-ml.so.1"] == f"libnvidia-ml.so.{V}"
    assert made[f"{lib}/libnvidia-nvvm.so.4"] == f"libnvidia-nvvm.so.{V}"
    assert made[f"{lib}/libnvidia-glcore.so"] == f"libnvidia-glcore.so.{V}"
    assert made[f"{lib}/libGLX_indirect.so.0"] == f"libGLX_nvidia.so.{V}"
    assert made[f"{lib}/gbm/nvidia-drm_gbm.so"] == "../libnvidia-allocator.so.1"
    assert all(p.startswith(f"{lib}/") for p in made)  # /lib's links are the host's own
    # with the hook no link is mounted as a file: only the versioned files are
    assert all(p.endswith(f".so.{V}") for p in mounts(files) if p.startswith(f"{lib}/"))


def test_h200_specs_for_a_whole_gpu_and_a_mig_device(tmp_path: Path) -> None:
    root = h200_root(tmp_path)
    write(root / "usr/local/nvidia/toolkit/nvidia-cdi-hook", ALL_HOOKS, 0o755)
    devices, files = found(root, gpus=[gpu()])
    uid = "af6a0f57-3c1e-4f1b-9d2a-0c5b8e7f6a11"
    spec = cdi.build_spec("gpu.dra.dev", [
        cdi.CdiDevice(cdi.device_name(uid, "gpu-0"), devices.gpu_nodes(gpu())),
        cdi.CdiDevice(cdi.device_name(uid, "gpu-0-mig-1g18gb-0"),
                      devices.mig_nodes(gpu(), (12, 13)))], files)
    assert cdi_problems(spec) == []
    assert spec["cdiVersion"] == "0.3.0"  # the host's /dev: no hostPath
    whole, mig = (d["containerEdits"] for d in spec["devices"])
    assert whole == {"deviceNodes": [{"path": "/dev/nvidia0"}]}  # no /dev/dri on this machine
    assert mig["deviceNodes"][1:] == [
        {"path": f"/dev/nvidia-caps/nvidia-cap{m}", "type": "c", "major": 241, "minor": m}
        for m in (12, 13)]
    edits = spec["containerEdits"]
    assert [n["path"] for n in edits["deviceNodes"]] == [
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]  # no modeset here
    assert [h["args"][1] for h in edits["hooks"]] == [
        "create-symlinks", "enable-cuda-compat", "update-ldcache",
        "disable-device-node-modification"]
    assert edits["hooks"][1]["args"][2:] == [f"--host-driver-version={V}"]
    assert edits["hooks"][2]["args"][2:] == ["--folder", f"/{LIB64}"]


def test_paths_in_the_spec_are_the_hosts(tmp_path: Path) -> None:
    """The plugin sees the driver at /driver-root; the runtime at /run/nvidia/driver."""
    _, files = found(h200_root(tmp_path), host="/run/nvidia/driver")
    assert files.mounts and all(
        m.host_path == f"/run/nvidia/driver{m.container_path}" for m in files.mounts
        if not m.container_path.startswith("/usr/bin/"))
    assert all(n.host_path == f"/run/nvidia/driver{n.path}" for n in files.device_nodes)
    assert str(tmp_path) not in repr(files)


def test_the_libraries_folder_is_found_through_the_linkers_links(tmp_path: Path) -> None:
    """A folder no distribution uses, known only from /lib/libnvidia-ml.so.1 -> there."""
    for name in ("libnvidia-ml", "libcuda"):
        write(tmp_path / f"opt/nv/lib/{name}.so.{V}")
        link(tmp_path / f"opt/nv/lib/{name}.so.1", f"{name}.so.{V}")
    link(tmp_path / "lib/libnvidia-ml.so.1", "/opt/nv/lib/libnvidia-ml.so.1")
    link(tmp_path / "lib/libcuda.so.1", "libcuda.so.1")  # a loop: ignored
    _, files = found(tmp_path)
    assert {p for p in mounts(files) if p.endswith(V)} == {f"/opt/nv/lib/libnvidia-ml.so.{V}",
                                                           f"/opt/nv/lib/libcuda.so.{V}"}
    assert files.ldcache_folders == ("/opt/nv/lib",)


def test_libraries_of_another_version_than_nvmls_are_still_found(tmp_path: Path) -> None:
    h200_root(tmp_path)
    _, files = found(tmp_path, version="550.163.01")
    assert files.driver_version == V
    assert f"/{LIB64}/libcuda.so.{V}" in mounts(files)


# --- a distribution's packages ----------------------------------------------------------------


def test_debian_graphics_vdpau_firmware_ipc_and_tools(tmp_path: Path) -> None:
    _, files = found(debian_root(tmp_path), host="/host")
    lib = "/usr/lib/x86_64-linux-gnu"
    expected = {
        **{f"{lib}/{name}": f"/host{lib}/{name}" for name in (
            f"libGLX_nvidia.so.{V}", f"libcuda.so.{V}", f"libnvidia-allocator.so.{V}",
            f"libnvidia-ml.so.{V}", f"vdpau/libvdpau_nvidia.so.{V}",
            "libnvidia-egl-gbm.so.1.1.2", "libnvidia-egl-wayland.so.1.1.13",
            "nvidia/xorg/nvidia_drv.so", f"nvidia/xorg/libglxserver_nvidia.so.{V}")},
        f"/usr/lib/firmware/nvidia/{V}/gsp_ga10x.bin":
            f"/host/usr/lib/firmware/nvidia/{V}/gsp_ga10x.bin",
        "/usr/share/glvnd/egl_vendor.d/10_nvidia.json":
            "/host/usr/share/glvnd/egl_vendor.d/10_nvidia.json",
        "/usr/share/egl/egl_external_platform.d/15_nvidia_gbm.json":
            "/host/usr/share/egl/egl_external_platform.d/15_nvidia_gbm.json",
        "/etc/OpenCL/vendors/nvidia.icd": "/host/etc/OpenCL/vendors/nvidia.icd",
        "/etc/vulkan/icd.d/nvidia_icd.json": "/host/etc/vulkan/icd.d/nvidia_icd.json",
        "/etc/vulkan/implicit_layer.d/nvidia_layers.json":
            "/host/usr/share/vulkan/implicit_layer.d/nvidia_layers.json",
        **{f"/usr/bin/{tool}": f"/host/usr/bin/{tool}" for tool in (
            "nvidia-smi", "nvidia-debugdump", "nvidia-cuda-mps-control",
            "nvidia-cuda-mps-server")},
        "/run/nvidia-persistenced/socket": "/host/run/nvidia-persistenced/socket",
        "/tmp/nvidia-mps": "/host/tmp/nvidia-mps",
    }
    assert mounts(files) == expected
    ipc = {m.container_path: m.options for m in files.mounts
           if m.container_path.startswith(("/run/", "/tmp/"))}
    assert ipc == dict.fromkeys(("/run/nvidia-persistenced/socket", "/tmp/nvidia-mps"),
                                cdi.IPC_MOUNT_OPTIONS)
    assert files.ldcache_folders == (lib, f"{lib}/vdpau")
    assert files.env == (f"NVIDIA_CTK_LIBCUDA_DIR={lib}",)
    made = links(files)
    assert made[f"{lib}/libnvidia-egl-gbm.so.1"] == "libnvidia-egl-gbm.so.1.1.2"
    assert made[f"{lib}/vdpau/libvdpau_nvidia.so.1"] == f"libvdpau_nvidia.so.{V}"
    assert made[f"{lib}/nvidia/xorg/libglxserver_nvidia.so"] == \
        f"libglxserver_nvidia.so.{V}"


def test_debian_a_whole_gpu_gets_its_drm_nodes_and_by_path_links(tmp_path: Path) -> None:
    devices, files = found(debian_root(tmp_path), gpus=[gpu()])
    assert [n.path for n in files.device_nodes][-1] == "/dev/nvidia-modeset"
    nodes = devices.gpu_nodes(gpu())
    assert [(n.path, n.host_path) for n in nodes] == [
        (f"/dev/{name}", f"/dev/{name}") for name in ("nvidia0", "dri/card1", "dri/renderD128")]
    spec = cdi.build_spec("gpu.dra.dev", [cdi.CdiDevice("gpu-0", nodes)], files)
    assert cdi_problems(spec) == []
    [hook] = spec["devices"][0]["containerEdits"]["hooks"]
    assert hook["args"] == ["nvidia-cdi-hook", "create-symlinks",
                            "--link", f"../card1::/dev/dri/by-path/pci-{BUS}-card",
                            "--link", f"../renderD128::/dev/dri/by-path/pci-{BUS}-render"]
    # a MIG device of that GPU gets no DRM node, as the toolkit gives it none
    assert [n.path for n in devices.mig_nodes(gpu(), (1, 2))] == [
        "/dev/nvidia0", "/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2"]
    # another GPU (no sysfs drm folder) gets only its own node
    assert devices.gpu_nodes(gpu("00000000:07:00.0")) == (devices.gpu_node(gpu()),)


# --- nvidia-cdi-hook -------------------------------------------------------------------------


def test_without_a_hook_the_hosts_links_are_mounted_and_what_is_lost_is_said(
        tmp_path: Path) -> None:
    _, files = found(h200_root(tmp_path))
    assert files.hook is None and files.links == ()
    spec = cdi.build_spec("gpu.dra.dev", [cdi.CdiDevice("gpu-0", ())], files)
    assert "hooks" not in spec["containerEdits"]
    lib = f"/{LIB64}"
    # libcuda.so.1 is the host's link, mounted as the file it leads to
    assert mounts(files)[f"{lib}/libcuda.so.1"] == f"{lib}/libcuda.so.1"
    assert mounts(files)[f"{lib}/libcuda.so"] == f"{lib}/libcuda.so"
    message = hook_missing(files)
    assert "no nvidia-cdi-hook" in message and "usr/local/nvidia/toolkit" in message
    assert "--nvidia-cdi-hook" in message and f"libraries in {lib} " in message
    assert "LD_LIBRARY_PATH" in message


def test_a_hook_that_cannot_run_is_not_used(tmp_path: Path) -> None:
    root = h200_root(tmp_path)
    write(root / "usr/bin/nvidia-cdi-hook", ALL_HOOKS, 0o644)
    assert found(root)[1].hook is None


def test_the_hook_given_is_used_as_given(tmp_path: Path) -> None:
    root = h200_root(tmp_path)
    write(root / "usr/bin/nvidia-cdi-hook", ALL_HOOKS, 0o755)
    _, files = found(root, hook=Path("/opt/toolkit/nvidia-cdi-hook"))
    assert files.hook == "/opt/toolkit/nvidia-cdi-hook"
    assert files.hook_commands == frozenset(cdi.HOOK_COMMANDS)


def test_an_older_hook_binary_is_given_only_the_commands_it_has(tmp_path: Path) -> None:
    """Toolkit 1.17.4's hook has no enable-cuda-compat nor disable-device-node-modification:
    a spec asking for them would fail every container."""
    root = h200_root(tmp_path)
    write(root / "usr/bin/nvidia-cdi-hook", b"\x7fELF create-symlinks update-ldcache chmod",
          0o755)
    _, files = found(root)
    assert files.hook == "/usr/bin/nvidia-cdi-hook"
    assert files.hook_commands == {"create-symlinks", "update-ldcache"}
    # the explicit path of that same binary, seen under the root, is probed too
    _, given = found(root, hook=Path("/usr/bin/nvidia-cdi-hook"))
    assert given.hook_commands == {"create-symlinks", "update-ldcache"}


def test_nothing_under_the_root_gives_only_the_control_nodes(tmp_path: Path) -> None:
    _, files = found(tmp_path, version=None)
    assert files.mounts == () and files.hook is None and files.env == ()
    assert [n.path for n in files.device_nodes] == ["/dev/nvidiactl", "/dev/nvidia-uvm",
                                                   "/dev/nvidia-uvm-tools"]
