"""A DeviceTaintRule on the real API server: the real scheduler avoids the device it
taints, `gpu-dra allocate --kubeconfig` gives the same answer, and `gpu-dra explain
--kubeconfig` names the device, the taint, since when, and the rule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from driver.cli.main import main
from driver.devcluster.controlplane import LocalCluster
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.publish import ApiPublisher, SlicePool
from tests.support.apiserver import RESOURCE_V1, ControlPlane, create, delete, unique
from tests.support.claims import Claims

DRIVER = "gpu.dra.dev"
RULES = f"{RESOURCE_V1}/devicetaintrules"


@contextlib.contextmanager
def published(control_plane: ControlPlane, node: str) -> Iterator[None]:
    """Four mock A100s as ``node``'s pool, deleted after."""
    api = control_plane.cluster.api_client()
    publisher = ApiPublisher(api, SlicePool(DRIVER, node, "static"))
    try:
        publisher.publish(discover(mock_provider("a100-pcie-4x")), timeout=60)
        yield
    finally:
        publisher.cleanup()
        api.close()


@contextlib.contextmanager
def taint_rule(control_plane: ControlPlane, node: str, device: str) -> Iterator[dict[str, Any]]:
    """A NoSchedule rule on one device of ``node``'s pool (never NoExecute: the
    controller manager would evict); yields it as the server stored it."""
    rule: dict[str, Any] = {
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceTaintRule",
        "metadata": {"name": unique("psu-swap")},
        "spec": {"deviceSelector": {"driver": DRIVER, "pool": node, "device": device},
                 "taint": {"key": "example.com/maintenance", "value": "psu",
                           "effect": "NoSchedule"}}}
    stored = create(control_plane.api, RULES, rule)
    try:
        yield stored
    finally:
        delete(control_plane.api, f"{RULES}/{rule['metadata']['name']}")


def test_a_device_taint_rule_steers_the_scheduler_and_explain_names_it(
        control_plane: ControlPlane, scheduler: LocalCluster, controller_manager: LocalCluster,
        device_classes: None, namespace: str, fake_node: Any,
        capsys: pytest.CaptureFixture[str]) -> None:
    node = fake_node()
    claims = Claims(control_plane.api, namespace, node)
    with published(control_plane, node), taint_rule(control_plane, node, "gpu-1") as rule:
        since = rule["spec"]["taint"]["timeAdded"]  # the API server stamps it
        claims.request("three", DRIVER, count=3)
        held = claims.wait_allocated("three")
        assert "gpu-1" not in held

        # Ours, from the cluster's objects, picks what the scheduler picked.
        code = main(["allocate", "--kubeconfig", str(control_plane.kubeconfig),
                     "--claim", f"{namespace}/three", "--node", node, "-o", "table"])
        out, err = capsys.readouterr()
        assert (code, err) == (0, ""), err
        assert out.splitlines()[1].split()[-3:] == [f"gpu={d}" for d in held]

        claims.request("four", DRIVER, count=4)
        claims.wait_unschedulable("four")
        code = main(["explain", "--kubeconfig", str(control_plane.kubeconfig),
                     "--claim", f"{namespace}/four", "--node", node])
        out, err = capsys.readouterr()
        assert (code, err) == (1, ""), err
        assert "1 tainted (not tolerated)" in out
        assert (f"  - gpu-1: tainted example.com/maintenance=psu:NoSchedule since {since} "
                f"(DeviceTaintRule {rule['metadata']['name']})\n") in out
        for name in ("four", "three"):
            claims.release(name)
