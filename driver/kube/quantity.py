"""Kubernetes resource quantities: exact values, and the canonical text the API server
stores.

Counters and capacities are compared exactly, as the scheduler does with
`resource.Quantity`; floats would make `79.25Gi` minus three placements drift. Writing
the canonical form makes a read-back compare equal, so an unchanged inventory causes no
writes.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache
from math import ceil

from driver.errors import KubeError

_QUANTITY = re.compile(r"([+-]?)(\d+\.?\d*|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_NANO = Fraction(1, 10**9)

class QuantityError(KubeError, ValueError):
    """Text that is not a Kubernetes quantity."""


@lru_cache(maxsize=4096)
def parse_quantity(text: str) -> Fraction:
    """`80Gi`, `1500m`, `1e3` -> the exact value; finer than 1n rounds up, like the API."""
    match = _QUANTITY.fullmatch(text) if isinstance(text, str) else None
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


def canonical(value: int) -> str:
    """A non-negative integer in canonical DecimalSI form: 8000 -> "8k"."""
    if value < 0:
        raise ValueError(f"quantity must not be negative: {value}")
    return format_quantity(Fraction(value))
