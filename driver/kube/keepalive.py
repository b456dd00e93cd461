"""GETs on the prepare path over kept-alive HTTPS connections of the standard library.

The kubelet waits on every claim GET; the kubernetes client's call (request building,
urllib3's pool manager, its response wrapper) cost about 0.2-0.3 ms of the 1.4 ms a claim
GET took against a local API server. `KeepAlive` sends the same request (the client's
TLS settings, bearer token re-read as the client re-reads it, User-Agent) on
`http.client` connections it keeps open, one per concurrent caller. A connection the
API server closed while idle is noticed by the next request on it, which is sent once
more on a new connection (a GET changes nothing). Proxies are not spoken here: with one
configured, `keepalive` returns None and callers keep the client's own path.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# what a reused connection that the server closed meanwhile raises before any answer
_STALE = (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionError,
          ssl.SSLEOFError)


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes


@dataclass(frozen=True)
class _Server:
    """Where and how to connect: address, TLS context (None: plain HTTP), SNI name."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    server_name: str


def _server(configuration: Any) -> _Server:
    url = urlsplit(configuration.host)
    host = url.hostname or "localhost"
    if url.scheme != "https":
        return _Server(host, url.port or 80, None, host)
    tls = ssl.create_default_context(cafile=configuration.ssl_ca_cert,
                                     cadata=getattr(configuration, "ca_cert_data", None))
    if not configuration.verify_ssl:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    elif configuration.assert_hostname is False:
        tls.check_hostname = False
    if configuration.cert_file:
        tls.load_cert_chain(configuration.cert_file, configuration.key_file)
    return _Server(host, url.port or 443, tls, configuration.tls_server_name or host)


class KeepAlive:
    """GET requests to the API server of a ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any) -> None:
        self._configuration = api_client.configuration
        self._server = _server(self._configuration)
        self._user_agent = api_client.user_agent
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def get(self, path: str, timeout: float) -> Response:
        """GET `path` (JSON); OSError or http.client.HTTPException if it cannot be had."""
        headers = {"Accept": "application/json", "User-Agent": self._user_agent}
        token = self._configuration.auth_settings().get("BearerToken")
        if token and token["value"]:
            headers[token["key"]] = token["value"]
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                return self._send(conn, path, headers, timeout)
            except _STALE:
                pass  # closed by the server while idle: once more on a new connection
        return self._send(self._connect(timeout), path, headers, timeout)

    def _send(self, conn: http.client.HTTPConnection, path: str, headers: dict[str, str],
              timeout: float) -> Response:
        try:
            conn.sock.settimeout(timeout)
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        return Response(response.status, response.reason, body)

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        server = self._server
        sock = socket.create_connection((server.host, server.port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if server.tls is not None:
                sock = server.tls.wrap_socket(sock, server_hostname=server.server_name)
        except BaseException:
            sock.close()
            raise
        conn = http.client.HTTPConnection(server.host, server.port, timeout)
        conn.sock = sock
        return conn

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def keepalive(api_client: Any) -> KeepAlive | None:
    """A `KeepAlive` for the client's API server, None where the client goes through a
    proxy or checks the server's certificate for a name of its own (`assert_hostname`):
    then its own calls are the way."""
    configuration = api_client.configuration
    if configuration.proxy or isinstance(configuration.assert_hostname, str):
        return None
    return KeepAlive(api_client)
