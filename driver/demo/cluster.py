"""`gpu-dra demo --cluster`: the driver against a real local control plane, until Ctrl-C.

etcd, kube-apiserver, kube-scheduler and kube-controller-manager (driver/devcluster/controlplane.py)
run on loopback; a fake Node is kept Ready; on it, the kubelet stand-in (the kubelet's own
plugin manager and DRA manager, driver/devcluster/node.py) and ``gpu-dra plugin`` on a mock
machine, both as child processes. The user gets a kubeconfig and applies their own
DeviceClasses, claims and pods: the scheduler allocates, the stand-in prepares through
the plugin's sockets, the plugin writes CDI specs. SIGINT or SIGTERM stops everything in
reverse order and removes the folder; every child also dies if this process is killed.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from driver.allocator import driver_classes
from driver.allocator.input import InputError
from driver.atomicfile import write_atomically
from driver.demo.local import Print, Steps, profile_source
from driver.devcluster.controlplane import (
    ALL_BINARIES,
    AssetsUnavailable,
    ClusterConfig,
    ComponentError,
    FakeNodeKeeper,
    LocalCluster,
    ensure_assets,
    stop_signals_held,
)
from driver.devcluster.node import (
    NODE_TOOLS_BUILD,
    STANDIN_ENV,
    KubeletStandin,
    PluginDaemon,
    PluginFolders,
    ensure_standin,
    poll,
)
from driver.errors import DevClusterError
from driver.kube.api import api_request
from driver.resourceslice.build import MigMode

RESOURCE_V1 = "/apis/resource.k8s.io/v1"
READY_TIMEOUT = 120.0
WATCH_INTERVAL = 0.5
INTERRUPTED = 130  # the shell's code for a SIGINT: Ctrl-C before the cluster was up


@dataclass(frozen=True)
class ClusterDemoOptions:
    profile: str = "dgx-h100"  # a shipped profile name or a YAML file
    mig_mode: MigMode = "dynamic"
    kubeconfig_out: Path | None = None
    keep: bool = False
    driver: str = "gpu.dra.dev"
    node: str = "gpu-node-0"


class MissingBinaries(DevClusterError):
    """The control plane or the stand-in is neither found nor buildable: exit code 2."""


def missing_hint(err: AssetsUnavailable) -> str:
    """One line: what failed and what to install or set."""
    first = str(err).splitlines()[0]
    return (f"{first}: install Go >= 1.26 (the binaries are then built once from pinned "
            f"sources, about 15 minutes, and cached) or set KUBEBUILDER_ASSETS to a folder "
            f"with {', '.join(ALL_BINARIES)} and kubelet-standin (or {STANDIN_ENV} to the "
            f"stand-in, built by {NODE_TOOLS_BUILD})")


def example(driver: str, node: str, cdi_root: Path) -> list[str]:
    """A ResourceClaimTemplate and a pod using it, ready to paste, then what to watch."""
    return f"""\
kubectl apply -f - <<'EOF'
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata:
  name: one-gpu
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly:
          deviceClassName: {driver}
---
apiVersion: v1
kind: Pod
metadata:
  name: gpu-pod
spec:
  nodeSelector:
    kubernetes.io/hostname: {node}
  terminationGracePeriodSeconds: 0
  resourceClaims:
  - name: gpu
    resourceClaimTemplateName: one-gpu
  containers:
  - name: main
    image: registry.k8s.io/pause:3.10
    resources:
      claims:
      - name: gpu
EOF
kubectl get resourceclaims -o wide        # allocated to gpu-pod, reserved for it
kubectl get resourceslices                # what the plugin publishes for {node}
ls {cdi_root}  # the claim's CDI spec while the pod exists
kubectl delete pod gpu-pod                # unprepared: the CDI spec goes away""".splitlines()


class ClusterDemo:
    """The running pieces, each stopped by :meth:`stop` in reverse order of start."""

    def __init__(self, options: ClusterDemoOptions, root: Path, out: Print) -> None:
        self.options, self.root, self.out = options, root, out
        self.cluster: LocalCluster | None = None
        self.api: Any = None
        self.keeper: FakeNodeKeeper | None = None
        self.standin: KubeletStandin | None = None
        self.plugin: PluginDaemon | None = None
        self.folders = PluginFolders(root)
        self._seen: dict[str, str] = {}

    # --- start -------------------------------------------------------------------------------

    def start_control_plane(self, assets: Path) -> tuple[str, list[str]]:
        self.cluster = LocalCluster(ClusterConfig(
            assets=assets, workdir=self.root / "control-plane", stop_grace=5.0))
        self.cluster.start()
        started = self.cluster.started_in or 0.0
        self.cluster.start_scheduler()
        self.cluster.start_controller_manager()
        self.api = self.cluster.api_client()
        return (f"etcd, kube-apiserver {self.cluster.server_version()} "
                f"(ready in {started:.1f}s), kube-scheduler, kube-controller-manager",
                [f"API server {self.cluster.server}",
                 f"logs {self.cluster.workdir}/<component>.log"])

    def add_node(self) -> tuple[str, list[str]]:
        self.keeper = FakeNodeKeeper(self.api)
        self.keeper.add(self.options.node, labels={"nvidia.com/gpu.present": "true"})
        # Pods in "default" need its ServiceAccount; the controller makes it, but a
        # user's first pod must not race it.
        sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}
        api_request(self.api, "POST", "/api/v1/namespaces/default/serviceaccounts",
                    sa).expect(201, 409)
        return f"Node {self.options.node} Ready (kept fresh: no kubelet runs)", []

    def apply_classes(self) -> tuple[str, list[str]]:
        names = []
        for device_class in driver_classes(self.options.driver):
            api_request(self.api, "POST", f"{RESOURCE_V1}/deviceclasses",
                        device_class).expect(201, 409)
            names.append(device_class["metadata"]["name"])
        return f"DeviceClasses {', '.join(names)}", []

    def start_standin(self, binary: Path) -> tuple[str, list[str]]:
        assert self.cluster is not None
        with stop_signals_held():  # recorded before a Ctrl-C can land: stop() takes it
            self.standin = KubeletStandin(binary, self.cluster.kubeconfig, self.options.node,
                                          self.root / "kubelet", driver=self.options.driver)
        self.standin.wait_running(READY_TIMEOUT)
        return (f"kubelet-standin for {self.options.node} (the kubelet's plugin and DRA "
                f"managers)", [f"watching {self.standin.registry_dir}",
                               f"log {self.standin.log}"])

    def start_plugin(self) -> tuple[str, list[str]]:
        assert self.cluster is not None and self.standin is not None
        o = self.options
        folders = self.folders
        args = folders.plugin_args(node=o.node, driver=o.driver,
                                   kubeconfig=self.cluster.kubeconfig,
                                   registry_dir=self.standin.registry_dir,
                                   mock=str(profile_source(o.profile)), mig_mode=o.mig_mode,
                                   mock_state=folders.mig_state)
        with stop_signals_held():
            self.plugin = PluginDaemon(args, folders.plugin_log)
        standin, plugin = self.standin, self.plugin

        def registered() -> dict[str, Any] | None:
            plugin.check_alive()
            standin.check_alive()
            return standin.registration(o.driver)

        poll(registered, f"{o.driver} to register with {standin.name}", READY_TIMEOUT,
             fatal=(ComponentError,))
        devices = poll(self._published, "the plugin's ResourceSlices", READY_TIMEOUT,
                       fatal=(ComponentError,))
        return (f"gpu-dra plugin on mock {o.profile}, {o.mig_mode} MIG: registered, "
                f"{devices} devices published", [f"log {self.plugin.log}"])

    def _published(self) -> int:
        assert self.plugin is not None
        self.plugin.check_alive()
        items = api_request(self.api, "GET", f"{RESOURCE_V1}/resourceslices", query={
            "fieldSelector": f"spec.nodeName={self.options.node},"
                             f"spec.driver={self.options.driver}"}).expect(200)["items"]
        return sum(len(s["spec"].get("devices") or []) for s in items)

    # --- run ---------------------------------------------------------------------------------

    def failed(self) -> str | None:
        """What died on its own, with its log's tail, if anything did."""
        assert self.cluster is not None
        for name, code in self.cluster.exited().items():
            tail = self.cluster.log(name).read_text(errors="replace").splitlines()[-20:]
            return f"{name} exited with code {code}:\n" + "\n".join(tail)
        for proc in (self.standin, self.plugin):
            if proc is not None and not proc.alive():
                return f"{proc.name} exited with code {proc.proc.returncode}:\n{proc.tail()}"
        return None

    def report_pods(self) -> None:
        """A line for each pod whose preparation state changed since the last look."""
        assert self.standin is not None
        for pod in self.standin.pods():
            state = pod.get("state", "")
            if self._seen.get(pod["uid"]) == state:
                continue
            self._seen[pod["uid"]] = state
            devices = [f"{d['device']} ({' '.join(d.get('cdiDeviceIDs') or [])})"
                       for claim in pod.get("claims") or []
                       for d in (claim.get("drivers") or {}).get(self.options.driver, [])]
            detail = f": {pod['error']}" if pod.get("error") else ""
            if devices and state == "prepared":
                detail = f": {', '.join(devices)}"
            self.out(f"{time.strftime('%H:%M:%S')} pod {pod['namespace']}/{pod['name']} "
                     f"{state}{detail}")

    # --- stop --------------------------------------------------------------------------------

    def stop(self) -> list[str]:
        """Stand-in, plugin, node keeper, control plane; what was stopped, in order."""
        stopped = []
        if self.standin is not None:
            self.standin.stop(grace=5.0)
            stopped.append("kubelet-standin")
        if self.plugin is not None:
            self.plugin.stop(grace=10.0)
            stopped.append("plugin")
        if self.keeper is not None:
            self.keeper.stop()
        if self.api is not None:
            self.api.close()
        if self.cluster is not None:
            self.cluster.stop()
            stopped.append("control plane")
        return stopped


class _Signals:
    """Within the block, records the first SIGINT/SIGTERM and raises KeyboardInterrupt for
    it while armed (startup), so a Ctrl-C then stops what has started. Later ones are
    ignored: a second Ctrl-C must not cut the cleanup short.

    Python runs the handler in the main thread even when another thread took the signal,
    so a signal that the main thread holds (``stop_signals_held``: a child being started
    and recorded) is queued back to it, to arrive when the block ends."""

    def __init__(self) -> None:
        self.signum = 0
        self.armed = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def arm(self) -> None:
        """Raise for the next signal, or now for one that came while disarmed."""
        if self.signum:
            raise KeyboardInterrupt
        self.armed = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            signal.pthread_kill(threading.get_ident(), signum)
            return
        if self.signum:
            return
        self.signum = signum
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def run_cluster_demo(options: ClusterDemoOptions, out: Print = print) -> int:
    """Start, print how to use it, wait for SIGINT/SIGTERM, stop. Exit code 0 after a
    signal once ready, 130 for one during startup, 1 if a component dies; raises
    InputError (bad option), MissingBinaries, StepFailed (after stopping what started)."""
    from driver.nvml.mock import mock_provider
    from driver.nvml.profile import ProfileError

    try:  # the plugin would load it too, but only after the control plane is up
        mock_provider(str(profile_source(options.profile)))
    except ProfileError as err:
        raise InputError(str(err)) from err
    if options.kubeconfig_out is not None and not options.kubeconfig_out.parent.is_dir():
        raise InputError(f"--kubeconfig-out {options.kubeconfig_out}: no such folder")
    began = time.monotonic()
    steps = Steps(8, out)
    with _Signals() as signals:
        found: list[Path] = []
        missing: list[AssetsUnavailable] = []
        try:
            steps.run("binaries", lambda: _binaries(found, missing, out))
        except KeyboardInterrupt:
            return INTERRUPTED
        signals.armed = False
        if missing:
            raise MissingBinaries(missing_hint(missing[0]))
        assets, standin = found
        root = Path(tempfile.mkdtemp(prefix="gpu-dra-cluster-", dir="/tmp"))  # short sockets
        demo = ClusterDemo(options, root, out)
        out(f"gpu-dra demo --cluster: profile {options.profile}, folder {root}")
        code = 0
        try:
            signals.arm()
            steps.run("control plane", lambda: demo.start_control_plane(assets))
            steps.run("fake GPU node", demo.add_node)
            steps.run("device classes", demo.apply_classes)
            steps.run("kubelet stand-in", lambda: demo.start_standin(standin))
            steps.run("plugin", demo.start_plugin)
            kubeconfig = _kubeconfig(demo, options)
            steps.run("ready", lambda: (f"up in {time.monotonic() - began:.1f}s; Ctrl-C "
                                        f"stops everything", [f"kubeconfig {kubeconfig}"]))
            signals.armed = False
            for line in _usage(kubeconfig, demo.folders.cdi_root, options):
                out(line)
            while not signals.signum:
                demo.report_pods()
                if (why := demo.failed()) is not None:
                    out(f"gpu-dra demo --cluster: {why}")
                    code = 1
                    break
                time.sleep(WATCH_INTERVAL)
            if signals.signum:
                out(f"received {signal.Signals(signals.signum).name}: stopping")
        except KeyboardInterrupt:
            out("interrupted: stopping what has started")
            code = INTERRUPTED
        finally:
            signals.armed = False
            steps.total = steps.done + 1
            steps.run("stop", lambda: _stop(demo, root, options.keep))
    return code


def _binaries(found: list[Path], missing: list[AssetsUnavailable],
              out: Print) -> tuple[str, list[str]]:
    def progress(line: str) -> None:
        out(f"      {line}")

    try:
        assets = ensure_assets(progress)
        standin = ensure_standin(assets, progress)
    except AssetsUnavailable as err:
        missing.append(err)
        return "missing", []
    found += [assets, standin]
    return "control plane and kubelet stand-in", [f"control plane {assets}",
                                                  f"kubelet-standin {standin}"]


def _kubeconfig(demo: ClusterDemo, options: ClusterDemoOptions) -> Path:
    """The cluster's kubeconfig, copied to --kubeconfig-out when given (and left there)."""
    assert demo.cluster is not None
    if options.kubeconfig_out is None:
        return demo.cluster.kubeconfig
    # the temp file's mode, 0600, stays: the file holds the admin key
    write_atomically(options.kubeconfig_out, demo.cluster.kubeconfig.read_bytes(),
                     durable=False)
    return options.kubeconfig_out


def _usage(kubeconfig: Path, cdi_root: Path, options: ClusterDemoOptions) -> list[str]:
    """Unindented, so the lines paste into a shell as they are."""
    return [
        f"CDI specs appear in {cdi_root}",
        "in another terminal:",
        "",
        f"export KUBECONFIG={kubeconfig}",
        *example(options.driver, options.node, cdi_root),
        "",
        "pods on the node are reported here as the stand-in prepares and unprepares them:",
    ]


def _stop(demo: ClusterDemo, root: Path, keep: bool) -> tuple[str, list[str]]:
    stopped = demo.stop()
    summary = f"stopped {', '.join(stopped) or 'nothing'}"
    if keep:
        return f"{summary}; folder kept: {root}", []
    shutil.rmtree(root, ignore_errors=True)
    return f"{summary}; folder removed", []
