"""Exact Kubernetes quantities and semantic versions, as the allocator and CEL read them.

Counters and capacities are compared exactly, as the scheduler does with
`resource.Quantity`; floats would make `79.25Gi` minus three placements drift.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache
from math import ceil

_QUANTITY = re.compile(r"^([+-]?)(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_NANO = Fraction(1, 10**9)

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")


class QuantityError(ValueError):
    """Text that is not a Kubernetes quantity."""


@lru_cache(maxsize=4096)
def parse_quantity(text: str) -> Fraction:
    """`80Gi`, `1500m`, `1e3` -> the exact value; finer than 1n rounds up, like the API."""
    match = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise QuantityError(f"{text!r} is not a quantity (e.g. 40Gi, 1500m, 2)")
    sign, number, suffix = match.group(1), match.group(2), match.group(3) or ""
    value = Fraction(number)
    if suffix in _BINARY:
        value *= _BINARY[suffix]
    elif suffix in _DECIMAL:
        value *= Fraction(10) ** _DECIMAL[suffix]
    else:
        value *= Fraction(10) ** int(suffix[1:])
    if value.denominator != 1 and (value / _NANO).denominator != 1:
        value = ceil(value / _NANO) * _NANO
    return -value if sign == "-" else value


def format_quantity(value: Fraction) -> str:
    """The canonical text of an exact value: integers in DecimalSI, else milli or nano."""
    if value.denominator == 1:
        number = int(value)
        if number < 0:
            return "-" + format_quantity(Fraction(-number))
        exponent = 0
        while number and number % 1000 == 0 and exponent < 6:
            number //= 1000
            exponent += 1
        return f"{number}{['', 'k', 'M', 'G', 'T', 'P', 'E'][exponent]}"
    milli = value * 1000
    if milli.denominator == 1:
        return f"{int(milli)}m"
    return f"{ceil(value / _NANO)}n"


class SemverError(ValueError):
    """Text that is not a semantic version 2.0.0."""


@lru_cache(maxsize=4096)
def parse_semver(text: str) -> tuple[int, int, int, tuple[tuple[int, int | str], ...]]:
    """A sortable key: (major, minor, patch, prerelease). Build metadata does not order."""
    match = _SEMVER.match(text) if isinstance(text, str) else None
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
    match = re.match(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)$", text)
    if not match:
        return text
    major, minor, patch, rest = match.groups()
    return f"{int(major)}.{int(minor or 0)}.{int(patch or 0)}{rest}"
