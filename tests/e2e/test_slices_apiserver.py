"""Every slice the builder makes, from every mock machine in both MIG modes, created for
real by the kube-apiserver of the e2e tier and stored exactly as sent."""

from __future__ import annotations

from typing import Any

import pytest

from driver.inventory.discovery import discover
from driver.kube.api import api_request
from driver.nvml.mock import list_profiles, mock_provider
from driver.resourceslice.build import MigMode, SliceOptions, build_slices, limit_violations
from driver.resourceslice.errors import PublishError
from driver.resourceslice.publish import ApiPublisher, SlicePool
from tests.support.apiserver import SLICES, ControlPlane, submit_slice, unique

DRIVER = "gpu.dra.dev"
CASES = [(p, m) for p in list_profiles() for m in ("static", "dynamic")]


def pool(api: Any, node: str) -> list[dict[str, Any]]:
    body = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)
    return sorted(body["items"], key=lambda s: s["metadata"]["name"])


@pytest.mark.parametrize(("profile", "mig_mode"), CASES)
def test_every_slice_is_created_and_stored_as_sent(
        control_plane: ControlPlane, fake_node: Any, profile: str, mig_mode: MigMode) -> None:
    node = fake_node(unique(f"{profile}-{mig_mode}"))
    inventory = discover(mock_provider(profile))
    api = control_plane.cluster.api_client()
    publisher = ApiPublisher(api, SlicePool(DRIVER, node, mig_mode))  # counter layout: auto
    try:
        built = build_slices(inventory, SliceOptions(DRIVER, node, mig_mode, "split"), 1)
        assert limit_violations(built) == []
        result = publisher.publish(inventory, timeout=60)
        assert len(result.created) == len(built)
        stored = pool(control_plane.api, node)
        assert [s["metadata"]["name"] for s in stored] == list(result.created)
        assert [s["spec"] for s in stored] == [s["spec"] for s in built]
        # What the server stores compares equal to what the builder makes: no rewrite.
        assert publisher.publish(inventory, timeout=60).writes == 0
    finally:
        deleted = publisher.cleanup()
        api.close()
    assert deleted == len(built)
    assert pool(control_plane.api, node) == []


def test_the_137_server_refuses_the_combined_layout_auto_avoids(
        control_plane: ControlPlane, fake_node: Any) -> None:
    node = fake_node()
    inventory = discover(mock_provider("h100-80gb-hbm3"))
    combined = build_slices(inventory, SliceOptions(DRIVER, node, "dynamic", "combined"), 1)
    split = build_slices(inventory, SliceOptions(DRIVER, node, "dynamic", "split"), 1)
    assert control_plane.cluster.server_version() == "v1.37.2"
    verdict = submit_slice(control_plane.api, combined[-1], dry_run=True)
    assert not verdict.accepted and verdict.status == 422, str(verdict)
    assert "only one of `sharedCounters` or `devices` is allowed" in str(verdict), str(verdict)
    for s in split:
        assert submit_slice(control_plane.api, s, dry_run=True).accepted

    # Forced, the layout is used as is, and the server's refusal is an error, not a retry.
    api = control_plane.cluster.api_client()
    forced = ApiPublisher(api, SlicePool(DRIVER, node, "dynamic", counter_layout="combined"))
    try:
        with pytest.raises(PublishError, match="only one of `sharedCounters` or `devices`"):
            forced.publish(inventory, timeout=60)
        assert pool(control_plane.api, node) == []
    finally:
        api.close()
