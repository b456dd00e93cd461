"""`gpu-dra plugin`: the kubelet plugin's life cycle.

Start: discovery; recovery from the checkpoint (void after a reboot, roll back half-done
work, destroy stray dynamic MIG devices, remove orphan CDI specs); publish the slices (a
local directory); start the health monitor (`monitor`), whose changes re-publish the
slices with their taints (at most once a second), go to every open health stream at once
and to `health.json`, with the admin's requests (`admin`) applied before the first publish;
serve the DRA socket; then create the registration socket, so the kubelet never calls a
plugin that is not ready; with the API server, publish the slices now, in the background,
as upstream's kubeletplugin helper does (a prepare needs the claim's allocation, not the
slices); then re-discover every `rediscover_interval` seconds and on SIGHUP
(`rediscover`). SIGTERM or SIGINT: remove the registration socket, refuse new
calls, finish those in flight, remove the DRA socket; the slices stay (the kubelet wipes
them if the plugin stays away) unless `cleanup` is set.

A socket that answers belongs to a live plugin: a start that finds one at its own paths
fails (SocketInUse) before it acts on anything; a stop removes only the sockets it bound.

Rolling updates (`pod_uid`, kubelet 1.33+): the old and the new pod of a DaemonSet with
maxSurge run side by side on the same directories, so each names its sockets after its pod
UID as the upstream kubeletplugin helper does (`RollingUpdate(uid)`): the registration
socket `<driver>-<uid>-reg.sock` (hashed shorter where the path would not fit a socket
address) and the DRA socket `dra-<uid>.sock`; the kubelet uses the newest registered one.
Prepare and unprepare are serialized across the two by the node lock (`nodelock`), both
publish the slices (the same ones: the second finds nothing to write), and a pod that stops
removes only its own sockets and leaves the slices to the other (`cleanup` is refused with a
pod UID). Where the new version builds other slices, the pod whose slices were overwritten
by the other does not restore them while the other pod's sockets accept connections
(`ApiPublisher`'s `others_alive`): no write ping-pong; the survivor restores its own.
A pod killed without its stop leaves its sockets: the next start removes those of this
driver that nobody listens on.
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pynvml

from driver.health.classify import HealthSettings
from driver.health.model import GpuHealth
from driver.inventory.discovery import discover
from driver.inventory.exclude import Exclusion, Split, describe, split
from driver.inventory.model import Inventory
from driver.kube.api import api_client
from driver.kube.events import post_node_event
from driver.nvml import Provider
from driver.nvml.events import HealthWatch
from driver.plugin import mockroot, mpspod
from driver.plugin.admin import STATUS_FILE, AdminWatch, status_doc, write_status
from driver.plugin.cdi import DriverFiles
from driver.plugin.checkpoint import BOOT_ID_PATH, PreparedDevice, read_boot_id
from driver.plugin.claims import ApiClaimSource, ClaimRef, ClaimSource, DirClaimSource
from driver.plugin.claimstatus import StatusWriter, api_writer, claim_entries
from driver.plugin.devices import Target, device_index
from driver.plugin.driverfiles import HostDevices, driver_files, hook_missing, host_devices
from driver.plugin.exclusion import NodeExclusion, annotation_key
from driver.plugin.metrics import Metrics
from driver.plugin.mig import MigManager
from driver.plugin.modes import PRIVATE_DIR, SHARED_DIR, make_dir
from driver.plugin.monitor import HealthMonitor, HealthView, Republisher
from driver.plugin.mpspod import PodSettings
from driver.plugin.node import DeviceTools, Identity, Paths, Published
from driver.plugin.nodelock import LOCK_FILE
from driver.plugin.rediscover import Rediscoverer, changes, keep_unreadable
from driver.plugin.servers import KUBELET_CALL_TIMEOUT, HealthBoard, Servers
from driver.plugin.sharing import timeslicer
from driver.plugin.sockets import (
    POD_UID,
    free_for_bind,
    other_plugin_alive,
    remove_dead_sockets,
    rolling_update_socket_name,
    too_long,
)
from driver.plugin.state import PluginState
from driver.resourceslice.build import (
    CounterLayout,
    GpuSharing,
    MigMode,
    SliceOptions,
    build_slices,
)

if TYPE_CHECKING:
    from driver.resourceslice.publish import LayoutChoice, Publisher

log = logging.getLogger(__name__)

# How long start-up waits for the API server before serving without published slices.
START_PUBLISH_TIMEOUT = 20.0
# How long one health re-publish retries the API server before the republisher backs off.
HEALTH_PUBLISH_TIMEOUT = 10.0
SIGNAL_POLL = 0.2  # seconds: how late a SIGTERM taken by another thread may be handled
HOOK_MISSING = "NvidiaCDIHookMissing"  # the Node event's reason
EXCLUDE_GPUS_PROBLEM = "ExcludeGpusProblem"  # the Node event's reason
NodeEvents = Callable[[str, str], None]  # a Warning event on this node: reason, message


@dataclass(frozen=True)
class PluginOptions:
    driver: str
    node: str
    registry_dir: Path
    plugin_dir: Path
    cdi_root: Path
    driver_root: Path = Path("/")
    host_driver_root: Path | None = None  # default: driver_root
    mig_mode: MigMode = "static"
    counter_layout: LayoutChoice = "auto"  # auto: by the API server's version; local: split
    gpu_sharing: GpuSharing = "exclusive"
    local_dir: Path | None = None
    kubeconfig: Path | None = None
    health_port: int | None = None
    metrics_port: int | None = None
    cleanup: bool = False
    cdi_hook: Path | None = None
    # --mock without --driver-root: the driver root is a mock one laid out here at start
    mock_driver_root: Path | None = None
    boot_id_path: Path = BOOT_ID_PATH
    proc_devices: Path = Path("/proc/devices")
    pod_uid: str | None = None  # set: a rolling update may run two pods; sockets per pod
    # in a cluster, MPS daemons run in pods of this namespace with this image (mpspod)
    pod_namespace: str | None = None
    image: str | None = None
    health: HealthSettings = field(default_factory=HealthSettings)
    health_check_interval: float = 5.0  # seconds between liveness checks of every GPU
    rediscover_interval: float = 60.0  # seconds between re-discoveries; 0: on SIGHUP only
    exclude: Exclusion = field(default_factory=Exclusion)  # GPUs left alone (--exclude-gpus)

    def __post_init__(self) -> None:
        self.slice_options()  # ValueError for settings the slices cannot combine
        if self.gpu_sharing == "consumable" and self.local_dir is None and \
                self.mps_pods is None:
            # publishing capacity the plugin cannot enforce would be a silent lie
            raise ValueError("--gpu-sharing consumable (env GPU_SHARING) in a cluster needs "
                             "--pod-namespace and --image (env POD_NAMESPACE, GPU_DRA_IMAGE): "
                             "each shared claim's limits are enforced by an MPS daemon in a "
                             "pod of its own")
        if self.pod_uid is not None and not POD_UID.fullmatch(self.pod_uid):
            raise ValueError(f"--pod-uid (env POD_UID): {self.pod_uid!r} is not a pod UID "
                             "(letters, digits, '-', '_', '.'; it names the sockets)")
        if self.pod_uid is not None and self.cleanup:
            raise ValueError("--cleanup (env CLEANUP_ON_EXIT) and --pod-uid (env POD_UID) "
                             "cannot be combined: in a rolling update the old pod's exit "
                             "would delete the ResourceSlices the new pod serves")
        for problem in (too_long("--kubelet-registry-dir", "KUBELET_REGISTRY_DIR",
                                 self.registration_socket),
                        too_long("--plugin-data-dir", "PLUGIN_DATA_DIR", self.dra_socket)):
            if problem is not None:
                raise ValueError(problem)

    def slice_options(self, layout: CounterLayout = "split") -> SliceOptions:
        """The slice builder's options; the layout does not change the devices."""
        return SliceOptions(self.driver, self.node, self.mig_mode, layout, self.gpu_sharing)

    @property
    def mps_pods(self) -> PodSettings | None:
        """Where MPS daemons run in a cluster; None in local mode or when not set."""
        if self.local_dir is not None or self.pod_namespace is None or self.image is None:
            return None
        driver_root = self.mock_driver_root or self.driver_root
        return PodSettings(self.driver, self.pod_namespace, self.node, self.image,
                           driver_root, self.host_driver_root or driver_root)

    @property
    def dra_socket(self) -> Path:
        return self.plugin_dir / (f"dra-{self.pod_uid}.sock" if self.pod_uid else "dra.sock")

    @property
    def registration_socket(self) -> Path:
        if self.pod_uid:
            return self.registry_dir / rolling_update_socket_name(self.registry_dir,
                                                                  self.driver, self.pod_uid)
        return self.registry_dir / f"{self.driver}-reg.sock"

    @property
    def lock_path(self) -> Path:
        return self.plugin_dir / LOCK_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.plugin_dir / "checkpoint.json"


class Plugin:
    """The running plugin; `start` and `stop` are separate so tests can drive it in-process."""

    def __init__(self, options: PluginOptions, provider: Provider,
                 publisher: Publisher | None = None, claims: ClaimSource | None = None,
                 node_events: NodeEvents | None = None) -> None:
        self.options = options
        self.provider = provider
        self.metrics = Metrics()
        self._publisher = publisher
        self._claims = claims
        self._api: Any = None  # the API server's client, in a cluster
        self._resync_stop = threading.Event()
        self._node_events = node_events  # default: posted to the API server, if any
        self.state: PluginState | None = None
        self.servers: Servers | None = None
        self.probe_port: int | None = None
        self.monitor: HealthMonitor | None = None
        self.admin: AdminWatch | None = None
        self._board: HealthBoard | None = None
        self._republisher: Republisher | None = None
        self.rediscoverer: Rediscoverer | None = None
        self._exclusion: NodeExclusion | None = None
        self._unmatched: tuple[str, ...] = ()
        self._left = ""  # the GPUs excluded, as logged
        self.claim_status: StatusWriter | None = None
        self._first_publish: threading.Thread | None = None  # API server: after registering
        self.failed: Exception | None = None  # the first publish's PublishError, for `run`

    def _sources(self) -> tuple[Publisher, ClaimSource]:
        """Local directory or API server, unless the caller gave its own."""
        o = self.options
        if self._publisher is not None and self._claims is not None:
            return self._publisher, self._claims
        if o.local_dir is not None:
            from driver.resourceslice.dirpublisher import DirPublisher

            layout: CounterLayout = "split" if o.counter_layout == "auto" else o.counter_layout
            publisher: Publisher = DirPublisher(o.local_dir, o.slice_options(layout),
                                                on_writes=self.metrics.slice_writes.inc)
            claims: ClaimSource = DirClaimSource(o.local_dir)
        else:
            # Only here: a plugin on a local directory never loads the API publisher, its
            # HTTP client or the kubernetes client
            # (tests/integration/test_plugin_startup_imports.py).
            from driver.resourceslice.publish import ApiPublisher, SlicePool

            api = self._api = api_client(o.kubeconfig)
            self._node_events = self._node_events or functools.partial(
                post_node_event, api, o.node, component=o.driver)
            others_alive = functools.partial(
                other_plugin_alive, o.registry_dir, o.plugin_dir, o.driver,
                (o.registration_socket, o.dra_socket))
            api_publisher = ApiPublisher(
                api, SlicePool(o.driver, o.node, o.mig_mode, o.counter_layout, o.gpu_sharing),
                on_writes=self.metrics.slice_writes.inc, others_alive=others_alive)
            threading.Thread(target=api_publisher.run_resync, args=(self._resync_stop,),
                             name="publish-resync", daemon=True).start()
            publisher, claims = api_publisher, ApiClaimSource(api)
        return self._publisher or publisher, self._claims or claims

    def start(self) -> None:
        """SocketInUse, before anything is touched, when another plugin serves on this
        one's sockets (they are checked again when bound)."""
        o = self.options
        for socket_path in (o.dra_socket, o.registration_socket):
            free_for_bind(socket_path)
        if o.metrics_port is not None:
            self.metrics.serve(o.metrics_port)
        found = discover(self.provider)
        log.info("discovered %d GPUs (driver %s)", len(found.gpus), found.driver_version)
        publisher, claims = self._sources()
        self._publisher = publisher
        self._exclusion = NodeExclusion(
            o.exclude, self._api, o.node, o.driver, start_timeout=START_PUBLISH_TIMEOUT,
            report=functools.partial(self._node_warning, EXCLUDE_GPUS_PROBLEM))
        parts = self._split(found)  # NodeExclusionError: the annotation is unreadable
        inventory = parts.served
        index = device_index(inventory, o.mig_mode)
        self.provider.nvml.nvmlInit()  # one NVML session for MIG changes, until stop
        make_dir(o.plugin_dir, PRIVATE_DIR)  # the checkpoint, the lock, the DRA socket
        make_dir(o.cdi_root, SHARED_DIR)  # read by the container runtime
        devices, files = self._host_files(inventory)
        self._report_hook(files)
        self.claim_status = self._claim_status()
        self.state = PluginState(
            tools=DeviceTools(
                files=files, devices=devices, host=self.provider.host,
                mig=MigManager(self.provider),
                timeslicer=timeslicer(self.provider, o.mock_driver_root or o.driver_root,
                                      mock_root=o.mock_driver_root is not None),
                mps=mpspod.daemons(o.plugin_dir / "mps", self.provider,
                                   o.mock_driver_root or o.driver_root,
                                   mock_root=o.mock_driver_root is not None,
                                   local=o.local_dir is not None, pods=o.mps_pods,
                                   api=self._api)),
            identity=Identity(driver=o.driver, node=o.node,
                              boot_id=read_boot_id(o.boot_id_path)),
            published=self._published(parts, index),
            paths=Paths(checkpoint=o.checkpoint_path, cdi_root=o.cdi_root,
                        node_lock=o.lock_path),
            claim_source=claims, metrics=self.metrics, status=self.claim_status)
        self.state.recover(lambda: remove_dead_sockets(o.registry_dir, o.plugin_dir, o.driver))
        self._board = HealthBoard()
        threading.Thread(target=self.state.watch_mps,
                         args=(self._resync_stop, self._board.set_mps_problems),
                         name="mps-watch", daemon=True).start()
        monitor = self.monitor = self._health_monitor(self.state, publisher)
        if self.claim_status is not None:
            for ref, prepared in self.state.prepared_claims():
                self.claim_status.prepared(ref, prepared, restored=True)
            self.claim_status.start()
        # the admin's requests first: a GPU kept out is never published untainted
        self.admin = AdminWatch(o.plugin_dir, lambda: monitor.view, monitor.apply)
        self.admin.check()
        self._write_status(monitor.view)
        in_cluster = self._api is not None
        if not in_cluster:  # a local directory: published before the kubelet sees us
            self._publish_first(publisher, inventory, monitor.view.gpus)
        self.metrics.published.set(len(index))
        self.servers = Servers(
            state=self.state, metrics=self.metrics, driver=o.driver, pool=o.node,
            dra_socket=o.dra_socket, registration_socket=o.registration_socket,
            board=self._board)
        if o.health_port is not None:
            self.probe_port = self.servers.start_probe(o.health_port)
        monitor.start()
        self.admin.start()
        self.servers.start()
        if in_cluster:
            # Registered first, as upstream's kubeletplugin helper does: a prepare needs
            # only the claim's allocation and what discovery found, not the slices.
            self._first_publish = threading.Thread(
                target=self._publish_first, args=(publisher, inventory, monitor.view.gpus),
                name="first-publish", daemon=True)
            self._first_publish.start()
        self.rediscoverer = Rediscoverer(self.rediscover, o.rediscover_interval)
        self.rediscoverer.start()

    def _publish_first(self, publisher: Publisher, inventory: Inventory,
                       health: Mapping[int, GpuHealth]) -> None:
        """The first publish, then the republisher, so a newer health or inventory is
        written after it, never overwritten by it. PublishError is raised (local
        directory) or kept in `failed` for `run` (API server, in a thread of its own)."""
        from driver.resourceslice.errors import PublishError, PublishTimeout

        assert self._republisher is not None
        try:
            publisher.publish(inventory, timeout=START_PUBLISH_TIMEOUT, health=health)
        except PublishTimeout as err:
            # Serving matters more: the kubelet may need to unprepare what we prepared
            # before. The resync loop publishes as soon as the API server answers.
            log.warning("serving before the ResourceSlices are published: %s", err)
        except PublishError as err:
            if self._first_publish is None:
                raise
            self.failed = err
        self._republisher.start()

    def _claim_status(self) -> StatusWriter | None:
        """In a cluster, the writer of the prepared claims' status.devices, with the
        devices published and the health seen when it writes."""
        if self._api is None:
            return None
        driver = self.options.driver

        def entries(ref: ClaimRef, devices: tuple[PreparedDevice, ...],
                    prepared_at: datetime) -> list[dict[str, Any]]:
            assert self.state is not None and self.monitor is not None
            published = self.state.published
            return claim_entries(driver, published.index,
                                 published.inventory.driver_version, self.monitor.view,
                                 devices, prepared_at)

        return StatusWriter(api_writer(self._api, driver), entries, self.metrics,
                            lambda: datetime.now(UTC))

    def _host_files(self, inventory: Inventory) -> tuple[HostDevices, DriverFiles]:
        """The device nodes of the inventory's GPUs and the driver's files of its version,
        as CDI specs give them (a mock driver root is laid out, or repaired, for them)."""
        o = self.options
        driver_root = o.mock_driver_root or o.driver_root
        host_root = o.host_driver_root or driver_root
        devices = host_devices(driver_root, host_root, o.proc_devices, inventory.gpus) \
            if o.mock_driver_root is None else mockroot.set_up(
                driver_root, host_root, [g.minor for g in inventory.gpus],
                inventory.driver_version)
        return devices, driver_files(driver_root, host_root, devices,
                                     version=inventory.driver_version, hook=o.cdi_hook)

    def _published(self, parts: Split, index: dict[str, Target]) -> Published:
        o = self.options
        left = replace(parts.served, gpus=parts.excluded, links={})
        return Published(
            inventory=parts.served, index=index,
            # the devices and counters published; the counter layout does not change them
            slices=build_slices(parts.served, o.slice_options(), generation=0),
            dynamic_mig=o.mig_mode == "dynamic",
            excluded={name: t.gpu for name, t in device_index(left, o.mig_mode).items()})

    def _split(self, inventory: Inventory) -> Split:
        """The GPUs served and those left alone, by the flag and the Node's annotation;
        entries that name no GPU are logged when they change (a GPU named by a chart-wide
        list may be on another node, or lost now: it stays excluded if it shows up)."""
        assert self._exclusion is not None
        parts = split(inventory, self._exclusion.current())
        if parts.unmatched != self._unmatched and parts.unmatched:
            message = (f"--exclude-gpus / annotation {annotation_key(self.options.driver)}: "
                       f"no GPU here has the minor number or UUID "
                       f"{', '.join(parts.unmatched)}; it stays excluded if it appears")
            log.warning("%s", message)
            self._node_warning(EXCLUDE_GPUS_PROBLEM, message)
        self._unmatched = parts.unmatched
        if describe(parts.excluded) != self._left:
            log.info("GPUs left alone (excluded): %s", describe(parts.excluded) or "none")
            self._left = describe(parts.excluded)
        return parts

    def rediscover(self) -> list[str]:
        """One re-discovery pass; what changed, in words. A change is logged, what is
        published swapped (`PluginState.publish`), the monitor's GPUs replaced, and the
        slices written with the latest health; nothing changed, nothing is written; an NVML
        failure is logged and leaves everything as it was."""
        assert self.state is not None and self.monitor is not None \
            and self._republisher is not None and self.servers is not None
        published = self.state.published
        try:
            # a served GPU that turned unreadable is kept (and tainted) before the split
            parts = self._split(keep_unreadable(published.inventory, discover(self.provider)))
            inventory = parts.served
        except pynvml.NVMLError as err:
            self.metrics.rediscoveries.labels("failed").inc()
            log.warning("re-discovery failed; still publishing what was found before: %s", err)
            return []
        found = changes(published.inventory, inventory, published.dynamic_mig)
        if not found:
            self.metrics.rediscoveries.labels("unchanged").inc()
            log.debug("re-discovery: nothing changed")
            return []
        index = device_index(inventory, self.options.mig_mode)
        devices, files = self._host_files(inventory)
        self.state.publish(self._published(parts, index),
                           replace(self.state.effects.tools, devices=devices, files=files))
        self.monitor.watch(_watched(inventory))
        self.metrics.published.set(len(index))
        self.metrics.rediscoveries.labels("changed").inc()
        log.info("re-discovery: %s; %d devices published", "; ".join(found), len(index))
        self._health_changed(self.monitor.view)
        return found

    def _health_monitor(self, state: PluginState, publisher: Publisher) -> HealthMonitor:
        """The monitor of the GPUs discovery could read; each change goes to
        `_health_changed` (with the inventory published then: a re-discovery publishes
        through it too)."""
        o = self.options

        def publish(health: Mapping[int, GpuHealth]) -> None:
            publisher.publish(state.published.inventory, timeout=HEALTH_PUBLISH_TIMEOUT,
                              health=health)

        self._republisher = Republisher(publish)
        return HealthMonitor(lambda: HealthWatch(self.provider.nvml),
                             _watched(state.published.inventory), o.health, self.metrics,
                             self._health_changed, o.health_check_interval)

    def _health_changed(self, view: HealthView) -> None:
        """A new health, or new GPUs: to every open health stream at once, to the slices
        through the coalescing republisher, and to `health.json` for `gpu-dra health`."""
        assert self._board is not None and self._republisher is not None
        self._board.update(view)
        self._republisher.changed(view.gpus)
        self._write_status(view)
        if self.claim_status is not None:
            self.claim_status.refresh()

    def _write_status(self, view: HealthView) -> None:
        try:
            write_status(self.options.plugin_dir, status_doc(view, datetime.now(UTC)))
        except OSError as err:  # only `gpu-dra health status` misses it
            log.warning("cannot write %s: %s", STATUS_FILE, err)

    def _report_hook(self, files: DriverFiles) -> None:
        """Containers still start without nvidia-cdi-hook, but may not find the driver's
        libraries: said in the log, the metric and a Node event, which never delays start."""
        self.metrics.cdi_hook.set(files.hook is not None)
        if files.hook is not None:
            return
        message = hook_missing(files)
        log.warning("%s", message)
        self._node_warning(HOOK_MISSING, message)

    def _node_warning(self, reason: str, message: str) -> None:
        """A Warning event on the Node, posted in the background (in a cluster)."""
        if self._node_events is not None:
            threading.Thread(target=self._node_events, args=(reason, message),
                             name="node-event", daemon=True).start()

    def stop(self, grace: float = KUBELET_CALL_TIMEOUT) -> None:
        if self.admin is not None:
            self.admin.stop()
        if self.rediscoverer is not None:
            self.rediscoverer.stop()
        if self.servers is not None:
            self.servers.stop(grace)
        if self.monitor is not None:
            self.monitor.stop()
        if self._republisher is not None:
            self._republisher.stop()
        self._resync_stop.set()
        if self.options.cleanup and self._publisher is not None:
            if self._first_publish is not None:  # else it may write after the clean-up
                self._first_publish.join()
            removed = self._publisher.cleanup()
            log.info("removed this node's ResourceSlices (%s)", removed)
        if self.claim_status is not None:
            self.claim_status.stop()
        if self.state is not None:
            self.state.close()
            self.provider.nvml.nvmlShutdown()


def _watched(inventory: Inventory) -> dict[int, str]:
    """The GPUs the health monitor watches: those discovery could read, minor -> UUID."""
    return {g.minor: g.uuid for g in inventory.gpus if g.minor >= 0 and g.healthy}


def run(options: PluginOptions, provider: Provider) -> int:
    """Run until SIGTERM or SIGINT, re-discovering on SIGHUP; the exit code."""
    stop = threading.Event()
    hangup = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda signum, frame: hangup.set())
    plugin = Plugin(options, provider)
    try:
        plugin.start()
        # What start made (modules, the inventory, slices) lives as long as the process:
        # frozen, the collector's full passes during prepares no longer walk it.
        gc.freeze()
        log.info("plugin %s ready on node %s", options.driver, options.node)
        # Short waits: Python runs a signal's handler in the main thread, and a signal that
        # the kernel hands to another thread (gRPC's) does not interrupt a long wait there.
        while not stop.wait(SIGNAL_POLL):
            if plugin.failed is not None:
                raise plugin.failed
            if hangup.is_set() and plugin.rediscoverer is not None:
                hangup.clear()
                log.info("received SIGHUP: discovering the GPUs again")
                plugin.rediscoverer.trigger()
    finally:
        plugin.stop()
    return 0
