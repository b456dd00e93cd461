"""The test's kubelet for MPS daemon pods (the kubelet stand-in runs no containers) and a
claim's daemon's answers through the mock driver root's control client."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
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


class PodRunner:
    """Plays the kubelet for the daemon pods on one node: runs each one's command, again
    when it fails."""

    def __init__(self, api: Any, namespace: str, node: str) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
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
            if self._backing_off.is_set():
                continue
            for pod in self.pods():
                known = self.processes.get(pod["metadata"]["uid"])
                if known is not None and known.poll() in (None, 0):  # restartPolicy OnFailure
                    continue
                [container] = pod["spec"]["containers"]
                assert container["command"][:2] == ["gpu-dra", "mps-daemon"]
                self.processes[pod["metadata"]["uid"]] = subprocess.Popen(
                    [sys.executable, "-m", "driver.cli", *container["command"][1:]],
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                    start_new_session=True)  # a group: what a container's end takes

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
             *extra: str) -> MpsNode:
    """Start them (the plugin with ``extra`` arguments), stopped when ``stack`` closes;
    returns once the plugin is registered."""
    root = stack.enter_context(short_tmp())
    standin = kubelet_standin(node, root, "v1", DRIVER)
    folders = PluginFolders(root)
    metrics_port = free_port()
    args = [*folders.plugin_args(node=node, driver=DRIVER, kubeconfig=control_plane.kubeconfig,
                                 registry_dir=standin.registry_dir, mock="dgx-h100",
                                 mig_mode="static", metrics_port=metrics_port),
            "--pod-namespace", namespace, "--image", IMAGE, *extra]
    plugins = [PluginDaemon(args, folders.plugin_log)]
    stack.callback(lambda: [p.stop() for p in plugins])
    runner = PodRunner(control_plane.api, namespace, node)
    stack.callback(runner.stop)
    standin.wait_registered(DRIVER)
    return MpsNode(standin, folders, args, plugins, runner, metrics_port)
