# cython: language_level=3
"""NVLink islands for driver/topology.py: a clique partition over 64-bit node bitsets.

Its one job; the allocation search is _alloc.pyx, and both take their bit helpers
from _bitset.pxd. Kept free of Python objects inside the loops; Python ints cross
the boundary only at entry and exit.
"""

from libc.stdint cimport uint64_t

from _bitset cimport lowest, popcount


cdef enum:
    MAX_NODES = 64


cdef void _max_clique(const uint64_t* adj, uint64_t chosen, uint64_t candidates,
                      uint64_t* best) noexcept nogil:
    """Branch and bound: grow `chosen` from `candidates`, keep the largest clique.

    Vertices are tried lowest index first and ties keep the first clique found,
    so the answer is deterministic.
    """
    cdef int v
    if popcount(chosen) + popcount(candidates) <= popcount(best[0]):
        return
    if candidates == 0:
        if popcount(chosen) > popcount(best[0]):
            best[0] = chosen
        return
    while candidates:
        if popcount(chosen) + popcount(candidates) <= popcount(best[0]):
            return
        v = lowest(candidates)
        candidates &= candidates - 1
        _max_clique(adj, chosen | (<uint64_t>1 << v), candidates & adj[v], best)


def clique_partition(list adjacency):
    """Partition nodes into cliques of a symmetric graph, largest clique first.

    `adjacency[i]` is the bitmask of the neighbours of node i (at most 64 nodes).
    The lowest unassigned node seeds each round; its largest clique among the
    unassigned nodes becomes one part. Returns the parts as bitmasks, in order.
    """
    cdef int n = len(adjacency)
    if n > MAX_NODES:
        raise ValueError(f"clique_partition: {n} nodes, at most {MAX_NODES}")
    cdef uint64_t adj[MAX_NODES]
    cdef uint64_t left = 0
    cdef uint64_t best
    cdef int i, v
    for i in range(n):
        adj[i] = <uint64_t>adjacency[i] & ~(<uint64_t>1 << i)
        left |= <uint64_t>1 << i
    parts = []
    while left:
        v = lowest(left)
        best = <uint64_t>1 << v
        with nogil:
            _max_clique(adj, <uint64_t>1 << v, adj[v] & left, &best)
        parts.append(best)
        left &= ~best
    return parts
