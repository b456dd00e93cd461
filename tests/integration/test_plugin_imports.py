"""The plugin that runs on GPU nodes never loads the local-cluster code or its extra
dependency: `gpu-dra plugin` is run as a process, and the modules it had loaded when it
stopped are listed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.support.plugin import Kubelet, Node, wait_for_socket

# Runs `gpu-dra plugin ARGS...` and writes the names of the loaded modules to FILE at exit.
RUN_AND_LIST = """
import atexit, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
sys.argv = ["gpu-dra", *args]
runpy.run_module("driver.cli", run_name="__main__")
"""


def test_the_plugin_imports_neither_the_local_cluster_nor_cryptography(
    node: Node, tmp_path: Path,
) -> None:
    listing = tmp_path / "modules.txt"
    proc = subprocess.Popen([sys.executable, "-c", RUN_AND_LIST, str(listing),
                             *node.cli_args("dgx-h100", "--mig-mode", "dynamic")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(node.registration_socket, timeout=60)
        kubelet = Kubelet(node.dra_socket, node.registration_socket)
        assert kubelet.get_info(wait_for_ready=True, timeout=30).name == "gpu.dra.dev"
        kubelet.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    modules = listing.read_text().split()
    assert "driver.plugin.daemon" in modules  # the listing is the plugin's
    assert [m for m in modules if m.startswith(("driver.devcluster", "driver.demo",
                                                "cryptography"))] == []
