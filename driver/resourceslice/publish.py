"""ResourceSlices -> the API server or a local directory, writing only what changed.

The pool is this node's slices of this driver. What to write is a pure function
(:func:`plan`) of what exists and what the builder wants; the publishers only
read, call :func:`plan` and carry out its writes.

Generation: consumers use only the slices of a pool's highest generation and wait
until they see ``resourceSliceCount`` of them, so every content change (ours, or
someone else's edit being undone) moves every slice to max(existing) + 1, and an
unchanged pool is left alone: a restart with the same inventory writes nothing.

Two publishers of one pool (a rolling update: the old and the new plugin pod side by side)
whose versions build different slices would undo each other's writes for as long as both
run; the one that finds the pool moved past its own last write, to other content, yields
(:func:`stance`) while the other pod lives.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import urllib3
import yaml
from kubernetes.client import ApiException, ResourceV1Api
from kubernetes.watch.watch import iter_resp_lines

from driver.atomicfile import remove_leftovers, write_atomically
from driver.errors import SliceError
from driver.inventory.model import Inventory
from driver.kube.api import ApiResult, api_request
from driver.resourceslice.build import (
    CounterLayout,
    MigMode,
    SliceOptions,
    build_slices,
    limit_violations,
    slice_name,
)

log = logging.getLogger(__name__)

LayoutChoice = Literal["auto", "split", "combined"]

SLICES_PATH = "/apis/resource.k8s.io/v1/resourceslices"


class PublishError(SliceError, RuntimeError):
    """Publishing cannot succeed by retrying: the slices, the RBAC or the cluster need a fix."""


class PublishTimeout(SliceError, RuntimeError):
    """:meth:`ApiPublisher.publish` gave up waiting; the resync loop keeps trying."""


class _Transient(Exception):
    """Worth retrying: the server is unreachable, busy, or the pool changed under us."""

    def __init__(self, waiting_for: str) -> None:
        super().__init__(waiting_for)
        self.waiting_for = waiting_for


# --- the pure part ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The writes that turn ``existing`` into ``desired``; ``generation`` is the pool's
    generation once they are done. ``update`` objects carry the resourceVersion they
    replace, ``delete`` objects are the existing ones (uid and resourceVersion are the
    delete preconditions)."""

    create: tuple[dict[str, Any], ...]
    update: tuple[dict[str, Any], ...]
    delete: tuple[dict[str, Any], ...]
    generation: int

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.update) + len(self.delete)


@dataclass(frozen=True)
class PublishResult:
    """What one publish wrote, by slice name, and the pool's generation afterwards."""

    created: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    generation: int = 0

    @property
    def writes(self) -> int:
        return len(self.created) + len(self.updated) + len(self.deleted)


def generation_of(slice_obj: Mapping[str, Any]) -> int:
    return int(slice_obj["spec"]["pool"].get("generation", 0))


def content(slice_obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a slice says, without its generation or what the server adds (a taint's
    ``timeAdded``): two slices with equal content need no write between them."""
    spec = dict(slice_obj["spec"])
    spec["pool"] = {k: v for k, v in spec["pool"].items() if k != "generation"}
    if any("taints" in d for d in spec.get("devices", [])):
        spec["devices"] = [_without_time_added(d) for d in spec["devices"]]
    owners = slice_obj.get("metadata", {}).get("ownerReferences") or []
    return {"spec": spec, "owners": owners}


def _without_time_added(device: Mapping[str, Any]) -> Mapping[str, Any]:
    if "taints" not in device:
        return device
    return {**device, "taints": [{k: v for k, v in t.items() if k != "timeAdded"}
                                 for t in device["taints"]]}


def stamped(slice_obj: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """A copy of ``slice_obj`` in pool generation ``generation``: its own metadata and
    pool, the devices shared (nothing changes those)."""
    spec = slice_obj["spec"]
    return {**slice_obj, "metadata": dict(slice_obj["metadata"]),
            "spec": {**spec, "pool": {**spec["pool"], "generation": generation}}}


def plan(existing: Sequence[Mapping[str, Any]], desired: Sequence[Mapping[str, Any]]) -> Plan:
    """Writes that make the pool ``existing`` equal to ``desired`` (whose generations are
    ignored): none when the content is the same and the pool is in one generation;
    otherwise every desired slice in generation max(existing) + 1 (existing ones
    updated in place, missing ones created) and the rest deleted."""
    by_name = {s["metadata"]["name"]: s for s in existing}
    wanted = {s["metadata"]["name"]: s for s in desired}
    if len(wanted) != len(desired):
        raise ValueError("desired slices: duplicate metadata.name")
    current = max((generation_of(s) for s in existing), default=0)
    unchanged = (
        bool(existing)
        and by_name.keys() == wanted.keys()
        and len({generation_of(s) for s in existing}) == 1
        and all(content(by_name[n]) == content(d) for n, d in wanted.items())
    )
    if unchanged:
        return Plan((), (), (), current)
    generation = current + 1
    create: list[dict[str, Any]] = []
    update: list[dict[str, Any]] = []
    for name, slice_obj in wanted.items():
        new = stamped(slice_obj, generation)
        if name in by_name:
            new["metadata"]["resourceVersion"] = by_name[name]["metadata"].get(
                "resourceVersion", "")
            update.append(new)
        else:
            create.append(new)
    delete = [by_name[n] for n in sorted(by_name.keys() - wanted.keys())]
    return Plan(tuple(create), tuple(update), tuple(delete), generation)


def counter_layout_for(git_version: str) -> CounterLayout:
    """Where counter sets go for an API server of ``git_version`` (``v1.37.2``):
    1.34 accepts them only beside the devices, 1.35+ only in device-less slices."""
    match = re.match(r"v?(\d+)\.(\d+)", git_version)
    if not match:
        raise PublishError(f"API server version {git_version!r}: not a Kubernetes version")
    major, minor = int(match[1]), int(match[2])
    if (major, minor) < (1, 34):
        raise PublishError(f"API server {git_version}: resource.k8s.io/v1 ResourceSlices "
                           "need Kubernetes 1.34 or newer")
    return "combined" if (major, minor) == (1, 34) else "split"


def dropped_fields(sent: Any, stored: Any, path: str = "") -> list[str]:
    """Paths set in ``sent`` that ``stored`` lacks: fields the API server dropped because
    it does not know them or their feature gate is off."""
    if isinstance(sent, Mapping) and isinstance(stored, Mapping):
        return [p for key, value in sent.items()
                for p in ([f"{path}.{key}".lstrip(".")] if key not in stored
                          else dropped_fields(value, stored[key], f"{path}.{key}"))]
    if isinstance(sent, list) and isinstance(stored, list):
        return [p for i, (a, b) in enumerate(zip(sent, stored, strict=False))
                for p in dropped_fields(a, b, f"{path}[{i}]")]
    return []


def foreign_change(event: Mapping[str, Any], expected: Mapping[str, Mapping[str, Any]],
                   generation: int) -> str | None:
    """Why a watch event shows the pool differs from what we last wrote (``expected``
    slices by name, in ``generation``), or None if it is our own write."""
    kind = event.get("type")
    obj = event.get("object") or {}
    name = obj.get("metadata", {}).get("name", "")
    if kind == "ERROR":
        return f"watch error: {obj.get('message', obj)}"
    if kind not in ("ADDED", "MODIFIED", "DELETED"):
        return None
    if kind == "DELETED":
        return f"ResourceSlice {name} was deleted" if name in expected else None
    if name not in expected:
        return f"ResourceSlice {name} is not one of ours"
    if generation_of(obj) != generation or content(obj) != content(expected[name]):
        return f"ResourceSlice {name} was changed"
    return None


Stance = Literal["write", "yield", "wait"]
"""What a resync does about a difference: write (restore), yield to a newer publisher of the
pool, or wait a little for that publisher's pod to show it is alive."""


def overtaken(existing: Sequence[Mapping[str, Any]], todo: Plan, last_generation: int) -> bool:
    """Another publisher moved the pool past ``last_generation`` (the one we last wrote) to
    content other than ours. A deleted slice or an edit that keeps the generation (a
    person's ``kubectl edit``) is not that: it is restored as any other difference."""
    top = max((generation_of(s) for s in existing), default=0)
    return bool(todo.writes) and 0 < last_generation < top


def stance(overtaken: bool, others_alive: bool, yielding: bool, alone_for: float,
           grace: float) -> Stance:
    """Whether a resync restores our content. Overtaken while another plugin pod of the
    driver is alive on the node: yield, so the newer version's slices stand. Overtaken
    with no other pod in sight: a new pod publishes before it opens its sockets, so wait up
    to ``grace`` seconds (``alone_for``: how long we have seen nobody) for them, unless we
    were already yielding, which means the other pod has just gone: restore at once."""
    if not overtaken:
        return "write"
    if others_alive:
        return "yield"
    return "wait" if not yielding and alone_for < grace else "write"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: try n waits ``initial * factor**n`` capped at
    ``cap``, of which a random ``jitter`` fraction is taken off, so a fleet of nodes
    that lost the API server at once does not come back in step."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 16.0
    jitter: float = 0.5

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        rng = rng or random.Random()
        for attempt in itertools.count():
            base = min(self.cap, self.initial * self.factor ** min(attempt, 64))
            yield base * (1 - self.jitter * rng.random())


# --- the publishers ---------------------------------------------------------------------------


class Publisher(Protocol):
    """Keeps this node's pool equal to what the builder makes of an inventory."""

    def publish(self, inventory: Inventory, timeout: float | None = None) -> PublishResult: ...

    def cleanup(self) -> int: ...


class DirPublisher:
    """Local mode: ``<root>/resourceslices/<name>.yaml``, one file per slice, each written
    atomically (temp file in the same folder, fsync, rename). Files of other drivers or
    nodes in the folder are left alone; names starting with ``.`` are never slices."""

    def __init__(self, root: Path, options: SliceOptions,
                 on_writes: Callable[[int], None] | None = None) -> None:
        self.directory = Path(root) / "resourceslices"
        self.options = options
        self.on_writes = on_writes  # told how many files each publish wrote (metrics)

    def _existing(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.directory.glob("[!.]*.yaml")):
            try:
                obj = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
                ours = (obj["metadata"]["name"] == path.stem
                        and obj["spec"]["driver"] == self.options.driver
                        and obj["spec"].get("nodeName") == self.options.node)
            except (yaml.YAMLError, TypeError, KeyError) as err:
                log.warning("%s: not a ResourceSlice, left alone (%s)", path, err)
                continue
            if ours:
                found.append(obj)
        return found

    def publish(self, inventory: Inventory, timeout: float | None = None) -> PublishResult:
        """Local files never make us wait: ``timeout`` is accepted for the protocol only."""
        desired = build_slices(inventory, self.options, generation=0)
        if problems := limit_violations(desired):
            raise PublishError("; ".join(problems))
        self.directory.mkdir(parents=True, exist_ok=True)
        # Temp files a writer killed mid-write left; our slice names share this prefix.
        remove_leftovers(self.directory, slice_name(self.options, 0)[:-1])
        todo = plan(self._existing(), desired)
        for obj in todo.delete:
            (self.directory / f"{obj['metadata']['name']}.yaml").unlink(missing_ok=True)
        for obj in (*todo.update, *todo.create):
            obj["metadata"].pop("resourceVersion", None)
            write_atomically(self.directory / f"{obj['metadata']['name']}.yaml",
                             yaml.safe_dump(obj, sort_keys=False).encode(), durable=True)
        if todo.writes and self.on_writes is not None:
            self.on_writes(todo.writes)
        return _result(todo)

    def cleanup(self) -> int:
        """Delete this node's slices of this driver; returns how many."""
        existing = self._existing() if self.directory.is_dir() else []
        for obj in existing:
            (self.directory / f"{obj['metadata']['name']}.yaml").unlink(missing_ok=True)
        return len(existing)


def _result(todo: Plan) -> PublishResult:
    def names(objs: tuple[dict[str, Any], ...]) -> tuple[str, ...]:
        return tuple(o["metadata"]["name"] for o in objs)

    return PublishResult(names(todo.create), names(todo.update), names(todo.delete),
                         todo.generation)


@dataclass(frozen=True)
class _Published:
    """What the last successful sync left on the server: the baseline for watch events."""

    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: int = 0


class ApiPublisher:
    """API server mode: this node's slices of this driver, owned by its Node.

    ``publish(inventory)`` brings the pool in line now (retrying what is worth retrying);
    ``run_resync(stop)``, in a thread, keeps it there: it watches the pool and restores
    any slice someone deletes or edits, resyncs every ``resync_period`` seconds, and
    rides out an unreachable API server with backoff, saying in ``waiting_for`` and the
    log what it waits for. ``cleanup()`` deletes the pool (uninstall).

    ``others_alive`` (None: never) tells whether another plugin pod of this driver runs on
    the node. While it does, the resync loop does not restore a pool that someone else
    moved to a higher generation with other content (see :func:`stance`): it checks again
    every ``yield_poll`` seconds and restores once that pod is gone. ``publish()`` always
    writes: a new inventory is news, not a restore.
    """

    def __init__(
        self,
        api_client: Any,
        driver: str,
        node: str,
        mig_mode: MigMode = "static",
        counter_layout: LayoutChoice = "auto",
        resync_period: float = 60.0,
        backoff: Backoff | None = None,
        request_timeout: float = 30.0,
        on_writes: Callable[[int], None] | None = None,
        others_alive: Callable[[], bool] | None = None,
        yield_grace: float = 10.0,
        yield_poll: float = 5.0,
    ) -> None:
        self._api = api_client
        self.on_writes = on_writes  # told how many writes each sync made, the loop's too
        self.driver = driver
        self.node = node
        self.mig_mode: MigMode = mig_mode
        self.counter_layout: LayoutChoice = counter_layout
        self.resync_period = resync_period
        self.backoff = backoff or Backoff()
        self.request_timeout = request_timeout
        self.others_alive = others_alive
        self.yield_grace = yield_grace
        self.yield_poll = yield_poll
        self._yielding = False  # the loop leaves the pool to a newer publisher's pod
        self._alone_since: float | None = None  # overtaken, and no other pod seen since
        self._selector = f"spec.nodeName={node},spec.driver={driver}"
        self._lock = threading.Lock()  # one sync at a time: publish() and the loop
        self._inventory: Inventory | None = None
        self._published = _Published()
        self._wake = threading.Event()  # an inventory arrived, or the loop must stop
        self._watch_lock = threading.Lock()
        self._watch_resp: Any = None
        self._waiting_for: str | None = None
        self.syncs = 0
        """Completed syncs (list, plan, writes), by publish() and the resync loop."""

    @property
    def waiting_for(self) -> str | None:
        """What publishing waits for right now (e.g. the API server), None when in sync."""
        return self._waiting_for

    @property
    def yielding(self) -> bool:
        """The resync loop leaves the pool to another plugin pod's newer slices."""
        return self._yielding

    @property
    def api_client(self) -> Any:
        """The ``kubernetes.client.ApiClient`` every call goes through."""
        return self._api

    @property
    def server(self) -> str:
        return str(self._api.configuration.host)

    # -- public API ----------------------------------------------------------------------

    def publish(self, inventory: Inventory, timeout: float | None = None) -> PublishResult:
        """Make the pool match ``inventory``; the result is what this call wrote.

        Transient failures (unreachable, 409, 429, 5xx) are retried with backoff for up
        to ``timeout`` seconds (None: until done), then :class:`PublishTimeout`; the
        resync loop, if running, carries on with this inventory. Problems retrying
        cannot fix raise :class:`PublishError`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.backoff.delays()
        pending: Inventory | None = inventory
        try:
            while True:
                try:
                    with self._lock:
                        if pending is not None:  # a newer publish() may follow ours
                            self._inventory, pending = pending, None
                        result, _, _ = self._sync(restore=False)
                    self._set_waiting(None)
                    return result
                except PublishError as err:
                    self._set_waiting(f"a fix: {err}")
                    raise
                except _Transient as err:
                    self._set_waiting(err.waiting_for)
                    delay = next(delays)
                    if deadline is not None and time.monotonic() + delay > deadline:
                        self._interrupt_watch()  # the loop resyncs, with its own backoff
                        raise PublishTimeout(f"gave up after {timeout:g}s waiting for "
                                             f"{err.waiting_for}") from err
                    time.sleep(delay)
        finally:
            self._wake.set()  # a loop still waiting for a first inventory has one now

    def run_resync(self, stop: threading.Event) -> None:
        """Keep the pool in sync until ``stop`` is set; never raises. Run it in a thread."""
        def wake_on_stop() -> None:
            stop.wait()
            self._wake.set()
            self._interrupt_watch()

        threading.Thread(target=wake_on_stop, name="publish-stop", daemon=True).start()
        delays: Iterator[float] | None = None
        while not stop.is_set():
            if self._inventory is None:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                with self._lock:
                    _, resource_version, taken = self._sync(restore=True)
                self._set_waiting(None)
                delays = None
                if resource_version:  # else cleanup() took the inventory away
                    self._watch(resource_version, stop, {
                        "write": self.resync_period, "yield": self.yield_poll,
                        "wait": 1.0}[taken])
            except _Transient as err:
                self._set_waiting(err.waiting_for)
                delays = delays or self.backoff.delays()
                stop.wait(next(delays))
            except PublishError as err:
                log.error("cannot publish ResourceSlices: %s", err)
                self._set_waiting(f"a fix: {err}")
                stop.wait(self.resync_period)
            except Exception:  # a bug must not end the loop that keeps the pool alive
                log.exception("ResourceSlice resync failed")
                stop.wait(self.resync_period)

    def cleanup(self, timeout: float | None = 60.0) -> int:
        """Delete every slice of this driver on this node (a clean uninstall) and stop
        publishing; returns how many were deleted. Stop ``run_resync`` first."""
        self._inventory = None
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = self.backoff.delays()
        deleted = 0
        while True:
            try:
                with self._lock:
                    existing, _ = self._list()
                    for obj in existing:
                        self._delete(obj)
                        deleted += 1
                    if not existing:
                        self._published = _Published()
                        self._set_waiting(None)
                        return deleted
            except _Transient as err:
                self._set_waiting(err.waiting_for)
                delay = next(delays)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise PublishTimeout(f"cleanup gave up after {timeout:g}s waiting for "
                                         f"{err.waiting_for}") from err
                time.sleep(delay)

    # -- one sync ------------------------------------------------------------------------

    def _sync(self, restore: bool) -> tuple[PublishResult, str, Stance]:
        """List, plan, write (``restore``: unless :meth:`_stance` says not to). Returns the
        result, the list's resourceVersion and the stance taken."""
        inventory = self._inventory
        if inventory is None:
            return PublishResult(generation=self._published.generation), "", "write"
        layout = (counter_layout_for(self._server_version())
                  if self.counter_layout == "auto" else self.counter_layout)
        options = SliceOptions(self.driver, self.node, self.mig_mode, layout)
        desired = build_slices(inventory, options, generation=0)
        if problems := limit_violations(desired):
            raise PublishError("; ".join(problems))
        owner = self._owner()
        for obj in desired:
            obj["metadata"]["ownerReferences"] = [owner]
        existing, resource_version = self._list()
        todo = plan(existing, desired)
        taken = self._stance(existing, todo) if restore else "write"
        if taken != "write":
            self.syncs += 1
            return PublishResult(generation=self._published.generation), resource_version, taken
        if self._yielding:
            self._yielding = False
            log.info("ResourceSlices of %s: no longer leaving them to another plugin pod of "
                     "%s (it is gone, or its slices are ours)", self.node, self.driver)
        for obj in todo.delete:
            self._delete(obj)
        for obj in todo.update:
            self._write("PUT", f"{SLICES_PATH}/{obj['metadata']['name']}", obj, 200)
        for obj in todo.create:
            self._write("POST", SLICES_PATH, obj, 201)
        self._published = _Published(
            {o["metadata"]["name"]: stamped(o, todo.generation) for o in desired},
            todo.generation)
        self.syncs += 1
        if todo.writes:
            if self.on_writes is not None:
                self.on_writes(todo.writes)
            log.info("ResourceSlices of %s: generation %d, created %d, updated %d, deleted %d",
                     self.node, todo.generation, len(todo.create), len(todo.update),
                     len(todo.delete))
        return _result(todo), resource_version, "write"

    def _stance(self, existing: Sequence[Mapping[str, Any]], todo: Plan) -> Stance:
        """:func:`stance` for this resync, asking ``others_alive`` only when it matters."""
        over = (self.others_alive is not None
                and overtaken(existing, todo, self._published.generation))
        alive = over and self.others_alive is not None and self.others_alive()
        now = time.monotonic()
        if over and not alive and self._alone_since is None:
            self._alone_since = now
        taken = stance(over, alive, self._yielding,
                       now - (self._alone_since or now), self.yield_grace)
        if taken != "wait":  # a publisher that is no pod waits a grace before each restore
            self._alone_since = None
        if taken == "yield" and not self._yielding:
            self._yielding = True
            log.info("ResourceSlices of %s: another plugin pod of %s on the node published "
                     "other slices (pool generation %d, ours %d); leaving them to it while "
                     "it runs", self.node, self.driver,
                     max(generation_of(s) for s in existing), self._published.generation)
        return taken

    def _call(self, method: str, path: str, body: Any = None,
              query: Mapping[str, str] | None = None) -> ApiResult:
        try:
            result = api_request(self._api, method, path, body, query=query,
                                 timeout=self.request_timeout)
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise _Transient(f"the API server at {self.server} ({_reason(err)})") from err
        except ApiException as err:  # status 0: TLS failures
            raise _Transient(f"the API server at {self.server} ({err.reason})") from err
        if result.status in (409, 429) or result.status >= 500:
            what = {409: "a conflict to clear", 429: "the API server to stop throttling"}
            raise _Transient(f"{what.get(result.status, 'the API server to recover')}: "
                             f"{method} {path}: HTTP {result.status} {_message(result)}")
        return result

    def _server_version(self) -> str:
        result = self._call("GET", "/version")
        if result.status != 200:
            raise PublishError(f"GET /version: HTTP {result.status} {_message(result)}")
        return str(result.body["gitVersion"])

    def _owner(self) -> dict[str, Any]:
        result = self._call("GET", f"/api/v1/nodes/{self.node}")
        if result.status == 404:
            raise _Transient(f"Node {self.node} to exist (it owns the ResourceSlices)")
        if result.status != 200:
            raise PublishError(f"GET Node {self.node}: HTTP {result.status} "
                               f"{_message(result)}")
        return {"apiVersion": "v1", "kind": "Node", "name": self.node,
                "uid": result.body["metadata"]["uid"], "controller": True}

    def _list(self) -> tuple[list[dict[str, Any]], str]:
        result = self._call("GET", SLICES_PATH, query={"fieldSelector": self._selector})
        if result.status != 200:
            raise PublishError(f"list ResourceSlices: HTTP {result.status} {_message(result)}")
        return list(result.body.get("items") or []), result.body["metadata"]["resourceVersion"]

    def _delete(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        preconditions = {"uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}
        result = self._call("DELETE", f"{SLICES_PATH}/{meta['name']}",
                            {"apiVersion": "v1", "kind": "DeleteOptions",
                             "preconditions": preconditions})
        if result.status == 404:
            return  # already gone
        if result.status not in (200, 202):
            raise PublishError(f"delete ResourceSlice {meta['name']}: HTTP {result.status} "
                               f"{_message(result)}")

    def _write(self, method: str, path: str, obj: dict[str, Any], ok: int) -> None:
        name = obj["metadata"]["name"]
        result = self._call(method, path, obj, query={"fieldValidation": "Strict"})
        if result.status == 404:
            raise _Transient(f"ResourceSlice {name} to settle (deleted while updating)")
        if result.status != ok:
            raise PublishError(f"{method} ResourceSlice {name}: HTTP {result.status} "
                               f"{_message(result)}")
        if lost := dropped_fields(obj["spec"], result.body.get("spec", {}), "spec"):
            raise PublishError(
                f"the API server dropped fields of ResourceSlice {name}: "
                f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''} (a feature gate such "
                "as DRAPartitionableDevices or DRADeviceTaints is off?)")

    # -- watching ------------------------------------------------------------------------

    def _watch(self, resource_version: str, stop: threading.Event, period: float) -> None:
        """Follow the pool from ``resource_version`` until someone else changes it,
        ``period`` seconds are over, or ``stop``; then return so the caller resyncs."""
        seconds = max(1, int(period))
        try:
            resp = ResourceV1Api(self._api).list_resource_slice(
                field_selector=self._selector, resource_version=resource_version, watch=True,
                allow_watch_bookmarks=True, timeout_seconds=seconds, _preload_content=False,
                _request_timeout=(self.request_timeout, seconds + self.request_timeout))
        except ApiException as err:
            if err.status == 410:
                return  # too old: a fresh list
            raise _Transient(f"the API server at {self.server} to watch "
                             f"(HTTP {err.status} {err.reason})") from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise _Transient(f"the API server at {self.server} ({_reason(err)})") from err
        with self._watch_lock:
            self._watch_resp = resp
        if stop.is_set():
            resp.shutdown()
        try:
            for line in iter_resp_lines(resp):
                if not line:
                    continue
                event = json.loads(line)
                if why := foreign_change(event, self._published.slices,
                                         self._published.generation):
                    log.info("%s: resyncing", why)
                    return
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as err:  # ValueError: bad JSON
            if not stop.is_set() and self._watch_resp is not None:
                raise _Transient(f"the API server at {self.server} (watch broke: "
                                 f"{_reason(err)})") from err
        finally:
            with self._watch_lock:
                self._watch_resp = None
            resp.close()
            resp.release_conn()

    def _interrupt_watch(self) -> None:
        """Unblock a watch in another thread; its loop then resyncs or stops."""
        with self._watch_lock:
            resp, self._watch_resp = self._watch_resp, None
        if resp is not None:
            resp.shutdown()

    def _set_waiting(self, what: str | None) -> None:
        if what != self._waiting_for:
            if what is None:
                log.info("ResourceSlices of %s in sync with %s", self.node, self.server)
            else:
                log.warning("ResourceSlices of %s: waiting for %s", self.node, what)
        self._waiting_for = what


def _reason(err: BaseException) -> str:
    """The innermost cause of a urllib3 error, e.g. 'Connection refused'."""
    inner = getattr(err, "reason", None) or err
    text = str(inner)
    match = re.search(r"\[Errno \d+\] ([^')]+)", text)
    return match[1] if match else text.split(": ", 1)[-1][:200]


def _message(result: ApiResult) -> str:
    body = result.body
    return str(body.get("message", "")) if isinstance(body, dict) else str(body)[:200]

