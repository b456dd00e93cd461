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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from driver.atomicfile import write_atomically
from driver.health.model import GpuHealth, Manual, Observation
from driver.health.state import label_value
from driver.health.taints import rfc3339
from driver.plugin.monitor import HealthView

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


def observations(requests: Requests, health: Mapping[int, GpuHealth],
                 gpus: Mapping[int, str], cleared: Mapping[str, datetime],
                 started: datetime, at: datetime
                 ) -> tuple[list[Observation], dict[str, datetime]]:
    """The manual observations that bring the watched GPUs (minor -> UUID, their health
    now) to what the admin asked, and the latest clear applied by GPU UUID after them.
    Out-of-service is compared with the GPU's health, so a GPU whose health starts over
    (it came back after a re-discovery) is kept out again; each clear is applied once."""
    found: list[Observation] = []
    cleared = dict(cleared)
    for minor, uuid in sorted(gpus.items()):
        times = [t for t in (requests.clears.get(uuid), requests.clears.get(str(minor)))
                 if t is not None]
        clear = max(times, default=None)
        conditions = health[minor].conditions if minor in health else ()
        if clear is not None and clear > max(started, cleared.get(uuid, started)):
            found.append(Manual(minor, at, "clear"))
            cleared[uuid] = clear
            conditions = ()
        out = next((c for c in conditions if c.kind == "out-of-service"), None)
        wanted = requests.out_of_service.get(uuid) or requests.out_of_service.get(str(minor))
        if wanted is None and out is not None:
            found.append(Manual(minor, at, "return"))
        elif wanted is not None and (out is None or out.value != label_value(wanted.reason)):
            found.append(Manual(minor, at, "out-of-service", wanted.reason))
    return found, cleared


class AdminWatch:
    """Applies the admin file's requests to the watched GPUs through `apply`, in a thread
    of its own; `view()` gives their health now (the GPUs may change with re-discovery)."""

    def __init__(self, plugin_dir: Path, view: Callable[[], HealthView],
                 apply: Callable[[list[Observation]], None],
                 interval: float = CHECK_INTERVAL) -> None:
        self._path = plugin_dir / ADMIN_FILE
        self._view = view
        self._apply = apply
        self._interval = interval
        self._started = datetime.now(UTC)
        self._cleared: dict[str, datetime] = {}
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
        """Read the file if it changed; apply what differs from the GPUs' health."""
        view = self._view()
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
            known = {*view.uuids.values(), *map(str, view.uuids)}
            unknown = {g for g in (*self._requests.out_of_service, *self._requests.clears)
                       if g not in known}
            if unknown:
                log.warning("%s names GPUs this node does not watch: %s", self._path,
                            ", ".join(sorted(unknown)))
        found, self._cleared = observations(self._requests, view.gpus, view.uuids,
                                            self._cleared, self._started, datetime.now(UTC))
        if found:
            self._apply(found)


def status_doc(view: HealthView, at: datetime) -> dict[str, Any]:
    """The published health as `health.json` holds it."""
    return {"updated": rfc3339(at), "gpus": [
        {"gpu": minor, "uuid": uuid, "status": view.gpus[minor].status,
         "cause": view.causes.get(minor, ""),
         "conditions": [{"kind": c.kind, "effect": c.effect, "value": c.value,
                         "since": rfc3339(c.since)} for c in view.gpus[minor].conditions]}
        for minor, uuid in sorted(view.uuids.items()) if minor in view.gpus]}


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
