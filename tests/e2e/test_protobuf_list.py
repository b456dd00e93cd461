"""ResourceSlices listed as Kubernetes protobuf from the real kube-apiserver decode into the
very dicts its JSON gives (driver/kube/protolist.py): our publisher's real slices (static
MIG, dynamic MIG with counters and health taints, consumable GPUs with request policies,
the 1.34 counter layout) and hand-written ones with what our publisher never writes
(allNodes, node selectors, per-device node selection, negative and empty values,
labels, annotations, owner references; this server's gates refuse list attributes:
the unit tests decode those), page by page; and a list the server answers only in
JSON read as JSON."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from driver.health.classify import HealthSettings
from driver.health.model import GpuHealth, XidEvent
from driver.health.state import observe
from driver.kube.api import ApiError, api_call, api_request, list_items, list_pages
from driver.kube.protolist import PROTOBUF, decode
from driver.resourceslice.build import SliceOptions, build_slices
from tests.support.apiserver import RESOURCE_V1, SLICES, ControlPlane, unique, wait_for
from tests.support.schedcost import LAYOUTS, dgx_h100

SELECTOR = {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "gpu.example.com/pool", "operator": "In",
                           "values": ["a", "b"]},
                          {"key": "gpu.example.com/spare", "operator": "Exists"}],
     "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}


def hand_written(driver: str, node: str, owner: dict[str, Any]) -> list[dict[str, Any]]:
    """Slices with the fields our publisher does not write; `owner`: an object that
    exists (the garbage collector of a kube-controller-manager that an earlier test
    started deletes a slice whose owner is gone)."""
    attributes = {"count": {"int": -3}, "on": {"bool": False}, "model": {"string": ""},
                  "gpu.example.com/fw": {"version": "1.2.3-rc.1+b5"},
                  "big": {"int": 1 << 40}, "text": {"string": "ünïcode"}}
    device = {"name": "dev-0", "attributes": attributes,
              "capacity": {"memory": {"value": "80Gi"}, "zero": {"value": "0"}}}

    def one(name: str, placement: dict[str, Any], devices: list[dict[str, Any]]
            ) -> dict[str, Any]:
        return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
                "metadata": {"name": f"{node}-{name}",
                             "labels": {"a": "1", "gpu.example.com/empty": ""},
                             "annotations": {"note": "x" * 300},
                             "ownerReferences": [owner]},
                "spec": {"driver": driver, "pool": {"name": f"{node}-{name}",
                                                    "generation": 0,
                                                    "resourceSliceCount": 1},
                         **placement, "devices": devices}}

    per_device = [{"name": "on-node", "nodeName": node},
                  {"name": "selected", "nodeSelector": SELECTOR},
                  {"name": "anywhere", "allNodes": True}]
    return [one("all", {"allNodes": True}, [device]),
            one("selected", {"nodeSelector": SELECTOR}, [{"name": "dev-0"}]),
            one("per-device", {"perDeviceNodeSelection": True}, per_device)]


def ours(driver: str, node: str, folder: Path) -> list[dict[str, Any]]:
    """Our publisher's slices of one node in each layout it writes."""
    at, settings = datetime(2026, 12, 7, 18, 0, 5, tzinfo=UTC), HealthSettings()
    unhealthy = {3: observe(GpuHealth(3), XidEvent(3, 79, at), settings)[0],
                 5: observe(GpuHealth(5), XidEvent(5, 13, at), settings)[0]}
    made = []
    for layout, options, health in (
            ("static-mig", SliceOptions(driver, f"{node}-s"), {}),
            ("plain", SliceOptions(driver, f"{node}-c", gpu_sharing="consumable"), {}),
            ("plain", SliceOptions(driver, f"{node}-o", counter_layout="combined"), {}),
            ("dynamic-mig", SliceOptions(driver, f"{node}-d", "dynamic"), unhealthy)):
        made += build_slices(dgx_h100(LAYOUTS[layout], folder), options, 1, health)
    return made


@pytest.fixture(scope="module")
def published(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[str, list[str]]]:
    """Every kind of slice, under a driver name of its own: the driver and the names."""
    api = control_plane.api
    driver, node = f"{unique('proto')}.example.com", unique("proto-node")
    default = api_request(api, "GET", "/api/v1/namespaces/default").expect(200)
    owner = {"apiVersion": "v1", "kind": "Namespace", "name": "default",
             "uid": default["metadata"]["uid"], "controller": True}
    made = ours(driver, node, tmp_path_factory.mktemp("proto")) + \
        hand_written(driver, node, owner)
    names = []
    try:
        for one in made:
            api_request(api, "POST", SLICES, one).expect(201)
            names.append(one["metadata"]["name"])
        # an update: a second managedFields entry, a generation of 2
        first = api_request(api, "GET", f"{SLICES}/{names[0]}").expect(200)
        first["metadata"]["labels"] = {"touched": "yes"}
        first["spec"]["pool"]["generation"] += 1
        api_request(api, "PUT", f"{SLICES}/{names[0]}", first).expect(200)
        # The lists compared are read from the API server's watch cache, which once (in
        # .ci/run) had not yet caught up with the last writes: wait until it has.
        generation = first["spec"]["pool"]["generation"]

        def listed_as_written() -> bool:
            listed = {s["metadata"]["name"]: s for s in list_items(
                api, SLICES, field_selector=f"spec.driver={driver}")}
            return sorted(listed) == sorted(names) and \
                listed[names[0]]["spec"]["pool"]["generation"] == generation

        wait_for(listed_as_written, "every slice, as written, in the list")
        yield driver, names
    finally:
        for name in names:
            api_request(api, "DELETE", f"{SLICES}/{name}").expect(200, 404)


def protobuf_pages(api: Any, path: str, query: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Each page of a list asked for as protobuf only, decoded."""
    while True:
        resp = api_call(api, "GET", path, query=query, accept=PROTOBUF)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith(PROTOBUF)
        page = decode(bytes(resp.read()))
        yield page
        if not page["metadata"].get("continue"):
            return
        query = {**query, "continue": page["metadata"]["continue"]}


def test_protobuf_pages_decode_to_the_json_pages(
        control_plane: ControlPlane, published: tuple[str, list[str]]) -> None:
    driver, names = published
    selector = f"spec.driver={driver}"
    as_json = [page for _, page in list_pages(control_plane.api, SLICES,
                                              field_selector=selector, limit=3)]
    as_protobuf = list(protobuf_pages(control_plane.api, SLICES,
                                      {"limit": "3", "fieldSelector": selector}))
    assert len(as_json) == len(as_protobuf) > 3  # pages of 3
    for want, got in zip(as_json, as_protobuf, strict=True):
        # the list's own resourceVersion and continue token move with any write to the
        # cluster between the two lists; the items do not
        assert {**got, "metadata": {}} == {**want, "metadata": {}}
        assert got["metadata"].keys() == want["metadata"].keys()
    items = [s for page in as_protobuf for s in page["items"]]
    assert sorted(s["metadata"]["name"] for s in items) == sorted(names)
    # what the test means to cover is in the slices the server kept
    text = orjson.dumps(items).decode()
    for field in ("sharedCounters", "consumesCounters", "taints", "timeAdded", "requestPolicy",
                  "allNodes", "nodeSelector", "perDeviceNodeSelection", '"int"', '"bool"',
                  '"string"', '"version"', "ownerReferences", "managedFields", "labels",
                  "annotations", '"generation":2'):
        assert field in text, field


def test_list_items_asks_for_protobuf_and_gives_the_json_items(
        control_plane: ControlPlane, published: tuple[str, list[str]]) -> None:
    selector = f"spec.driver={published[0]}"
    assert (list_items(control_plane.api, SLICES, field_selector=selector, limit=5,
                       protobuf=True)
            == list_items(control_plane.api, SLICES, field_selector=selector, limit=5))





def test_an_empty_list_is_the_same_in_both(control_plane: ControlPlane) -> None:
    """No slices of a driver: "items": [] in the JSON, no items field in the protobuf."""
    selector = f"spec.driver={unique('none')}.example.com"
    [(_, as_json)] = list_pages(control_plane.api, SLICES, field_selector=selector)
    [as_protobuf] = protobuf_pages(control_plane.api, SLICES, {"fieldSelector": selector})
    assert as_json["items"] == as_protobuf["items"] == []
    assert {**as_protobuf, "metadata": {}} == {**as_json, "metadata": {}}


def test_an_error_answered_in_protobuf_is_an_api_error_with_its_message(
        control_plane: ControlPlane) -> None:
    with pytest.raises(ApiError) as raised:
        list_items(control_plane.api, f"{RESOURCE_V1}/nosuchthings", protobuf=True)
    assert raised.value.result.status == 404
    assert "could not find the requested resource" in str(raised.value)


@pytest.fixture(scope="module")
def widgets(control_plane: ControlPlane) -> Iterator[str]:
    """A custom resource with one object: the path of its collection."""
    api = control_plane.api
    group = f"{unique('proto')}.example.com"
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"widgets.{group}"},
           "spec": {"group": group, "scope": "Cluster",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {
                                      "type": "object",
                                      "x-kubernetes-preserve-unknown-fields": True}}}]}}
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    api_request(api, "POST", crds, crd).expect(201)
    path = f"/apis/{group}/v1/widgets"
    try:
        wait_for(lambda: api_request(api, "POST", path, {
            "apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"},
            "size": 3}).status == 201, "the widget CRD to serve")
        yield path
    finally:
        api_request(api, "DELETE", f"{crds}/widgets.{group}").expect(200, 404)


def test_a_list_the_server_answers_only_in_json_is_read_as_json(
        control_plane: ControlPlane, widgets: str) -> None:
    items = list_items(control_plane.api, widgets, protobuf=True)
    assert [(w["metadata"]["name"], w["size"]) for w in items] == [("w", 3)]
