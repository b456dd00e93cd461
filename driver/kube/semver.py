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
    """`v1.2` -> `1.2.0`, as the K8s `semver(s, true)` function reads loose versions
    (apiserver's normalizeAndParse): a leading `v` dropped, leading zeros trimmed from
    the first three dot-separated parts, missing parts added as 0; a short version with
    a prerelease or build part is an error."""
    parts = text.removeprefix("v").split(".", 2)
    for index, part in enumerate(parts):
        if len(part) > 1:
            part = part.lstrip("0")
            parts[index] = part if part[:1].isdigit() else "0" + part
    if len(parts) < 3:
        if any(c in parts[-1] for c in "+-"):
            raise SemverError(f"{text!r}: short version cannot contain PreRelease/Build "
                              f"meta data")
        parts += ["0"] * (3 - len(parts))
    return ".".join(parts)
