"""A paged list read by a forked child process, its pages handed over a pipe as they come.

`gpu-dra explain` on 1,000 dynamic-MIG nodes waits seconds for the API server to write
the slices and spends seconds more building each node's model from them. Read in this
process, the two add up: the server waits while a page is decoded and used, and a
reader thread would wait for the GIL after every TLS record (the list took 12-16x longer
beside a busy thread, docs/benchmarks.md). The child only reads: it asks for the next
page as soon as it has handed this one over, so the server writes page k+1 while this
process decodes and uses page k, each on its own core.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
from types import TracebackType
from typing import Any

from driver.atomicfile import write_all
from driver.errors import KubeError
from driver.kube.api import ApiError, ApiResult, decode_page, list_bodies

_FRAME = struct.Struct("<cQ")  # kind, length of what follows
_PROTOBUF, _JSON, _FAILED, _END = b"p", b"j", b"x", b"e"
_PIPE_BYTES = 1 << 20


class ListReaderError(KubeError):
    """The child reading the list failed other than with an HTTP status, or ended
    without its last page."""


class ForkedList:
    """The pages of one list, read by a child forked on entering; :meth:`next_items`
    hands them out in order. Enter it before the API client makes a call: the child
    must not share a connection with this process."""

    def __init__(self, api_client: Any, path: str, *, field_selector: str = "",
                 limit: int = 100, protobuf: bool = False) -> None:
        self._api = api_client
        self._path = path
        self._field_selector = field_selector
        self._limit = limit
        self._protobuf = protobuf
        self._pid = 0
        self._fd = -1
        self._header = bytearray()
        self._kind = b""
        self._size = -1  # of the body being read; -1 while its header is
        self._filled = 0
        # Every page's body is read into this one buffer (grown, never shrunk): a new
        # one per page would be fresh memory to fault in, 900 faults for a 3.6 MB page.
        self._body = bytearray()
        self._eof = False
        self._reaped = False
        self.done = False
        """Every page was handed out."""

    def __enter__(self) -> ForkedList:
        read, write = os.pipe()
        with contextlib.suppress(OSError):  # a smaller pipe only makes the child wait more
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os._exit(self._child(write))
        os.close(write)
        self._pid, self._fd = pid, read
        os.set_blocking(read, False)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        os.close(self._fd)
        if not self._reaped:
            if not self.done:  # left early: the child may still be reading
                os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)

    def next_items(self, wait: bool) -> list[dict[str, Any]] | None:
        """The next page's items as its JSON's dicts (protobuf's shared, see
        :func:`driver.kube.api.list_items`); None where it has not come yet and ``wait``
        is false, or where every page was handed out (``done``). :class:`ApiError` as
        the server answered the child, :class:`ListReaderError` for any other failure."""
        while not self.done:
            if self._read(wait):
                kind, body = self._kind, memoryview(self._body)[:self._size]
                self._size = -1
                if kind == _END:
                    self.done = True
                    return None
                if kind == _FAILED:
                    self.done = True
                    raise _failure(self._path, bytes(body))
                items: list[dict[str, Any]] = decode_page(body, kind == _PROTOBUF)["items"]
                return items
            if self._eof:
                _, status = os.waitpid(self._pid, 0)
                self.done = self._reaped = True
                raise ListReaderError(f"GET {self._path}: the list's reader ended without "
                                      f"its last page (wait status {status})")
            if not wait:
                return None
        return None

    def _read(self, wait: bool) -> bool:
        """What the pipe holds now toward the next frame (``wait``: waiting for a first
        byte); whether the frame is whole."""
        if wait:
            select.select([self._fd], [], [])
        while self._size < 0 or self._filled < self._size:
            try:
                if self._size < 0:
                    got = os.read(self._fd, _FRAME.size - len(self._header))
                    self._header += got
                    if len(self._header) == _FRAME.size:
                        self._kind, self._size = _FRAME.unpack(self._header)
                        self._header.clear()
                        self._filled = 0
                        if len(self._body) < self._size:
                            self._body = bytearray(self._size)
                    read = len(got)
                else:
                    read = os.readv(self._fd, [memoryview(self._body)[self._filled:self._size]])
                    self._filled += read
            except BlockingIOError:
                return False
            if not read:
                self._eof = True
                return False
        return True

    def _child(self, fd: int) -> int:
        """Every page's body into ``fd``, then the end, or what failed; the exit code."""
        os.set_blocking(fd, True)
        try:
            for raw, protobuf in list_bodies(self._api, self._path,
                                             field_selector=self._field_selector,
                                             limit=self._limit, protobuf=self._protobuf):
                _send(fd, _PROTOBUF if protobuf else _JSON, raw)
            _send(fd, _END, b"")
            return 0
        except BrokenPipeError:
            return 1  # the parent left
        except ApiError as err:
            result = err.result
            failure = {"status": result.status, "body": result.body}
        except BaseException as err:  # reported to the parent, which raises it
            failure = {"message": f"{type(err).__name__}: {err}"}
        with contextlib.suppress(OSError):
            _send(fd, _FAILED, json.dumps(failure, default=str).encode())
        return 1


def _send(fd: int, kind: bytes, body: bytes) -> None:
    write_all(fd, _FRAME.pack(kind, len(body)))
    write_all(fd, body)


def _failure(path: str, body: bytes) -> KubeError:
    failure = json.loads(body)
    if "status" in failure:
        return ApiError(ApiResult("GET", path, failure["status"], failure["body"]), (200,))
    return ListReaderError(f"GET {path}: {failure['message']}")
