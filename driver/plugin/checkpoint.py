"""The plugin's record of what it prepared: a JSON snapshot, written atomically, and the
journal of the saves since (`journal`), read together.

Kubelet asks to unprepare claims that may be gone from the API server, and after a crash
the plugin must know what it half-did, so every claim's state is written down before and
after its side effects. Rules that keep upgrades and downgrades working (NVIDIA's driver
crash-looped on checkpoint changes):
- no checksum over re-marshalled data (the journal names its snapshot by the hash of the
  bytes as written); the snapshot's write is atomic (temp file, fsync, rename, fsync of
  the directory), so a torn snapshot cannot happen; its format is the same as before the
  journal, and a release that knows no journal reads it alone (`records` says when it
  holds every claim);
- fields this version does not know are kept, at every level, and written back;
- fields are only ever added, with a meaning that does not change, and a reader defaults
  a field that is missing; `schemaVersion` says which version wrote the file last;
- the node's boot id is stored: after a reboot every preparation is void.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from driver.atomicfile import write_atomically
from driver.errors import PluginError
from driver.kube.names import is_uuid
from driver.plugin import journal
from driver.safeload import LoadError, json_document, read_text

SCHEMA_VERSION = 1
MAX_BYTES = 256 << 20  # about 600,000 prepared claims; bounds what a start reads
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

State = Literal["PrepareStarted", "PrepareCompleted", "UnprepareStarted"]
STATES: tuple[State, ...] = ("PrepareStarted", "PrepareCompleted", "UnprepareStarted")


class CheckpointError(PluginError):
    """The checkpoint file cannot be read as a checkpoint; names the file and the field."""


@dataclass(frozen=True)
class MigInstance:
    """A MIG device the plugin created (dynamic MIG); ids are None until created."""

    profile_id: int
    start: int
    size: int
    gi_id: int | None = None
    ci_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PreparedDevice:
    """One allocation result as prepared: what the kubelet got back and what to undo."""

    request_names: tuple[str, ...]
    pool: str
    device: str
    cdi_device_ids: tuple[str, ...]
    gpu_uuid: str
    admin_access: bool = False
    share_id: str | None = None
    created_mig: MigInstance | None = None
    timeslice: str | None = None  # the interval set on the GPU, reset at unprepare
    config: dict[str, Any] | None = None  # the opaque config applied, as decoded
    # the directory of the claim's MPS daemon (`mps`), which serves this device
    mps: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ClaimRecord:
    uid: str
    namespace: str
    name: str
    state: State
    devices: tuple[PreparedDevice, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def with_state(self, state: State, devices: tuple[PreparedDevice, ...] | None = None
                   ) -> ClaimRecord:
        return replace(self, state=state, devices=self.devices if devices is None else devices)


@dataclass(frozen=True)
class Checkpoint:
    boot_id: str
    claims: dict[str, ClaimRecord] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION  # as read; what the file was last written by
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def with_claims(self, claims: dict[str, ClaimRecord]) -> Checkpoint:
        return replace(self, claims=claims)


def read_boot_id(path: Path = BOOT_ID_PATH) -> str:
    return path.read_text().strip()


# -- encoding --------------------------------------------------------------------------

def _mig_to_json(mig: MigInstance) -> dict[str, Any]:
    out = {**mig.extra, "profileId": mig.profile_id, "start": mig.start, "size": mig.size}
    if mig.gi_id is not None:
        out["gpuInstanceId"] = mig.gi_id
    if mig.ci_id is not None:
        out["computeInstanceId"] = mig.ci_id
    return out


def _device_to_json(device: PreparedDevice) -> dict[str, Any]:
    out: dict[str, Any] = {**device.extra, "requestNames": list(device.request_names),
                           "pool": device.pool, "device": device.device,
                           "cdiDeviceIDs": list(device.cdi_device_ids),
                           "gpuUUID": device.gpu_uuid, "adminAccess": device.admin_access}
    if device.share_id is not None:
        out["shareID"] = device.share_id
    if device.created_mig is not None:
        out["createdMig"] = _mig_to_json(device.created_mig)
    if device.timeslice is not None:
        out["timeslice"] = device.timeslice
    if device.config is not None:
        out["config"] = device.config
    if device.mps is not None:
        out["mpsDirectory"] = device.mps
    return out


def claim_to_json(record: ClaimRecord) -> dict[str, Any]:
    return {**record.extra, "namespace": record.namespace, "name": record.name,
            "state": record.state, "devices": [_device_to_json(d) for d in record.devices]}


def to_json(checkpoint: Checkpoint) -> dict[str, Any]:
    return {**checkpoint.extra, "schemaVersion": SCHEMA_VERSION,
            "nodeBootID": checkpoint.boot_id,
            "claims": {uid: claim_to_json(r) for uid, r in sorted(checkpoint.claims.items())}}


# -- decoding --------------------------------------------------------------------------

_MIG_KEYS = {"profileId", "start", "size", "gpuInstanceId", "computeInstanceId"}
_DEVICE_KEYS = {"requestNames", "pool", "device", "cdiDeviceIDs", "gpuUUID", "adminAccess",
                "shareID", "createdMig", "timeslice", "config", "mpsDirectory"}
_CLAIM_KEYS = {"namespace", "name", "state", "devices"}
_TOP_KEYS = {"schemaVersion", "nodeBootID", "claims"}


class _Reader:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: str, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.file}: {where}: {what}")

    def take(self, obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
             default: Any = ...) -> Any:
        if key not in obj:
            if default is ...:
                raise self.fail(f"{where}.{key}", "missing")
            return default
        value = obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"{where}.{key}", f"unexpected {type(value).__name__}")
        return value

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "not an object")
        return value

    def strings(self, obj: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
        values = self.take(obj, key, list, where, default=[])
        if not all(isinstance(v, str) for v in values):
            raise self.fail(f"{where}.{key}", "not a list of strings")
        return tuple(values)

    def mig(self, value: Any, where: str) -> MigInstance:
        obj = self.obj(value, where)
        return MigInstance(
            profile_id=self.take(obj, "profileId", int, where),
            start=self.take(obj, "start", int, where), size=self.take(obj, "size", int, where),
            gi_id=self.take(obj, "gpuInstanceId", int, where, default=None),
            ci_id=self.take(obj, "computeInstanceId", int, where, default=None),
            extra={k: v for k, v in obj.items() if k not in _MIG_KEYS})

    def device(self, value: Any, where: str) -> PreparedDevice:
        obj = self.obj(value, where)
        mig = obj.get("createdMig")
        return PreparedDevice(
            request_names=self.strings(obj, "requestNames", where),
            pool=self.take(obj, "pool", str, where), device=self.take(obj, "device", str, where),
            cdi_device_ids=self.strings(obj, "cdiDeviceIDs", where),
            gpu_uuid=self.take(obj, "gpuUUID", str, where),
            admin_access=self.take(obj, "adminAccess", bool, where, default=False),
            share_id=self.take(obj, "shareID", str, where, default=None),
            created_mig=None if mig is None else self.mig(mig, f"{where}.createdMig"),
            timeslice=self.take(obj, "timeslice", str, where, default=None),
            config=self.take(obj, "config", dict, where, default=None),
            mps=self.take(obj, "mpsDirectory", str, where, default=None),
            extra={k: v for k, v in obj.items() if k not in _DEVICE_KEYS})

    def uid(self, key: str) -> str:
        """A record's key: a claim UID, as it goes into CDI spec names and ids."""
        if not is_uuid(key):
            raise self.fail(f"claims.{key!r}", "the key is not a claim UID")
        return key

    def claim(self, uid: str, value: Any, where: str) -> ClaimRecord:
        obj = self.obj(value, where)
        state = self.take(obj, "state", str, where)
        if state not in STATES:
            raise self.fail(f"{where}.state", f"unknown state {state!r}")
        devices = self.take(obj, "devices", list, where, default=[])
        return ClaimRecord(
            uid=uid, namespace=self.take(obj, "namespace", str, where),
            name=self.take(obj, "name", str, where), state=state,
            devices=tuple(self.device(d, f"{where}.devices[{i}]") for i, d in enumerate(devices)),
            extra={k: v for k, v in obj.items() if k not in _CLAIM_KEYS})

    def checkpoint(self, data: Any) -> Checkpoint:
        top = self.obj(data, "(top)")
        claims = self.obj(top.get("claims", {}), "claims")
        return Checkpoint(
            boot_id=self.take(top, "nodeBootID", str, "(top)", default=""),
            claims={self.uid(uid): self.claim(uid, c, f"claims.{uid}")
                    for uid, c in claims.items()},
            schema_version=self.take(top, "schemaVersion", int, "(top)", default=0),
            extra={k: v for k, v in top.items() if k not in _TOP_KEYS})


def from_json(data: Any, file: str = "checkpoint") -> Checkpoint:
    return _Reader(file).checkpoint(data)


# -- the files -------------------------------------------------------------------------

FileId = tuple[int, int, int, int]


def file_id(path: Path) -> FileId | None:
    """What every write of the file changes (a rename makes another inode, an append another
    size, an edit in place another ctime), None if there is none."""
    try:
        return stat_id(os.stat(path))
    except FileNotFoundError:
        return None


def stat_id(stat: os.stat_result) -> FileId:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@dataclass(frozen=True)
class Read:
    """The checkpoint on disk: the snapshot with its journal's saves applied, the snapshot's
    size, and the journal as `journal.replay` found it."""

    checkpoint: Checkpoint
    snapshot_size: int
    replay: journal.Replay


def _read(path: Path, what: str) -> bytes | None:
    try:
        return read_text(path, MAX_BYTES).encode()
    except LoadError as err:
        if isinstance(err.__cause__, FileNotFoundError):
            return None
        raise CheckpointError(f"{what} {path}: cannot read it: {err.problem}") from None


def read(path: Path, boot_id: str | None = None) -> Read | None:
    """The checkpoint at `path` and its journal, None if there is none yet. A snapshot of
    another boot than `boot_id` is read without its journal: every record is void, and a
    power cut may have left the journal's last saves torn (a prepare flushes two lines at
    once, see `state`), which must not stop the start."""
    snapshot = _read(path, "checkpoint")
    if snapshot is None:
        return None
    journal_path = journal.path_for(path)
    try:
        data = json_document(snapshot, f"checkpoint {path}")
        journal_data = _read(journal_path, "checkpoint journal") or b""
        if boot_id is not None and isinstance(data, dict) and \
                data.get("nodeBootID", boot_id) != boot_id:
            replay = journal.Replay([], None, 0)  # void with the rest: nothing to report
        else:
            replay = journal.replay(journal_data, snapshot, f"checkpoint journal {journal_path}")
    except LoadError as err:
        raise CheckpointError(str(err)) from None
    if replay.saves:
        _apply(data, replay.saves)
    return Read(from_json(data, str(path)), len(snapshot), replay)


def _apply(data: Any, saves: list[journal.Save]) -> None:
    """The journal's saves over the snapshot's claims, still JSON (a snapshot that is not a
    checkpoint is left for `from_json` to name)."""
    claims = data.setdefault("claims", {}) if isinstance(data, dict) else None
    if isinstance(claims, dict):
        for save in saves:
            claims.update(save.changed)
            for uid in save.deleted:
                claims.pop(uid, None)


def load(path: Path) -> Checkpoint | None:
    """The checkpoint at `path` (its journal applied), None if there is none yet."""
    found = read(path)
    return None if found is None else found.checkpoint


def save(path: Path, checkpoint: Checkpoint) -> bytes:
    """Replace the snapshot atomically and durably; the bytes written. Compact JSON: the C
    encoder (indented, the pure-Python one made most of a compaction's time with many
    claims held)."""
    data = json.dumps(to_json(checkpoint), separators=(",", ":")).encode()
    write_atomically(path, data, durable=True)
    return data
