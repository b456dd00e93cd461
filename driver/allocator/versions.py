"""What is kept across Allocators: values derived from one version of an API object
(its uid and resourceVersion), as kube-scheduler's informer decodes each version once,
in bounded caches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar


def object_version(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(uid, resourceVersion) of an object read from the API server, else None (local
    files, tests: nothing derived from it is kept)."""
    meta = obj.get("metadata") or {}
    uid, version = meta.get("uid"), meta.get("resourceVersion")
    return (str(uid), str(version)) if uid and version else None


K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most `size` entries, the least recently used dropped first: what bounds the
    caches kept across Allocators."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        found = self._items.pop(key, None)
        if found is not None:
            self._items[key] = found
        return found

    def put(self, key: K, value: V) -> V:
        self._items[key] = value
        if len(self._items) > self.size:
            del self._items[next(iter(self._items))]
        return value

    def __len__(self) -> int:
        return len(self._items)
