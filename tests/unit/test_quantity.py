from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driver.kube.quantity import canonical

SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def test_canonical_examples() -> None:
    assert canonical(0) == "0"
    assert canonical(132) == "132"
    assert canonical(8000) == "8k"
    assert canonical(85899345920) == "85899345920"
    assert canonical(2 * 10**9) == "2G"
    assert canonical(10**21) == "1000E"


@given(st.integers(min_value=0, max_value=10**24))
def test_canonical_round_trips(value: int) -> None:
    text = canonical(value)
    number = text.rstrip("kMGTPE")
    assert int(number) * SUFFIX[text[len(number):]] == value
    assert not number.endswith("000") or text.endswith("E")


def test_negative_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        canonical(-1)
