"""An admin's hand on GPU health: keep a GPU out of service, return it to service, or
clear what the monitor found on it, through `health-admin.json` in the plugin's data
directory, which `gpu-dra health` writes and the running plugin reads.

A file rather than a socket or an API object: a GPU kept out stays out across plugin
restarts and upgrades, it works the same in local mode and in the pod (`kubectl exec
<plugin pod> -- gpu-dra health ...`; the data directory is a hostPath), and it needs
no listener nor RBAC. The plugin checks the file's identity every second and reads it
only when it changed; a file it cannot read is logged and changes nothing.

The plugin writes the health it publishes to `health.json` beside it, which `gpu-dra
health status` prints and which lets the command refuse a GPU this node does not have.

A GPU is named by its minor number or its UUID, as the admin wrote it; a UUID follows
the GPU if its minor changes. A clear is a request at a time: the plugin applies each
one once, and none made before it started (its health starts over then).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from driver.atomicfile import write_atomically
from driver.health.model import GpuHealth, Manual, Observation
from driver.health.taints import rfc3339

log = logging.getLogger(__name__)

ADMIN_FILE = "health-admin.json"
STATUS_FILE = "health.json"
CHECK_INTERVAL = 1.0  # seconds between looks at the admin file

Action = Literal["out-of-service", "return", "clear"]


class AdminError(ValueError):
    """The admin file, or a request, is not one this driver reads; names the field."""


@dataclass(frozen=True)
class OutOfService:
    reason: str
    since: datetime


@dataclass(frozen=True)
class Requests:
    """What the admin asked, keyed by the GPU as written (minor or UUID)."""

    out_of_service: Mapping[str, OutOfService] = field(default_factory=dict)
    clears: Mapping[str, datetime] = field(default_factory=dict)


def request(requests: Requests, action: Action, gpu: str, at: datetime,
            reason: str = "") -> Requests:
    """The requests after one more: a clear also ends the GPU's out-of-service (it
    forgets every condition), a return ends it alone."""
    oos = {k: v for k, v in requests.out_of_service.items() if k != gpu}
    if action == "out-of-service":
        oos[gpu] = OutOfService(reason, at)
    clears = dict(requests.clears)
    if action == "clear":
        clears[gpu] = at
    return Requests(oos, clears)


def parse(data: bytes, source: str) -> Requests:
    try:
        doc = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as err:
        raise AdminError(f"{source}: not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise AdminError(f"{source}: expected an object, got {type(doc).__name__}")
    oos_doc, clears_doc = doc.get("outOfService", {}), doc.get("clear", {})
    if not isinstance(oos_doc, dict):
        raise AdminError(f"{source}: outOfService: expected an object")
    if not isinstance(clears_doc, dict):
        raise AdminError(f"{source}: clear: expected an object")
    oos = {}
    for gpu, entry in oos_doc.items():
        where = f"{source}: outOfService.{gpu}"
        if not isinstance(entry, dict) or not isinstance(entry.get("reason", ""), str):
            raise AdminError(f"{where}: expected {{reason, since}}")
        oos[gpu] = OutOfService(entry.get("reason", ""),
                                _time(entry.get("since"), f"{where}.since"))
    clears = {gpu: _time(at, f"{source}: clear.{gpu}") for gpu, at in clears_doc.items()}
    return Requests(oos, clears)


def dump(requests: Requests) -> bytes:
    doc = {"outOfService": {gpu: {"reason": o.reason, "since": o.since.isoformat()}
                            for gpu, o in sorted(requests.out_of_service.items())},
           "clear": {gpu: at.isoformat() for gpu, at in sorted(requests.clears.items())}}
    return json.dumps(doc, indent=2).encode() + b"\n"


def _time(value: Any, where: str) -> datetime:
    try:
        at = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise AdminError(f"{where}: expected an ISO 8601 time, got {value!r}") from None
    if at.tzinfo is None:
        raise AdminError(f"{where}: {value!r} has no timezone")
    return at


def load(path: Path) -> Requests:
    """The admin's requests; none where there is no file."""
    try:
        return parse(path.read_bytes(), str(path))
    except FileNotFoundError:
        return Requests()


def record(plugin_dir: Path, action: Action, gpu: str, reason: str = "",
           at: datetime | None = None) -> Requests:
    """Add one request to the file, under a lock so two admins' requests both land."""
    path = plugin_dir / ADMIN_FILE
    with open(plugin_dir / f".{ADMIN_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        requests = request(load(path), action, gpu, at or datetime.now(UTC), reason)
        write_atomically(path, dump(requests), durable=True)
    return requests


@dataclass(frozen=True)
class Applied:
    """What the plugin has applied, by GPU UUID: out-of-service reasons, latest clears."""

    out_of_service: Mapping[str, str] = field(default_factory=dict)
    clears: Mapping[str, datetime] = field(default_factory=dict)


def observations(requests: Requests, gpus: Mapping[int, str], applied: Applied,
                 started: datetime, at: datetime) -> tuple[list[Observation], Applied]:
    """The manual observations that bring the watched GPUs (minor -> UUID) to what the
    admin asked, and what is applied after them."""
    found: list[Observation] = []
    oos = dict(applied.out_of_service)
    clears = dict(applied.clears)
    for minor, uuid in sorted(gpus.items()):
        times = [t for t in (requests.clears.get(uuid), requests.clears.get(str(minor)))
                 if t is not None]
        clear = max(times, default=None)
        if clear is not None and clear > max(started, clears.get(uuid, started)):
            found.append(Manual(minor, at, "clear"))
            clears[uuid] = clear
            oos.pop(uuid, None)  # cleared too: kept out only if the file still says so
        wanted = requests.out_of_service.get(uuid) or requests.out_of_service.get(str(minor))
        if wanted is None and uuid in oos:
            found.append(Manual(minor, at, "return"))
            del oos[uuid]
        elif wanted is not None and oos.get(uuid) != wanted.reason:
            found.append(Manual(minor, at, "out-of-service", wanted.reason))
            oos[uuid] = wanted.reason
    return found, Applied(oos, clears)


class AdminWatch:
    """Applies the admin file's requests to the watched GPUs (`gpus()`, which may change
    with re-discovery) through `apply`, in a thread of its own."""

    def __init__(self, plugin_dir: Path, gpus: Callable[[], Mapping[int, str]],
                 apply: Callable[[list[Observation]], None],
                 interval: float = CHECK_INTERVAL) -> None:
        self._path = plugin_dir / ADMIN_FILE
        self._gpus = gpus
        self._apply = apply
        self._interval = interval
        self._started = datetime.now(UTC)
        self._applied = Applied()
        self._seen: tuple[object, ...] | None = None
        self._requests = Requests()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-admin", daemon=True)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # a bug must not end the watch: the admin's next request
                log.exception("applying %s failed", self._path)

    def check(self) -> None:
        """Read the file if it changed, and apply what differs from what is applied."""
        gpus = dict(self._gpus())
        try:
            st = os.stat(self._path)
            identity: tuple[object, ...] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            identity = ()
        if identity != self._seen:
            self._seen = identity
            try:
                self._requests = load(self._path)
            except (AdminError, OSError) as err:
                log.error("GPU health admin requests not applied: %s", err)
                return
            unknown = [g for g in (*self._requests.out_of_service, *self._requests.clears)
                       if g not in gpus.values() and g not in map(str, gpus)]
            if unknown:
                log.warning("%s names GPUs this node does not watch: %s", self._path,
                            ", ".join(sorted(set(unknown))))
        found, self._applied = observations(self._requests, gpus, self._applied,
                                            self._started, datetime.now(UTC))
        # a GPU no longer watched (gone after a re-discovery) starts over if it returns
        self._applied = replace(self._applied, out_of_service={
            u: r for u, r in self._applied.out_of_service.items() if u in gpus.values()})
        if found:
            self._apply(found)


def status_doc(health: Mapping[int, GpuHealth], gpus: Mapping[int, str],
               causes: Mapping[int, str], at: datetime) -> dict[str, Any]:
    """The published health as `health.json` holds it."""
    return {"updated": rfc3339(at), "gpus": [
        {"gpu": minor, "uuid": uuid, "status": health[minor].status if minor in health
         else "unknown", "cause": causes.get(minor, ""),
         "conditions": [{"kind": c.kind, "effect": c.effect, "value": c.value,
                         "since": rfc3339(c.since)}
                        for c in (health[minor].conditions if minor in health else ())]}
        for minor, uuid in sorted(gpus.items())]}


def write_status(plugin_dir: Path, doc: Mapping[str, Any]) -> None:
    write_atomically(plugin_dir / STATUS_FILE, json.dumps(doc, indent=2).encode() + b"\n",
                     durable=False)


def read_status(plugin_dir: Path) -> dict[str, Any] | None:
    """The plugin's latest `health.json`; None before a plugin wrote one."""
    try:
        doc: dict[str, Any] = json.loads((plugin_dir / STATUS_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise AdminError(f"{plugin_dir / STATUS_FILE}: not JSON: {err}") from None
    return doc
