"""The ResourceSlice publisher against the real API server: it writes only what changed,
restores what others delete or edit, and rides out an API server outage."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver.devcluster.controlplane import ClusterConfig, FakeNodeKeeper, LocalCluster
from driver.health.classify import HealthSettings
from driver.health.model import GpuHealth, XidEvent
from driver.health.state import observe
from driver.inventory.discovery import discover
from driver.kube.api import api_request
from driver.nvml import Provider
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices
from driver.resourceslice.errors import PublishError, PublishTimeout
from driver.resourceslice.plan import Backoff, content
from driver.resourceslice.publish import PublishTiming
from tests.support.apiserver import SLICES, ControlPlane, unique, wait_for
from tests.support.publisher import (
    DRIVER,
    consistent,
    pool,
    publisher_for,
    resyncing,
    writes,
)


def mig(provider: Provider) -> Any:
    nvml = provider.nvml
    nvml.nvmlInit()
    return nvml


def remove_1g5gb_at_3(provider: Provider) -> None:
    """a100-mig's GPU 0 is full; free the 1g.5gb instance at memory slice 3 (GI 10)."""
    nvml = mig(provider)
    gi = nvml.nvmlDeviceGetGpuInstanceById(nvml.nvmlDeviceGetHandleByIndex(0), 10)
    nvml.nvmlComputeInstanceDestroy(nvml.nvmlGpuInstanceGetComputeInstanceById(gi, 0))
    nvml.nvmlGpuInstanceDestroy(gi)


def add_1g5gb_at_3(provider: Provider) -> None:
    nvml = mig(provider)
    placement = pynvml.c_nvmlGpuInstancePlacement_t()
    placement.start, placement.size = 3, 1
    gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(
        nvml.nvmlDeviceGetHandleByIndex(0), 19, placement)
    nvml.nvmlGpuInstanceCreateComputeInstance(gi, 0)


def devices(slices: list[dict[str, Any]]) -> list[str]:
    return [d["name"] for s in slices for d in s["spec"].get("devices", [])]


def test_first_start_creates_the_pool_owned_by_the_node(
        control_plane: ControlPlane, fake_node: Any) -> None:
    node = fake_node()
    inventory = discover(mock_provider("dgx-h100"))
    with publisher_for(control_plane, node, "dynamic") as (publisher, calls):
        result = publisher.publish(inventory)
        built = build_slices(inventory, SliceOptions(DRIVER, node, "dynamic", "split"), 1)
        stored = pool(control_plane.api, node)
        assert len(built) == 5  # 8 counter sets in one slice, 208 devices in four
        assert result.created == tuple(s["metadata"]["name"] for s in built)
        assert (result.updated, result.deleted, result.generation) == ((), (), 1)
        assert [m for m, _ in writes(calls)] == ["POST"] * 5
        node_uid = api_request(control_plane.api, "GET", f"/api/v1/nodes/{node}").expect(
            200)["metadata"]["uid"]
        for want, got in zip(built, stored, strict=True):
            assert got["spec"] == want["spec"]
            assert got["metadata"]["ownerReferences"] == [{
                "apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid,
                "controller": True}]


def test_a_restart_with_the_same_inventory_makes_zero_writes(
        control_plane: ControlPlane, fake_node: Any) -> None:
    node = fake_node()
    inventory = discover(mock_provider("dgx-h100"))
    with publisher_for(control_plane, node, "dynamic") as (first, _):
        first.publish(inventory)
        before = {s["metadata"]["name"]: s["metadata"]["resourceVersion"]
                  for s in pool(control_plane.api, node)}
        with publisher_for(control_plane, node, "dynamic") as (restarted, calls):
            result = restarted.publish(discover(mock_provider("dgx-h100")))
            with resyncing(restarted):
                wait_for(lambda: restarted.syncs >= 2, "the resync loop's first sync")
            assert result.writes == 0 and result.generation == 1
            assert writes(calls) == [], "the restart wrote to the API server"
            assert {m for m, _ in calls} == {"GET"}
            after = {s["metadata"]["name"]: s["metadata"]["resourceVersion"]
                     for s in pool(control_plane.api, node)}
            assert after == before


def test_one_mig_instance_added_updates_in_place_and_bumps_the_generation(
        control_plane: ControlPlane, fake_node: Any, tmp_path: Path) -> None:
    node = fake_node()
    provider = mock_provider("a100-mig", tmp_path / "mig.json")
    remove_1g5gb_at_3(provider)
    with publisher_for(control_plane, node) as (publisher, calls):
        publisher.publish(discover(provider))
        before = pool(control_plane.api, node)
        assert "gpu-0-mig-1g5gb-3" not in devices(before)
        calls.clear()

        add_1g5gb_at_3(provider)
        inventory = discover(provider)
        result = publisher.publish(inventory)
        after = pool(control_plane.api, node)
        assert result.generation == 2 and result.created == result.deleted == ()
        assert result.updated == tuple(s["metadata"]["name"] for s in before)
        assert [m for m, _ in writes(calls)] == ["PUT"] * len(before)
        assert [s["metadata"]["uid"] for s in after] == [s["metadata"]["uid"] for s in before]
        assert sorted(devices(after)) == sorted([*devices(before), "gpu-0-mig-1g5gb-3"])
        assert {s["spec"]["pool"]["generation"] for s in after} == {2}
        built = build_slices(inventory, SliceOptions(DRIVER, node), 2)
        assert [s["spec"] for s in after] == [s["spec"] for s in built]


def test_in_dynamic_mode_a_new_mig_instance_changes_nothing(
        control_plane: ControlPlane, fake_node: Any, tmp_path: Path) -> None:
    """Partitionable devices already offer every placement: creating one for a claim is
    the scheduler's counters' business, not a new slice."""
    node = fake_node()
    provider = mock_provider("a100-mig", tmp_path / "mig.json")
    remove_1g5gb_at_3(provider)
    with publisher_for(control_plane, node, "dynamic") as (publisher, calls):
        publisher.publish(discover(provider))
        calls.clear()
        add_1g5gb_at_3(provider)
        assert publisher.publish(discover(provider)).writes == 0
        assert writes(calls) == []


def test_a_deleted_or_edited_slice_is_restored_by_the_watch(
        control_plane: ControlPlane, fake_node: Any) -> None:
    api = control_plane.api
    node = fake_node()
    inventory = discover(mock_provider("dgx-h100"))
    # A resync period far beyond the test: only the watch can bring the slices back.
    reported: list[int] = []  # what the plugin's slice-writes metric is told
    with publisher_for(control_plane, node, "dynamic", PublishTiming(resync_period=600),
                       on_writes=reported.append) as (publisher, calls):
        publisher.publish(inventory)
        original = pool(api, node)
        victim = original[2]["metadata"]
        with resyncing(publisher):
            wait_for(lambda: publisher.syncs >= 2, "the resync loop to be watching")
            api_request(api, "DELETE", f"{SLICES}/{victim['name']}").expect(200)
            restored = wait_for(
                lambda: (p := pool(api, node)) and len(p) == len(original) and consistent(p)
                and p[2]["metadata"]["uid"] != victim["uid"] and p,
                "the deleted slice to come back")
            assert [content(s) for s in restored] == [content(s) for s in original]
            assert restored[0]["spec"]["pool"]["generation"] == 2

            edited = restored[1]["metadata"]["name"]
            api_request(api, "PATCH", f"{SLICES}/{edited}",
                        {"spec": {"devices": restored[1]["spec"]["devices"][:1]}},
                        content_type="application/merge-patch+json").expect(200)
            again = wait_for(
                lambda: (p := pool(api, node)) and consistent(p)
                and p[0]["spec"]["pool"]["generation"] == 3 and p,
                "the edited slice to be restored")
            assert [content(s) for s in again] == [content(s) for s in original]
            assert [s["metadata"]["name"] for s in again] == \
                [s["metadata"]["name"] for s in original]
        assert sum(reported) == len(writes(calls)) > len(original), \
            "the resync loop's writes are reported too"


class Injected:
    """A canned API answer, shaped like the client's RESTResponse."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.body = {"kind": "Status", "code": status, "message": f"injected {status}"}

    def read(self) -> bytes:
        return json.dumps(self.body).encode()


def inject(api: Any, faults: dict[tuple[str, str], list[int]]) -> list[tuple[str, int]]:
    """Answer the next calls matching (method, URL fragment) with the listed statuses
    instead of asking the server; returns what was injected, in order."""
    injected: list[tuple[str, int]] = []
    real = api.call_api

    def call_api(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        for (m, fragment), statuses in faults.items():
            if method == m and fragment in url and statuses:
                injected.append((method, statuses[0]))
                return Injected(statuses.pop(0))
        return real(method, url, *args, **kwargs)

    api.call_api = call_api
    return injected


def test_409_429_and_5xx_are_retried_until_the_pool_is_published(
        control_plane: ControlPlane, fake_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    node = fake_node()
    inventory = discover(mock_provider("dgx-h100"))
    timing = PublishTiming(backoff=Backoff(initial=0.05, cap=0.2))
    with publisher_for(control_plane, node, "dynamic", timing) as (publisher, _):
        injected = inject(publisher.api_client, {("GET", "resourceslices"): [503, 429],
                                           ("POST", "resourceslices"): [409, 500]})
        with caplog.at_level(logging.WARNING, logger="driver.resourceslice.publish"):
            result = publisher.publish(inventory, timeout=30)
        assert injected == [("GET", 503), ("GET", 429), ("POST", 409), ("POST", 500)]
        waited = [r.getMessage().split("waiting for ", 1)[1] for r in caplog.records
                  if r.name == "driver.resourceslice.publish"]
        assert [w.split(":")[0] for w in waited] == [
            "the API server to recover", "the API server to stop throttling",
            "a conflict to clear", "the API server to recover"]
        assert "injected 429" in waited[1]
        assert len(result.created) == 5 and result.generation == 1
        stored = pool(control_plane.api, node)
        assert len(stored) == 5 and consistent(stored)
        assert publisher.waiting_for is None


def test_what_retrying_cannot_fix_is_raised_and_the_loop_lives_on(
        control_plane: ControlPlane, fake_node: Any) -> None:
    node = fake_node()
    inventory = discover(mock_provider("l4-8x"))
    with publisher_for(control_plane, node,
                       timing=PublishTiming(resync_period=0.5)) as (publisher, _):
        inject(publisher.api_client, {("POST", "resourceslices"): [403, 403, 403]})
        with pytest.raises(PublishError, match="HTTP 403 injected 403"):
            publisher.publish(inventory)
        assert str(publisher.waiting_for).startswith(
            f"a fix: POST ResourceSlice {node}-{DRIVER}-0: HTTP 403")
        with resyncing(publisher) as loop:
            wait_for(lambda: pool(control_plane.api, node) and publisher.waiting_for is None,
                     "the loop to publish once the API server lets it")
            assert loop.is_alive()


def test_a_missing_node_is_waited_for_not_fatal(control_plane: ControlPlane) -> None:
    node = unique("not-yet")
    with publisher_for(control_plane, node,
                       timing=PublishTiming(backoff=Backoff(initial=0.2, cap=0.5))) as (
            publisher, calls):
        with pytest.raises(PublishTimeout, match=f"Node {node} to exist"):
            publisher.publish(discover(mock_provider("l4-8x")), timeout=2)
        assert publisher.waiting_for == f"Node {node} to exist (it owns the ResourceSlices)"
        assert writes(calls) == []


def test_the_driver_catches_up_after_a_30s_api_server_outage(
        assets: Path, tmp_path: Path) -> None:
    # A control plane of its own: the outage must not disturb the session's scheduler.
    with LocalCluster(ClusterConfig(assets=assets)) as cluster:
        api = cluster.api_client()
        with FakeNodeKeeper(api) as keeper:
            keeper.add("outage-node")
        own = ControlPlane(cluster=cluster, kubeconfig=cluster.kubeconfig, api=api)
        provider = mock_provider("a100-mig", tmp_path / "mig.json")
        remove_1g5gb_at_3(provider)
        timing = PublishTiming(backoff=Backoff(initial=0.5, cap=4.0))
        with publisher_for(own, "outage-node", timing=timing) as (publisher, _), \
                resyncing(publisher) as loop:
            publisher.publish(discover(provider))
            wait_for(lambda: publisher.syncs >= 2, "the resync loop to be watching")
            down_at = time.monotonic()
            cluster.stop_apiserver()
            try:
                waiting = wait_for(lambda: publisher.waiting_for, "the publisher to notice")
                assert waiting.startswith(f"the API server at {cluster.server}")
                add_1g5gb_at_3(provider)  # the node changes while the API server is away
                with pytest.raises(PublishTimeout, match="the API server"):
                    publisher.publish(discover(provider), timeout=3)
                # The outage itself: 30 s without an API server, then it comes back.
                time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
                assert loop.is_alive()
            finally:
                cluster.start_apiserver()
            caught_up = wait_for(
                lambda: (p := pool(api, "outage-node")) and "gpu-0-mig-1g5gb-3" in devices(p)
                and p, "the publisher to catch up", timeout=60)
            assert consistent(caught_up)
            assert caught_up[0]["spec"]["pool"]["generation"] == 2
            wait_for(lambda: publisher.waiting_for is None, "the publisher to be in sync")
            assert loop.is_alive()
        api.close()


def test_cleanup_deletes_only_this_nodes_pool(
        control_plane: ControlPlane, fake_node: Any) -> None:
    api = control_plane.api
    mine, other = fake_node(), fake_node()
    inventory = discover(mock_provider("dgx-h100"))
    with publisher_for(control_plane, other, "dynamic") as (neighbour, _):
        neighbour.publish(inventory)
        with publisher_for(control_plane, mine, "dynamic") as (publisher, _):
            publisher.publish(inventory)
            assert publisher.cleanup() == 5
            assert pool(api, mine) == []
            assert len(pool(api, other)) == 5
            assert publisher.cleanup() == 0


def test_its_own_writes_seen_by_the_watch_start_no_resync(
        control_plane: ControlPlane, fake_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A health change rewrites slices while the watch runs: the watch sees those writes
    before the publish has recorded them, and must not take them for someone else's."""
    node = fake_node()
    inventory = discover(mock_provider("dgx-h100"))
    sick, _ = observe(GpuHealth(3), XidEvent(3, 79, datetime.now(UTC)), HealthSettings())
    with publisher_for(control_plane, node, "dynamic", PublishTiming(resync_period=600)) \
            as (publisher, _):
        publisher.publish(inventory)
        with resyncing(publisher), caplog.at_level(logging.INFO,
                                                   logger="driver.resourceslice.publish"):
            wait_for(lambda: publisher.syncs >= 2, "the resync loop to be watching")
            for health in (sick, GpuHealth(3)) * 3:
                assert publisher.publish(inventory, health={3: health}).writes > 0
            time.sleep(1.0)  # the watch's last events
        assert [r.getMessage() for r in caplog.records if "resyncing" in r.getMessage()] == []
        assert consistent(pool(control_plane.api, node))
