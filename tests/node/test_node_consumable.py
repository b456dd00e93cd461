"""Consumable sharing on a real node: with the chart's `gpuSharing=consumable` (the release
upgraded for this test, and back after it), two pods whose claims ask different memory and
compute shares of the same GPU both run; each container sees CUDA_MPS_PIPE_DIRECTORY and
its daemon's socket, and each claim's daemon (in a Pod of its own) was told that claim's
own limits, its consumedCapacity."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from driver.nvml.mpsstandin import LOG_FILE, SOCKET
from driver.plugin.mps import mps_memory
from tests.node.test_node_mps import SHOW, daemon_pods, running
from tests.support.apiserver import create, get, wait_for
from tests.support.chart import CHART
from tests.support.claims import resource_claim
from tests.support.nodepods import DRIVER, RELEASE, Driver, Workloads
from tests.support.realnode import RealNode

SHARES = {"small": ("10Gi", 30), "large": ("20Gi", 50)}


def shared_gpus(driver: Driver) -> dict[str, str]:
    """The published GPUs several claims may share, by name: their uuids."""
    return {d["name"]: d["attributes"]["uuid"]["string"] for s in driver.slices()
            for d in s["spec"].get("devices", []) if d.get("allowMultipleAllocations")}


def upgrade(driver: Driver, *values: str) -> None:
    """helm upgrade of the release with ``values`` over the session's; waits for the new
    plugin pod Ready and the old one gone."""
    old = driver.wait_ready()["metadata"]["uid"]
    driver.helm.run("upgrade", RELEASE, str(CHART), *driver.helm_args(*values))
    wait_for(lambda: (p := driver.ready_pod()) is not None and p["metadata"]["uid"] != old,
             "the upgraded plugin pod Ready", timeout=180)
    # until the old pod is gone, both pods publish the pool, each with its own settings
    wait_for(lambda: len(driver.plugin_pods()) == 1, "the old plugin pod gone", timeout=120)


@pytest.fixture
def consumable(driver: Driver, real_node: RealNode) -> Iterator[Driver]:
    """The release upgraded to consumable sharing (static MIG: dynamic MIG cannot share a
    GPU), back to the session's values after the test (its workloads gone first: request
    this fixture before `workloads`)."""
    upgrade(driver, "--set", "gpuSharing=consumable", "--set", "migMode=static")
    wait_for(lambda: shared_gpus(driver), "shared GPUs published", timeout=60)
    yield driver
    wait_for(lambda: daemon_pods(real_node) == [], "the daemons' pods gone", timeout=60)
    upgrade(driver)
    wait_for(lambda: driver.slices() and not shared_gpus(driver),
             "exclusive slices published again", timeout=60)


def test_two_pods_sharing_a_gpu_by_memory_see_the_pipe_and_their_own_limits(
        consumable: Driver, workloads: Workloads, real_node: RealNode) -> None:
    uuid = shared_gpus(consumable)["gpu-0"]
    for name, (memory, compute) in SHARES.items():
        claim = resource_claim(name, cel=f'device.attributes["{DRIVER}"].uuid == "{uuid}"')
        claim["spec"]["devices"]["requests"][0]["exactly"]["capacity"] = {
            "requests": {"memory": memory, "compute": str(compute)}}
        create(workloads.api, workloads.claims, claim)
        workloads.pod(name, [name], command=SHOW)
    for name, (memory, compute) in SHARES.items():
        workloads.wait_running(name)
        assert workloads.allocated(name) == ["gpu-0"]
        log = workloads.log(name)
        assert "pipe=/tmp/nvidia-mps" in log and SOCKET in log.split(), log
        uid = workloads.claim_uid(name)
        [daemon] = [p for p in daemon_pods(real_node)
                    if p["metadata"]["labels"][f"{DRIVER}/claim-uid"] == uid]
        assert running(daemon), daemon.get("status")
        stored: dict[str, Any] = get(workloads.api, f"{workloads.claims}/{name}") or {}
        [result] = stored["status"]["allocation"]["devices"]["results"]
        consumed = int(result["consumedCapacity"]["memory"])
        assert consumed == int(memory.removesuffix("Gi")) << 30
        assert result["consumedCapacity"]["compute"] == str(compute)
        told = (real_node.host_path(f"/var/lib/kubelet/plugins/{DRIVER}/mps/{uid}") /
                "log" / LOG_FILE).read_text()
        assert f"Cmd:set_default_active_thread_percentage {compute}" in told, told
        assert f"Cmd:set_default_device_pinned_mem_limit 0 {mps_memory(consumed)}" in told, \
            told
