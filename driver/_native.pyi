"""Types of driver._native, built from native/_native.pyx."""

def clique_partition(adjacency: list[int]) -> list[int]:
    """Partition nodes into cliques of a symmetric graph, largest clique first.

    `adjacency[i]` is the bitmask of the neighbours of node i (at most 64 nodes; more
    raise ValueError). Returns the parts as bitmasks, in order.
    """
