"""GPUs kept from the driver on a real API server: the cluster-mode plugin publishes no
device of a GPU that `--exclude-gpus` or the Node annotation `<driver>/exclude-gpus` names
(the two merged); an annotation changed while the plugin runs takes effect on the next
re-discovery (the timer or SIGHUP); an annotation it cannot parse stops a starting plugin
and, later, leaves the last one in force; at start a Node that is not there yet is waited
for, a bounded time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from driver.inventory.exclude import parse_exclusion
from driver.kube.api import api_request
from driver.nvml.mock import mock_provider
from driver.plugin.daemon import Plugin
from driver.plugin.exclusion import NodeExclusion, NodeExclusionError
from tests.support.apiserver import SLICES, ControlPlane, events_for, unique, wait_for
from tests.support.plugin import Node, short_tmp

DRIVER = "gpu.dra.dev"
KEY = f"{DRIVER}/exclude-gpus"
GPU3 = "GPU-68a37c14-cba3-5893-8527-70e1ada18b19"  # dgx-h100 minor 3


@pytest.fixture
def node_name(node_keeper: Any) -> Iterator[str]:
    name = unique("exclude-node")
    node_keeper.add(name)
    yield name
    node_keeper.remove(name)


def annotate(api: Any, node: str, value: str | None) -> None:
    api_request(api, "PATCH", f"/api/v1/nodes/{node}",
                {"metadata": {"annotations": {KEY: value}}},
                content_type="application/merge-patch+json").expect(200)


def published(api: Any, node: str) -> set[str]:
    items = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node}"}).expect(200)["items"]
    return {d["name"] for s in items for d in s["spec"].get("devices") or []}


def becomes(api: Any, node: str, expected: set[str]) -> None:
    """Until the node's slices offer exactly `expected` (a re-publish follows within a
    second of a re-discovery)."""
    wait_for(lambda: published(api, node) == expected or None, f"slices of {expected}")


def warned(api: Any, node: str, text: str) -> None:
    """Until the Node has a Warning event of the exclusion that says `text`."""
    wait_for(lambda: any(e["reason"] == "ExcludeGpusProblem" and text in e["message"]
                         for e in events_for(api, "default", node)) or None,
             f"a Node event saying {text!r}")


def plugin(control_plane: ControlPlane, folder: Node, node: str, flag: str = "") -> Plugin:
    options = folder.options(node=node, local_dir=None, kubeconfig=control_plane.kubeconfig,
                             exclude=parse_exclusion(flag), rediscover_interval=0,
                             cleanup=True)
    return Plugin(options, mock_provider("dgx-h100"))


def test_flag_and_annotation_merged_and_followed_on_rediscovery(
        control_plane: ControlPlane, node_name: str) -> None:
    api = control_plane.api
    annotate(api, node_name, GPU3)
    with short_tmp() as root:
        running = plugin(control_plane, Node(root), node_name, flag="5")
        running.start()
        try:
            everything = {f"gpu-{m}" for m in range(8)}
            becomes(api, node_name, everything - {"gpu-3", "gpu-5"})
            annotate(api, node_name, "1, 2, 9")  # 9: none here, and said so on the Node
            assert running.rediscover()  # what SIGHUP and the timer run
            becomes(api, node_name, everything - {"gpu-1", "gpu-2", "gpu-5"})
            warned(api, node_name, "no GPU here has the minor number or UUID 9; it stays "
                                   "excluded if it appears")
            annotate(api, node_name, "gpu-two")  # a typo: the last good one stays
            assert running.rediscover() == []
            becomes(api, node_name, everything - {"gpu-1", "gpu-2", "gpu-5"})
            warned(api, node_name, f"annotation {KEY}='gpu-two': 'gpu-two' is neither a GPU "
                                   "minor number nor a GPU UUID")
            annotate(api, node_name, None)
            assert running.rediscover()
            becomes(api, node_name, everything - {"gpu-5"})
        finally:
            running.stop(grace=1)


def test_a_bad_annotation_stops_a_starting_plugin(control_plane: ControlPlane,
                                                 node_name: str) -> None:
    annotate(control_plane.api, node_name, "3,GPU-3")
    with short_tmp() as root:
        running = plugin(control_plane, Node(root), node_name)
        with pytest.raises(NodeExclusionError,
                           match=f"Node {node_name} annotation {KEY}='3,GPU-3': 'GPU-3' is "
                                 "neither"):
            running.start()
        running.stop(grace=1)
    assert published(control_plane.api, node_name) == set()


def test_at_start_a_node_not_there_yet_is_waited_for(control_plane: ControlPlane,
                                                      node_keeper: Any) -> None:
    name = unique("late-node")
    waiting = NodeExclusion(parse_exclusion("5"), control_plane.api, name, DRIVER,
                            start_timeout=30)
    timer = threading.Timer(1.0, node_keeper.add, args=(name,))
    timer.start()
    try:
        assert waiting.current() == parse_exclusion("5")
    finally:
        timer.join()
        node_keeper.remove(name)
    gone = NodeExclusion(parse_exclusion("5"), control_plane.api, unique("no-node"), DRIVER,
                         start_timeout=1)
    with pytest.raises(NodeExclusionError, match="cannot read Node no-node-.* for its "
                                                 f"annotation {KEY}"):
        gone.current()
