"""The plugin's gRPC servers: the DRA socket, the registration socket, and the TCP probe.

The DRA socket serves DRAPlugin v1 and v1beta1 (one implementation; v1beta1 only lacks
share_id) and the resource-health stream in v1 and v1alpha1, which reports each device's
health as the health monitor has it (its GPU's), re-sent every HEALTH_RESEND seconds and
pushed to every open stream the moment it changes. The kubelet dials one socket
for both, so they share one server and its threads; a stream holds its thread while open, so
streams are capped (HEALTH_STREAMS, the next refused with RESOURCE_EXHAUSTED) and the
threads for prepare and unprepare (PREPARE_WORKERS) are never theirs. The registration socket
answers the kubelet's plugin watcher. The TCP health service answers probes by calling
the plugin's own sockets, so a deleted or wedged socket fails the probe and the pod is
restarted, instead of a kubelet silently losing the plugin.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driver._proto.dra_v1 import api_pb2 as dra_v1
from driver._proto.dra_v1 import api_pb2_grpc as dra_v1_grpc
from driver._proto.dra_v1beta1 import api_pb2 as dra_v1beta1
from driver._proto.dra_v1beta1 import api_pb2_grpc as dra_v1beta1_grpc
from driver._proto.drahealth_v1 import api_pb2 as health_v1
from driver._proto.drahealth_v1 import api_pb2_grpc as health_v1_grpc
from driver._proto.drahealth_v1alpha1 import api_pb2 as health_v1alpha1
from driver._proto.drahealth_v1alpha1 import api_pb2_grpc as health_v1alpha1_grpc
from driver._proto.pluginregistration_v1 import api_pb2 as reg_v1
from driver._proto.pluginregistration_v1 import api_pb2_grpc as reg_v1_grpc
from driver.health.model import GpuHealth
from driver.health.taints import conditions_text
from driver.plugin.claims import ClaimRef
from driver.plugin.devices import Target
from driver.plugin.metrics import Metrics
from driver.plugin.modes import PRIVATE_DIR, SOCKET, make_dir
from driver.plugin.monitor import HealthView
from driver.plugin.sockets import SocketFile, free_for_bind, grpc_address
from driver.plugin.state import MpsProblem, Outcome, PluginState

log = logging.getLogger(__name__)

# What GetInfo advertises, newest first: kubelets pick the first they know.
SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth",
            "v1alpha1.DRAResourceHealth")
KUBELET_CALL_TIMEOUT = 45.0  # the kubelet's per-call deadline
ANSWER_MARGIN = 3.0  # answer this long before the caller's deadline
HEALTH_RESEND = 10.0  # the kubelet marks a device Unknown after 30 s without a report
HEALTH_CHECK_TIMEOUT = 30  # told to the kubelet: three resends missed make a device Unknown
PROBE_TIMEOUT = 1.0
PREPARE_WORKERS = 16  # prepare/unprepare calls (and the probe's), never taken by a stream
HEALTH_STREAMS = 8  # the kubelet keeps one per plugin socket; a reconnect may overlap


class DraServicer:
    """NodePrepareResources and NodeUnprepareResources for one API version."""

    def __init__(self, state: PluginState, metrics: Metrics, pb: ModuleType,
                 share_ids: bool, stopping: threading.Event) -> None:
        self.state = state
        self.metrics = metrics
        self.pb = pb
        self.share_ids = share_ids
        self.stopping = stopping

    def _refuse_when_stopping(self, context: grpc.ServicerContext) -> None:
        """Once deregistration began, a new call is refused, not started: the server's
        grace period is for the calls already in flight."""
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the plugin is shutting down")

    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float:
        remaining = context.time_remaining()
        budget = KUBELET_CALL_TIMEOUT if remaining is None else min(remaining,
                                                                    KUBELET_CALL_TIMEOUT)
        return time.monotonic() + max(0.0, budget - ANSWER_MARGIN)

    @staticmethod
    def _refs(request: Any) -> list[ClaimRef]:
        return [ClaimRef(c.namespace, c.name, c.uid) for c in request.claims]

    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._refuse_when_stopping(context)
        started = time.monotonic()
        outcomes = self.state.prepare(self._refs(request), self._deadline(context))
        response = self.pb.NodePrepareResourcesResponse()
        for uid, outcome in outcomes.items():
            self._prepared(response.claims[uid], outcome)
        self.metrics.latency.labels("prepare").observe(time.monotonic() - started)
        return response

    def _prepared(self, entry: Any, outcome: Outcome) -> None:
        entry.SetInParent()  # an empty entry is success with no devices
        if outcome.error is not None:
            entry.error = outcome.error
            return
        for device in outcome.devices:
            added = entry.devices.add(request_names=device.request_names,
                                      pool_name=device.pool, device_name=device.device,
                                      cdi_device_ids=device.cdi_device_ids)
            if self.share_ids and device.share_id is not None:
                added.share_id = device.share_id

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._refuse_when_stopping(context)
        started = time.monotonic()
        outcomes = self.state.unprepare(self._refs(request), self._deadline(context))
        response = self.pb.NodeUnprepareResourcesResponse()
        for uid, outcome in outcomes.items():
            entry = response.claims[uid]
            entry.SetInParent()
            if outcome.error is not None:
                entry.error = outcome.error
        self.metrics.latency.labels("unprepare").observe(time.monotonic() - started)
        return response


class StreamSlots:
    """The health streams open at once, at most `limit` (each holds a server thread while
    open); `close` ends them all, at once, when the plugin stops."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._open: dict[threading.Event, threading.Event] = {}  # ended -> its wake
        self._closed = False

    def take(self, context: grpc.ServicerContext, wake: threading.Event) -> threading.Event:
        """A slot for this stream: an event set when the caller goes away (cancel, deadline,
        a closed connection) or the plugin stops, which sets `wake` too; aborts when none
        is left."""
        ended = threading.Event()
        with self._lock:
            closed, full = self._closed, len(self._open) >= self._limit
            if not (closed or full):
                self._open[ended] = wake
        if closed:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the plugin is shutting down")
        if full:
            log.warning("refused a health stream: %d are open already", self._limit)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self._limit} health streams are open already")
        def end() -> None:
            ended.set()
            wake.set()

        if not context.add_callback(end):
            end()  # the call ended already
        return ended

    def give_back(self, ended: threading.Event) -> None:
        with self._lock:
            self._open.pop(ended, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for ended, wake in self._open.items():
                ended.set()
                wake.set()


class HealthBoard:
    """The GPUs' health as the monitor last reported it, the devices whose claims' MPS
    daemons are down (by device name, as the MPS watch last found them), and the streams
    to wake when either changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._view = HealthView({}, {}, {})
        self._mps: dict[str, MpsProblem] = {}
        self._listeners: set[threading.Event] = set()

    @property
    def view(self) -> HealthView:
        return self._view

    @property
    def mps_problems(self) -> dict[str, MpsProblem]:
        return self._mps

    def update(self, view: HealthView) -> None:
        with self._lock:
            self._view = view
        self._wake()

    def set_mps_problems(self, problems: dict[str, MpsProblem]) -> None:
        """Wakes the streams only on a change: the watch reports every round."""
        with self._lock:
            if problems == self._mps:
                return
            self._mps = problems
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for wake in listeners:
            wake.set()

    def listen(self, wake: threading.Event) -> None:
        with self._lock:
            self._listeners.add(wake)

    def forget(self, wake: threading.Event) -> None:
        with self._lock:
            self._listeners.discard(wake)


class HealthStreamServicer:
    """NodeWatchResources: the complete device list with its health, sent when it changes
    and re-sent every HEALTH_RESEND seconds until the stream or the plugin ends; its thread
    is free the moment either does."""

    def __init__(self, pool: str, devices: Callable[[], Mapping[str, Target]],
                 pb: ModuleType, slots: StreamSlots, board: HealthBoard) -> None:
        self.pool = pool
        self.devices = devices  # those published now: a re-discovery changes them
        self.pb = pb
        self.slots = slots
        self.board = board

    def _report(self, view: HealthView, mps: Mapping[str, MpsProblem]) -> Any:
        now = int(time.time())
        response = self.pb.NodeWatchResourcesResponse()
        for name, target in sorted(self.devices().items()):
            health, message = self._health(target, view, mps.get(name))
            response.devices.add(device=self.pb.DeviceIdentifier(pool_name=self.pool,
                                                                 device_name=name),
                                 health=health, last_updated_time=now,
                                 health_check_timeout_seconds=HEALTH_CHECK_TIMEOUT,
                                 message=message[:1024])
        return response

    def _health(self, target: Target, view: HealthView,
                mps: MpsProblem | None) -> tuple[Any, str]:
        """The GPU's verdict (`_gpu_health`), made UNHEALTHY from HEALTHY by a down MPS
        daemon that leaves the device's pods without one; the message names the GPU's
        trouble first, then the daemon's."""
        health, message = self._gpu_health(target, view)
        if mps is None:
            return health, message
        if health == self.pb.HEALTHY:
            return self.pb.UNHEALTHY if mps.unhealthy else health, mps.message
        return health, f"{message}; {mps.message}" if message else mps.message

    def _gpu_health(self, target: Target, view: HealthView) -> tuple[Any, str]:
        """The monitor's verdict on the device's GPU where it watches it, else discovery's;
        the message names every condition, then the latest transition's cause."""
        gpu: GpuHealth | None = view.gpus.get(target.gpu.minor)
        if gpu is None:
            return (self.pb.HEALTHY if target.gpu.healthy else self.pb.UNHEALTHY,
                    target.gpu.health_error or "")
        status = {"healthy": self.pb.HEALTHY, "unhealthy": self.pb.UNHEALTHY,
                  "unknown": self.pb.UNKNOWN}[gpu.status]
        latest = view.causes.get(target.gpu.minor, "")
        if not gpu.conditions:  # why it is healthy again, if it was not
            return status, latest
        return status, f"{conditions_text(gpu)} (latest: {latest})" if latest else \
            conditions_text(gpu)

    def NodeWatchResources(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        wake = threading.Event()
        ended = self.slots.take(context, wake)
        self.board.listen(wake)
        try:
            while True:
                wake.clear()  # before reading the board: a change after it wakes us
                if ended.is_set():
                    break
                yield self._report(self.board.view, self.board.mps_problems)
                wake.wait(HEALTH_RESEND)
        finally:
            self.board.forget(wake)
            self.slots.give_back(ended)


class RegistrationServicer(reg_v1_grpc.RegistrationServicer):
    def __init__(self, driver: str, endpoint: Path) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self.registered = threading.Event()

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return reg_v1.PluginInfo(type="DRAPlugin", name=self.driver, endpoint=str(self.endpoint),
                                 supported_versions=list(SERVICES))

    def NotifyRegistrationStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.plugin_registered:
            log.info("the kubelet registered the plugin")
            self.registered.set()
        else:
            log.error("the kubelet refused the plugin: %s; still serving, it retries when the "
                      "registration socket is created again", request.error)
        return reg_v1.RegistrationStatusResponse()


class ProbeServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 Check for the pod's probes: SERVING when both sockets answer."""

    def __init__(self, registration_socket: Path, dra_socket: Path) -> None:
        self.ready = threading.Event()
        self._registration_socket = registration_socket
        self._dra_socket = dra_socket

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        status = health_pb2.HealthCheckResponse
        if not self.ready.is_set():
            return status(status=status.NOT_SERVING)
        try:
            with grpc.insecure_channel(grpc_address(self._registration_socket)) as channel:
                reg_v1_grpc.RegistrationStub(channel).GetInfo(reg_v1.InfoRequest(),
                                                              timeout=PROBE_TIMEOUT)
            with grpc.insecure_channel(grpc_address(self._dra_socket)) as channel:
                dra_v1_grpc.DRAPluginStub(channel).NodePrepareResources(
                    dra_v1.NodePrepareResourcesRequest(), timeout=PROBE_TIMEOUT)
        except grpc.RpcError as err:
            log.warning("health probe: a plugin socket does not answer: %s", err.code())
            return status(status=status.NOT_SERVING)
        return status(status=status.SERVING)


_BINDING = threading.Lock()  # one private socket name per process at a time


def _bind_unix(server: grpc.Server, path: Path) -> SocketFile:
    """Listen on `path` unless another plugin does (a killed plugin's socket is replaced);
    the socket file as bound, so that stopping removes only that one.

    grpc unlinks whatever socket is at the path it binds, when it binds and again when it
    stops, so it binds a private name in the same directory (dot-named: the kubelet's plugin
    watcher ignores it; never longer than a socket name of ours) that is then linked to
    `path` and unlinked: grpc's unlinks never reach `path`."""
    make_dir(path.parent, PRIVATE_DIR)
    free_for_bind(path)
    # random, not the pid: two plugin pods in a rolling update are both pid 1
    private = path.parent / f".{secrets.token_hex(3)}"  # 7 bytes: shorter than dra.sock
    with _BINDING:
        server.add_insecure_port(grpc_address(private))
        try:
            os.chmod(private, SOCKET)
            return SocketFile.link(private, path)
        finally:
            private.unlink(missing_ok=True)


class Servers:
    """Start order: DRA socket, then the registration socket (the kubelet dials the DRA
    endpoint as soon as it registers). Stop order: the other way round."""

    def __init__(self, *, state: PluginState, metrics: Metrics, driver: str, pool: str,
                 dra_socket: Path, registration_socket: Path,
                 board: HealthBoard | None = None) -> None:
        self.dra_socket = dra_socket
        self.registration_socket = registration_socket
        self.stopping = threading.Event()
        self.registration = RegistrationServicer(driver, dra_socket)
        self.probe = ProbeServicer(registration_socket, dra_socket)
        self._bound: dict[Path, SocketFile] = {}
        self._streams = StreamSlots(HEALTH_STREAMS)
        self.board = board or HealthBoard()

        def devices() -> Mapping[str, Target]:
            return state.published.index
        # a refused stream takes a thread too, for an instant: the capped streams and the
        # refusals can never take all of PREPARE_WORKERS
        self._dra = grpc.server(ThreadPoolExecutor(PREPARE_WORKERS + HEALTH_STREAMS,
                                                   thread_name_prefix="dra"))
        # One servicer class per service serves every version of it, given the version's
        # messages (`pb`); the generated base classes differ only in those message types.
        dra_v1_grpc.add_DRAPluginServicer_to_server(cast(
            dra_v1_grpc.DRAPluginServicer,
            DraServicer(state, metrics, dra_v1, share_ids=True, stopping=self.stopping)),
            self._dra)
        dra_v1beta1_grpc.add_DRAPluginServicer_to_server(cast(
            dra_v1beta1_grpc.DRAPluginServicer,
            DraServicer(state, metrics, dra_v1beta1, share_ids=False, stopping=self.stopping)),
            self._dra)
        health_v1_grpc.add_DRAResourceHealthServicer_to_server(cast(
            health_v1_grpc.DRAResourceHealthServicer,
            HealthStreamServicer(pool, devices, health_v1, self._streams, self.board)), self._dra)
        health_v1alpha1_grpc.add_DRAResourceHealthServicer_to_server(cast(
            health_v1alpha1_grpc.DRAResourceHealthServicer,
            HealthStreamServicer(pool, devices, health_v1alpha1, self._streams, self.board)),
            self._dra)
        self._registration = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="reg"))
        reg_v1_grpc.add_RegistrationServicer_to_server(self.registration, self._registration)
        self._probe: grpc.Server | None = None

    def start_probe(self, port: int, address: str = "[::]") -> int:
        """The grpc.health.v1 service on TCP (NOT_SERVING until `ready`); returns the port."""
        self._probe = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="probe"))
        health_pb2_grpc.add_HealthServicer_to_server(self.probe, self._probe)
        bound = self._probe.add_insecure_port(f"{address}:{port}")
        self._probe.start()
        return bound

    def start(self) -> None:
        self._bound[self.dra_socket] = _bind_unix(self._dra, self.dra_socket)
        self._dra.start()
        self._bound[self.registration_socket] = _bind_unix(self._registration,
                                                           self.registration_socket)
        self._registration.start()
        self.probe.ready.set()
        log.info("serving %s on %s; registration socket %s", ", ".join(SERVICES),
                 self.dra_socket, self.registration_socket)

    def _remove(self, path: Path) -> None:
        """Remove the socket at `path` if this process bound it (it may have failed to
        start before binding it, or another plugin may have bound it since)."""
        bound = self._bound.pop(path, None)
        if bound is not None:
            bound.remove()

    def stop(self, grace: float) -> None:
        """Deregister first, then refuse new calls and let those in flight finish."""
        self.probe.ready.clear()
        self.stopping.set()  # refuses new DRA calls
        self._streams.close()
        self._remove(self.registration_socket)
        self._registration.stop(0)
        self._dra.stop(grace).wait()
        self._remove(self.dra_socket)
        if self._probe is not None:
            self._probe.stop(0)
