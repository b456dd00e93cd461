"""Where the plugin reads claims: the API server (here a stand-in serving the
resource.k8s.io/v1 claim path over real HTTP through the official client) and the local
directory, with every way a claim can be unusable answered per claim."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from driver.plugin.claims import ApiClaimSource, ClaimError, ClaimRef, DirClaimSource
from tests.support.plugin import (
    Claim,
    Node,
    Start,
    claim_object,
    new_uid,
    result,
)

PATH = "/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{name}"


class ApiServer(ThreadingHTTPServer):
    """Answers GET of ResourceClaims from `claims` (by path); `broken` paths answer 500."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.claims: dict[str, dict[str, Any]] = {}
        self.broken: set[str] = set()
        self.requests: list[str] = []

    def add(self, claim: Claim, obj: dict[str, Any]) -> Claim:
        self.claims[PATH.format(namespace=claim.namespace, name=claim.name)] = obj
        return claim

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path in self.server.broken:
            self._answer(500, {"kind": "Status", "message": "etcdserver: request timed out"})
        elif self.path in self.server.claims:
            self._answer(200, self.server.claims[self.path])
        else:
            self._answer(404, {"kind": "Status", "reason": "NotFound"})

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[ApiServer]:
    server = ApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def api_client(url: str) -> Any:
    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


def test_claims_from_the_api_server_each_answered_alone(node: Node, start: Start,
                                                        api_server: ApiServer) -> None:
    def claim(name: str) -> Claim:
        return Claim("team-a", name, new_uid())

    good = api_server.add(c := claim("good"), claim_object(c, [result("gpu-0")]))
    replaced = api_server.add(c := claim("replaced"), claim_object(
        Claim(c.namespace, c.name, new_uid()), [result("gpu-1")]))
    pending = api_server.add(c := claim("pending"), claim_object(c, [result("gpu-1")],
                                                                  allocated=False))
    gone = claim("gone")
    broken = claim("broken")
    api_server.broken.add(PATH.format(namespace="team-a", name="broken"))
    running = start(claims=ApiClaimSource(api_client(api_server.url)))
    answers = running.kubelet.prepare([good, replaced, pending, gone, broken])
    assert answers[good.uid].error == "" and answers[good.uid].devices[0]["device"] == "gpu-0"
    assert answers[replaced.uid].error.endswith("it was deleted and created again")
    assert answers[pending.uid].error == "ResourceClaim team-a/pending is not allocated"
    assert answers[gone.uid].error == "ResourceClaim team-a/gone not found"
    assert answers[broken.uid].error.startswith(
        "ResourceClaim team-a/broken: API server answered 500")
    assert PATH.format(namespace="team-a", name="good") in api_server.requests
    # prepared once, answered from the checkpoint afterwards: no second GET
    before = len(api_server.requests)
    running.kubelet.prepare([good])
    assert len(api_server.requests) == before


def test_an_unreachable_api_server_fails_the_claim_not_the_call() -> None:
    source = ApiClaimSource(api_client("http://127.0.0.1:9"), timeout=2)
    with pytest.raises(ClaimError, match="cannot reach the API server") as caught:
        source.get(ClaimRef("ns", "c", new_uid()))
    assert caught.value.reason == "api_error"


@pytest.mark.parametrize(("content", "reason", "message"), [
    (b"{not: [valid", "bad_claim", ": not YAML: "),
    (b"- just\n- a list\n", "bad_claim", "not a ResourceClaim object"),
    (b"x" * (3 * 1024 * 1024 + 1), "bad_claim", ": larger than 3145728 bytes"),
])
def test_unusable_claim_files_are_refused(tmp_path: Path, content: bytes, reason: str,
                                          message: str) -> None:
    ref = ClaimRef("ns", "c", new_uid())
    (tmp_path / "resourceclaims" / "ns").mkdir(parents=True)
    (tmp_path / "resourceclaims" / "ns" / "c.yaml").write_bytes(content)
    with pytest.raises(ClaimError, match=message) as caught:
        DirClaimSource(tmp_path).get(ref)
    assert caught.value.reason == reason
