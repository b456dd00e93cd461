"""Semantic versions as the allocator and CEL read them (Kubernetes' `semver()`)."""

from __future__ import annotations

import re
from functools import lru_cache

from driver.errors import KubeError

_SEMVER = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?")


class SemverError(KubeError, ValueError):
    """Text that is not a semantic version 2.0.0."""


@lru_cache(maxsize=4096)
def parse_semver(text: str) -> tuple[int, int, int, tuple[tuple[int, int | str], ...]]:
    """A sortable key: (major, minor, patch, prerelease). Build metadata does not order."""
    match = _SEMVER.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise SemverError(f"{text!r} is not a semantic version (e.g. 1.2.3)")
    pre = match.group(4)
    # A release sorts after all of its prereleases: an empty prerelease tuple gets a
    # sentinel that compares greater than any identifier.
    identifiers: tuple[tuple[int, int | str], ...] = (
        tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
        if pre else ((2, 0),))
    return int(match.group(1)), int(match.group(2)), int(match.group(3)), identifiers


def normalize_semver(text: str) -> str:
    """`v1.2` -> `1.2.0`, as the K8s `semver(s, true)` function reads loose versions."""
    match = re.fullmatch(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)", text)
    if not match:
        return text
    major, minor, patch, rest = match.groups()
    return f"{int(major)}.{int(minor or 0)}.{int(patch or 0)}{rest}"
