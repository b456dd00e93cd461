"""What is kept across Allocators: values derived from one version of an API object
(its uid and resourceVersion), as kube-scheduler's informer decodes each version once,
in bounded caches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar


def object_version(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(uid, resourceVersion) of an object read from the API server, else None (local
    files, tests: nothing derived from it is kept)."""
    meta = obj.get("metadata")
    if not meta:
        return None
    uid, version = meta.get("uid"), meta.get("resourceVersion")
    if not (uid and version):
        return None
    return (uid if type(uid) is str else str(uid),
            version if type(version) is str else str(version))


K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Entries whose weights (`weight`, 1 each by default) sum to at most `size`, the
    least recently used dropped first: what bounds the caches kept across Allocators."""

    def __init__(self, size: int, weight: Callable[[V], int] = lambda _: 1) -> None:
        self.size = size
        self.weight = weight
        self.total = 0
        self._items: dict[K, tuple[V, int]] = {}

    def get(self, key: K) -> V | None:
        """The entry, made the most recent; one dict lookup where it already is (a
        decision asks for the same few keys again and again)."""
        items = self._items
        found = items.get(key)
        if found is None:
            return None
        if next(reversed(items)) != key:
            del items[key]
            items[key] = found
        return found[0]

    def put(self, key: K, value: V) -> V:
        old = self._items.pop(key, None)
        if old is not None:
            self.total -= old[1]
        weight = self.weight(value)
        self._items[key] = (value, weight)
        self.total += weight
        while self.total > self.size and len(self._items) > 1:
            self.total -= self._items.pop(next(iter(self._items)))[1]
        return value

    def __len__(self) -> int:
        return len(self._items)
