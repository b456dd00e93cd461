"""CDI specs: one per prepared claim, telling the container runtime what to inject.

`build_spec` is a pure function of the prepared devices and the driver files found on the
host; the rest writes and removes spec files. A spec carries what NVIDIA's container
toolkit (nvcdi) generates for the same devices: device nodes, the driver's files as
read-only mounts, and nvidia-cdi-hook's createContainer hooks where the host has the hook.
Conventions (spec-digest.md section 5): kind `k8s.<driver>/claim`, device names
`<claimUID>-<device>` so a name is never reused (runtimes cache specs), one transient spec
file `k8s.<driver>-claim_<claimUID>.json` per claim, and the lowest cdiVersion that covers
the fields used, because a runtime with an older CDI library rejects versions it does not
know.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from driver.atomicfile import remove_leftovers, write_atomically
from driver.kube.names import is_uuid

CLASS = "claim"
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
LIBRARY_MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "rbind", "rprivate")
# Sockets and the MPS pipe folder are written to, so not read-only; nothing there runs.
IPC_MOUNT_OPTIONS = ("nosuid", "nodev", "rbind", "rprivate", "noexec")
# nvidia-cdi-hook's commands in the order the toolkit runs them: the links first, the CUDA
# compat folder before ldconfig reads the folders, device node protection last.
HOOK_COMMANDS = ("create-symlinks", "enable-cuda-compat", "update-ldcache",
                 "disable-device-node-modification")

# CDI's name rules (container-device-interface/pkg/parser), each matched against the whole
# name: a pattern ending in `$` would also accept a trailing newline
_VENDOR = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_CLASS = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class Symlink:
    """A link nvidia-cdi-hook's create-symlinks makes in the container: `link` (a container
    path) holding `target` as written (often relative, as the host's own link)."""

    target: str
    link: str

    def arg(self) -> str:
        return f"{self.target}::{self.link}"


@dataclass(frozen=True)
class DeviceNode:
    """A character device to create in the container. `host_path` where it differs from
    `path`; major/minor where the host file may not exist yet (MIG capability nodes, which
    the driver creates on first use) so the runtime can create the node itself; `links` to
    it that programs look for (a DRM node's /dev/dri/by-path names)."""

    path: str
    host_path: str | None = None
    major: int | None = None
    minor: int | None = None
    links: tuple[Symlink, ...] = ()

    def to_json(self) -> dict[str, Any]:
        node: dict[str, Any] = {"path": self.path}
        if self.host_path is not None and self.host_path != self.path:
            node["hostPath"] = self.host_path
        if self.major is not None and self.minor is not None:
            node.update(type="c", major=self.major, minor=self.minor)
        return node


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    options: tuple[str, ...] = LIBRARY_MOUNT_OPTIONS


@dataclass(frozen=True)
class DriverFiles:
    """What every container of a claim gets: control device nodes, the driver's files
    (libraries, firmware, tools, graphics configs, IPC sockets) and, where the host has
    nvidia-cdi-hook, its hooks: `links` to create, `ldcache_folders` to give ldconfig, CUDA
    forward compatibility for `driver_version`, device nodes kept from NVML's hands.
    `hook_commands`: the commands that hook binary knows (older ones lack the newer two)."""

    device_nodes: tuple[DeviceNode, ...]
    mounts: tuple[Mount, ...] = ()
    ldcache_folders: tuple[str, ...] = ()
    hook: str | None = None  # host path of nvidia-cdi-hook
    links: tuple[Symlink, ...] = ()
    driver_version: str | None = None
    env: tuple[str, ...] = ()
    hook_commands: frozenset[str] = frozenset(HOOK_COMMANDS)

    @cached_property
    def container_edits(self) -> dict[str, Any]:
        """The edits every claim's spec repeats, built once (most of a spec: about 0.2 ms
        of a prepare built and encoded each time); shared by the specs, never changed."""
        edits: dict[str, Any] = {
            # keep a legacy NVIDIA hook from adding GPUs
            "env": ["NVIDIA_VISIBLE_DEVICES=void", *self.env],
            "deviceNodes": [node.to_json() for node in self.device_nodes],
        }
        if self.mounts:
            edits["mounts"] = [_mount(m) for m in self.mounts]
        hooks = _common_hooks(self)
        if hooks:
            edits["hooks"] = hooks
        return edits

    @cached_property
    def encoded_edits(self) -> str:
        """`container_edits` as compact JSON."""
        return _compact(self.container_edits)


@dataclass(frozen=True)
class CdiDevice:
    """One device of the spec: its name within the spec and the nodes it adds (and, for a
    device served by the claim's MPS daemon, the mounts and env that join it)."""

    name: str
    device_nodes: tuple[DeviceNode, ...]
    mounts: tuple[Mount, ...] = ()
    env: tuple[str, ...] = ()


def vendor(driver: str) -> str:
    return f"k8s.{driver}"


def kind(driver: str) -> str:
    return f"{vendor(driver)}/{CLASS}"


def device_name(claim_uid: str, device: str) -> str:
    return f"{claim_uid}-{device}"


def qualified_name(driver: str, name: str) -> str:
    """What goes into the kubelet's cdi_device_ids: `<vendor>/<class>=<name>`."""
    return f"{kind(driver)}={name}"


def spec_file_name(driver: str, claim_uid: str) -> str:
    return f"{vendor(driver)}-{CLASS}_{claim_uid}.json"


def build_spec(driver: str, devices: Sequence[CdiDevice], files: DriverFiles) -> dict[str, Any]:
    """The spec of one claim: common edits once (`files.container_edits`, shared: copy the
    spec before changing it), each device's nodes (and the links to them) under its own
    name."""
    spec: dict[str, Any] = {
        "kind": kind(driver),
        "devices": [{"name": d.name, "containerEdits": _device_edits(d, files)}
                    for d in devices],
        "containerEdits": files.container_edits,
    }
    return {"cdiVersion": minimum_version(spec), **spec}


def encode_spec(spec: dict[str, Any], files: DriverFiles) -> bytes:
    """`spec` (`build_spec`'s with `files`) as compact JSON, the bytes json.dumps writes,
    with the common edits (its last key) encoded once per DriverFiles; the C encoder writes
    the rest (indented, the pure-Python one took a third of a millisecond per claim)."""
    text = _compact({key: value for key, value in spec.items() if key != "containerEdits"})
    return f'{text[:-1]},"containerEdits":{files.encoded_edits}}}'.encode()


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _common_hooks(files: DriverFiles) -> list[dict[str, Any]]:
    """nvidia-cdi-hook's commands with their arguments, in HOOK_COMMANDS order; none
    without the hook, a command left out when it has nothing to do or the hook lacks it."""
    if files.hook is None:
        return []
    args: dict[str, list[str]] = {
        "create-symlinks": _link_args(files.links),
        "enable-cuda-compat": [f"--host-driver-version={files.driver_version}"]
        if files.driver_version else [],
        "update-ldcache": [a for folder in files.ldcache_folders for a in ("--folder", folder)],
        "disable-device-node-modification": [],
    }
    idle = {"create-symlinks": not files.links, "update-ldcache": not files.ldcache_folders}
    return [_hook(files.hook, command, args[command]) for command in HOOK_COMMANDS
            if command in files.hook_commands and not idle.get(command, False)]


def _device_edits(device: CdiDevice, files: DriverFiles) -> dict[str, Any]:
    edits: dict[str, Any] = {"deviceNodes": [n.to_json() for n in device.device_nodes]}
    links = tuple(link for node in device.device_nodes for link in node.links)
    if files.hook is not None and links and "create-symlinks" in files.hook_commands:
        edits["hooks"] = [_hook(files.hook, "create-symlinks", _link_args(links))]
    if device.env:
        edits["env"] = list(device.env)
    if device.mounts:
        edits["mounts"] = [_mount(m) for m in device.mounts]
    return edits


def _mount(mount: Mount) -> dict[str, Any]:
    return {"hostPath": mount.host_path, "containerPath": mount.container_path,
            "options": list(mount.options)}


def _link_args(links: Sequence[Symlink]) -> list[str]:
    return [arg for link in links for arg in ("--link", link.arg())]


def _hook(path: str, command: str, args: list[str]) -> dict[str, Any]:
    """One createContainer hook; nvidia-ctk (the toolkit's CLI) has the same commands under
    `hook`."""
    program = PurePosixPath(path).name
    argv = [program, "hook"] if program == "nvidia-ctk" else [program]
    return {"hookName": "createContainer", "path": path, "args": [*argv, command, *args]}


def minimum_version(spec: dict[str, Any]) -> str:
    """The lowest cdiVersion that allows every field the spec uses (specs-go/version.go)."""
    edits = [spec.get("containerEdits") or {}] + \
        [d.get("containerEdits") or {} for d in spec.get("devices", [])]
    needed = "0.3.0"

    def need(version: str) -> None:
        nonlocal needed
        needed = max(needed, version, key=VERSIONS.index)

    if any(m.get("type") for e in edits for m in e.get("mounts", [])):
        need("0.4.0")
    if any(n.get("hostPath") for e in edits for n in e.get("deviceNodes", [])) or \
            any(d["name"][:1].isdigit() for d in spec.get("devices", [])):
        need("0.5.0")
    if spec.get("annotations") or any(d.get("annotations") for d in spec.get("devices", [])) \
            or "." in spec["kind"].partition("/")[2]:
        need("0.6.0")
    if any(e.get("intelRdt") or e.get("additionalGids") for e in edits):
        need("0.7.0")
    if any(e.get("netDevices") for e in edits) or any(
            "schemata" in (e.get("intelRdt") or {}) or "enableMonitoring" in
            (e.get("intelRdt") or {}) for e in edits):
        need("1.1.0")
    return needed


def spec_problems(spec: dict[str, Any]) -> list[str]:
    """The CDI rules its JSON schema does not encode: kind and device name syntax, unique
    names, a known cdiVersion at least the minimum the fields need."""
    problems = []
    version = spec.get("cdiVersion")
    if version not in VERSIONS:
        problems.append(f"cdiVersion: {version!r} is not a known CDI version")
    elif VERSIONS.index(version) < VERSIONS.index(minimum_version(spec)):
        problems.append(f"cdiVersion: {version} is lower than {minimum_version(spec)}, "
                        "which the fields used need")
    vendor_part, slash, class_part = str(spec.get("kind", "")).partition("/")
    if not slash or not _VENDOR.fullmatch(vendor_part) or not _CLASS.fullmatch(class_part) or \
            "/" in class_part:
        problems.append(f"kind: {spec.get('kind')!r} is not <vendor>/<class>")
    elif len(class_part) > 63 or len(vendor_part) > 253:
        problems.append("kind: vendor longer than 253 or class longer than 63 characters")
    names = [d.get("name", "") for d in spec.get("devices", [])]
    if not names:
        problems.append("devices: a spec needs at least one device")
    for name in names:
        if not _DEVICE_NAME.fullmatch(name):
            problems.append(f"devices: {name!r} is not a valid CDI device name")
    if len(set(names)) != len(names):
        problems.append("devices: names are not unique")
    return problems


def write_spec(cdi_root: Path, driver: str, claim_uid: str, data: bytes) -> Path:
    """Write a spec (`encode_spec`) atomically (temp file, rename) so a runtime never reads
    half a spec.

    Not fsynced: a crash of the OS voids every preparation (boot id) and the next start
    removes the specs of claims no longer prepared, so durability would buy nothing.
    """
    path = cdi_root / spec_file_name(driver, claim_uid)
    write_atomically(path, data, durable=False)
    return path


def remove_spec(cdi_root: Path, driver: str, claim_uid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (cdi_root / spec_file_name(driver, claim_uid)).unlink()


def claim_specs(cdi_root: Path, driver: str) -> dict[str, Path]:
    """This driver's claim spec files under `cdi_root`, by claim UID, and removes the temp
    files of writes that were killed."""
    prefix = f"{vendor(driver)}-{CLASS}_"
    remove_leftovers(cdi_root, prefix)
    found = {}
    for path in cdi_root.glob(f"{prefix}*.json"):
        uid = path.name.removeprefix(prefix).removesuffix(".json")
        if is_uuid(uid):
            found[uid] = path
    return found
