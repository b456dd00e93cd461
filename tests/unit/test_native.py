"""The compiled kernel is what runs, and its clique partition is right."""

from __future__ import annotations

from itertools import combinations

from hypothesis import given
from hypothesis import strategies as st

import driver._native
from driver.inventory import topology


def test_native_module_is_a_compiled_shared_object() -> None:
    assert driver._native.__file__.endswith(".so")
    assert topology.clique_partition is driver._native.clique_partition


def _is_clique(mask: int, adjacency: list[int]) -> bool:
    nodes = [i for i in range(len(adjacency)) if mask >> i & 1]
    return all(adjacency[a] >> b & 1 for a, b in combinations(nodes, 2))


def _largest_clique_with(seed: int, allowed: int, adjacency: list[int]) -> int:
    others = [i for i in range(len(adjacency)) if allowed >> i & 1 and i != seed]
    for size in range(len(others), -1, -1):
        for group in combinations(others, size):
            mask = (1 << seed) | sum(1 << i for i in group)
            if _is_clique(mask, adjacency):
                return size + 1
    raise AssertionError("a single node is always a clique")


@st.composite
def graphs(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(min_value=1, max_value=9))
    adjacency = [0] * n
    for a, b in combinations(range(n), 2):
        if draw(st.booleans()):
            adjacency[a] |= 1 << b
            adjacency[b] |= 1 << a
    return adjacency


@given(graphs())
def test_parts_are_maximum_cliques_seeded_by_the_lowest_free_node(adjacency: list[int]) -> None:
    parts = driver._native.clique_partition(adjacency)
    left = (1 << len(adjacency)) - 1
    for part in parts:
        seed = (left & -left).bit_length() - 1
        assert part >> seed & 1, "each part contains the lowest unassigned node"
        assert part & ~left == 0, "parts are disjoint"
        assert _is_clique(part, adjacency)
        assert part.bit_count() == _largest_clique_with(seed, left, adjacency)
        left &= ~part
    assert left == 0, "every node is in a part"


def test_known_shapes() -> None:
    full8 = [0xFF] * 8
    assert driver._native.clique_partition(full8) == [0xFF]
    ring4 = [0b1010, 0b0101, 0b1010, 0b0101]
    assert driver._native.clique_partition(ring4) == [0b0011, 0b1100]
    assert driver._native.clique_partition([0, 0, 0]) == [1, 2, 4]


def test_more_than_64_nodes_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="at most 64"):
        driver._native.clique_partition([0] * 65)
