"""Where the plugin reads claims: the API server (here a stand-in serving the
resource.k8s.io/v1 claim path over real HTTP through the official client) and the local
directory, with every way a claim can be unusable answered per claim."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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

    def __init__(self, protocol: str = "HTTP/1.0") -> None:
        super().__init__(("127.0.0.1", 0), type("Handler", (_Handler,),
                                                 {"protocol_version": protocol}))
        self.claims: dict[str, dict[str, Any]] = {}
        self.broken: set[str] = set()
        self.requests: list[str] = []
        self.connections: list[tuple[str, int]] = []  # client addresses, one per request
        self.tokens: list[str | None] = []  # each request's Authorization header
        self.hang_up = False  # close each connection after its answer, saying nothing

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
        self.server.connections.append(self.client_address)
        self.server.tokens.append(self.headers.get("Authorization"))
        self.close_connection = self.server.hang_up
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


@contextmanager
def serving(protocol: str = "HTTP/1.0") -> Iterator[ApiServer]:
    server = ApiServer(protocol)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def api_server() -> Iterator[ApiServer]:
    with serving() as server:
        yield server


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


def test_claims_are_read_on_one_kept_alive_connection_that_may_be_closed_meanwhile(
        ) -> None:
    """An HTTP/1.1 API server keeps the connection: the next GETs reuse it. When the server
    closes it while it sits idle (without a word, as a restarted API server or a load
    balancer does), the next GET still gets its claim, on a new connection."""
    with serving("HTTP/1.1") as server:
        claims = [server.add(c, claim_object(c, [result("gpu-0")]))
                  for c in (Claim("team-a", f"c{i}", new_uid()) for i in range(4))]
        source = ApiClaimSource(api_client(server.url))
        for claim in claims[:2]:
            assert source.get(ClaimRef(claim.namespace, claim.name, claim.uid))
        assert len(set(server.connections)) == 1
        server.hang_up = True  # the third GET's connection is closed after its answer
        for claim in claims[2:]:
            got = source.get(ClaimRef(claim.namespace, claim.name, claim.uid))
            assert got["metadata"]["uid"] == claim.uid
        # the fourth found it closed and went on a new one; no GET was answered twice
        assert len(server.requests) == 4
        assert len(set(server.connections)) == 2


def test_the_bearer_token_goes_with_each_get_as_the_client_has_it_then(
        api_server: ApiServer) -> None:
    """A projected service-account token rotates: the client's refresh hook gives the one
    to send, read again for every GET."""
    claim = api_server.add(c := Claim("team-a", "c", new_uid()), claim_object(c, []))
    client_ = api_client(api_server.url)
    tokens = iter(["first", "second"])

    def refresh(configuration: client.Configuration) -> None:
        configuration.api_key["BearerToken"] = next(tokens)

    client_.configuration.api_key["BearerToken"] = "expired"
    client_.configuration.api_key_prefix["BearerToken"] = "Bearer"
    client_.configuration.refresh_api_key_hook = refresh
    source = ApiClaimSource(client_)
    for _ in range(2):
        source.get(ClaimRef(claim.namespace, claim.name, claim.uid))
    assert api_server.tokens == ["Bearer first", "Bearer second"]


def test_with_a_proxy_set_the_claim_is_read_through_it(api_server: ApiServer) -> None:
    """A proxy (the kubeconfig's proxy-url, or HTTPS_PROXY) is the only way to the API
    server: the GET goes to it, as the Kubernetes client sends it."""
    configuration = client.Configuration(host="http://127.0.0.1:9",  # nothing listens
                                         proxy=api_server.url)
    client_ = client.ApiClient(configuration)
    ref = ClaimRef("team-a", "c", new_uid())
    with pytest.raises(ClaimError, match="not found"):  # the stand-in knows no such path
        ApiClaimSource(client_).get(ref)
    assert api_server.requests == [
        "http://127.0.0.1:9" + PATH.format(namespace=ref.namespace, name=ref.name)]


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
