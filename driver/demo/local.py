"""`gpu-dra demo`: the driver end to end on a mock machine, with no cluster and no GPU.

The real plugin runs in local mode in a temporary folder with real unix sockets; the demo
plays the scheduler (the allocation kernel, `explain` for what does not fit) and the
kubelet (registration GetInfo, then NodePrepareResources / NodeUnprepareResources over
the DRA socket). Every step prints one line with its time, then its details.

The plugin runs dynamic MIG: it turns MIG mode on for the GPU of the first MIG claim, as
it would on a real node.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from driver._proto.dra_v1 import api_pb2 as dra_v1
from driver._proto.dra_v1 import api_pb2_grpc as dra_v1_grpc
from driver._proto.pluginregistration_v1 import api_pb2 as reg_v1
from driver._proto.pluginregistration_v1 import api_pb2_grpc as reg_v1_grpc
from driver.allocator import Allocator, Ledger, allocate_in_order, driver_classes
from driver.allocator.documents import load_documents
from driver.allocator.explain import explain_all
from driver.allocator.input import InputError
from driver.allocator.pools import pools_complete
from driver.errors import DevClusterError
from driver.health.classify import meaning
from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.inventory.view import inventory_table
from driver.nvml import Provider
from driver.nvml.faults import Fault
from driver.nvml.mock import inject
from driver.nvml.profile import PROFILES_DIR
from driver.plugin import cdi, monitor
from driver.plugin.daemon import Plugin, PluginOptions
from driver.plugin.sockets import grpc_address

EXAMPLE_CLAIMS = Path(__file__).with_name("claims")
KUBELET_TIMEOUT = 45.0  # the kubelet's deadline for DRA calls
# Liveness checks of every GPU (5 s by default): a reset GPU is given back within one.
HEALTH_CHECK_INTERVAL = 0.5
HEALTH_BOUND_S = 10.0  # how long the slices may take to follow a fault
DEMO_XID = 79
Print = Callable[[str], None]


@dataclass(frozen=True)
class DemoOptions:
    profile: str  # a shipped profile name or a YAML file
    claims: Path = EXAMPLE_CLAIMS
    keep: bool = False
    driver: str = "gpu.dra.dev"
    node: str = "demo-node"


class StepFailed(DevClusterError):
    """A step of the demo went wrong: exit code 1, the step named."""


@dataclass(frozen=True)
class Placed:
    """A claim as the demo scheduler left it: `allocation` None when it does not fit."""

    namespace: str
    name: str
    uid: str
    obj: dict[str, Any]
    allocation: dict[str, Any] | None
    reason: str = ""


def profile_source(profile: str) -> Path:
    """The YAML file of a shipped profile name or a path; InputError when there is none."""
    path = PROFILES_DIR / f"{profile}.yaml"
    if "/" not in profile and not profile.endswith((".yaml", ".yml")) and path.exists():
        return path
    if Path(profile).is_file():
        return Path(profile)
    shipped = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")
                               if not p.stem.startswith("_")))
    raise InputError(f"--profile {profile}: no such profile or file (shipped: {shipped})")


def read_claims(path: Path) -> list[dict[str, Any]]:
    try:
        documents = load_documents(path)
    except InputError as err:
        raise InputError(f"--claims {err}") from None
    claims = [d for d in documents if d.get("kind", "ResourceClaim") == "ResourceClaim"]
    if not claims:
        raise InputError(f"--claims {path}: no ResourceClaim documents")
    return claims


def allocate(slices: list[dict[str, Any]], raw_claims: list[dict[str, Any]], driver: str,
             node: str, held: Sequence[Placed] = ()) -> list[Placed]:
    """Each claim in order as the scheduler would (parity), seeing `held` and the ones
    before it; the ones that do not fit carry `explain`'s answer."""
    allocator = Allocator(slices, driver_classes(driver))
    claims = allocator.parse(raw_claims)
    ledger = Ledger.of([{**c.obj, "status": {"allocation": c.allocation}} for c in held])
    placed = []
    for claim, _, outcome in allocate_in_order(allocator, claims, ledger, [node]):
        if outcome.status == "error":
            raise InputError(f"ResourceClaim {claim.key}: {outcome.field or 'spec.devices'}: "
                             f"{outcome.message}")
        meta = claim.raw.get("metadata") or {}
        namespace, name = meta.get("namespace") or "default", meta["name"]
        uid = meta.get("uid") or str(uuid.uuid4())
        obj = json.loads(json.dumps(claim.raw))
        obj.setdefault("apiVersion", "resource.k8s.io/v1")
        obj.setdefault("kind", "ResourceClaim")
        obj["metadata"] = {**meta, "namespace": namespace, "uid": uid}
        if outcome.status == "allocated":
            placed.append(Placed(namespace, name, uid, obj, outcome.allocations[0]))
            continue
        reason = outcome.message
        if outcome.status == "unschedulable":
            (why,) = explain_all(allocator, [claim], ledger, [node])
            reason = "\n".join([*why.reasons, *(f"nearest change that fits: {c}"
                                                for c in why.nearest)])
        placed.append(Placed(namespace, name, uid, obj, None, reason))
    return placed


def read_slices(local_dir: Path, wait: float = 5.0) -> list[dict[str, Any]]:
    """The plugin's slices as its local mode wrote them. Each file is replaced atomically,
    the pool is not: while the plugin republishes (a health change), files of two
    generations sit side by side and the pool is incomplete, which the scheduler would
    wait out; so does this, up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        slices = [yaml.load(p.read_text(), Loader=yaml.CSafeLoader)
                  for p in sorted((local_dir / "resourceslices").glob("*.yaml"))]
        if pools_complete(slices) or time.monotonic() > deadline:
            return slices
        time.sleep(0.05)


def write_allocated(local_dir: Path, claim: Placed) -> None:
    """Where the plugin's local mode reads the claim, with its status.allocation."""
    path = local_dir / "resourceclaims" / claim.namespace / f"{claim.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**claim.obj, "status": {"allocation": claim.allocation}},
                                   sort_keys=False))


class Kubelet:
    """The kubelet's side of the plugin's sockets: registration, then DRA v1."""

    def __init__(self, options: PluginOptions) -> None:
        self._reg = grpc.insecure_channel(grpc_address(options.registration_socket))
        self._dra = grpc.insecure_channel(grpc_address(options.dra_socket))

    def close(self) -> None:
        self._reg.close()
        self._dra.close()

    def get_info(self) -> Any:
        return reg_v1_grpc.RegistrationStub(self._reg).GetInfo(
            reg_v1.InfoRequest(), timeout=KUBELET_TIMEOUT)

    def _claims(self, claims: Sequence[Placed]) -> list[Any]:
        return [dra_v1.Claim(namespace=c.namespace, name=c.name, uid=c.uid) for c in claims]

    def prepare(self, claims: Sequence[Placed]) -> Any:
        return dra_v1_grpc.DRAPluginStub(self._dra).NodePrepareResources(
            dra_v1.NodePrepareResourcesRequest(claims=self._claims(claims)),
            timeout=KUBELET_TIMEOUT)

    def unprepare(self, claims: Sequence[Placed]) -> Any:
        return dra_v1_grpc.DRAPluginStub(self._dra).NodeUnprepareResources(
            dra_v1.NodeUnprepareResourcesRequest(claims=self._claims(claims)),
            timeout=KUBELET_TIMEOUT)


class Steps:
    """Numbered steps, each one line with its time, then its details indented."""

    def __init__(self, total: int, out: Print) -> None:
        self.total, self.done, self.out = total, 0, out

    def run(self, name: str, step: Callable[[], tuple[str, list[str]]]) -> None:
        self.done += 1
        started = time.monotonic()
        try:
            summary, details = step()
        except InputError:
            raise
        except Exception as err:  # any failure of a step is reported with the step named
            message = err.details() if isinstance(err, grpc.RpcError) else str(err)
            self.out(f"[{self.done}/{self.total}] {name}  FAILED  {message}")
            raise StepFailed(f"step {name} failed: {message}") from err
        self.out(f"[{self.done}/{self.total}] {name}  {time.monotonic() - started:.2f}s  "
                 f"{summary}")
        for line in details:
            self.out(f"      {line}")


def slice_summary(slices: list[dict[str, Any]]) -> str:
    devices = [d for s in slices for d in s["spec"].get("devices") or []]
    migs = sum(1 for d in devices if "-mig-" in d["name"])
    counters = sum(len(s["spec"].get("sharedCounters") or []) for s in slices)
    return (f"{len(slices)} ResourceSlices: {len(devices) - migs} GPUs, {migs} MIG "
            f"placements, {counters} counter sets")


def run_demo(options: DemoOptions, out: Print = print) -> int:
    """Exit code 0 when every step worked; raises InputError for bad input, StepFailed."""
    from driver.nvml.mock import mock_provider
    from driver.nvml.profile import ProfileError

    source = profile_source(options.profile)
    raw_claims = read_claims(options.claims)
    root = Path(tempfile.mkdtemp(prefix="gpu-dra-demo-", dir="/tmp"))  # sockets: short paths
    started = time.monotonic()
    plugin: Plugin | None = None
    kubelet: Kubelet | None = None
    steps = Steps(12, out)
    monitor_log = MonitorLog()
    try:
        try:
            provider = mock_provider(str(source), root / "mig-state.json")
        except ProfileError as err:
            raise InputError(str(err)) from err
        plugin_options = PluginOptions(
            driver=options.driver, node=options.node, registry_dir=root / "registry",
            plugin_dir=root / "plugin", cdi_root=root / "cdi", mig_mode="dynamic",
            counter_layout="split", local_dir=root / "local",
            mock_driver_root=root / "plugin" / "mock-driver-root",
            health_check_interval=HEALTH_CHECK_INTERVAL)
        (root / "local").mkdir()
        out(f"gpu-dra demo: profile {options.profile}, claims {options.claims}, "
            f"folder {root}")
        steps.run("discover", lambda: _discover(provider, options))
        plugin = started_plugin = Plugin(plugin_options, provider)
        steps.run("start plugin", lambda: _start(started_plugin, plugin_options))
        kubelet = client = Kubelet(plugin_options)
        steps.run("register", lambda: _register(client))
        slices = read_slices(root / "local")
        steps.run("publish", lambda: (slice_summary(slices),
                                      [f"{root / 'local' / 'resourceslices'}"]))
        placed: list[Placed] = []
        steps.run("allocate", lambda: _allocate(placed, slices, raw_claims, options,
                                                 plugin_options))
        allocated = [c for c in placed if c.allocation is not None]
        steps.run("prepare", lambda: _prepare(client, allocated))
        steps.run("cdi spec", lambda: _cdi_spec(plugin_options, allocated))
        story = GpuFailure(root / "mig-state.json", root / "local", options, allocated,
                           monitor_log)
        steps.run("gpu fails", story.fail)
        steps.run("steer", story.steer)
        steps.run("gpu recovers", story.recover)
        steps.run("unprepare", lambda: _unprepare(client, allocated, plugin_options))
        client.close()
        kubelet = None
        plugin = None
        steps.run("stop", lambda: _stop(started_plugin, root, options.keep))
    finally:
        if kubelet is not None:
            kubelet.close()
        if plugin is not None:
            plugin.stop(grace=1.0)
        monitor_log.close()
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)
    out(f"done in {time.monotonic() - started:.2f}s")
    return 0


def _discover(provider: Provider, options: DemoOptions) -> tuple[str, list[str]]:
    inventory: Inventory = discover(provider)
    mig = sum(1 for gpu in inventory.gpus if gpu.mig_profiles)
    return (f"{len(inventory.gpus)} GPUs on mock profile {options.profile} "
            f"({mig} MIG-capable)", inventory_table(inventory).splitlines())


def _start(plugin: Plugin, options: PluginOptions) -> tuple[str, list[str]]:
    plugin.start()
    return ("plugin serving in local mode, dynamic MIG",
            [f"DRA socket {options.dra_socket}",
             f"registration socket {options.registration_socket}"])


def _register(kubelet: Kubelet) -> tuple[str, list[str]]:
    info = kubelet.get_info()
    return (f"GetInfo: {info.type} {info.name} at {info.endpoint}",
            [f"services: {', '.join(info.supported_versions)}"])


def _allocate(placed: list[Placed], slices: list[dict[str, Any]],
              raw_claims: list[dict[str, Any]], demo: DemoOptions,
              options: PluginOptions) -> tuple[str, list[str]]:
    assert options.local_dir is not None
    placed += allocate(slices, raw_claims, demo.driver, demo.node)
    details = []
    for claim in placed:
        if claim.allocation is None:
            details.append(f"{claim.namespace}/{claim.name}: does not fit; explain:")
            details += [f"  {line}" for line in claim.reason.splitlines()]
            continue
        write_allocated(options.local_dir, claim)
        devices = ", ".join(r["device"] for r in claim.allocation["devices"]["results"])
        details.append(f"{claim.namespace}/{claim.name}: {devices}")
    fit = sum(1 for c in placed if c.allocation is not None)
    return f"{fit} of {len(placed)} claims allocated (parity with kube-scheduler)", details


def _prepare(kubelet: Kubelet, claims: list[Placed]) -> tuple[str, list[str]]:
    response = kubelet.prepare(claims)
    details = []
    for claim in claims:
        answer = response.claims[claim.uid]
        if answer.error:
            raise StepFailed(f"{claim.namespace}/{claim.name}: {answer.error}")
        details.append(f"{claim.namespace}/{claim.name}:")
        details += [f"  {d.device_name}: {' '.join(d.cdi_device_ids)}" for d in answer.devices]
    return f"NodePrepareResources: {len(claims)} claims prepared", details


def _cdi_spec(options: PluginOptions, claims: list[Placed]) -> tuple[str, list[str]]:
    specs = cdi.claim_specs(options.cdi_root, options.driver)
    missing = [f"{c.namespace}/{c.name}" for c in claims if c.uid not in specs]
    if missing:
        raise StepFailed(f"no CDI spec for {', '.join(missing)}")
    if not claims:
        return "no claim prepared", []
    path = specs[claims[0].uid]
    return (f"{len(specs)} CDI specs in {options.cdi_root}; "
            f"{claims[0].namespace}/{claims[0].name}'s:",
            [str(path), *json.dumps(json.loads(path.read_text()), indent=2).splitlines()])


def _unprepare(kubelet: Kubelet, claims: list[Placed],
               options: PluginOptions) -> tuple[str, list[str]]:
    response = kubelet.unprepare(claims)
    for claim in claims:
        if response.claims[claim.uid].error:
            raise StepFailed(f"{claim.namespace}/{claim.name}: "
                             f"{response.claims[claim.uid].error}")
    left = cdi.claim_specs(options.cdi_root, options.driver)
    if left:
        raise StepFailed(f"CDI specs left after unprepare: {', '.join(map(str, left.values()))}")
    return f"NodeUnprepareResources: {len(claims)} claims unprepared, CDI specs removed", []


def _stop(plugin: Plugin, root: Path, keep: bool) -> tuple[str, list[str]]:
    plugin.stop(grace=1.0)
    if keep:
        return f"plugin stopped; folder kept: {root}", []
    shutil.rmtree(root)
    return "plugin stopped, sockets and folder removed", []


class MonitorLog(logging.Handler):
    """The health monitor's log lines (each transition, with the XID and its meaning), kept
    for the steps to show instead of going to stderr, from creation until `close`."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self._logger = logging.getLogger(monitor.__name__)
        self._level = self._logger.level
        self._lines: list[str] = []
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)

    def close(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(record.getMessage())

    def take(self) -> list[str]:
        """The lines logged since the last call, each marked as the plugin's."""
        lines, self._lines = self._lines, []
        return [f"plugin log: {line}" for line in lines]


def taint_text(taint: dict[str, Any]) -> str:
    return f"{taint['key']}={taint.get('value', '')}:{taint['effect']} since {taint['timeAdded']}"


class GpuFailure:
    """A GPU fails while the claims run, and comes back: XID 79 on the GPU a new whole-GPU
    claim would get, recorded in the mock's state file as `gpu-dra mock inject` records it;
    the plugin's health monitor taints it in the slices, the scheduler (the kernel) steers
    the claim around it, and after `--recover` (the GPU was reset) the taint goes."""

    def __init__(self, state: Path, local_dir: Path, demo: DemoOptions,
                 held: Sequence[Placed], log: MonitorLog) -> None:
        self.state, self.local_dir, self.demo, self.held = state, local_dir, demo, held
        self.log = log
        self.claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                      "metadata": {"name": "after-xid", "namespace": "demo"},
                      "spec": {"devices": {"requests": [
                          {"name": "gpu", "exactly": {"deviceClassName": demo.driver}}]}}}
        self.gpu = 0
        self.uuid = ""

    def _place(self, raw: dict[str, Any]) -> tuple[Placed, list[dict[str, Any]]]:
        slices = read_slices(self.local_dir)
        (placed,) = allocate(slices, [raw], self.demo.driver, self.demo.node, self.held)
        return placed, slices

    def _line(self, placed: Placed) -> str:
        if placed.allocation is None:
            return f"{placed.namespace}/{placed.name}: does not fit"
        devices = ", ".join(r["device"] for r in placed.allocation["devices"]["results"])
        return f"{placed.namespace}/{placed.name}: {devices}"

    def _taints(self, slices: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Taints by device name, of the GPU and its MIG devices."""
        name = f"gpu-{self.gpu}"
        return {d["name"]: d["taints"] for s in slices for d in s["spec"].get("devices") or []
                if d.get("taints") and (d["name"] == name or d["name"].startswith(name + "-"))}

    def _wait(self, tainted: bool) -> tuple[float, dict[str, list[dict[str, Any]]]]:
        """Seconds until the slice files show the GPU tainted (or not), and its taints."""
        started = time.monotonic()
        while True:
            taints = self._taints(read_slices(self.local_dir))
            if bool(taints) == tainted:
                return time.monotonic() - started, taints
            if time.monotonic() - started > HEALTH_BOUND_S:
                raise StepFailed(f"gpu-{self.gpu}: the slices still show it "
                                 f"{'healthy' if tainted else 'tainted'} after "
                                 f"{HEALTH_BOUND_S:g}s")
            time.sleep(0.02)

    def _inject(self, *fault: str) -> str:
        return (f"as `gpu-dra mock inject --mock-state {self.state} --gpu {self.gpu} "
                f"{' '.join(fault)}` does")

    def fail(self) -> tuple[str, list[str]]:
        before, _ = self._place(self.claim)
        if before.allocation is not None:  # else every GPU is taken: the first one fails
            self.gpu = int(before.allocation["devices"]["results"][0]["device"].split("-")[1])
        self.uuid = inject(self.state, self.gpu, Fault("xid", DEMO_XID))
        took, taints = self._wait(tainted=True)
        name = f"gpu-{self.gpu}"
        migs = len(taints) - (name in taints)
        return (f"XID {DEMO_XID} ({meaning(DEMO_XID)}) on {name}, tainted in the slices in "
                f"{took:.2f}s",
                [f"before the XID: {self._line(before)}",
                 f"XID {DEMO_XID} recorded in the mock's state file, "
                 + self._inject("--xid", str(DEMO_XID)), *self.log.take(),
                 *(f"{name}: {taint_text(t)}" for t in taints.get(name, [])),
                 *([f"and its {migs} MIG placements"] if migs else [])])

    def steer(self) -> tuple[str, list[str]]:
        placed, _ = self._place(self.claim)
        pinned = json.loads(json.dumps(self.claim))
        pinned["metadata"]["name"] = f"gpu-{self.gpu}-only"
        pinned["spec"]["devices"]["requests"][0]["exactly"]["selectors"] = [{"cel": {
            "expression": f'device.attributes["{self.demo.driver}"].uuid == "{self.uuid}"'}}]
        only, _ = self._place(pinned)
        details = [self._line(placed)]
        if only.allocation is None:
            details += [f"{only.namespace}/{only.name} (a claim for {self.uuid}): does not "
                        "fit; explain:", *(f"  {line}" for line in only.reason.splitlines())]
        on_sick = placed.allocation is not None and any(
            r["device"] == f"gpu-{self.gpu}" for r in placed.allocation["devices"]["results"])
        if on_sick or only.allocation is not None:
            raise StepFailed(f"gpu-{self.gpu} is tainted but was allocated")
        return f"a new claim avoids the tainted gpu-{self.gpu}", details

    def recover(self) -> tuple[str, list[str]]:
        inject(self.state, self.gpu, Fault("recover"))
        took, _ = self._wait(tainted=False)
        placed, _ = self._place(self.claim)
        return (f"gpu-{self.gpu} reset: taints gone from the slices in {took:.2f}s",
                ["the GPU answers again, " + self._inject("--recover"), *self.log.take(),
                 f"liveness checked every {HEALTH_CHECK_INTERVAL:g}s here "
                 "(--health-check-interval, 5s by default)",
                 f"allocatable again: {self._line(placed)}"])
