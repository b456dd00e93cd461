"""What a `gpu-dra plugin` process loads until it is registered: start-up is mostly
imports, and the kubelet waits for the plugin's sockets. Python lists every module it
imports (PYTHONPROFILEIMPORTTIME) in the plugin's log."""

from __future__ import annotations

import re

import pytest

from tests.support.plugin import Daemon, Node, gpu_config, make_claim, opaque, result

IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", re.MULTILINE)


def test_a_plugin_on_a_local_directory_loads_no_kubernetes_client_and_no_explain(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    daemon = Daemon(node, node.cli_args("dgx-h100", "--mig-mode", "dynamic"))
    try:
        daemon.kubelet.get_info()
    finally:
        assert daemon.stop() == 0
    loaded = set(IMPORTED.findall(daemon.log.read_text()))
    assert "driver.plugin.servers" in loaded, "the log lists the plugin's imports"
    assert {m for m in loaded if m.split(".")[0] == "kubernetes"} == set()
    assert "driver.resourceslice.publish" not in loaded  # the API server's publisher
    assert "driver.allocator.explain" not in loaded  # only `gpu-dra explain` needs it


def test_the_config_models_load_with_the_first_claim_that_has_a_config(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic and our config models cost a start about 0.1 s where no mock profile
    (itself pydantic) loads them: a start and a claim without config never load them."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    daemon = Daemon(node, node.cli_args("dgx-h100", "--mig-mode", "dynamic"))
    try:
        plain = make_claim(node.local, [result("gpu-0")])
        assert daemon.kubelet.prepare([plain])[plain.uid].error == ""
        before = set(IMPORTED.findall(daemon.log.read_text()))
        shared = make_claim(node.local, [result("gpu-1")], [opaque(gpu_config(
            strategy="TimeSlicing", timeSlicingConfig={"interval": "Long"}))])
        assert daemon.kubelet.prepare([shared])[shared.uid].error == ""
    finally:
        assert daemon.stop() == 0
    assert "driver.plugin.servers" in before, "the log lists the plugin's imports"
    assert "driver.plugin.configschema" not in before
    assert "driver.plugin.configschema" in set(IMPORTED.findall(daemon.log.read_text()))
