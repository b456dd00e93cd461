"""A container run as a container runtime runs one from our CDI specs: the upstream CDI
library (cdi-resolve, tests/e2e/cdi-resolve) turns the claim's device ids into OCI edits,
which are added to the config `runc spec` makes, and runc runs it in a minimal root file
system made here: busybox as the shell, the programs a test brings, and the host's loader
and C libraries those and the spec's nvidia-smi need (none of NVIDIA's: the spec mounts
those). runc, cdi-resolve and busybox come from build/device-tools (scripts/device-tools.sh
puts them there for a GPU machine, which has no Go and maybe no runc), else from the node
tier's build (tests/node/tools/build.sh), else from PATH.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tests.support.realnode import find_assets as find_node_assets

ROOT = Path(__file__).resolve().parents[2]
DEVICE_TOOLS = ROOT / "build/device-tools"
PROBE_SOURCE = Path(__file__).with_name("cuda_probe.c")
APPLETS = ("sh", "cat", "ls", "stat")  # busybox applets the containers' scripts call
NVIDIA_LIBRARY = re.compile(r"lib(nvidia|cuda)")  # never from the host: the spec mounts them


@dataclass(frozen=True)
class Tools:
    runc: Path
    cdi_resolve: Path
    busybox: Path
    cc: Path  # builds the CUDA probe against this machine's C library


def tool(name: str, node_bin: Path | None) -> Path | None:
    """build/device-tools/<name>, else the node tier's tools in ``node_bin`` (runc,
    busybox), else <name> on PATH; cdi-resolve also from the e2e tools' cached build."""
    carried = DEVICE_TOOLS / name
    if carried.is_file() and os.access(carried, os.X_OK):
        return carried
    if node_bin is not None and (node_bin / name).is_file():
        return node_bin / name
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    if name == "cdi-resolve":
        from tests.support.standin import find_tools  # needs Go to find the cache

        built = find_tools()
        if built is not None and built.cdi_resolve.is_file():
            return built.cdi_resolve
    return None


def container_tools() -> Tools | str:
    """What running a container takes, or why it cannot run here."""
    if os.geteuid() != 0:
        return "runc runs containers as root here"
    node = find_node_assets()  # one look at the node tier's build for all four
    node_bin = None if node is None else node.folder / "bin"
    found = {name: tool(name, node_bin) for name in ("runc", "cdi-resolve", "busybox", "cc")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        return (f"{', '.join(missing)} not found in {DEVICE_TOOLS} or on PATH (run "
                "scripts/device-tools.sh; cdi-resolve: tests/e2e/kubelet-standin/build.sh)")
    runc, cdi_resolve, busybox, cc = found.values()
    assert runc and cdi_resolve and busybox and cc
    return Tools(runc, cdi_resolve, busybox, cc)


def build_probe(cc: Path, folder: Path) -> Path:
    """The CUDA probe (cuda_probe.c), built for this machine's C library."""
    probe = folder / "cuda-probe"
    built = subprocess.run([str(cc), "-O2", "-o", str(probe), str(PROBE_SOURCE), "-ldl"],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"{cc} {PROBE_SOURCE.name}: {built.stderr}"
    return probe


def shared_libraries(program: Path) -> list[Path]:
    """The loader and libraries a host program loads at start (ldd); none for a static
    program or a script."""
    listed = subprocess.run(["ldd", str(program)], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0:
        return []
    return [Path(m.group(1)) for m in re.finditer(r"(/\S+) \(0x", listed.stdout)]


def make_rootfs(rootfs: Path, files: Mapping[str, Path], needs: Sequence[Path] = ()
                ) -> list[str]:
    """A root file system holding `files` (container path -> host file) and the libraries
    they and the host programs `needs` load, copied to their host paths; busybox's applets
    as links in /bin. Returns the folders of those libraries (for LD_LIBRARY_PATH)."""
    for folder in ("bin", "dev", "etc", "proc", "sys", "tmp", "usr/bin"):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    for inside, host in files.items():
        shutil.copy2(host, rootfs / inside.lstrip("/"))
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    libraries = {lib for program in [*files.values(), *needs]
                 for lib in shared_libraries(program) if not NVIDIA_LIBRARY.match(lib.name)}
    for lib in libraries:
        (rootfs / lib.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), rootfs / lib.relative_to("/"))
    return sorted({str(lib.parent) for lib in libraries})


def runc_spec(runc: Path, bundle: Path) -> dict[str, Any]:
    """The default config `runc spec` writes."""
    (bundle / "config.json").unlink(missing_ok=True)
    subprocess.run([str(runc), "spec", "--bundle", str(bundle)], check=True,
                   capture_output=True, timeout=30)
    config: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    return config


def library_folders(edits: Mapping[str, Any]) -> list[str]:
    """The container folders of the libraries the edits mount, in mount order."""
    folders = [str(PurePosixPath(m["destination"]).parent) for m in edits.get("mounts", [])
               if ".so" in PurePosixPath(m["destination"]).name]
    return list(dict.fromkeys(folders))


def oci_config(base: Mapping[str, Any], edits: Mapping[str, Any], args: Sequence[str],
               env: Sequence[str] = ()) -> dict[str, Any]:
    """`base` (runc spec's config) running `args` with the CDI library's edits (its OCI
    spec of the devices, made from an empty one) added as the library adds them to a
    container's own: environment, mounts after the config's, hooks, device nodes and
    their device cgroup rules after the config's deny-all."""
    config = copy.deepcopy(dict(base))
    process = config["process"]
    process.update(args=list(args), terminal=False,
                   env=[*process.get("env", []), *env, *edits.get("process", {}).get("env", [])])
    config["root"] = {"path": "rootfs", "readonly": False}  # ldconfig writes /etc/ld.so.cache
    mounts = list(edits.get("mounts", []))
    clash = {m["destination"] for m in config["mounts"]} & {m["destination"] for m in mounts}
    assert not clash, f"the CDI edits mount over the base config's {sorted(clash)}"
    config["mounts"] = [*config["mounts"], *mounts]
    for stage, hooks in edits.get("hooks", {}).items():
        config.setdefault("hooks", {}).setdefault(stage, []).extend(hooks)
    linux, theirs = config["linux"], edits.get("linux", {})
    linux["devices"] = [*linux.get("devices", []), *theirs.get("devices", [])]
    resources = linux.setdefault("resources", {})
    resources["devices"] = [*resources.get("devices", []),
                            *theirs.get("resources", {}).get("devices", [])]
    return config


@dataclass(frozen=True)
class Ran:
    id: str
    config: dict[str, Any]
    result: subprocess.CompletedProcess[str]


def run_in_container(tools: Tools, bundle: Path, edits: Mapping[str, Any],
                     script: str, timeout: float = 120) -> Ran:
    """`script` run by the container's shell, with the CUDA probe at /cuda-probe, the
    libraries' folders in LD_LIBRARY_PATH (so they load whether or not the spec's
    update-ldcache hook ran) and the edits; the container is deleted afterwards."""
    bundle.mkdir(parents=True, exist_ok=True)
    probe = build_probe(tools.cc, bundle)
    smi = [Path(m["source"]) for m in edits.get("mounts", [])
           if m["destination"] == "/usr/bin/nvidia-smi"]
    libc_folders = make_rootfs(bundle / "rootfs", {"/bin/busybox": tools.busybox,
                                                   "/cuda-probe": probe}, needs=smi)
    path = ":".join([*library_folders(edits), *libc_folders])
    config = oci_config(runc_spec(tools.runc, bundle), edits, ["/bin/sh", "-c", script],
                        env=[f"LD_LIBRARY_PATH={path}"])
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    name = f"gpu-dra-{uuid.uuid4().hex[:12]}"
    state = ["--root", str(bundle / "runc-state")]
    try:
        result = subprocess.run([str(tools.runc), *state, "run", "--bundle", str(bundle), name],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout)
    finally:
        subprocess.run([str(tools.runc), *state, "delete", "--force", name],
                       capture_output=True, timeout=30)
    return Ran(name, config, result)
