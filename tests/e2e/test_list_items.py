"""Listing a collection of the real kube-apiserver page by page, as `gpu-dra explain
--kubeconfig` reads a cluster's slices: every item once, only the driver asked for; and
explain looking at no other driver's slices."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from driver.cli.main import main
from driver.kube.api import ApiError, api_request, list_items, list_pages
from tests.support.apiserver import RESOURCE_V1, SLICES, ControlPlane, resource_slice, unique
from tests.support.claims import resource_claim
from tests.support.plugin import DRIVER


@pytest.fixture
def slices(control_plane: ControlPlane) -> Iterator[tuple[str, dict[str, list[str]]]]:
    """Five one-device slices of one driver, two of another, on one node: the node and
    the slices' names by driver."""
    node = unique("list-node")
    made: dict[str, list[str]] = {}
    for driver, count in ((f"{unique('mine')}.example.com", 5),
                          (f"{unique('theirs')}.example.com", 2)):
        for i in range(count):
            name = f"{node}-{driver}-{i}"
            api_request(control_plane.api, "POST", SLICES, resource_slice(
                name, driver, node, [{"name": f"dev-{i}"}])).expect(201)
            made.setdefault(driver, []).append(name)
    yield node, made
    for names in made.values():
        for name in names:
            api_request(control_plane.api, "DELETE", f"{SLICES}/{name}").expect(200, 404)


def test_every_item_of_the_driver_asked_for_once_across_pages(
        control_plane: ControlPlane, slices: tuple[str, dict[str, list[str]]]) -> None:
    made = slices[1]
    mine, theirs = made
    pages = list(list_pages(control_plane.api, SLICES, field_selector=f"spec.driver={mine}",
                            limit=2))
    assert len(pages) == 3  # 2 + 2 + 1: the continue tokens followed to the end
    items = list_items(control_plane.api, SLICES, field_selector=f"spec.driver={mine}",
                       limit=2)
    assert sorted(s["metadata"]["name"] for s in items) == sorted(made[mine])
    assert {s["spec"]["driver"] for s in items} == {mine}
    everything = list_items(control_plane.api, SLICES, limit=3)
    names = [s["metadata"]["name"] for s in everything]
    assert len(names) == len(set(names))
    assert set(made[mine] + made[theirs]) <= set(names)


def test_a_collection_the_server_does_not_serve_is_an_error_with_its_status(
        control_plane: ControlPlane) -> None:
    with pytest.raises(ApiError) as raised:
        list_items(control_plane.api, f"{RESOURCE_V1}/nosuchthings")
    assert raised.value.result.status == 404


def test_explain_reads_only_the_slices_of_its_driver(
        control_plane: ControlPlane, device_classes: None, namespace: str,
        slices: tuple[str, dict[str, list[str]]], capsys: pytest.CaptureFixture[str]) -> None:
    """A node with only another driver's devices is no candidate for a claim of ours:
    explain does not list it among the nodes where the claim does not fit."""
    api = control_plane.api
    ours, theirs = unique("ours-node"), slices[0]
    gpu = {"name": "gpu-0", "attributes": {"type": {"string": "gpu"}}}
    name = f"{ours}-{DRIVER}"
    api_request(api, "POST", SLICES, resource_slice(name, DRIVER, ours, [gpu])).expect(201)
    try:
        api_request(api, "POST", f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaims",
                    resource_claim("two", count=2)).expect(201)
        code = main(["explain", "--kubeconfig", str(control_plane.kubeconfig),
                     "--claim", f"{namespace}/two"])
        out, err = capsys.readouterr()
        assert (code, err) == (1, ""), err
        assert f"{namespace}/two on {ours}: does not fit" in out
        assert theirs not in out
    finally:
        api_request(api, "DELETE", f"{SLICES}/{name}").expect(200, 404)
