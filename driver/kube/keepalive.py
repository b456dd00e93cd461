"""GETs on the prepare path over kept-alive HTTPS connections of their own.

The kubelet waits on every claim GET; the kubernetes client's call (request building,
urllib3's pool manager, http.client's response with its email-parser headers) cost about
0.4 ms of the 1.5 ms a claim GET took against a local API server. `KeepAlive` sends the
same request (the client's TLS settings, bearer token re-read as the client re-reads it,
User-Agent) on connections it keeps open, one per concurrent caller, and reads the
answer itself: an HTTP/1.1 response to a GET is a status line, header lines, and a body
of Content-Length bytes, in chunks, or up to the end of the connection (RFC 9112). A
connection the API server closed while idle is noticed by the next request on it, before
any byte of an answer, and the request is sent once more on a new connection (a GET
changes nothing). Proxies are not spoken here: with one configured, `keepalive` returns
None and callers keep the client's own path.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024  # bytes of status line and headers; the API server sends about 400
READ_SIZE = 256 * 1024


class HttpError(OSError):
    """The server's answer is not HTTP/1.x as this reader takes it."""


class _Closed(ConnectionError):
    """The connection ended before any byte of the answer: the server closed it while it
    sat idle (or before reading the request), so the request can go again."""


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


class _Connection:
    """One socket and the bytes read from it but not used yet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.used = 0  # bytes of `buffer` consumed

    def _fill(self) -> None:
        data = self.sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError("the API server closed the connection mid-answer")
        self.buffer += data

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n", self.used)) < 0:
            if len(self.buffer) - self.used > MAX_HEAD:
                raise HttpError(f"a line longer than {MAX_HEAD} bytes")
            self._fill()
        line = bytes(self.buffer[self.used:end])
        self.used = end + 2
        return line

    def _take(self, size: int) -> bytes:
        while len(self.buffer) - self.used < size:
            self._fill()
        data = bytes(self.buffer[self.used:self.used + size])
        self.used += size
        return data

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(f"chunk size {size_text!r} is not hex") from None
            if size == 0:
                while self._line():  # trailer fields, up to an empty line
                    pass
                return b"".join(parts)
            parts.append(self._take(size))
            if self._take(2) != b"\r\n":
                raise HttpError("a chunk does not end with CRLF")

    def _to_end(self) -> bytes:
        try:
            while True:
                self._fill()
        except ConnectionError:
            return self._take(len(self.buffer) - self.used)

    def exchange(self, request: bytes) -> tuple[Response, bool]:
        """Send `request`, read its answer; the answer and whether the connection stays
        usable."""
        del self.buffer[:self.used]
        self.used = 0
        try:
            self.sock.sendall(request)
            if not self.buffer:
                data = self.sock.recv(READ_SIZE)
                if not data:
                    raise _Closed("closed before the answer")
                self.buffer += data
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as err:
            raise _Closed(str(err)) from None
        version, _, rest = self._line().partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {version + b' ' + rest!r}")
        headers: dict[bytes, bytes] = {}
        while line := self._line():
            name, colon, value = line.partition(b":")
            if not colon:
                raise HttpError(f"not a header line: {line!r}")
            headers[name.strip().lower()] = value.strip().lower()
        connection = headers.get(b"connection", b"")
        keep = b"close" not in connection and (version == b"HTTP/1.1"
                                               or b"keep-alive" in connection)
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            body = self._chunked()
        elif (length := headers.get(b"content-length")) is not None:
            if not length.isdigit():
                raise HttpError(f"Content-Length {length!r} is not a number")
            body = self._take(int(length))
        elif code in (b"204", b"304"):
            body = b""
        else:
            body, keep = self._to_end(), False
        return Response(int(code), reason.decode("latin-1"), body), keep


class KeepAlive:
    """GET requests to the API server of a ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any) -> None:
        self._configuration = api_client.configuration
        self._server = _server(self._configuration)
        netloc = urlsplit(self._configuration.host).netloc
        self._fixed = (f"Host: {netloc}\r\nUser-Agent: {api_client.user_agent}\r\n"
                       "Accept: application/json\r\n")
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def get(self, path: str, timeout: float) -> Response:
        """GET `path` (JSON); OSError if it cannot be had."""
        auth = ""
        token = self._configuration.auth_settings().get("BearerToken")
        if token and token["value"]:
            auth = f"{token['key']}: {token['value']}\r\n"
        request = f"GET {path} HTTP/1.1\r\n{self._fixed}{auth}\r\n".encode()
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                return self._send(conn, request, timeout)
            except _Closed:
                pass  # closed by the server while idle: once more on a new connection
        return self._send(self._connect(timeout), request, timeout)

    def _send(self, conn: _Connection, request: bytes, timeout: float) -> Response:
        try:
            conn.sock.settimeout(timeout)
            response, keep = conn.exchange(request)
        except BaseException:
            conn.sock.close()
            raise
        if keep:
            with self._lock:
                self._idle.append(conn)
        else:
            conn.sock.close()
        return response

    def _connect(self, timeout: float) -> _Connection:
        server = self._server
        sock = socket.create_connection((server.host, server.port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if server.tls is not None:
                sock = server.tls.wrap_socket(sock, server_hostname=server.server_name)
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)


def keepalive(api_client: Any) -> KeepAlive | None:
    """A `KeepAlive` for the client's API server, None where the client goes through a
    proxy or checks the server's certificate for a name of its own (`assert_hostname`):
    then its own calls are the way."""
    configuration = api_client.configuration
    if configuration.proxy or isinstance(configuration.assert_hostname, str):
        return None
    return KeepAlive(api_client)
