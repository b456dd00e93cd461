"""What `gpu-dra plugin` loads before it serves, in a fresh interpreter: start-up is
mostly imports, and the kubelet waits for the plugin's sockets."""

from __future__ import annotations

import json
import subprocess
import sys

PLUGIN_MODULES = ("driver.cli.main", "driver.plugin.daemon", "driver.resourceslice.dirpublisher",
                  "driver.resourceslice.publish")


def loaded_after(modules: tuple[str, ...]) -> set[str]:
    code = (f"import sys\nfor m in {list(modules)!r}: __import__(m)\n"
            "import json; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return set(json.loads(out.stdout))


def test_a_plugin_on_a_local_directory_loads_no_kubernetes_client_and_no_allocate_command(
        ) -> None:
    loaded = loaded_after(PLUGIN_MODULES)
    assert not {m for m in loaded if m.split(".")[0] == "kubernetes"}
    assert "driver.allocator.explain" not in loaded  # only `gpu-dra explain` needs it
