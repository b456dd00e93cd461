"""The test's kubelet for MPS daemon pods (the kubelet stand-in runs no containers) and a
claim's daemon's answers through the mock driver root's control client."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.devcluster.controlplane import free_port
from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.kube.api import api_request
from tests.support.apiserver import ControlPlane
from tests.support.plugin import short_tmp
from tests.support.standin import KubeletStandin

DRIVER = "gpu.dra.dev"
IMAGE = "registry.example.com/gpu-dra-driver:test"


@dataclass
class Liveness:
    """A container's liveness probe as the kubelet runs it: when next, and how many
    failed in a row."""

    due: float
    failures: int = 0


class PodRunner:
    """Plays the kubelet for the daemon pods on one node, where the driver relies on it:
    runs each one's command, again when it fails (restartPolicy OnFailure) or fails its
    liveness probe `failureThreshold` times in a row (killed, as a container's end kills
    its processes, then started again), never for a pod being deleted; writes the pod's
    phase through the status subresource (Running once started, Succeeded once its
    container exited 0)."""

    def __init__(self, api: Any, namespace: str, node: str) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.liveness: dict[str, Liveness] = {}
        self._stop = threading.Event()
        self._backing_off = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pods(self) -> list[dict[str, Any]]:
        return list(api_request(self.api, "GET", f"/api/v1/namespaces/{self.namespace}/pods",
                                query={"fieldSelector": f"spec.nodeName={self.node}",
                                       "labelSelector": "app.kubernetes.io/component="
                                                        "mps-daemon"}).expect(200)["items"])

    @contextlib.contextmanager
    def backing_off(self) -> Iterator[None]:
        """While in it, a container that failed is not started again (the kubelet's
        crash back-off)."""
        self._backing_off.set()
        try:
            yield
        finally:
            self._backing_off.clear()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for pod in self.pods():
                uid = pod["metadata"]["uid"]
                if pod["metadata"].get("deletionTimestamp") or \
                        pod["status"].get("phase") in ("Succeeded", "Failed"):
                    continue
                [container] = pod["spec"]["containers"]
                known = self.processes.get(uid)
                if known is not None and known.poll() is None:
                    self._probe(uid, known, container)
                    continue
                if known is not None and known.returncode == 0:  # restartPolicy OnFailure
                    self._phase(pod, "Succeeded")
                    continue
                if self._backing_off.is_set():
                    continue
                assert container["command"][:2] == ["gpu-dra", "mps-daemon"]
                self.processes[uid] = self._start(container["command"])
                probe = container.get("livenessProbe", {})
                self.liveness[uid] = Liveness(time.monotonic() +
                                              probe.get("initialDelaySeconds", 0))
                self._phase(pod, "Running")

    @staticmethod
    def _start(command: list[str]) -> subprocess.Popen[bytes]:
        """`gpu-dra ...` on the host, in a process group: what a container's end takes."""
        return subprocess.Popen([sys.executable, "-m", "driver.cli", *command[1:]],
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                                start_new_session=True)

    def _probe(self, uid: str, process: subprocess.Popen[bytes],
               container: dict[str, Any]) -> None:
        """Run the container's exec liveness probe when it is due; kill the container at
        its failure threshold (the next round starts it again)."""
        probe, liveness = container.get("livenessProbe"), self.liveness[uid]
        if probe is None or time.monotonic() < liveness.due:
            return
        checker = self._start(probe["exec"]["command"])
        try:
            failed = checker.wait(timeout=probe["timeoutSeconds"]) != 0
        except subprocess.TimeoutExpired:
            checker.kill()
            checker.wait()
            failed = True
        liveness.failures = liveness.failures + 1 if failed else 0
        liveness.due = time.monotonic() + probe["periodSeconds"]
        if liveness.failures >= probe["failureThreshold"]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def _phase(self, pod: dict[str, Any], phase: str) -> None:
        """The pod's phase, as the kubelet writes it (a pod deleted meanwhile: nothing)."""
        if pod["status"].get("phase") != phase:
            api_request(self.api, "PATCH", f"/api/v1/namespaces/{self.namespace}/pods/"
                        f"{pod['metadata']['name']}/status", {"status": {"phase": phase}},
                        content_type="application/merge-patch+json").expect(200, 404)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ask(claim_dir: Path, command: str) -> str:
    """The claim's daemon's answer, through the mock driver root's control client."""
    control = claim_dir.parent.parent / "mock-driver-root/usr/local/nvidia/bin/" \
        "nvidia-cuda-mps-control"
    done = subprocess.run([str(control)], input=command + "\n", capture_output=True,
                          text=True, check=True, timeout=10,
                          env={"PATH": os.environ["PATH"],
                               "CUDA_MPS_PIPE_DIRECTORY": str(claim_dir / "pipe")})
    return done.stdout.strip()


@dataclass
class MpsNode:
    """A plugin on the mock dgx-h100 in cluster mode, its kubelet stand-in and the test's
    runner of its daemon pods; `plugins[-1]` is the one running."""

    standin: KubeletStandin
    folders: PluginFolders
    args: list[str]
    plugins: list[PluginDaemon]
    runner: PodRunner
    metrics_port: int


def mps_node(stack: contextlib.ExitStack, control_plane: ControlPlane, node: str,
             namespace: str, kubelet_standin: Callable[..., KubeletStandin],
             *extra: str, mock_state: bool = False) -> MpsNode:
    """Start them (the plugin with ``extra`` arguments; with ``mock_state``, its mock
    NVML's state in ``folders.mig_state``, for the test to change), stopped when ``stack``
    closes; returns once the plugin is registered."""
    root = stack.enter_context(short_tmp())
    standin = kubelet_standin(node, root, "v1", DRIVER)
    folders = PluginFolders(root)
    metrics_port = free_port()
    args = [*folders.plugin_args(node=node, driver=DRIVER, kubeconfig=control_plane.kubeconfig,
                                 registry_dir=standin.registry_dir, mock="dgx-h100",
                                 mig_mode="static", metrics_port=metrics_port,
                                 mock_state=folders.mig_state if mock_state else None),
            "--pod-namespace", namespace, "--image", IMAGE, *extra]
    plugins = [PluginDaemon(args, folders.plugin_log)]
    stack.callback(lambda: [p.stop() for p in plugins])
    runner = PodRunner(control_plane.api, namespace, node)
    stack.callback(runner.stop)
    standin.wait_registered(DRIVER)
    return MpsNode(standin, folders, args, plugins, runner, metrics_port)
