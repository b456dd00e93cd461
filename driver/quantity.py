"""Kubernetes resource quantities, written the way the API server stores them.

The API server rewrites every quantity into its canonical form; writing the
canonical form ourselves makes a read-back compare equal, so an unchanged
inventory causes no writes.
"""

from __future__ import annotations

_DECIMAL_SUFFIXES = ["", "k", "M", "G", "T", "P", "E"]


def canonical(value: int) -> str:
    """A non-negative integer in canonical DecimalSI form: 8000 -> "8k"."""
    if value < 0:
        raise ValueError(f"quantity must not be negative: {value}")
    exponent = 0
    while value and value % 1000 == 0 and exponent < len(_DECIMAL_SUFFIXES) - 1:
        value //= 1000
        exponent += 1
    return f"{value}{_DECIMAL_SUFFIXES[exponent]}"
