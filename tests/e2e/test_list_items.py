"""Listing a collection of the real kube-apiserver page by page, as `gpu-dra explain
--kubeconfig` reads a cluster's slices: every item once, only the driver asked for; and
explain looking at no other driver's slices. The list as explain reads it, in a forked
child (`ForkedList`): the same pages, the server's errors, no process left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driver.cli.main import main
from driver.kube.api import ApiError, api_client, api_request, list_items, list_pages
from driver.kube.forkedlist import ForkedList, ListReaderError
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


def _children() -> set[int]:
    """The pids of this process's children, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid():
                found.add(int(stat.parent.name))
    return found


def _read_all(reader: ForkedList) -> list[list[dict[str, Any]]]:
    pages = []
    while not reader.done:
        items = reader.next_items(wait=True)
        if items is not None:
            pages.append(items)
    return pages


@pytest.mark.parametrize("protobuf", [False, True], ids=["json", "protobuf"])
def test_a_forked_list_hands_out_the_pages_in_order(
        control_plane: ControlPlane, slices: tuple[str, dict[str, list[str]]],
        protobuf: bool) -> None:
    """The child reads the pages that `list_pages` reads, in order; this process gets
    the same dicts as `list_items` gives."""
    mine = next(iter(slices[1]))
    selector = f"spec.driver={mine}"
    expected = [[s["metadata"]["name"] for s in page["items"]] for _, page in list_pages(
        control_plane.api, SLICES, field_selector=selector, limit=2)]
    before = _children()
    with ForkedList(api_client(control_plane.kubeconfig), SLICES, field_selector=selector,
                    limit=2, protobuf=protobuf) as reader:
        pages = _read_all(reader)
        assert reader.next_items(wait=True) is None  # done: nothing more
    assert [[s["metadata"]["name"] for s in page] for page in pages] == expected
    assert len(pages) == 3
    assert [s for page in pages for s in page] == list_items(
        control_plane.api, SLICES, field_selector=selector, limit=2, protobuf=protobuf)
    assert _children() == before  # the child was waited for


def test_a_forked_list_raises_the_servers_answer(control_plane: ControlPlane) -> None:
    with ForkedList(api_client(control_plane.kubeconfig), f"{RESOURCE_V1}/nosuchthings",
                    protobuf=True) as reader, pytest.raises(ApiError) as raised:
        _read_all(reader)
    assert raised.value.result.status == 404
    assert "the server could not find the requested resource" in str(raised.value)


def _client_of(control_plane: ControlPlane, host: str) -> Any:
    api = api_client(control_plane.kubeconfig)
    api.configuration.host = host
    api.rest_client = type(api.rest_client)(api.configuration)
    return api


def test_a_forked_list_that_cannot_reach_the_server_says_why(
        control_plane: ControlPlane) -> None:
    api = _client_of(control_plane, "https://127.0.0.1:1")  # nothing listens there
    with ForkedList(api, SLICES) as reader, pytest.raises(ListReaderError) as raised:
        _read_all(reader)
    assert str(raised.value).startswith(f"GET {SLICES}: MaxRetryError")
    assert "Connection refused" in str(raised.value)


def test_a_forked_list_left_early_or_whose_reader_died_leaves_no_process(
        control_plane: ControlPlane, slices: tuple[str, dict[str, list[str]]]) -> None:
    selector = f"spec.driver={next(iter(slices[1]))}"
    before = _children()
    with ForkedList(api_client(control_plane.kubeconfig), SLICES, field_selector=selector,
                    limit=1) as reader:
        assert reader.next_items(wait=True) is not None
    assert _children() == before  # stopped and waited for, the other pages unread
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connects, never answers
        api = _client_of(control_plane, f"https://127.0.0.1:{silent.getsockname()[1]}")
        with ForkedList(api, SLICES) as reader:
            (child,) = _children() - before
            os.kill(child, signal.SIGKILL)
            with pytest.raises(ListReaderError, match="ended without its last page"):
                _read_all(reader)
    assert _children() == before
