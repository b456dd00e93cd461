"""The node side of the e2e tests: the kubelet stand-in (the kubelet's own plugin manager
and DRA manager, in Go, see kubelet-standin/main.go), the plugin daemon as a process, and
CDI resolution with the library the container runtimes use (cdi-resolve/main.go).

The Go programs are built by ``kubelet-standin/build.sh`` into a cache folder keyed by
their sources; :func:`find_tools` and :func:`build_tools` return it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.localcluster import AssetsUnavailable, die_with_parent, run_build_script
from tests.e2e.helpers import wait_for

HERE = Path(__file__).resolve().parent
TOOLS_BUILD = HERE / "kubelet-standin" / "build.sh"
REPO = HERE.parents[1]


class ToolsUnavailable(RuntimeError):
    """kubelet-standin and cdi-resolve are neither built nor buildable here."""


@dataclass(frozen=True)
class E2eTools:
    kubelet_standin: Path
    cdi_resolve: Path

    @classmethod
    def at(cls, folder: Path) -> E2eTools:
        return cls(folder / "kubelet-standin", folder / "cdi-resolve")


def find_tools() -> E2eTools | None:
    """The cached build for the current sources, if complete (needs Go for the key)."""
    try:
        proc = subprocess.run(["bash", str(TOOLS_BUILD), "--print"], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.split()
    return E2eTools.at(Path(lines[-1])) if proc.returncode == 0 and lines else None


def build_tools(progress: Callable[[str], None] | None = None) -> E2eTools:
    """Build (or reuse) both programs; ``progress`` gets each line of the build log."""
    try:
        return E2eTools.at(run_build_script(TOOLS_BUILD, progress))
    except AssetsUnavailable as err:
        raise ToolsUnavailable(str(err)) from err


class _Process:
    """A child process in its own process group, logging to a file, SIGKILLed if the test
    process dies."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO, env=env, start_new_session=True, preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"{self.name} exited with code {self.proc.returncode}:\n"
                                 f"{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class KubeletStandin(_Process):
    """kubelet-standin for one node; reads what it reports under ``status_dir``."""

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
        def running() -> bool:
            self.check_alive()
            return (self.status_dir / "standin.json").exists()

        wait_for(running, f"{self.name} to watch pods and plugins", timeout=timeout)

    def registrations(self) -> list[dict[str, Any]]:
        return list(_read_json(self.status_dir / "registrations.json") or [])

    def wait_registered(self, driver: str, timeout: float = 60.0) -> dict[str, Any]:
        """The successful register event of ``driver``; fails at once on a refused one."""
        def registered() -> dict[str, Any] | None:
            self.check_alive()
            for event in self.registrations():
                if event["driver"] == driver and event.get("error"):
                    raise AssertionError(f"registration of {driver} refused: {event}")
                if event["driver"] == driver and event["event"] == "register":
                    return event
            return None

        return wait_for(registered, f"{driver} to register with {self.name}", timeout=timeout)

    def pod(self, uid: str) -> dict[str, Any] | None:
        return _read_json(self.status_dir / "pods" / f"{uid}.json")

    def wait_pod(self, uid: str, state: str, timeout: float = 90.0) -> dict[str, Any]:
        """The pod's status once it is in ``state`` (prepared, unprepared)."""
        def in_state() -> dict[str, Any] | None:
            self.check_alive()
            status = self.pod(uid)
            return status if status and status["state"] == state else None

        return wait_for(in_state, f"pod {uid} to be {state} by {self.name}", timeout=timeout)

    def grpc_calls(self) -> list[tuple[str, str, int]]:
        """(full gRPC method, status code, count) of the DRA calls the kubelet code made,
        as its metrics counted them."""
        calls = _read_json(self.status_dir / "grpc-calls.json") or []
        return sorted((c["method"], c["code"], c["count"]) for c in calls)


class PluginDaemon(_Process):
    """``gpu-dra plugin`` as the DaemonSet runs it, as a child process."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        super().__init__("gpu-dra plugin", [sys.executable, "-m", "driver.cli", "plugin", *args],
                         log)


class CdiResolveError(AssertionError):
    """The CDI library refused: a device did not resolve or its spec is invalid."""


def cdi_resolve(binary: Path, spec_dirs: Sequence[Path], devices: Sequence[str]
                ) -> dict[str, Any]:
    """The OCI runtime spec a container gets for ``devices``, as containerd and CRI-O
    would build it from ``spec_dirs``."""
    proc = subprocess.run(
        [str(binary), *(f"--spec-dir={d}" for d in spec_dirs), *devices],
        capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise CdiResolveError(proc.stderr.strip())
    return dict(json.loads(proc.stdout)["ociSpec"])
