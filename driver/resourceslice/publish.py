"""ResourceSlices -> the API server, writing only what changed (:class:`ApiPublisher`),
and what every publisher offers (:class:`Publisher`).

The pool is this node's slices of this driver. What to write is a pure function
(:func:`driver.resourceslice.plan.plan`) of what exists and what the builder wants; the
publishers only read, call it and carry out its writes. A pool that another publisher moved
on (the other plugin pod of a rolling update) is left to it while that pod lives
(:func:`driver.resourceslice.plan.stance`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import urllib3

from driver.health.model import GpuHealth
from driver.inventory.model import Inventory
from driver.kube.api import ApiResult, api_request, api_watch
from driver.resourceslice.build import GpuSharing, MigMode, SliceOptions
from driver.resourceslice.errors import PublishError, PublishTimeout
from driver.resourceslice.plan import (
    Backoff,
    Plan,
    PublishResult,
    Stance,
    counter_layout_for,
    desired,
    dropped_fields,
    foreign_change,
    generation_of,
    overtaken,
    plan,
    result_of,
    stamped,
    stance,
)

log = logging.getLogger(__name__)

LayoutChoice = Literal["auto", "split", "combined"]

SLICES_PATH = "/apis/resource.k8s.io/v1/resourceslices"
OWN_WRITES_KEPT = 64  # a dozen syncs of a large pool: older events are long delivered

T = TypeVar("T")


class Publisher(Protocol):
    """Keeps this node's pool equal to what the builder makes of an inventory."""

    def publish(self, inventory: Inventory, timeout: float | None = None,
                health: Mapping[int, GpuHealth] | None = None) -> PublishResult: ...

    def cleanup(self) -> int: ...


class _Transient(Exception):
    """Worth retrying: the server is unreachable, busy, or the pool changed under us."""

    def __init__(self, waiting_for: str) -> None:
        super().__init__(waiting_for)
        self.waiting_for = waiting_for


def _retry(attempt: Callable[[], T], backoff: Backoff, timeout: float | None, *,
           waiting: Callable[[str], None], task: str = "",
           giving_up: Callable[[], None] | None = None) -> T:
    """``attempt()``, called again after each of ``backoff``'s delays while it fails with
    :class:`_Transient` (``waiting`` is told what it waits for), for up to ``timeout``
    seconds (None: until it succeeds). A delay that would end past the deadline raises
    :class:`PublishTimeout` ("``task`` gave up after ...") instead, after ``giving_up()``.
    Anything else ``attempt`` raises goes through at once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delays = backoff.delays()
    while True:
        try:
            return attempt()
        except _Transient as err:
            waiting(err.waiting_for)
            delay = next(delays)
            if deadline is not None and time.monotonic() + delay > deadline:
                if giving_up is not None:
                    giving_up()
                gave_up = f"gave up after {timeout:g}s waiting for {err.waiting_for}"
                raise PublishTimeout(f"{task} {gave_up}" if task else gave_up) from err
            time.sleep(delay)


@dataclass(frozen=True)
class SlicePool:
    """The pool an :class:`ApiPublisher` keeps: ``driver``'s slices on ``node``, with MIG
    devices as ``mig_mode`` offers them and counter sets where ``counter_layout`` puts them
    (auto: where the API server's version wants them, :func:`counter_layout_for`), GPUs
    shared as ``gpu_sharing`` says."""

    driver: str
    node: str
    mig_mode: MigMode = "static"
    counter_layout: LayoutChoice = "auto"
    gpu_sharing: GpuSharing = "exclusive"

    @property
    def field_selector(self) -> str:
        return f"spec.nodeName={self.node},spec.driver={self.driver}"


@dataclass(frozen=True)
class PublishTiming:
    """How an :class:`ApiPublisher` paces itself, in seconds."""

    resync_period: float = 60.0
    """The resync loop lists and compares at least this often, whatever the watch says."""
    backoff: Backoff = field(default_factory=Backoff)
    """The waits between tries while publishing fails in a way worth retrying."""
    request_timeout: float = 30.0
    """Each API request's timeout; a watch's read timeout is this on top of its period."""
    yield_grace: float = 10.0
    """How long an overtaken resync waits for the other plugin pod to show it is alive."""
    yield_poll: float = 5.0
    """How often a resync that yields to another plugin pod checks that it still runs."""


@dataclass(frozen=True)
class _Published:
    """What the last successful sync left on the server: the baseline for watch events."""

    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: int = 0


class ApiPublisher:
    """API server mode: this node's slices of this driver, owned by its Node.

    ``publish(inventory)`` brings the pool in line now (retrying what is worth retrying);
    ``run_resync(stop)``, in a thread, keeps it there: it watches the pool and restores
    any slice someone deletes or edits, resyncs every ``timing.resync_period`` seconds, and
    rides out an unreachable API server with backoff, saying in ``waiting_for`` and the
    log what it waits for. ``cleanup()`` deletes the pool (uninstall).

    ``on_writes`` is told how many writes each sync made, the resync loop's too (metrics).
    ``others_alive`` (None: never) tells whether another plugin pod of this driver runs on
    the node. While it does, the resync loop does not restore a pool that someone else
    moved to a higher generation with other content (see :func:`stance`): it checks again
    every ``timing.yield_poll`` seconds and restores once that pod is gone. ``publish()``
    always writes: a new inventory is news, not a restore.
    """

    def __init__(
        self,
        api_client: Any,
        pool: SlicePool,
        timing: PublishTiming | None = None,
        *,
        on_writes: Callable[[int], None] | None = None,
        others_alive: Callable[[], bool] | None = None,
    ) -> None:
        self._api = api_client
        self.pool = pool
        self.timing = timing or PublishTiming()
        self.on_writes = on_writes
        self.others_alive = others_alive
        self._yielding = False  # the loop leaves the pool to a newer publisher's pod
        self._alone_since: float | None = None  # overtaken, and no other pod seen since
        self._selector = pool.field_selector
        self._lock = threading.Lock()  # one sync at a time: publish() and the loop
        self._inventory: Inventory | None = None
        self._health: Mapping[int, GpuHealth] = {}  # the GPUs' taints come from it
        self._published = _Published()
        # resourceVersions of our latest writes: the watch's events of them are ours
        self._written: deque[str] = deque(maxlen=OWN_WRITES_KEPT)
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

    def publish(self, inventory: Inventory, timeout: float | None = None,
                health: Mapping[int, GpuHealth] | None = None) -> PublishResult:
        """Make the pool match ``inventory`` and the GPUs' ``health``; the result is what
        this call wrote.

        Transient failures (unreachable, 409, 429, 5xx) are retried with backoff for up
        to ``timeout`` seconds (None: until done), then :class:`PublishTimeout`; the
        resync loop, if running, carries on with this inventory. Problems retrying
        cannot fix raise :class:`PublishError`."""
        pending: Inventory | None = inventory

        def attempt() -> PublishResult:
            nonlocal pending
            try:
                with self._lock:
                    if pending is not None:  # a newer publish() may follow ours
                        self._inventory, pending = pending, None
                        self._health = dict(health or {})
                    result, _, _ = self._sync(restore=False)
            except PublishError as err:
                self._set_waiting(f"a fix: {err}")
                raise
            self._set_waiting(None)
            return result

        try:
            # Giving up, unblock the loop's watch: it resyncs, with its own backoff.
            return _retry(attempt, self.timing.backoff, timeout, waiting=self._set_waiting,
                          giving_up=self._interrupt_watch)
        finally:
            self._wake.set()  # a loop still waiting for a first inventory has one now

    def run_resync(self, stop: threading.Event) -> None:
        """Keep the pool in sync until ``stop`` is set; never raises. Run it in a thread."""
        def wake_on_stop() -> None:
            stop.wait()
            self._wake.set()
            self._interrupt_watch()

        threading.Thread(target=wake_on_stop, name="publish-stop", daemon=True).start()
        # Its own backoff rather than _retry's: it waits on ``stop``, and a sync that got
        # through starts the backoff over even when the watch after it fails.
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
                        "write": self.timing.resync_period, "yield": self.timing.yield_poll,
                        "wait": 1.0}[taken])
            except _Transient as err:
                self._set_waiting(err.waiting_for)
                delays = delays or self.timing.backoff.delays()
                stop.wait(next(delays))
            except PublishError as err:
                log.error("cannot publish ResourceSlices: %s", err)
                self._set_waiting(f"a fix: {err}")
                stop.wait(self.timing.resync_period)
            except Exception:  # a bug must not end the loop that keeps the pool alive
                log.exception("ResourceSlice resync failed")
                stop.wait(self.timing.resync_period)

    def cleanup(self, timeout: float | None = 60.0) -> int:
        """Delete every slice of this driver on this node (a clean uninstall) and stop
        publishing; returns how many were deleted. Stop ``run_resync`` first."""
        self._inventory = None
        deleted = 0

        def attempt() -> int:
            nonlocal deleted
            while True:  # until a list finds none
                with self._lock:
                    existing, _ = self._list()
                    for obj in existing:
                        self._delete(obj)
                        deleted += 1
                    if not existing:
                        self._published = _Published()
                        self._set_waiting(None)
                        return deleted

        return _retry(attempt, self.timing.backoff, timeout, waiting=self._set_waiting,
                      task="cleanup")

    # -- one sync ------------------------------------------------------------------------

    def _sync(self, restore: bool) -> tuple[PublishResult, str, Stance]:
        """List, plan, write (``restore``: unless :meth:`_stance` says not to). Returns the
        result, the list's resourceVersion and the stance taken."""
        inventory = self._inventory
        if inventory is None:
            return PublishResult(generation=self._published.generation), "", "write"
        layout = (counter_layout_for(self._server_version())
                  if self.pool.counter_layout == "auto" else self.pool.counter_layout)
        options = SliceOptions(self.pool.driver, self.pool.node, self.pool.mig_mode, layout,
                               self.pool.gpu_sharing)
        wanted = desired(inventory, options, self._health)
        owner = self._owner()
        for obj in wanted:
            obj["metadata"]["ownerReferences"] = [owner]
        existing, resource_version = self._list()
        todo = plan(existing, wanted)
        taken = self._stance(existing, todo) if restore else "write"
        if taken != "write":
            self.syncs += 1
            return PublishResult(generation=self._published.generation), resource_version, taken
        if self._yielding:
            self._yielding = False
            log.info("ResourceSlices of %s: no longer leaving them to another plugin pod of "
                     "%s (it is gone, or its slices are ours)", self.pool.node, self.pool.driver)
        for gone in todo.delete:
            self._delete(gone)
        for obj in todo.update:
            self._write("PUT", f"{SLICES_PATH}/{obj['metadata']['name']}", obj, 200)
        for obj in todo.create:
            self._write("POST", SLICES_PATH, obj, 201)
        self._published = _Published(
            {o["metadata"]["name"]: stamped(o, todo.generation) for o in wanted},
            todo.generation)
        self.syncs += 1
        if todo.writes:
            if self.on_writes is not None:
                self.on_writes(todo.writes)
            log.info("ResourceSlices of %s: generation %d, created %d, updated %d, deleted %d",
                     self.pool.node, todo.generation, len(todo.create), len(todo.update),
                     len(todo.delete))
        return result_of(todo), resource_version, "write"

    def _stance(self, existing: Sequence[Mapping[str, Any]], todo: Plan) -> Stance:
        """:func:`stance` for this resync, asking ``others_alive`` only when it matters."""
        over = (self.others_alive is not None
                and overtaken(existing, todo, self._published.generation))
        alive = over and self.others_alive is not None and self.others_alive()
        now = time.monotonic()
        if over and not alive and self._alone_since is None:
            self._alone_since = now
        taken = stance(over, alive, self._yielding,
                       now - (self._alone_since or now), self.timing.yield_grace)
        if taken != "wait":  # a publisher that is no pod waits a grace before each restore
            self._alone_since = None
        if taken == "yield" and not self._yielding:
            self._yielding = True
            log.info("ResourceSlices of %s: another plugin pod of %s on the node published "
                     "other slices (pool generation %d, ours %d); leaving them to it while "
                     "it runs", self.pool.node, self.pool.driver,
                     max(generation_of(s) for s in existing), self._published.generation)
        return taken

    def _call(self, method: str, path: str, body: Any = None,
              query: Mapping[str, str] | None = None) -> ApiResult:
        # Here, not at the top: the kubernetes client costs about 0.2 s of start-up, and a
        # plugin on a local directory never loads it.
        from kubernetes.client.exceptions import ApiException

        try:
            result = api_request(self._api, method, path, body, query=query,
                                 timeout=self.timing.request_timeout)
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
        result = self._call("GET", f"/api/v1/nodes/{self.pool.node}")
        if result.status == 404:
            raise _Transient(f"Node {self.pool.node} to exist (it owns the ResourceSlices)")
        if result.status != 200:
            raise PublishError(f"GET Node {self.pool.node}: HTTP {result.status} "
                               f"{_message(result)}")
        return {"apiVersion": "v1", "kind": "Node", "name": self.pool.node,
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
        self._written.append(result.body["metadata"]["resourceVersion"])
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
        request_timeout = self.timing.request_timeout
        from kubernetes.client.exceptions import ApiException  # see _call

        query = {"fieldSelector": self._selector, "resourceVersion": resource_version,
                 "allowWatchBookmarks": "true", "timeoutSeconds": str(seconds)}
        try:
            status, reason, resp = api_watch(self._api, SLICES_PATH, query,
                                             (request_timeout, seconds + request_timeout))
        except ApiException as err:  # status 0: TLS failures
            raise _Transient(f"the API server at {self.server} to watch "
                             f"(HTTP {err.status} {err.reason})") from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise _Transient(f"the API server at {self.server} ({_reason(err)})") from err
        if status != 200:
            resp.release_conn()
            if status == 410:
                return  # too old: a fresh list
            raise _Transient(f"the API server at {self.server} to watch "
                             f"(HTTP {status} {reason})")
        with self._watch_lock:
            self._watch_resp = resp
        if stop.is_set():
            resp.shutdown()
        try:
            for line in resp:  # urllib3 splits the stream at newlines
                if not line.strip():
                    continue
                event = json.loads(line)
                if why := self._foreign(event):
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

    def _foreign(self, event: Mapping[str, Any]) -> str | None:
        """`foreign_change`, unless the event is of a write of ours: a sync's events can
        arrive before it records what it published, or after a newer sync, so the event's
        resourceVersion is looked up among our writes once a sync in flight is done."""
        if foreign_change(event, self._published.slices, self._published.generation) is None:
            return None
        with self._lock:
            version = (event.get("object") or {}).get("metadata", {}).get("resourceVersion")
            if event.get("type") in ("ADDED", "MODIFIED") and version in self._written:
                return None
            return foreign_change(event, self._published.slices, self._published.generation)

    def _interrupt_watch(self) -> None:
        """Unblock a watch in another thread; its loop then resyncs or stops."""
        with self._watch_lock:
            resp, self._watch_resp = self._watch_resp, None
        if resp is not None:
            # ValueError: the watch ended on its own meanwhile (urllib3 let go of the socket)
            with contextlib.suppress(ValueError):
                resp.shutdown()

    def _set_waiting(self, what: str | None) -> None:
        if what != self._waiting_for:
            if what is None:
                log.info("ResourceSlices of %s in sync with %s", self.pool.node, self.server)
            else:
                log.warning("ResourceSlices of %s: waiting for %s", self.pool.node, what)
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

