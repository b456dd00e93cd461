"""`--gpu-sharing consumable` against the real control plane: the slices `gpu-dra slices`
builds are stored as sent, and kube-scheduler packs claims onto one GPU by the memory they
ask (KEP-5075), a claim that asks for none taking a GPU whole; the chart refuses the mode
this version cannot enforce in a cluster."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from driver.cli.main import main
from driver.devcluster.controlplane import LocalCluster
from driver.kube.api import api_request
from driver.nvml.mock import list_profiles
from tests.e2e.test_chart import env_of, plugin_container
from tests.support.apiserver import SLICES, ControlPlane, create, delete, get, pod_with_claim
from tests.support.chart import Helm
from tests.support.claims import Claims, resource_claim

DRIVER = "gpu.dra.dev"
MIB = 1 << 20


def consumable_slices(capsys: pytest.CaptureFixture[str], profile: str, node: str
                      ) -> list[dict[str, Any]]:
    assert main(["slices", "--mock", profile, "--node-name", node,
                 "--gpu-sharing", "consumable", "-o", "json"]) == 0
    slices: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return slices


@contextlib.contextmanager
def stored(control_plane: ControlPlane, slices: list[dict[str, Any]]
           ) -> Iterator[list[dict[str, Any]]]:
    """Create the slices; yields them as the API server stores them; deletes them after."""
    names = [s["metadata"]["name"] for s in slices]
    try:
        yield [create(control_plane.api, SLICES, s) for s in slices]
    finally:
        for name in names:
            delete(control_plane.api, f"{SLICES}/{name}")


@pytest.mark.parametrize("profile", list_profiles())
def test_consumable_slices_are_stored_as_sent(
        control_plane: ControlPlane, fake_node: Any, capsys: pytest.CaptureFixture[str],
        profile: str) -> None:
    slices = consumable_slices(capsys, profile, fake_node())
    with stored(control_plane, slices) as kept:
        assert [s["spec"] for s in kept] == [s["spec"] for s in slices]
    assert any(d.get("allowMultipleAllocations") for s in slices
               for d in s["spec"].get("devices", [])) or profile == "a100-mig"


def request_memory(claims: Claims, name: str, memory: str | None) -> None:
    """A claim for one GPU asking for `memory` (None: no capacity) and a pod using it."""
    claim = resource_claim(name)
    if memory is not None:
        claim["spec"]["devices"]["requests"][0]["exactly"]["capacity"] = {
            "requests": {"memory": memory}}
    create(claims.api, claims.claims, claim)
    pod = pod_with_claim(name, {"resourceClaimName": name})
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": claims.node}
    create(claims.api, claims.pods, pod)


def shares(claims: Claims, name: str) -> list[tuple[str, str, dict[str, str]]]:
    claim = get(claims.api, f"{claims.claims}/{name}") or {}
    return [(r["device"], r["shareID"], r["consumedCapacity"])
            for r in claim["status"]["allocation"]["devices"]["results"]]


def test_the_scheduler_puts_four_20g_claims_on_one_h100_and_a_fifth_on_another(
        control_plane: ControlPlane, scheduler: LocalCluster,
        controller_manager: LocalCluster, device_classes: None, namespace: str,
        fake_node: Any, capsys: pytest.CaptureFixture[str]) -> None:
    node = fake_node()
    claims = Claims(control_plane.api, namespace, node)
    # 20G (decimal): four fit in an H100's 81559 MiB (four of 20Gi would not)
    with stored(control_plane, consumable_slices(capsys, "dgx-h100", node)):
        names = [f"share-{i}" for i in range(5)]
        for name in names[:4]:
            request_memory(claims, name, "20G")
            assert claims.wait_allocated(name) == ["gpu-0"]
            claims.wait_bound(name)
        request_memory(claims, names[4], "20G")
        assert claims.wait_allocated(names[4]) == ["gpu-1"]
        got = [s for n in names for s in shares(claims, n)]
        assert len({share_id for _, share_id, _ in got}) == 5
        assert {json.dumps(c, sort_keys=True) for _, _, c in got} == {json.dumps(
            {"compute": "0", "memory": f"{19074 * MIB}"}, sort_keys=True)}

        request_memory(claims, "whole", None)  # all the memory: nobody else fits beside it
        assert claims.wait_allocated("whole") == ["gpu-2"]
        request_memory(claims, "too-big", "81560Mi")
        claims.wait_unschedulable("too-big")
        for name in [*names, "whole", "too-big"]:
            claims.release(name)
    items = api_request(control_plane.api, "GET", claims.claims).expect(200)["items"]
    assert items == []


def test_the_chart_runs_consumable_sharing_with_mps_daemon_pods(helm: Helm) -> None:
    env = env_of(plugin_container(helm.template("gpu", "gpu-dra",
                                                {"gpuSharing": "consumable"})))
    assert env["GPU_SHARING"] == "consumable"
    assert env["GPU_DRA_IMAGE"] and "POD_NAMESPACE" in env
    assert env_of(plugin_container(helm.template("gpu", "gpu-dra")))["GPU_SHARING"] == \
        "exclusive"
