"""The Go kubelet plugin of tests/goplugin (built on k8s.io/dynamic-resource-allocation's
kubeletplugin helper), the other target of the API-server prepare benchmarks.

`goplugin_binary()` builds it with Go (cached outside the clone by build.sh) or returns
None where it is not cached and Go is missing; `goplugin_args` are its arguments on a node
laid out as ours (the same socket paths, so the same `Kubelet` client drives it).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.plugin import DRIVER, Node

HERE = Path(__file__).parents[1] / "goplugin"  # build.sh, main.go, README.md
NO_GO = 3  # build.sh: not cached and Go is not on PATH


def goplugin_binary() -> Path | None:
    """The cached plugin, else built now; None when it is not cached and Go is missing."""
    built = subprocess.run(["bash", str(HERE / "build.sh")], capture_output=True, text=True,
                           check=False, timeout=1800)
    if built.returncode == NO_GO:
        return None
    if built.returncode != 0:
        raise RuntimeError(f"tests/goplugin/build.sh failed: {built.stderr.strip()}")
    return Path(built.stdout.strip().splitlines()[-1])


def goplugin_args(node: Node, node_name: str, kubeconfig: Path) -> list[str]:
    """Serving `node_name`'s pool of 8 GPUs (gpu-0 ... gpu-7, as the mock dgx-h100) with
    claims read from `kubeconfig`'s API server."""
    node.prepare_dirs()
    return ["--kubeconfig", str(kubeconfig), "--node-name", node_name,
            "--driver-name", DRIVER, "--kubelet-registry-dir", str(node.registry),
            "--plugin-data-dir", str(node.plugin_dir), "--cdi-root", str(node.cdi_root),
            "--gpus", "8"]
