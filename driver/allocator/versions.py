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
    least recently used dropped first: what bounds the caches kept across Allocators.

    A get moves its entry to the newest end only where it is in the older half (by
    count): one dict lookup for the few keys a decision asks for again and again, and an
    entry asked for at least once in every half a cache's worth of new entries is never
    the one dropped."""

    def __init__(self, size: int, weight: Callable[[V], int] = lambda _: 1) -> None:
        self.size = size
        self.weight = weight
        self.total = 0
        self._serial = 0  # entries made or moved to the newest end so far
        self._items: dict[K, tuple[V, int, int]] = {}  # value, weight, serial

    def get(self, key: K) -> V | None:
        items = self._items
        found = items.get(key)
        if found is None:
            return None
        if found[2] < self._serial - (len(items) >> 1):
            del items[key]
            items[key] = (found[0], found[1], self._serial)
            self._serial += 1
        return found[0]

    def put(self, key: K, value: V) -> V:
        old = self._items.pop(key, None)
        if old is not None:
            self.total -= old[1]
        weight = self.weight(value)
        self._items[key] = (value, weight, self._serial)
        self._serial += 1
        self.total += weight
        while self.total > self.size and len(self._items) > 1:
            self.total -= self._items.pop(next(iter(self._items)))[1]
        return value

    def __len__(self) -> int:
        return len(self._items)
