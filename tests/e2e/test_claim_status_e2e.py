"""Claim device status (KEP-4817) end to end: the plugin, acting with the chart's RBAC
through a token bound to its pod on the node (the API server's real authorization,
its per-driver check of status.devices included), prepares a claim the real scheduler
allocated, and the claim's status.devices then names the GPU and MIG device it got, by
UUID, as the API server's validation accepted them; a GPU's health change shows in its
entry; unpreparing removes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from driver.devcluster.controlplane import LocalCluster
from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.plugin.claims import ClaimRef
from driver.plugin.claimstatus import api_writer, apply_body
from driver.plugin.devices import device_index
from tests.e2e.test_rbac import (  # noqa: F401 (install: a fixture)
    Install,
    install,
    kubeconfig_with_token,
    plugin_pod,
    token_for,
)
from tests.support.apiserver import (
    RESOURCE_V1,
    ControlPlane,
    create,
    delete,
    get,
    pod_with_claim,
    unique,
    wait_for,
)
from tests.support.health import inject
from tests.support.plugin import short_tmp
from tests.support.standin import KubeletStandin

MOCK = "a100-mig"  # GPU 0 split in live MIG devices, GPU 1 whole


def ours(claim: dict[str, Any] | None, driver: str) -> list[dict[str, Any]]:
    if claim is None:
        return []
    return [e for e in claim.get("status", {}).get("devices") or [] if e["driver"] == driver]


def test_a_prepared_claim_names_its_devices_until_unprepared(
    control_plane: ControlPlane, scheduler: LocalCluster, controller_manager: LocalCluster,
    install: Install, fake_node: Callable[..., str],  # noqa: F811
    kubelet_standin: Callable[..., KubeletStandin], tmp_path: Path,
) -> None:
    api, driver, ns = control_plane.api, install.driver, install.namespace
    node = fake_node(labels={"nvidia.com/gpu.present": "true"})
    token = token_for(api, install, plugin_pod(control_plane, install, node))
    with short_tmp() as root:
        standin = kubelet_standin(node, root, "v1", driver)
        folders = PluginFolders(root)
        args = folders.plugin_args(
            node=node, driver=driver, registry_dir=standin.registry_dir, mock=MOCK,
            kubeconfig=kubeconfig_with_token(control_plane, token, tmp_path),
            mig_mode="static", mock_state=root / "mock-state.json")
        plugin = PluginDaemon(args, folders.plugin_log)
        try:
            standin.wait_registered(driver)
            claims = f"{RESOURCE_V1}/namespaces/{ns}/resourceclaims"
            claim = create(api, claims, {
                "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {"name": unique("gpus")},
                "spec": {"devices": {"requests": [
                    {"name": "gpu", "exactly": {"deviceClassName": driver}},
                    {"name": "mig", "exactly": {"deviceClassName": f"mig.{driver}"}}]}}})
            name = claim["metadata"]["name"]
            pod = pod_with_claim(unique("pod"), {"resourceClaimName": name})
            pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node}
            made = create(api, f"/api/v1/namespaces/{ns}/pods", pod)
            standin.wait_pod(made["metadata"]["uid"], "prepared")

            entries = wait_for(lambda: len(ours(get(api, f"{claims}/{name}"), driver)) == 2
                               and ours(get(api, f"{claims}/{name}"), driver),
                               "the claim's status.devices")
            index = device_index(discover(mock_provider(MOCK)), "static")
            results = get(api, f"{claims}/{name}")["status"]["allocation"]["devices"]["results"]
            assert sorted((e["pool"], e["device"]) for e in entries) == \
                sorted((r["pool"], r["device"]) for r in results)
            by_device = {e["device"]: e for e in entries}
            for result in results:
                entry, target = by_device[result["device"]], index[result["device"]]
                ready = entry["conditions"][0]
                assert (ready["type"], ready["status"], ready["reason"]) == \
                    ("Ready", "True", "Prepared")
                if result["request"] == "gpu":
                    assert entry["data"]["uuid"] == target.gpu.uuid
                else:
                    assert target.static_mig is not None
                    assert (entry["data"]["uuid"], entry["data"]["parentUUID"]) == \
                        (target.static_mig.uuid, target.gpu.uuid)

            # a restarted plugin writes its prepared claims again (here: entries removed
            # while it was away)
            plugin.stop()
            ref = ClaimRef(ns, name, claim["metadata"]["uid"])
            api_writer(api, driver)(ref, apply_body(ref, []))
            assert ours(get(api, f"{claims}/{name}"), driver) == []
            plugin = PluginDaemon(args, folders.plugin_log)
            wait_for(lambda: [(e["device"], e["data"]) for e in ours(
                get(api, f"{claims}/{name}"), driver)] == [(e["device"], e["data"])
                                                           for e in entries],
                "the claim's status.devices written again")

            # an informational XID (no eviction) on the whole GPU: a condition of its own
            whole = next(r["device"] for r in results if r["request"] == "gpu")
            inject(root / "mock-state.json", index[whole].gpu.minor, "--xid", "13")

            def conditions() -> dict[str, list[tuple[str, str, str]]]:
                return {e["device"]: [(c["type"], c["status"], c["reason"])
                                      for c in e["conditions"]]
                        for e in ours(get(api, f"{claims}/{name}"), driver)}

            wait_for(lambda: len(conditions()[whole]) == 2, "the XID in the claim's status")
            assert conditions()[whole] == [("Ready", "True", "Prepared"),
                                           ("XidError", "True", "Xid13")]
            [mig] = set(by_device) - {whole}
            assert conditions()[mig] == [("Ready", "True", "Prepared")]

            delete(api, f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}")
            standin.wait_pod(made["metadata"]["uid"], "unprepared")
            wait_for(lambda: not ours(get(api, f"{claims}/{name}"), driver),
                     "the claim's status.devices without the driver's entries")
            assert "cannot write status.devices" not in folders.plugin_log.read_text()
        finally:
            print(f"--- gpu-dra plugin (exit {plugin.stop()}) ---\n{plugin.tail()}")
            print(f"--- kubelet-standin ---\n{standin.tail()}")
