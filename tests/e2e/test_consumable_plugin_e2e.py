"""`gpu-dra plugin --gpu-sharing consumable` in a cluster, end to end with the real
scheduler: four claims of 20G (decimal: four fit in the dgx-h100 H100's 81559 MiB) land on
one GPU and a fifth on another; each claim's MPS daemon (in a Pod of its own, run by the
test's PodRunner) is told its own limits, its consumedCapacity (pinned memory in MPS
units, active thread percentage its compute); unpreparing one leaves the others running."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from driver.kube.api import api_request
from driver.plugin.mps import mps_memory
from tests.support.apiserver import (
    SLICES,
    ControlPlane,
    create,
    delete,
    get,
    pod_with_claim,
    wait_for,
)
from tests.support.claims import Claims, resource_claim
from tests.support.mpspods import DRIVER, ask, mps_node
from tests.support.standin import KubeletStandin

MIB = 1 << 20
COMPUTE = [10, 20, 30, 40, 50]


def shared_gpus(api: Any, node: str) -> list[str]:
    """The GPUs ``node``'s pool publishes for several claims to share."""
    items = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)["items"]
    return [d["name"] for s in items for d in s["spec"].get("devices", [])
            if d.get("allowMultipleAllocations")]


def share(claims: Claims, name: str, memory: str, compute: int) -> str:
    """A claim for a share of one GPU and a pod using it; the pod's uid."""
    claim = resource_claim(name)
    claim["spec"]["devices"]["requests"][0]["exactly"]["capacity"] = {
        "requests": {"memory": memory, "compute": str(compute)}}
    create(claims.api, claims.claims, claim)
    pod = pod_with_claim(name, {"resourceClaimName": name})
    pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": claims.node}
    uid: str = create(claims.api, claims.pods, pod)["metadata"]["uid"]
    return uid


def status_devices(api: Any, path: str) -> list[dict[str, Any]] | None:
    """The claim's status.devices (KEP-4817), if any."""
    claim = get(api, path) or {}
    devices: list[dict[str, Any]] | None = claim.get("status", {}).get("devices")
    return devices


def test_four_20g_shares_of_one_h100_each_get_a_daemon_with_their_own_limits(
    control_plane: ControlPlane, fake_node: Callable[..., str], namespace: str,
    kubelet_standin: Callable[..., KubeletStandin], scheduler: Any,
    controller_manager: Any, device_classes: None,
) -> None:
    api = control_plane.api
    node = fake_node()
    claims = Claims(api, namespace, node)
    with contextlib.ExitStack() as stack:
        mps = mps_node(stack, control_plane, node, namespace, kubelet_standin,
                       "--gpu-sharing", "consumable")
        standin, folders, runner = mps.standin, mps.folders, mps.runner
        wait_for(lambda: shared_gpus(api, node), "the plugin's shared GPUs published")

        names = [f"share-{i}" for i in range(5)]
        uids = {}
        for name, compute in zip(names[:4], COMPUTE, strict=False):
            uids[name] = share(claims, name, "20G", compute)
            assert claims.wait_allocated(name) == ["gpu-0"]
            claims.wait_bound(name)
        uids[names[4]] = share(claims, names[4], "20G", COMPUTE[4])
        assert claims.wait_allocated(names[4]) == ["gpu-1"]

        dirs = {}
        for name, compute in zip(names, COMPUTE, strict=True):
            [claim] = standin.wait_pod(uids[name], "prepared")["claims"]
            stored = get(api, f"{claims.claims}/{name}") or {}
            [result] = stored["status"]["allocation"]["devices"]["results"]
            assert result["consumedCapacity"]["compute"] == str(compute)
            memory = int(result["consumedCapacity"]["memory"])
            assert memory == 19074 * MIB
            dirs[name] = claim_dir = folders.plugin_dir / "mps" / claim["uid"]
            assert ask(claim_dir, "get_default_active_thread_percentage") == f"{compute}.0"
            assert ask(claim_dir, "get_default_device_pinned_mem_limit 0") == \
                mps_memory(memory)
            # its status.devices entry (KEP-4817) is the share's, by shareID
            entries = wait_for(functools.partial(status_devices, api, f"{claims.claims}/{name}"),
                               f"status.devices of {name}")
            assert [(e["device"], e["shareID"]) for e in entries] == \
                [(result["device"], result["shareID"])]
        assert len(runner.pods()) == 5

        delete(api, f"{claims.pods}/{names[0]}")
        standin.wait_pod(uids[names[0]], "unprepared")
        assert len(runner.pods()) == 4 and not dirs[names[0]].exists()
        for name, compute in zip(names[1:], COMPUTE[1:], strict=True):
            assert ask(dirs[name], "get_default_active_thread_percentage") == f"{compute}.0"
