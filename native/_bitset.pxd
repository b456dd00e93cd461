# cython: language_level=3
# Bit helpers over device bitsets (arrays of 64-bit words, bit d of word d >> 6 is
# device d), shared by _alloc.pyx and _native.pyx through `from _bitset cimport ...`.
# All inline: nothing of this file is linked or imported at run time.

from libc.stdint cimport uint64_t


cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil


cdef inline int popcount(uint64_t x) noexcept nogil:
    return __builtin_popcountll(x)


cdef inline int lowest(uint64_t x) noexcept nogil:
    """Index of the lowest set bit of x (x != 0)."""
    return __builtin_ctzll(x)


cdef inline int count_bits(const uint64_t* a, int words) noexcept nogil:
    cdef int w, total = 0
    for w in range(words):
        total += popcount(a[w])
    return total


cdef inline bint test(const uint64_t* a, int d) noexcept nogil:
    return (a[d >> 6] >> (d & 63)) & 1


cdef inline void setbit(uint64_t* a, int d) noexcept nogil:
    a[d >> 6] |= (<uint64_t>1) << (d & 63)


cdef inline void clearbit(uint64_t* a, int d) noexcept nogil:
    a[d >> 6] &= ~((<uint64_t>1) << (d & 63))


cdef inline void clear_before(uint64_t* a, int words, int start) noexcept nogil:
    """Zero the bits of positions < start."""
    cdef int w
    for w in range(words):
        if (w + 1) * 64 <= start:
            a[w] = 0
        elif w * 64 < start:
            a[w] &= ~(((<uint64_t>1) << (start - w * 64)) - 1)
