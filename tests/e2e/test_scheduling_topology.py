"""What the real kube-scheduler makes of our slices: NVLink islands through
``matchAttribute``, and partitionable MIG devices that never overlap in memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.cli.main import main
from driver.devcluster.controlplane import LocalCluster
from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.kube.api import api_request
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import MigMode, SliceOptions, build_slices
from driver.resourceslice.publish import ApiPublisher, SlicePool
from tests.support.apiserver import (
    RESOURCE_V1,
    ControlPlane,
    get,
)
from tests.support.claims import Claims

DRIVER = "gpu.dra.dev"
ISLAND = f"{DRIVER}/nvlinkIsland"


@contextlib.contextmanager
def published(control_plane: ControlPlane, node: str, inventory: Inventory,
              mig_mode: MigMode) -> Iterator[list[dict[str, Any]]]:
    """Publish ``inventory`` as ``node``'s pool; yields the slices; deletes them after."""
    api = control_plane.cluster.api_client()
    publisher = ApiPublisher(api, SlicePool(DRIVER, node, mig_mode))
    try:
        publisher.publish(inventory, timeout=60)
        yield build_slices(inventory, SliceOptions(DRIVER, node, mig_mode), 1)
    finally:
        publisher.cleanup()
        api.close()


@pytest.fixture
def claims_on(control_plane: ControlPlane, scheduler: LocalCluster,
              controller_manager: LocalCluster, device_classes: None,
              namespace: str) -> Any:
    return lambda node: Claims(control_plane.api, namespace, node)


def test_nvlink_island_constraint_gets_a_bridged_pair_and_no_triple(
        control_plane: ControlPlane, fake_node: Any, claims_on: Any) -> None:
    node = fake_node()
    inventory = discover(mock_provider("a100-pcie-4x"))  # NVLink bridges 0-1 and 2-3
    claims = claims_on(node)
    with published(control_plane, node, inventory, "static"):
        # Four GPUs are free, but no three of them are all NVLink-connected.
        claims.request("three-linked", DRIVER, count=3, match_attribute=ISLAND)
        claims.wait_unschedulable("three-linked")
        claims.release("three-linked")
        claims.request("three-any", DRIVER, count=3)  # the same, without the constraint
        assert len(claims.wait_allocated("three-any")) == 3
        claims.release("three-any")

        claims.request("pair", DRIVER, count=2, match_attribute=ISLAND)
        pair = claims.wait_allocated("pair")
        assert sorted(pair) in (["gpu-0", "gpu-1"], ["gpu-2", "gpu-3"])
        a, b = (next(g.index for g in inventory.gpus if f"gpu-{g.minor}" == d) for d in pair)
        assert inventory.link(a, b).startswith("NV"), inventory.link(a, b)
        claims.release("pair")


def test_mig_1g10gb_fills_the_h100_and_7g80gb_waits_for_all_of_it(
        control_plane: ControlPlane, fake_node: Any, claims_on: Any) -> None:
    node = fake_node()
    inventory = discover(mock_provider("h100-80gb-hbm3"))
    claims = claims_on(node)
    mig_class = f"mig.{DRIVER}"

    def profile(name: str) -> str:
        return f'device.attributes["{DRIVER}"].profile == "{name}"'

    with published(control_plane, node, inventory, "dynamic") as slices:
        placement = {d["name"]: range(d["attributes"]["placementStart"]["int"],
                                      d["attributes"]["placementStart"]["int"]
                                      + d["attributes"]["placementSize"]["int"])
                     for s in slices for d in s["spec"].get("devices", [])
                     if "placementStart" in d["attributes"]}

        def no_overlap() -> None:
            held = [d for devices in claims.all_allocated().values() for d in devices]
            for x, y in combinations(held, 2):
                assert not set(placement[x]) & set(placement[y]), (x, y)

        small = [f"small-{i}" for i in range(7)]
        for name in small:
            claims.request(name, mig_class, cel=profile("1g.10gb"))
        got = [claims.wait_allocated(name) for name in small]
        assert sorted(d for devices in got for d in devices) == \
            [f"gpu-0-mig-1g10gb-{i}" for i in range(7)]
        no_overlap()

        claims.request("small-8", mig_class, cel=profile("1g.10gb"))
        claims.wait_unschedulable("small-8")
        claims.request("big", mig_class, cel=profile("7g.80gb"))
        claims.wait_unschedulable("big")
        no_overlap()

        claims.release("small-8")
        for name in small[:-1]:
            claims.release(name)
        # One 1g.10gb is still allocated: a fresh 7g.80gb attempt must fail too.
        claims.request("big-while-one-left", mig_class, cel=profile("7g.80gb"))
        claims.wait_unschedulable("big-while-one-left")
        assert claims.allocated("big") is None
        no_overlap()
        claims.release("big-while-one-left")

        claims.release(small[-1])
        assert claims.wait_allocated("big") == ["gpu-0-mig-7g80gb-0"]
        assert list(claims.all_allocated()) == ["big"]
        no_overlap()
        claims.release("big")


def test_explain_says_why_a_claim_is_pending_from_the_clusters_objects(
        control_plane: ControlPlane, fake_node: Any, claims_on: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """README's "A claim stays Pending" recipe: the objects kubectl would dump, fed to
    `gpu-dra explain`, name the constraint and the claims holding the devices."""
    node = fake_node()
    claims = claims_on(node)
    with published(control_plane, node, discover(mock_provider("a100-pcie-4x")),
                   "static") as slices:
        island = {d["name"]: d["attributes"]["nvlinkIsland"]["int"]
                  for s in slices for d in s["spec"]["devices"]}
        claims.request("train-a", DRIVER, count=2, match_attribute=ISLAND)
        held = claims.wait_allocated("train-a")
        # One GPU of the other NVLink pair: no pair is left whole.
        claims.request("single", DRIVER, cel=f'device.attributes["{DRIVER}"].nvlinkIsland '
                       f'!= {island[held[0]]}')
        claims.wait_allocated("single")
        claims.request("train-b", DRIVER, count=2, match_attribute=ISLAND)
        claims.wait_unschedulable("train-b")

        def dump(path: str, name: str) -> str:
            """The API's typed list (`kubectl get --raw`), items without a kind."""
            file = tmp_path / name
            file.write_text(yaml.safe_dump(dict(api_request(control_plane.api, "GET", path)
                                                .expect(200))))
            return str(file)

        pending = tmp_path / "pending.yaml"
        pending.write_text(yaml.safe_dump(get(control_plane.api,
                                              f"{claims.claims}/train-b")))
        code = main(["explain", "--slices", dump(f"{RESOURCE_V1}/resourceslices", "s.yaml"),
                     "--classes", dump(f"{RESOURCE_V1}/deviceclasses", "c.yaml"),
                     "--allocated", dump(f"{RESOURCE_V1}/resourceclaims", "a.yaml"),
                     "--claims", str(pending)])
        out, err = capsys.readouterr()
        assert (code, err) == (1, ""), err
        ours = [block for block in out.split("\n" + claims.namespace)
                if f"/train-b on {node}: does not fit" in block]
        assert ours, out
        assert f"matchAttribute {ISLAND}" in ours[0]
        assert f"{claims.namespace}/train-a" in ours[0] and f"{claims.namespace}/single" in ours[0]

        # The same answer in one command, straight from the cluster.
        code = main(["explain", "--kubeconfig", str(control_plane.kubeconfig),
                     "--claim", f"{claims.namespace}/train-b", "--node", node])
        direct, err = capsys.readouterr()
        assert (code, err) == (1, ""), err
        assert f"{claims.namespace}/train-b on {node}: does not fit" in direct
        assert direct.strip() in out, (direct, out)
        for name in ("train-b", "single", "train-a"):
            claims.release(name)
