"""Forty pods through one dgx-h100 node in dynamic MIG mode, with a plugin crash halfway.

The real scheduler allocates a mix of claims (whole GPUs, NVLink sets, MIG slices of four
profiles) from the slices `gpu-dra plugin` publishes; the kubelet stand-in prepares each
pod's claim over the plugin's socket; the test deletes every pod as soon as it is
prepared, so the next ones fit. The first half runs to the end (every claim unprepared,
the node idle); then the GPUs are frozen (the test holds the mock NVML's cross-process
lock, as a wedged driver call would) and the second half is submitted, a MIG pod first.
With nothing in flight at the freeze, no unprepare can wait on the lock (only MIG
teardowns take it, and no MIG claim can be prepared while frozen), so the first call to
hang is a prepare that needs a MIG change; the plugin is SIGKILLed there, then started
again like a crashed pod. At the end no claim is prepared, no MIG instance and no CDI
spec is left, and the node's ResourceSlices are the ones it started with.

The run's wall time, the restart gap and the API writes are printed as JSON (and written
to ``$GPU_DRA_SOAK_REPORT`` when set) for docs/benchmarks.md; nothing is timed in the
pass/fail part.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import platform
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from driver.devcluster.controlplane import ComponentError, LocalCluster, free_port
from driver.devcluster.node import PluginDaemon, PluginFolders, poll
from driver.inventory.discovery import discover
from driver.kube.api import api_request
from driver.nvml.mock import mock_provider
from driver.plugin import checkpoint
from driver.plugin.checkpoint import ClaimRecord
from driver.plugin.devices import Target, device_index
from tests.support.apiserver import (
    RESOURCE_V1,
    SLICES,
    ControlPlane,
    api_writes,
    create,
    delete,
    pod_with_claim,
    wait_for,
)
from tests.support.metrics import scrape
from tests.support.plugin import live_mig, short_tmp
from tests.support.standin import KubeletStandin

DRIVER = "gpu.dra.dev"
MACHINE = "dgx-h100"
ISLAND = f"{DRIVER}/nvlinkIsland"
KILL_AFTER = 20  # pods run to the end before the GPUs are frozen
RUN_TIMEOUT = 180.0  # the whole run; it takes 12-16 s on the 2-core CI box
FREEZE_TIMEOUT = 60.0  # for a prepare to hang on the frozen GPUs
POLL = 0.05
SLICE_WRITES = "gpu_dra_resourceslice_writes_total"
GRACE = 30  # pods are deleted gracefully: the stand-in unprepares, then removes them


@dataclass(frozen=True)
class Shape:
    """One kind of claim: ``count`` whole GPUs (in one NVLink island if ``nvlink``), or
    one MIG device of ``profile``."""

    name: str
    count: int = 1
    profile: str | None = None
    nvlink: bool = False

    def template(self) -> dict[str, Any]:
        exactly: dict[str, Any] = {"deviceClassName": f"mig.{DRIVER}" if self.profile
                                   else DRIVER}
        if self.count > 1:
            exactly["count"] = self.count
        if self.profile:
            exactly["selectors"] = [{"cel": {"expression": (
                f'device.attributes["{DRIVER}"].profile == "{self.profile}"')}}]
        devices: dict[str, Any] = {"requests": [{"name": "gpu", "exactly": exactly}]}
        if self.nvlink:
            devices["constraints"] = [{"requests": ["gpu"], "matchAttribute": ISLAND}]
        return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                "metadata": {"name": self.name}, "spec": {"spec": {"devices": devices}}}

    def problems(self, devices: list[str], index: dict[str, Target],
                 islands: dict[str, int]) -> list[str]:
        """What is wrong with an allocation of ``devices`` for this shape."""
        targets = [index[d] for d in devices if d in index]
        if not len(devices) == len(set(devices)) == len(targets) == self.count:
            return [f"{self.name}: got {devices}"]
        if self.profile is not None:
            return [f"{self.name}: {t.name} is not a {self.profile} MIG device" for t in targets
                    if t.dynamic_profile is None or t.dynamic_profile.name != self.profile]
        wrong = [f"{self.name}: {t.name} is not a whole GPU" for t in targets if t.kind != "gpu"]
        if self.nvlink and len({islands.get(d) for d in devices}) != 1:
            wrong.append(f"{self.name}: {devices} span NVLink islands")
        return wrong


MIX: tuple[tuple[Shape, int], ...] = (
    (Shape("gpu-1"), 8),
    (Shape("gpu-2", 2), 4),
    (Shape("nvlink-2", 2, nvlink=True), 3),
    (Shape("nvlink-3", 3, nvlink=True), 2),
    (Shape("nvlink-4", 4, nvlink=True), 3),
    (Shape("mig-1g", profile="1g.10gb"), 8),
    (Shape("mig-2g", profile="2g.20gb"), 5),
    (Shape("mig-3g", profile="3g.40gb"), 4),
    (Shape("mig-7g", profile="7g.80gb"), 3),
)


def interleaved() -> list[Shape]:
    """The 40 pods' shapes, round-robin, so every kind is still coming after the crash."""
    rows = itertools.zip_longest(*([shape] * n for shape, n in MIX))
    return [shape for row in rows for shape in row if shape is not None]


def halves() -> tuple[list[Shape], list[Shape]]:
    """The shapes run before the freeze, and those submitted while frozen with a MIG shape
    first: its prepare must create a MIG device, so it hangs on the frozen GPUs."""
    shapes = interleaved()
    before, after = shapes[:KILL_AFTER], shapes[KILL_AFTER:]
    first_mig = next(i for i, shape in enumerate(after) if shape.profile is not None)
    return before, [after.pop(first_mig), *after]


# --- the node ----------------------------------------------------------------------------------


@dataclass
class DgxNode:
    """A fake Node with the kubelet stand-in, and `gpu-dra plugin` on the mock dgx-h100
    with its MIG state in a file, so the GPUs outlive the plugin process."""

    name: str
    folders: PluginFolders
    standin: KubeletStandin
    kubeconfig: Path
    plugin: PluginDaemon | None = None
    metrics_port: int = 0
    lives: list[PluginDaemon] = field(default_factory=list)

    def start_plugin(self) -> None:
        self.metrics_port = free_port()
        folders = self.folders
        args = folders.plugin_args(node=self.name, driver=DRIVER, kubeconfig=self.kubeconfig,
                                   registry_dir=self.standin.registry_dir, mock=MACHINE,
                                   mig_mode="dynamic", mock_state=folders.mig_state,
                                   metrics_port=self.metrics_port)
        self.plugin = PluginDaemon(args, folders.plugin_log)  # appended to by each life
        self.lives.append(self.plugin)

    def kill_plugin(self) -> int:
        assert self.plugin is not None
        os.killpg(self.plugin.proc.pid, signal.SIGKILL)
        return self.plugin.proc.wait(timeout=30)

    def plugin_metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def registrations(self) -> int:
        return sum(e["driver"] == DRIVER and e["event"] == "register"
                   for e in self.standin.registrations())

    def check_alive(self) -> None:
        """ComponentError, with its log's tail, if the plugin or the stand-in exited."""
        assert self.plugin is not None
        self.plugin.check_alive()
        self.standin.check_alive()

    def wait_registered(self) -> None:
        """Until the stand-in registered the plugin; at once if either exits."""
        def registered() -> bool:
            self.check_alive()
            return self.registrations() > 0

        poll(registered, f"{DRIVER} to register with {self.standin.name}", 60.0, POLL,
             fatal=(ComponentError,))

    def records(self) -> dict[str, ClaimRecord]:
        saved = checkpoint.load(self.folders.checkpoint)
        return {} if saved is None else dict(saved.claims)

    @contextlib.contextmanager
    def frozen_gpus(self) -> Iterator[None]:
        """Hold the mock NVML's lock (``<state>.lock``, taken by every MIG change of any
        process): the plugin's MIG creations and destructions hang as on a wedged driver."""
        with open(f"{self.folders.mig_state}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def slice_specs(api: Any, node: str) -> dict[str, dict[str, Any]]:
    items = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)["items"]
    return {s["metadata"]["name"]: s["spec"] for s in items}


def complete(specs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`specs` where they hold every slice their pool says it has, else none."""
    counts = {spec["pool"]["resourceSliceCount"] for spec in specs.values()}
    return specs if len(counts) == 1 and len(specs) == counts.pop() else {}


@pytest.fixture
def dgx_node(
    control_plane: ControlPlane, scheduler: LocalCluster, controller_manager: LocalCluster,
    device_classes: None, fake_node: Callable[..., str],
    kubelet_standin: Callable[..., KubeletStandin],
) -> Iterator[DgxNode]:
    """The node, without its plugin (the test starts it); at the end the plugin is stopped,
    its whole log printed (pytest shows it when the test fails) and the node's slices
    deleted."""
    with short_tmp() as root:
        name = fake_node()
        node = DgxNode(name, PluginFolders(root), kubelet_standin(name, root, "v1", DRIVER),
                       control_plane.kubeconfig)
        try:
            yield node
        finally:
            codes = [plugin.stop() for plugin in node.lives]
            log = node.folders.plugin_log
            print(f"--- gpu-dra plugin, {len(codes)} lives (exit codes {codes}) ---\n"
                  f"{log.read_text(errors='replace') if log.exists() else ''}")
            print(f"--- kubelet-standin ---\n{node.standin.tail()}")
            api_request(control_plane.api, "DELETE", SLICES,
                        query={"fieldSelector": f"spec.nodeName={name}"}).expect(200, 404)


# --- the run -----------------------------------------------------------------------------------


def mig_of(records: Iterable[ClaimRecord]) -> set[tuple[str, int, int]]:
    """(GPU UUID, GI profile id, placement start) of the MIG devices the records created."""
    return {(d.gpu_uuid, d.created_mig.profile_id, d.created_mig.start)
            for r in records for d in r.devices if d.created_mig is not None}


def live(state: Path) -> set[tuple[str, int, int]]:
    return {(uuid, profile, start) for uuid, gis in live_mig(state).items()
            for profile, start, _ in gis}


def stuck(record: ClaimRecord, state: Path) -> bool:
    """Whether this preparation needs a MIG change, so it hangs while the GPUs are frozen:
    a MIG device to create, or a whole GPU whose MIG mode must be switched off."""
    mig_on = json.loads(state.read_text()).get("migEnabled", {}) if state.exists() else {}
    return record.state == "PrepareStarted" and any(
        d.created_mig is not None or mig_on.get(d.gpu_uuid) for d in record.devices)


@dataclass
class Run:
    """What the test saw, by pod UID, and when (``time.monotonic``)."""

    shapes: dict[str, tuple[str, Shape]] = field(default_factory=dict)  # uid: name, shape
    prepared: dict[str, dict[str, Any]] = field(default_factory=dict)  # stand-in statuses
    unprepared: dict[str, dict[str, Any]] = field(default_factory=dict)
    prepared_at: dict[str, float] = field(default_factory=dict)
    at: dict[str, float] = field(default_factory=dict)  # frozen, killed, registered, ...
    metrics: dict[str, float] = field(default_factory=dict)  # the first plugin's, at the freeze
    registrations: int = 0  # before the kill
    completed_at_kill: set[str] = field(default_factory=set)  # claim UIDs
    crash: dict[str, Any] = field(default_factory=dict)  # what the report says of it

    def progress(self, standin: KubeletStandin | None = None) -> str:
        """How far the run got; with the stand-in, what it says of each unfinished pod."""
        line = (f"{len(self.prepared)} of {len(self.shapes)} pods prepared, "
                f"{len(self.unprepared)} unprepared")
        if standin is None:
            return line
        pending = [(name, (standin.pod(uid) or {"state": "not admitted"}))
                   for uid, (name, _) in self.shapes.items() if uid not in self.unprepared]
        return "\n".join([line, *(f"  {name}: {status['state']} {status.get('error', '')}"
                                   for name, status in pending)])


def test_forty_pods_through_a_dgx_h100_with_a_plugin_crash(
    control_plane: ControlPlane, namespace: str, dgx_node: DgxNode,
) -> None:
    api, node = control_plane.api, dgx_node
    pods_path = f"/api/v1/namespaces/{namespace}/pods"
    writes_before = api_writes(api)
    started = time.monotonic()
    node.start_plugin()
    node.wait_registered()
    # Whole: the plugin registers first and publishes its pool's slices one by one after.
    initial = wait_for(lambda: complete(slice_specs(api, node.name)),
                       f"{node.name}'s ResourceSlices, every one of its pool", interval=POLL)
    ready = time.monotonic()
    index = device_index(discover(mock_provider(MACHINE, node.folders.mig_state)), "dynamic")
    islands = {d["name"]: d["attributes"]["nvlinkIsland"]["int"] for spec in initial.values()
               for d in spec.get("devices", []) if "nvlinkIsland" in d["attributes"]}
    assert set(islands) == {n for n, t in index.items() if t.kind == "gpu"}

    for shape, _ in MIX:
        create(api, f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaimtemplates",
               shape.template())
    run = Run()
    before, after = halves()

    def submit(shapes: list[Shape]) -> None:
        for shape in shapes:
            i = len(run.shapes)
            pod = pod_with_claim(f"soak-{i:02d}-{shape.name}",
                                 {"resourceClaimTemplateName": shape.name})
            pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node.name}
            uid = create(api, pods_path, pod)["metadata"]["uid"]
            run.shapes[uid] = (pod["metadata"]["name"], shape)

    def run_all(deadline: float, freeze: contextlib.ExitStack) -> None:
        """Until every pod submitted so far was prepared and unprepared."""
        while len(run.unprepared) < len(run.shapes):
            assert time.monotonic() < deadline, f"timed out: {run.progress(node.standin)}"
            node.check_alive()
            crash_step(run, node, freeze)
            observe(run, node, api, pods_path)
            time.sleep(POLL)

    submit(before)
    submitted = time.monotonic()
    deadline = submitted + RUN_TIMEOUT
    with contextlib.ExitStack() as freeze:
        run_all(deadline, freeze)
        # The node is idle: nothing prepared, nothing in flight.
        assert node.records() == {}
        run.metrics = node.plugin_metrics()
        run.registrations = node.registrations()
        freeze.enter_context(node.frozen_gpus())
        run.at["frozen"] = time.monotonic()
        submit(after)
        run_all(deadline, freeze)

    # Every pod ran: prepared with an allocation of its shape, then unprepared.
    problems = [p for uid, (_, shape) in run.shapes.items()
                for p in shape.problems(devices_of(run.prepared[uid]), index, islands)]
    assert problems == []
    assert all(run.unprepared[uid]["claims"] == run.prepared[uid]["claims"]
               for uid in run.shapes)
    assert "restarted" in run.at, "the plugin was never killed"
    wait_for(lambda: not api_request(api, "GET", pods_path).expect(200)["items"],
             "every pod to be removed")
    claims_path = f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims"
    wait_for(lambda: not api_request(api, "GET", claims_path).expect(200)["items"],
             "every generated ResourceClaim to be deleted")
    finished = time.monotonic()

    # Nothing is left on the node, and it offers what it offered at the start.
    assert node.records() == {}
    assert live_mig(node.folders.mig_state) == {}
    assert sorted(p.name for p in node.folders.cdi_root.iterdir()) == []
    assert slice_specs(api, node.name) == initial
    assert node.plugin is not None and node.plugin.alive()

    life1, life2 = run.metrics, node.plugin_metrics()
    writes = api_writes(api) - writes_before
    slice_writes = sum(n for key, n in writes.items() if key.endswith(" resourceslices"))
    plugin_slice_writes = [int(m[SLICE_WRITES]) for m in (life1, life2)]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "pods": {shape.name: n for shape, n in MIX},
        "plugin_start_to_slices_s": round(ready - started, 2),
        "wall_s": round(finished - submitted, 2),
        "crash": run.crash | restart_gaps(run),
        "gpus_left_in_mig_mode": sum(json.loads(node.folders.mig_state.read_text())["migEnabled"]
                                     .values()),
        "plugin_slice_writes": plugin_slice_writes,
        "plugin_claims": [claim_counts(m) for m in (life1, life2)],
        "plugin_call_s": [round(sum(v for k, v in m.items()
                                    if k.startswith("gpu_dra_call_duration_seconds_sum")), 3)
                          for m in (life1, life2)],
        "kubelet_grpc_calls": [f"{method.rsplit('/', 1)[-1]} {code}: {count}"
                               for method, code, count in node.standin.grpc_calls()],
        "api_writes_total": sum(writes.values()),
        "api_writes": dict(sorted(writes.items(), key=lambda kv: (-kv[1], kv[0]))),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("GPU_DRA_SOAK_REPORT"):
        Path(os.environ["GPU_DRA_SOAK_REPORT"]).write_text(text + "\n")
    # The plugin is the only writer of its node's slices, and its metric counts them all.
    assert slice_writes == sum(plugin_slice_writes)


def devices_of(status: dict[str, Any]) -> list[str]:
    [claim] = status["claims"]
    return [d["device"] for d in claim["drivers"][DRIVER]]


def claim_counts(metrics: dict[str, float]) -> dict[str, int]:
    prefix = "gpu_dra_claims_total{"
    return {k.removeprefix(prefix).rstrip("}"): int(v) for k, v in metrics.items()
            if k.startswith(prefix)}


def observe(run: Run, node: DgxNode, api: Any, pods_path: str) -> None:
    """Read the stand-in's pod states: a prepared pod is deleted at once (its work is
    done); an unprepared one is finished."""
    for uid, (name, _) in run.shapes.items():
        if uid in run.unprepared:
            continue
        status = node.standin.pod(uid)
        state = status["state"] if status else None
        if state == "prepared" and uid not in run.prepared:
            run.prepared[uid] = status
            run.prepared_at[uid] = time.monotonic()
            delete(api, f"{pods_path}/{name}", grace_seconds=GRACE)
        elif state == "unprepared" and uid in run.prepared:
            run.unprepared[uid] = status


def crash_step(run: Run, node: DgxNode, freeze: contextlib.ExitStack) -> None:
    """Once the GPUs are frozen and a prepare hangs on them, SIGKILL the plugin, check what
    it left, thaw and start it again; then note when it is back."""
    at, crash = run.at, run.crash
    if "frozen" not in at:
        return
    if "killed" not in at:
        hung = [r for r in node.records().values() if stuck(r, node.folders.mig_state)]
        if not hung:
            assert time.monotonic() - at["frozen"] < FREEZE_TIMEOUT, (
                f"no prepare hung on the frozen GPUs; {run.progress()}")
            return
        crash["exit_code"] = node.kill_plugin()
        at["killed"] = time.monotonic()
        crash["prepared_before"] = len(run.prepared)
        records = node.records()  # final: the plugin is dead
        run.completed_at_kill = {u for u, r in records.items() if r.state == "PrepareCompleted"}
        crash["in_flight"] = dict(Counter(r.state for r in records.values()
                                          if r.state != "PrepareCompleted"))
        crash["frozen_s"] = round(at["killed"] - at["frozen"], 2)
        crash["hung_prepares"] = sorted(r.name for r in hung)
        # Still frozen, nothing moves: every MIG device that exists is one a record
        # explains, and every completed preparation has its devices.
        held = live(node.folders.mig_state)
        done = mig_of(r for r in records.values() if r.state == "PrepareCompleted")
        assert done <= held <= mig_of(records.values())
        freeze.close()
        node.start_plugin()
        at["restarted"] = time.monotonic()
        return
    if "registered" not in at and node.registrations() > run.registrations:
        at["registered"] = time.monotonic()


def restart_gaps(run: Run) -> dict[str, float]:
    """Seconds from the kill until the stand-in registered the new plugin, the new plugin
    prepared its first pod (the kubelet's connection to the DRA socket, same path, may
    come back before the registration), and it prepared the claims caught mid-prepare."""
    killed = run.at["killed"]
    by_new = [run.prepared_at[uid] for uid, status in run.prepared.items()
              if run.prepared_at[uid] > killed
              and status["claims"][0]["uid"] not in run.completed_at_kill]
    hung = set(run.crash["hung_prepares"])
    retried = [run.prepared_at[uid] for uid, status in run.prepared.items()
               if status["claims"][0]["name"] in hung]
    return {"kill_to_registered_s": round(run.at["registered"] - killed, 2),
            "kill_to_first_prepared_s": round(min(by_new) - killed, 2),
            "kill_to_hung_claims_prepared_s": round(max(retried) - killed, 2)}
