"""Raw calls to the Kubernetes API: any JSON in, JSON out, status code kept.

The typed client validates bodies against its own models before sending; going
around it lets the API server alone judge an object (what the server accepts is
the point when publishing slices) and keeps fields newer than the client intact.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from driver.errors import KubeError
from driver.gcpause import collector_paused
from driver.kube import protolist
from driver.kube.protolist import PROTOBUF

T = TypeVar("T")


class ApiError(KubeError, RuntimeError):
    """An API call answered with an unexpected HTTP status."""

    def __init__(self, result: ApiResult, expected: Sequence[int]) -> None:
        message = result.body.get("message") if isinstance(result.body, dict) else result.body
        super().__init__(f"{result.method} {result.path}: HTTP {result.status} "
                         f"(expected {', '.join(map(str, expected))}): {message}")
        self.result = result


@dataclass(frozen=True)
class ApiResult:
    """Status code and decoded JSON body of one API call."""

    method: str
    path: str
    status: int
    body: Any

    def expect(self, *codes: int) -> Any:
        """The body if the status is one of ``codes`` (any 2xx when none given)."""
        ok = self.status in codes if codes else 200 <= self.status < 300
        if not ok:
            raise ApiError(self, codes or (200,))
        return self.body


def api_call(api_client: Any, method: str, path: str, body: Any = None, *,
             query: Mapping[str, str] | None = None, content_type: str = "application/json",
             timeout: float | tuple[float, float] = 30.0,
             accept: str = "application/json") -> Any:
    """The client's response to one raw call (``status``, ``reason``, ``headers``,
    ``read()``; the open urllib3 response as ``response``), its body not read yet. Raw
    calls never load the client's generated API classes and models: a smaller image, a
    faster start."""
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = content_type
    m, url, hdrs, data, post = api_client.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        # The client's bearer token (in-cluster or kubeconfig), re-read when it rotates;
        # without this only client certificates would authenticate the call.
        auth_settings=["BearerToken"],
    )
    return api_client.call_api(m, url, header_params=hdrs, body=data, post_params=post,
                               _request_timeout=timeout)


def api_request(
    api_client: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    query: Mapping[str, str] | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> ApiResult:
    """One raw call through a ``kubernetes.client.ApiClient``: any JSON in, JSON out.

    The typed client validates bodies with its own (pydantic) models before sending;
    going around it lets the API server alone judge an object, which is the point when
    testing what the server accepts, and keeps fields newer than the client intact.
    """
    resp = api_call(api_client, method, path, body, query=query, content_type=content_type,
                    timeout=timeout)
    return ApiResult(method=method, path=path, status=int(resp.status), body=_body(resp.read()))


def _body(raw: bytes) -> Any:
    """A response body as JSON, else as text (an error page), None when empty."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


def api_watch(api_client: Any, path: str, query: Mapping[str, str],
              timeout: tuple[float, float]) -> tuple[int, str, Any]:
    """A watch of ``path`` (``watch=true`` is added): the HTTP status, its reason and the
    open urllib3 response whose lines are the events (raw, see :func:`api_call`)."""
    resp = api_call(api_client, "GET", path, query={**query, "watch": "true"}, timeout=timeout)
    return int(resp.status), str(resp.reason), resp.response


def api_client(kubeconfig: Path | None) -> Any:
    """A client for the kubeconfig's current context, else the pod's in-cluster config."""
    from kubernetes import client, config

    if kubeconfig is not None:
        return config.new_client_from_config(str(kubeconfig))
    config.load_incluster_config()
    return client.ApiClient()


def list_items(api_client: Any, path: str, *, field_selector: str = "",
               limit: int = 500, protobuf: bool = False) -> list[dict[str, Any]]:
    """Every item of a collection as its JSON's dicts, page by page (see
    :func:`list_pages`).

    ``protobuf``: ask for Kubernetes protobuf first, for a list that
    :mod:`driver.kube.protolist` decodes (ResourceSlices): the same dicts, the bytes
    about twice as fast for the server to write, and dicts of repeated small messages
    shared (read them, never change them); JSON where the server answers JSON."""
    items: list[dict[str, Any]] = []
    for _, page in _pages(api_client, path, field_selector, limit, _accept(protobuf), _decoded):
        items += page["items"]
    return items


def list_pages(api_client: Any, path: str, *, field_selector: str = "",
               limit: int = 500) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Each page of a collection's list (``limit``/``continue``): its raw JSON body, for
    a caller that passes the bytes on, and the body decoded. Asking for the next page
    while this one is decoded gave nothing against a local API server on 2 cores
    (docs/benchmarks.md), so the pages are read one after the other."""
    return _pages(api_client, path, field_selector, limit, "application/json", _decoded)


def list_bodies(api_client: Any, path: str, *, field_selector: str = "", limit: int = 500,
                protobuf: bool = False) -> Iterator[tuple[bytes, bool]]:
    """Each page's raw body and whether it is protobuf (:func:`decode_page` decodes it),
    nothing of it read but its continue token: for a reader that hands the bytes to
    another process (:mod:`driver.kube.forkedlist`)."""
    return _pages(api_client, path, field_selector, limit, _accept(protobuf), _undecoded)


def decode_page(raw: bytes | memoryview, protobuf: bool) -> dict[str, Any]:
    """A page's body as its JSON's dicts (see :func:`list_items` for protobuf's)."""
    with collector_paused():  # decoding makes no cycles
        page: dict[str, Any] = protolist.decode(raw) if protobuf else orjson.loads(raw)
    return page


def _accept(protobuf: bool) -> str:
    return f"{PROTOBUF}, application/json" if protobuf else "application/json"


def _decoded(raw: bytes, protobuf: bool) -> tuple[tuple[bytes, dict[str, Any]], str]:
    page = decode_page(raw, protobuf)
    return (raw, page), _continue(page)


def _undecoded(raw: bytes, protobuf: bool) -> tuple[tuple[bytes, bool], str]:
    return (raw, protobuf), _continue(protolist.decode_head(raw) if protobuf
                                      else orjson.loads(raw))


def _continue(page: dict[str, Any]) -> str:
    """A list's continue token; "" on its last page."""
    token: str = (page.get("metadata") or {}).get("continue") or ""
    return token


def _pages(api_client: Any, path: str, field_selector: str, limit: int, accept: str,
           read: Callable[[bytes, bool], tuple[T, str]]) -> Iterator[T]:
    """What ``read`` makes of each page's body (JSON or protobuf, by its Content-Type),
    following the continue token it returns; an :class:`ApiError` for any status but
    200."""
    query = {"limit": str(limit)}
    if field_selector:
        query["fieldSelector"] = field_selector
    while True:
        resp = api_call(api_client, "GET", path, query=query, accept=accept)
        raw = bytes(resp.read())
        protobuf = str(resp.headers.get("Content-Type", "")).startswith(PROTOBUF)
        if int(resp.status) != 200:
            body = protolist.decode(raw) if protobuf else _body(raw)
            raise ApiError(ApiResult("GET", path, int(resp.status), body), (200,))
        value, token = read(raw, protobuf)
        yield value
        if not token:
            return
        query = {**query, "continue": token}
