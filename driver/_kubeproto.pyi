"""Types of driver._kubeproto, built from native/_kubeproto.pyx."""

from typing import Any

class ProtoError(ValueError):
    """Bytes that are not the message the table describes."""

class Decoder:
    """The field table, compiled; one decoder holds its caches across calls."""

    def __init__(
        self, table: dict[str, list[tuple[int, str, int, str | None, int, int, bool]]],
        shared: frozenset[str] = ...,
    ) -> None: ...
    def decode_object(self, data: bytes | memoryview) -> dict[str, Any]:
        """An API server's protobuf body: the dict of its object, with the apiVersion and
        kind its JSON has."""
