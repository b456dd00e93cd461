"""The node side of a local cluster: the kubelet stand-in (the kubelet's own plugin manager
and DRA manager, a Go program in ``tests/e2e/kubelet-standin``) for a fake Node and the
plugin daemon, each a child process that dies with its parent.

``gpu-dra demo --cluster`` and the e2e tests both use it. The binary is looked up in
``$GPU_DRA_KUBELET_STANDIN``, then next to the control-plane binaries
(``$KUBEBUILDER_ASSETS``), then in the build cache that ``kubelet-standin/build.sh`` fills
(``${GPU_DRA_CACHE:-~/.cache/gpu-dra}/e2e-tools-<key>/``), else built there with Go.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from driver.devcluster.controlplane import (
    CONTROL_PLANE_SRC,
    AssetsUnavailable,
    ComponentError,
    run_build_script,
    spawn_logged,
    stop_group,
)

__all__ = [
    "NODE_TOOLS_BUILD",
    "STANDIN_ENV",
    "ChildProcess",
    "KubeletStandin",
    "PluginDaemon",
    "PluginFolders",
    "build_node_tools",
    "ensure_standin",
    "find_standin",
    "node_tools_folder",
    "poll",
]

T = TypeVar("T")

NODE_TOOLS_BUILD = CONTROL_PLANE_SRC.parent / "kubelet-standin" / "build.sh"
"""Builds kubelet-standin and cdi-resolve; present in a source checkout, not in a wheel."""
STANDIN_ENV = "GPU_DRA_KUBELET_STANDIN"
"""A kubelet-standin binary to use instead of looking for one."""
STANDIN = "kubelet-standin"


# --- the binary ------------------------------------------------------------------------------


def node_tools_folder() -> Path | None:
    """The build cache for the current stand-in sources, if complete (Go computes the key)."""
    if not NODE_TOOLS_BUILD.is_file():
        return None
    try:
        proc = subprocess.run(["bash", str(NODE_TOOLS_BUILD), "--print"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.split()
    return Path(lines[-1]) if proc.returncode == 0 and lines else None


def build_node_tools(progress: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) kubelet-standin and cdi-resolve; the folder holding both."""
    if not NODE_TOOLS_BUILD.is_file():
        raise AssetsUnavailable(f"{NODE_TOOLS_BUILD} not found: build from a source checkout")
    if shutil.which("go") is None:
        raise AssetsUnavailable("Go is not installed: cannot build the kubelet stand-in")
    return run_build_script(NODE_TOOLS_BUILD, progress)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_standin(assets: Path | None = None) -> Path | None:
    """``$GPU_DRA_KUBELET_STANDIN``, else ``kubelet-standin`` in ``assets`` (the
    control-plane folder) or ``$KUBEBUILDER_ASSETS``, else the build cache.

    A ``$GPU_DRA_KUBELET_STANDIN`` that is not an executable file is an error, not a miss.
    """
    if env := os.environ.get(STANDIN_ENV):
        path = Path(env).expanduser()
        if not _executable(path):
            raise AssetsUnavailable(f"{STANDIN_ENV}={env}: not an executable file")
        return path
    for folder in (assets, os.environ.get("KUBEBUILDER_ASSETS")):
        if folder and _executable(Path(folder) / STANDIN):
            return Path(folder) / STANDIN
    cached = node_tools_folder()  # last: it runs Go and hashes every stand-in source
    return cached / STANDIN if cached is not None and _executable(cached / STANDIN) else None


def ensure_standin(assets: Path | None = None,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Find the stand-in, else build it when Go is available, else raise AssetsUnavailable."""
    found = find_standin(assets)
    if found is not None:
        return found
    if progress is not None:
        progress("kubelet-standin not found: building it from the Go module proxy")
    return build_node_tools(progress) / STANDIN


# --- processes -------------------------------------------------------------------------------


def poll(probe: Callable[[], T | None], what: str, timeout: float = 60.0,
         interval: float = 0.25, fatal: tuple[type[Exception], ...] = ()) -> T:
    """Call ``probe`` until it returns something truthy; TimeoutError naming ``what`` at
    the deadline. Exceptions from the probe count as "not yet" (transient API errors) and
    the last one is reported, except ``fatal`` ones, which propagate at once."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except fatal:
            raise
        except Exception as err:
            last = err
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; "
                               f"last: {last!r}")
        time.sleep(interval)


class ChildProcess:
    """A child in its own process group (a stop takes all of it), logging to a file, and
    SIGKILLed if the thread that started it dies.

    Where a signal handler raises, construct it and record it under
    ``localcluster.stop_signals_held()``, so no interrupt lands in between.
    """

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        self.proc = spawn_logged(argv, log, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        """ComponentError with the log's tail once the process has exited."""
        if not self.alive():
            raise ComponentError(self.name, f"exited with code {self.proc.returncode}",
                                 self.tail())

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; the exit code."""
        return stop_group(self.proc, grace)


class PluginDaemon(ChildProcess):
    """``gpu-dra plugin`` as the DaemonSet runs it, as a child process."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        super().__init__("gpu-dra plugin", [sys.executable, "-m", "driver.cli", "plugin", *args],
                         log)


@dataclass(frozen=True)
class PluginFolders:
    """Where ``gpu-dra plugin`` keeps a local node's state, under the node's ``root`` (keep
    it short: socket paths); the layout ``demo --cluster`` and the e2e tests share."""

    root: Path

    @property
    def plugin_dir(self) -> Path:
        return self.root / "plugin"

    @property
    def cdi_root(self) -> Path:
        return self.root / "cdi"

    @property
    def checkpoint(self) -> Path:
        return self.plugin_dir / "checkpoint.json"

    @property
    def mig_state(self) -> Path:
        return self.root / "mig-state.json"

    @property
    def plugin_log(self) -> Path:
        return self.root / "plugin.log"

    def plugin_args(self, *, node: str, driver: str, kubeconfig: Path, registry_dir: Path,
                    mock: str, mig_mode: str, mock_state: Path | None = None,
                    metrics_port: int = 0) -> list[str]:
        """The command line of the plugin on the mock machine ``mock``, talking to the API
        server of ``kubeconfig`` and registering in the stand-in's ``registry_dir``."""
        args = ["--mock", mock, "--mig-mode", mig_mode, "--node-name", node,
                "--driver-name", driver, "--kubeconfig", str(kubeconfig),
                "--kubelet-registry-dir", str(registry_dir),
                "--plugin-data-dir", str(self.plugin_dir), "--cdi-root", str(self.cdi_root),
                "--health-port", "0", "--metrics-port", str(metrics_port)]
        return args if mock_state is None else [*args, "--mock-state", str(mock_state)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class KubeletStandin(ChildProcess):
    """kubelet-standin for one node, its folders under ``root`` (keep it short: socket
    paths); reads what it reports under ``status_dir`` (see kubelet-standin/README.md)."""

    def __init__(self, binary: Path, kubeconfig: Path, node: str, root: Path,
                 dra_api: str = "v1", driver: str = "") -> None:
        self.node = node
        self.registry_dir = root / "plugins_registry"
        self.status_dir = root / "standin"
        self.registry_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(binary), f"--kubeconfig={kubeconfig}", f"--node-name={node}",
                f"--registry-dir={self.registry_dir}", f"--status-dir={self.status_dir}",
                f"--dra-api={dra_api}", f"--driver-name={driver}", "--v=4"]
        super().__init__(f"kubelet-standin ({node})", argv, root / "kubelet-standin.log")

    def wait_running(self, timeout: float = 60.0) -> None:
        """Until it watches pods and plugins; ComponentError if it exits first."""
        def running() -> bool:
            self.check_alive()
            return (self.status_dir / "standin.json").exists()

        poll(running, f"{self.name} to watch pods and plugins", timeout,
             fatal=(ComponentError,))

    def registrations(self) -> list[dict[str, Any]]:
        return list(_read_json(self.status_dir / "registrations.json") or [])

    def registration(self, driver: str) -> dict[str, Any] | None:
        """The successful register event of ``driver`` so far; ComponentError for a
        refused one."""
        for event in self.registrations():
            if event["driver"] == driver and event.get("error"):
                raise ComponentError(self.name, f"registration of {driver} refused: {event}")
            if event["driver"] == driver and event["event"] == "register":
                return event
        return None

    def wait_registered(self, driver: str, timeout: float = 60.0) -> dict[str, Any]:
        """:meth:`registration` once there is one; ComponentError at once on a refused one
        or if the stand-in exits."""
        def registered() -> dict[str, Any] | None:
            self.check_alive()
            return self.registration(driver)

        return poll(registered, f"{driver} to register with {self.name}", timeout,
                    fatal=(ComponentError,))

    def pod(self, uid: str) -> dict[str, Any] | None:
        """The pod's latest status (namespace, name, uid, state, containers, claims)."""
        status = _read_json(self.status_dir / "pods" / f"{uid}.json")
        return status if isinstance(status, dict) else None

    def grpc_calls(self) -> list[tuple[str, str, int]]:
        """(full gRPC method, status code, count) of the DRA calls the kubelet code made,
        as its metrics counted them."""
        calls = _read_json(self.status_dir / "grpc-calls.json") or []
        return sorted((c["method"], c["code"], c["count"]) for c in calls)

    def device_health(self, driver: str) -> dict[tuple[str, str], dict[str, Any]]:
        """``driver``'s devices by (pool, device) as the kubelet's health cache has them
        now: ``health`` (Healthy, Unhealthy, Unknown), ``message``, ``timeoutSeconds``."""
        view = _read_json(self.status_dir / "health.json") or {}
        return {(d["pool"], d["device"]): d for d in view.get("devices", [])
                if d["driver"] == driver}

    def pods(self) -> list[dict[str, Any]]:
        """Each pod's latest status (namespace, name, uid, state, containers, claims)."""
        found = []
        for path in sorted((self.status_dir / "pods").glob("*.json")):
            with contextlib.suppress(OSError, ValueError):  # replaced while read
                found.append(json.loads(path.read_text()))
        return found
