"""The node side of the e2e tests: the kubelet stand-in (the kubelet's own plugin manager
and DRA manager, in Go, see kubelet-standin/main.go; started by driver/devcluster/node.py, which
``gpu-dra demo --cluster`` shares), the plugin daemon as a process, and CDI resolution with
the library the container runtimes use (cdi-resolve/main.go).

The Go programs are built by ``kubelet-standin/build.sh`` into a cache folder keyed by
their sources; :func:`find_tools` and :func:`build_tools` return it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.devcluster.controlplane import AssetsUnavailable, ComponentError
from driver.devcluster.node import KubeletStandin as _KubeletStandin
from driver.devcluster.node import build_node_tools, node_tools_folder
from tests.support.apiserver import wait_for


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
    folder = node_tools_folder()
    return E2eTools.at(folder) if folder is not None else None


def build_tools(progress: Callable[[str], None] | None = None) -> E2eTools:
    """Build (or reuse) both programs; ``progress`` gets each line of the build log."""
    try:
        return E2eTools.at(build_node_tools(progress))
    except AssetsUnavailable as err:
        raise ToolsUnavailable(str(err)) from err


class KubeletStandin(_KubeletStandin):
    """The product's stand-in (driver/devcluster/node.py), waiting for pods as tests do."""

    def wait_pod(self, uid: str, state: str, timeout: float = 90.0) -> dict[str, Any]:
        """The pod's status once it is in ``state`` (prepared, unprepared); ComponentError
        at once if the stand-in exits."""
        def in_state() -> dict[str, Any] | None:
            self.check_alive()
            status = self.pod(uid)
            return status if status and status["state"] == state else None

        return wait_for(in_state, f"pod {uid} to be {state} by {self.name}", timeout=timeout,
                        fatal=(ComponentError,))


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
