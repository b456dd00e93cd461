"""The Node event a plugin without nvidia-cdi-hook posts: what `kubectl describe node`
shows, and that an API server that cannot take it costs a warning, never the start."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import pytest

from driver.kube.events import node_event, post_node_event


class Response:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self._body = json.dumps(body).encode()

    def read(self) -> bytes:
        return self._body


class FakeApi:
    """The two calls `api_request` makes on a kubernetes ApiClient; answers `status`, or
    raises `error`."""

    def __init__(self, status: int = 201, error: Exception | None = None) -> None:
        self.status, self.error = status, error
        self.sent: list[tuple[str, str, Any]] = []

    def param_serialize(self, *, method: str, resource_path: str, body: Any,
                        **_: Any) -> tuple[Any, ...]:
        self.sent.append((method, resource_path, body))
        return method, resource_path, {}, body, []

    def call_api(self, *_: Any, **__: Any) -> Response:
        if self.error is not None:
            raise self.error
        return Response(self.status, {"message": "refused"} if self.status >= 400 else {})


def test_the_event_names_the_node_as_kubectl_describe_node_looks_it_up() -> None:
    event = node_event("gpu-node-1", "NvidiaCDIHookMissing", "no nvidia-cdi-hook",
                       "gpu.dra.dev", datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC))
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Node",
                                       "name": "gpu-node-1", "uid": "gpu-node-1"}
    assert (event["type"], event["reason"], event["message"]) == \
        ("Warning", "NvidiaCDIHookMissing", "no nvidia-cdi-hook")
    assert event["metadata"] == {"generateName": "gpu-node-1.", "namespace": "default"}
    assert event["source"] == {"component": "gpu.dra.dev", "host": "gpu-node-1"}
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-12-01T10:00:00Z"


def test_the_event_is_created_in_the_default_namespace() -> None:
    api = FakeApi()
    post_node_event(api, "gpu-node-1", "NvidiaCDIHookMissing", "no hook", "gpu.dra.dev")
    [(method, path, body)] = api.sent
    assert (method, path) == ("POST", "/api/v1/namespaces/default/events")
    assert body["reason"] == "NvidiaCDIHookMissing" and body["count"] == 1


@pytest.mark.parametrize("api", [FakeApi(status=403), FakeApi(error=TimeoutError("timed out"))])
def test_an_event_that_cannot_be_posted_is_a_warning_not_an_error(
        api: FakeApi, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="driver.kube.events"):
        post_node_event(api, "gpu-node-1", "NvidiaCDIHookMissing", "no hook", "gpu.dra.dev")
    assert "could not post the NvidiaCDIHookMissing event on node gpu-node-1" in caplog.text
