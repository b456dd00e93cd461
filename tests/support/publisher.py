"""The API server publisher in the e2e tier: one with its calls counted
(:func:`publisher_for`), its resync loop in a thread (:func:`resyncing`), and the pool as
the API server stores it (:func:`pool`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from driver.kube.api import api_request
from driver.resourceslice.build import MigMode
from driver.resourceslice.publish import ApiPublisher, PublishTiming, SlicePool
from tests.support.apiserver import SLICES, ControlPlane

DRIVER = "gpu.dra.dev"
WRITES = ("POST", "PUT", "PATCH", "DELETE")


def counted(api: Any) -> list[tuple[str, str]]:
    """Record every HTTP call ``api`` makes as (method, url): the publisher's own traffic."""
    calls: list[tuple[str, str]] = []
    real = api.call_api

    def call_api(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        calls.append((method, url))
        return real(method, url, *args, **kwargs)

    api.call_api = call_api
    return calls


def writes(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [c for c in calls if c[0] in WRITES]


def pool(api: Any, node: str) -> list[dict[str, Any]]:
    """This node's slices of our driver, as stored, by name."""
    body = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)
    return sorted(body["items"], key=lambda s: s["metadata"]["name"])


def consistent(slices: list[dict[str, Any]]) -> bool:
    """One generation, as many slices as each one says, no name twice."""
    names = [s["metadata"]["name"] for s in slices]
    return (len({s["spec"]["pool"]["generation"] for s in slices}) == 1
            and {s["spec"]["pool"]["resourceSliceCount"] for s in slices} == {len(slices)}
            and len(set(names)) == len(names))


@contextlib.contextmanager
def publisher_for(control_plane: ControlPlane, node: str, mig_mode: MigMode = "static",
                  timing: PublishTiming | None = None, *,
                  on_writes: Callable[[int], None] | None = None,
                  others_alive: Callable[[], bool] | None = None,
                  ) -> Iterator[tuple[ApiPublisher, list[tuple[str, str]]]]:
    """An ApiPublisher with its own API client (its calls counted); its pool is deleted
    afterwards."""
    api = control_plane.cluster.api_client()
    calls = counted(api)
    publisher = ApiPublisher(api, SlicePool(DRIVER, node, mig_mode), timing,
                             on_writes=on_writes, others_alive=others_alive)
    try:
        yield publisher, calls
    finally:
        publisher.cleanup()
        api.close()


@contextlib.contextmanager
def resyncing(publisher: ApiPublisher) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=publisher.run_resync, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "run_resync did not stop"
