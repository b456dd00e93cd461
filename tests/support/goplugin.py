"""The Go kubelet plugin of tests/goplugin (built on k8s.io/dynamic-resource-allocation's
kubeletplugin helper), the other target of the API-server prepare benchmarks.

`goplugin_binary()` builds it with Go (cached outside the clone by build.sh) or returns
None where it is not cached and Go is missing; `goplugin_args` are its arguments on a node
laid out as ours (the same socket paths, so the same `Kubelet` client drives it).
"""

from __future__ import annotations

from pathlib import Path

from tests.support.gobuild import built_binary
from tests.support.plugin import DRIVER, Node

HERE = Path(__file__).parents[1] / "goplugin"  # build.sh, main.go, README.md


def goplugin_binary() -> Path | None:
    """The cached plugin, else built now; None when it is not cached and Go is missing."""
    return built_binary(HERE / "build.sh")


def goplugin_args(node: Node, node_name: str, kubeconfig: Path) -> list[str]:
    """Serving `node_name`'s pool of 8 GPUs (gpu-0 ... gpu-7, as the mock dgx-h100) with
    claims read from `kubeconfig`'s API server."""
    node.prepare_dirs()
    return ["--kubeconfig", str(kubeconfig), "--node-name", node_name,
            "--driver-name", DRIVER, "--kubelet-registry-dir", str(node.registry),
            "--plugin-data-dir", str(node.plugin_dir), "--cdi-root", str(node.cdi_root),
            "--gpus", "8"]
