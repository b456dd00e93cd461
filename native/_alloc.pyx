# cython: language_level=3
"""The allocation search over device bitsets: no Python objects inside the loop.

Same semantics as driver/allocator/reference.py (the upstream v1.37 search, first fit in
pool/slice/device order, combinations within a request), plus pruning that only
cuts subtrees holding no solution, so the first solution found is the same:
- count: fewer usable devices left in scan order than slots to fill;
- constraint groups: a matchAttribute value already fixed, or the group a first
  device would fix, has too few usable members left; a distinctAttribute has too
  few unused values left; devices lacking a constrained attribute are not usable;
- counters: at a request's first slot, fewer devices that fit the counters left
  than it needs.
A request whose candidates include a selector error is never pruned: upstream
would reach the error and stop with it.

`Prepared.run` returns a status (1 ok, 0 no solution, -1 result limit exceeded,
-2 error, -3 gave up: the work budget ran out before the search decided).
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset


cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil


cdef enum:
    OK = 1
    FAIL = 0
    MAXSIZE = -1
    ERROR = -2
    GAVEUP = -3
    MAX_RESULTS = 32
    NSCORE = 7


cdef struct State:
    # sizes
    int n, W, E, C, G, K, NC, ND, NI, NS
    # devices
    const uint64_t* base_inuse
    const int8_t* multi
    const int8_t* base_shared
    const int8_t* counted
    const int8_t* blocked
    const int32_t* dc_start
    const int32_t* dc_idx
    const int64_t* dc_amt
    const int64_t* counter_avail
    int64_t* counter_used
    const int64_t* dim_avail
    int64_t* dim_used
    int32_t* shares
    int32_t* alloc_any_count
    uint64_t* alloc_any        # W: allocating for any claim
    uint64_t* alloc_claim      # C*W: allocating for claim c
    # entries
    const int32_t* e_count
    const int8_t* e_all
    const int8_t* e_admin
    const int8_t* e_fa
    const int8_t* e_has_err
    const int8_t* e_has_multi
    const int8_t* c_safe       # the claim can never exceed the result limit
    const uint64_t* e_cand     # E*W
    const uint64_t* e_err      # E*W
    const int32_t* e_all_start
    const int32_t* e_all_idx
    const int8_t* e_all_soft
    const uint32_t* e_cmask
    const int32_t* e_cons_start
    const int32_t* cons_dev
    const int32_t* cons_dim
    const int64_t* cons_amt
    # claims and request groups
    const int32_t* c_gstart    # C+1
    const int32_t* g_estart    # G+1
    # constraints
    const int32_t* c_kstart    # C+1
    const int8_t* k_kind
    const int32_t* k_values    # K*n
    const int32_t* k_gstart    # K+1: value groups, each W words, in k_groups
    const uint64_t* k_groups
    const uint64_t* k_has      # K*W: devices that have the attribute
    int32_t* k_count           # match: devices in the set; distinct: values seen
    int32_t* k_value           # match: the fixed value
    int32_t* k_seen            # distinct: stack of seen values, n per constraint
    # results
    int32_t* pick_e            # C*MAX_RESULTS
    int32_t* pick_d
    int32_t* npicks
    int32_t* alts              # G
    # control
    int stop_claim             # the search ends after this claim (C, or one claim alone)
    int8_t* alone_fail         # C: the claim cannot be allocated even on its own
    int64_t nodes
    int64_t budget
    int optimize
    int prune
    int err_e, err_d, err_kind
    uint64_t* scratch          # depth-indexed bitsets: (MAX_RESULTS*C + 8) * W
    # topology
    const int32_t* island
    const int32_t* bandwidth
    const int32_t* numa
    const int32_t* pcie
    const int32_t* slice_set
    const uint32_t* slice_mask
    const uint32_t* set_free
    const uint32_t* set_full
    const int32_t* set_island
    const int32_t* island_free
    int has_best
    int64_t best[NSCORE]
    int32_t* best_pick_e
    int32_t* best_pick_d
    int32_t* best_npicks
    int32_t* best_alts


cdef inline int popcount(uint64_t x) noexcept nogil:
    return __builtin_popcountll(x)


cdef inline int count_bits(const uint64_t* a, int W) noexcept nogil:
    cdef int w, total = 0
    for w in range(W):
        total += popcount(a[w])
    return total


cdef inline bint test(const uint64_t* a, int d) noexcept nogil:
    return (a[d >> 6] >> (d & 63)) & 1


cdef inline void setbit(uint64_t* a, int d) noexcept nogil:
    a[d >> 6] |= (<uint64_t>1) << (d & 63)


cdef inline void clearbit(uint64_t* a, int d) noexcept nogil:
    a[d >> 6] &= ~((<uint64_t>1) << (d & 63))


cdef inline void clear_before(uint64_t* a, int W, int start) noexcept nogil:
    """Zero the bits of positions < start."""
    cdef int w
    for w in range(W):
        if (w + 1) * 64 <= start:
            a[w] = 0
        elif w * 64 < start:
            a[w] &= ~(((<uint64_t>1) << (start - w * 64)) - 1)


cdef inline bint in_use(State* s, int d) noexcept nogil:
    return test(s.base_inuse, d) or test(s.alloc_any, d)


cdef bint capacity_fits(State* s, int e, int d) noexcept nogil:
    cdef int i
    for i in range(s.e_cons_start[e], s.e_cons_start[e + 1]):
        if s.cons_dev[i] == d and s.dim_used[s.cons_dim[i]] + s.cons_amt[i] > s.dim_avail[s.cons_dim[i]]:
            return False
    return True


cdef void capacity_add(State* s, int e, int d, int sign) noexcept nogil:
    cdef int i
    for i in range(s.e_cons_start[e], s.e_cons_start[e + 1]):
        if s.cons_dev[i] == d:
            s.dim_used[s.cons_dim[i]] += sign * s.cons_amt[i]


cdef inline bint skips_counters(State* s, int d) noexcept nogil:
    return s.multi[d] and (s.base_shared[d] or s.shares[d] > 0)


cdef bint counters_fit(State* s, int d) noexcept nogil:
    cdef int i
    if s.blocked[d]:
        return False
    for i in range(s.dc_start[d], s.dc_start[d + 1]):
        if s.counter_used[s.dc_idx[i]] + s.dc_amt[i] > s.counter_avail[s.dc_idx[i]]:
            return False
    return True


cdef void counters_add(State* s, int d, int sign) noexcept nogil:
    cdef int i
    for i in range(s.dc_start[d], s.dc_start[d + 1]):
        s.counter_used[s.dc_idx[i]] += sign * s.dc_amt[i]


cdef bint constraint_add(State* s, int k, int d) noexcept nogil:
    cdef int value = s.k_values[k * s.n + d]
    cdef int i
    if value < 0:
        return False
    if s.k_kind[k] == 0:
        if s.k_count[k] > 0 and value != s.k_value[k]:
            return False
        if s.k_count[k] == 0:
            s.k_value[k] = value
        s.k_count[k] += 1
        return True
    for i in range(s.k_count[k]):
        if s.k_seen[k * s.n + i] == value:
            return False
    s.k_seen[k * s.n + s.k_count[k]] = value
    s.k_count[k] += 1
    return True


cdef inline void constraint_remove(State* s, int k) noexcept nogil:
    s.k_count[k] -= 1


cdef void rollback(State* s, int c, int e, int d, int added, bint reserved) noexcept nogil:
    """Undo the first `added` applicable constraints (each one is independent, so the
    order does not matter) and the counter reservation: the single rollback path."""
    cdef int k, removed = 0
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if removed >= added:
            break
        if (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            constraint_remove(s, k)
            removed += 1
    if reserved:
        counters_add(s, d, -1)


cdef int allocate(State* s, int c, int e, int d, bint must, bint soft_fail) noexcept nogil:
    """allocateDevice: 1 taken, 0 not, ERROR (must and a constraint fails)."""
    cdef bint multi = s.multi[d]
    cdef bint reserved = False
    cdef int k, added = 0
    if not multi and s.e_admin[e] and test(s.alloc_claim + c * s.W, d):
        return 0
    if not s.e_admin[e] and in_use(s, d):
        return 0
    if s.counted[d] and not skips_counters(s, d):
        if not counters_fit(s, d):
            return 0
        counters_add(s, d, 1)
        reserved = True
    if soft_fail:
        rollback(s, c, e, d, 0, reserved)
        return 0
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            if not constraint_add(s, k, d):
                rollback(s, c, e, d, added, reserved)
                if must:
                    s.err_e = e
                    s.err_d = d
                    s.err_kind = 2
                    return ERROR
                return 0
            added += 1
    if multi and not capacity_fits(s, e, d):
        rollback(s, c, e, d, added, reserved)
        return 0
    if multi:
        capacity_add(s, e, d, 1)
        s.shares[d] += 1
    else:
        setbit(s.alloc_claim + c * s.W, d)
        s.alloc_any_count[d] += 1
        setbit(s.alloc_any, d)
    s.pick_e[c * MAX_RESULTS + s.npicks[c]] = e
    s.pick_d[c * MAX_RESULTS + s.npicks[c]] = d
    s.npicks[c] += 1
    return 1


cdef void deallocate(State* s, int c, int e, int d) noexcept nogil:
    cdef int k, added = 0
    s.npicks[c] -= 1
    if s.multi[d]:
        s.shares[d] -= 1
        capacity_add(s, e, d, -1)
    else:
        clearbit(s.alloc_claim + c * s.W, d)
        s.alloc_any_count[d] -= 1
        if s.alloc_any_count[d] == 0:
            clearbit(s.alloc_any, d)
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            added += 1
    rollback(s, c, e, d, added, s.counted[d] and not skips_counters(s, d))


cdef int usable(State* s, int c, int e, int start, uint64_t* out) noexcept nogil:
    """Devices from `start` on that the rest of this request could take, as far as
    in-use, constraints and candidacy tell; returns how many."""
    cdef int W = s.W, w, k, v, i
    cdef const uint64_t* cand = s.e_cand + e * W
    cdef const uint64_t* claim_alloc = s.alloc_claim + c * W
    for w in range(W):
        if s.e_admin[e]:
            out[w] = cand[w] & ~claim_alloc[w]
        else:
            out[w] = cand[w] & ~s.base_inuse[w] & ~s.alloc_any[w]
    clear_before(out, W, start)
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if not (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            continue
        for w in range(W):
            out[w] &= s.k_has[k * W + w]
        if s.k_kind[k] == 0:
            if s.k_count[k] > 0:
                v = s.k_gstart[k] + s.k_value[k]
                for w in range(W):
                    out[w] &= s.k_groups[v * W + w]
        else:
            for i in range(s.k_count[k]):
                v = s.k_gstart[k] + s.k_seen[k * s.n + i]
                for w in range(W):
                    out[w] &= ~s.k_groups[v * W + w]
    return count_bits(out, W)


cdef bint distinct_short(State* s, int c, int e, const uint64_t* avail, int need) noexcept nogil:
    """A distinctAttribute of this request has fewer unused values among `avail`."""
    cdef int W = s.W, k, v, w, values
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if s.k_kind[k] != 1 or not (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            continue
        values = 0
        for v in range(s.k_gstart[k], s.k_gstart[k + 1]):
            for w in range(W):
                if s.k_groups[v * W + w] & avail[w]:
                    values += 1
                    break
        if values < need:
            return True
    return False


cdef int counter_fits_count(State* s, const uint64_t* avail) noexcept nogil:
    cdef int W = s.W, w, d, total = 0
    cdef uint64_t bits
    for w in range(W):
        bits = avail[w]
        while bits:
            d = w * 64 + __builtin_ctzll(bits)
            bits &= bits - 1
            if not s.counted[d] or skips_counters(s, d) or counters_fit(s, d):
                total += 1
    return total


cdef bint group_short(State* s, int c, int e, int d, const uint64_t* avail, int need,
                      uint64_t* tmp) noexcept nogil:
    """Picking d fixes a matchAttribute value whose group has too few usable devices
    after d to fill the remaining `need` slots."""
    cdef int W = s.W, k, v, w
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if s.k_kind[k] != 0 or s.k_count[k] > 0 or not (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            continue
        v = s.k_gstart[k] + s.k_values[k * s.n + d]
        for w in range(W):
            tmp[w] = avail[w] & s.k_groups[v * W + w]
        clear_before(tmp, W, d + 1)
        if count_bits(tmp, W) < need:
            return True
    return False


cdef bint fitting_at_least(State* s, const uint64_t* devices, int need) noexcept nogil:
    """At least `need` of `devices` fit the counters as they are now."""
    cdef int w, d, found = 0
    cdef uint64_t bits
    if need <= 0:
        return True
    for w in range(s.W):
        bits = devices[w]
        while bits:
            d = w * 64 + __builtin_ctzll(bits)
            bits &= bits - 1
            if not s.counted[d] or skips_counters(s, d) or counters_fit(s, d):
                found += 1
                if found >= need:
                    return True
    return False


cdef bint all_device_possible(State* s, int c, int e, int i) noexcept nogil:
    """Device i of an All request's list is not taken, tainted, or short of counters now
    (all of which only get worse along a search path)."""
    cdef int d = s.e_all_idx[i]
    if s.e_all_soft[i]:
        return False
    if s.e_admin[e]:
        if not s.multi[d] and test(s.alloc_claim + c * s.W, d):
            return False
    elif in_use(s, d):
        return False
    if s.counted[d] and not skips_counters(s, d) and not counters_fit(s, d):
        return False
    return True


cdef bint all_possible(State* s, int c, int e) noexcept nogil:
    """An All request can still take every one of its devices."""
    cdef int i
    if s.e_count[e] == 0:
        return False
    for i in range(s.e_all_start[e], s.e_all_start[e + 1]):
        if not all_device_possible(s, c, e, i):
            return False
    return True


cdef bint tail_infeasible(State* s, int c, int g, uint64_t* tmp, uint64_t* uni) noexcept nogil:
    """Some request from group g of claim c on cannot get its devices even if nothing
    more were allocated, or all of them together need more distinct devices than
    their candidates hold. Only requests upstream would reach without an error on
    the way are looked at: the lookahead stops at the first request with selector
    errors or an All request under a constraint, and at a claim that may exceed the
    result limit (where upstream's fallback depends on the search path)."""
    cdef int cc, gg, ee, w, k, v, best_need, need_sum = 0
    cdef bint feasible, exclusive, uni_ok = True
    cdef int W = s.W
    for w in range(W):
        uni[w] = 0
    for cc in range(c, s.stop_claim):
        if not s.c_safe[cc]:
            return False
        if s.alone_fail[cc]:
            return True
        for gg in range(g if cc == c else s.c_gstart[cc], s.c_gstart[cc + 1]):
            feasible = False
            exclusive = True
            best_need = 1 << 30
            for ee in range(s.g_estart[gg], s.g_estart[gg + 1]):
                if s.e_has_err[ee]:
                    return False
                if s.e_all[ee]:
                    exclusive = False
                    if s.e_cmask[ee]:
                        # Under a constraint an All request may end in an error, unless
                        # its first device already fails before constraints are checked.
                        if s.e_count[ee] > 0 and all_device_possible(
                                s, cc, ee, s.e_all_start[ee]):
                            return False
                    elif all_possible(s, cc, ee):
                        feasible = True
                    continue
                for w in range(W):
                    if s.e_admin[ee]:
                        tmp[w] = s.e_cand[ee * W + w] & ~s.alloc_claim[cc * W + w]
                    else:
                        tmp[w] = s.e_cand[ee * W + w] & ~s.base_inuse[w] & ~s.alloc_any[w]
                if cc == c:
                    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
                        if not (s.e_cmask[ee] >> (k - s.c_kstart[c])) & 1:
                            continue
                        for w in range(W):
                            tmp[w] &= s.k_has[k * W + w]
                        if s.k_kind[k] == 0 and s.k_count[k] > 0:
                            v = s.k_gstart[k] + s.k_value[k]
                            for w in range(W):
                                tmp[w] &= s.k_groups[v * W + w]
                if count_bits(tmp, W) >= s.e_count[ee] and fitting_at_least(
                        s, tmp, s.e_count[ee]):
                    feasible = True
                if s.e_admin[ee] or s.e_has_multi[ee]:
                    exclusive = False
                else:
                    for w in range(W):
                        uni[w] |= tmp[w]
                    if s.e_count[ee] < best_need:
                        best_need = s.e_count[ee]
            if not feasible:
                return True
            if exclusive and uni_ok:
                need_sum += best_need
                if count_bits(uni, W) < need_sum:
                    return True
            else:
                uni_ok = False
    return False


cdef int one(State* s, int c, int g, int a, int slot, bint in_sub, int start, int depth) noexcept nogil:
    """allocateOne."""
    cdef int e, d, result, alt, w, total, after, taken
    cdef bint all_exceeded, prune
    cdef uint64_t bits
    cdef uint64_t* avail
    cdef uint64_t* tmp
    s.nodes += 1
    if s.nodes > s.budget:
        return GAVEUP
    if c >= s.stop_claim:
        if not s.optimize:
            return OK
        keep(s)
        return FAIL
    if g >= s.c_gstart[c + 1]:
        result = one(s, c + 1, s.c_gstart[c + 1], 0, 0, False, 0, depth + 1)
        return FAIL if result == MAXSIZE else result
    if s.prune and not in_sub and slot == 0 and tail_infeasible(
            s, c, g, s.scratch + (2 * depth) * s.W, s.scratch + (2 * depth + 1) * s.W):
        return FAIL
    if not in_sub and s.e_fa[s.g_estart[g]]:
        all_exceeded = True
        for alt in range(s.g_estart[g + 1] - s.g_estart[g]):
            result = one(s, c, g, alt, 0, True, 0, depth + 1)
            if result == MAXSIZE:
                continue
            all_exceeded = False
            if result == ERROR or result == GAVEUP:
                return result
            if result == OK:
                s.alts[g] = alt
                return OK
        return MAXSIZE if all_exceeded else FAIL
    e = s.g_estart[g] + a
    if s.e_all[e] and s.e_count[e] == 0:
        return FAIL
    if slot >= s.e_count[e]:
        s.alts[g] = a
        return one(s, c, g + 1, 0, 0, False, 0, depth + 1)
    if s.e_count[e] - slot > MAX_RESULTS - s.npicks[c]:
        return MAXSIZE
    if s.e_all[e]:
        d = s.e_all_idx[s.e_all_start[e] + slot]
        taken = allocate(s, c, e, d, True, s.e_all_soft[s.e_all_start[e] + slot])
        if taken != 1:
            return ERROR if taken == ERROR else FAIL
        result = one(s, c, g, a, slot + 1, in_sub, 0, depth + 1)
        if result != OK:
            deallocate(s, c, e, d)
        return result
    avail = s.scratch + (2 * depth) * s.W
    tmp = s.scratch + (2 * depth + 1) * s.W
    prune = s.prune and (s.optimize or not s.e_has_err[e])
    # After a pick, what comes after this request may have become impossible.
    if prune and slot > 0 and tail_infeasible(s, c, g + 1, avail, tmp):
        return FAIL
    if prune:
        total = usable(s, c, e, start, avail)
        if total < s.e_count[e] - slot:
            return FAIL
        if distinct_short(s, c, e, avail, s.e_count[e] - slot):
            return FAIL
        if slot == 0 and counter_fits_count(s, avail) < s.e_count[e]:
            return FAIL
    else:
        for w in range(s.W):
            if s.e_admin[e]:
                avail[w] = (s.e_cand[e * s.W + w] | s.e_err[e * s.W + w]) & ~s.alloc_claim[c * s.W + w]
            else:
                avail[w] = (s.e_cand[e * s.W + w] | s.e_err[e * s.W + w]) & ~s.base_inuse[w] & ~s.alloc_any[w]
            if s.optimize:
                avail[w] &= ~s.e_err[e * s.W + w]
        clear_before(avail, s.W, start)
        total = count_bits(avail, s.W)
    after = total
    for w in range(s.W):
        bits = avail[w]
        while bits:
            d = w * 64 + __builtin_ctzll(bits)
            bits &= bits - 1
            after -= 1
            if not prune and test(s.e_err + e * s.W, d):
                s.err_e = e
                s.err_d = d
                s.err_kind = 1
                return ERROR
            if prune:
                if after < s.e_count[e] - slot - 1:
                    return FAIL
                if group_short(s, c, e, d, avail, s.e_count[e] - slot - 1, tmp):
                    continue
            elif not test(s.e_cand + e * s.W, d):
                continue
            if s.multi[d] and not capacity_fits(s, e, d):
                continue
            taken = allocate(s, c, e, d, False, False)
            if taken != 1:
                continue
            result = one(s, c, g, a, slot + 1, in_sub, d + 1, depth + 1)
            if result == OK:
                return OK
            deallocate(s, c, e, d)
            if result != FAIL:
                return result
    return FAIL


cdef void reset(State* s) noexcept nogil:
    """Back to nothing allocating (after a search that ended with a solution in place)."""
    memset(s.counter_used, 0, (s.NC + 1) * sizeof(int64_t))
    memset(s.dim_used, 0, (s.ND + 1) * sizeof(int64_t))
    memset(s.shares, 0, (s.n + 1) * sizeof(int32_t))
    memset(s.alloc_any_count, 0, (s.n + 1) * sizeof(int32_t))
    memset(s.alloc_any, 0, s.W * sizeof(uint64_t))
    memset(s.alloc_claim, 0, max(1, s.C) * s.W * sizeof(uint64_t))
    memset(s.k_count, 0, (s.K + 1) * sizeof(int32_t))
    memset(s.npicks, 0, max(1, s.C) * sizeof(int32_t))
    memset(s.alts, 0, max(1, s.G) * sizeof(int32_t))


cdef void claims_alone(State* s) noexcept nogil:
    """Search each claim of a multi-claim problem on its own, first fit, with a small
    budget: a claim that fails alone fails with any other claims allocated before it
    (they only take devices and counters away), so the lookahead may cut there."""
    cdef int c, result, optimize = s.optimize
    cdef int64_t budget = s.budget
    s.optimize = 0
    for c in range(s.C):
        s.stop_claim = c + 1
        s.budget = s.nodes + min(budget // (10 * s.C), 1000000)
        result = one(s, c, s.c_gstart[c], 0, 0, False, 0, 0)
        s.alone_fail[c] = result == FAIL
        reset(s)
    s.optimize = optimize
    s.budget = budget
    s.stop_claim = s.C
    s.err_e = -1
    s.err_d = -1
    s.err_kind = 0


cdef int largest_block(uint32_t free_mask, uint32_t full) noexcept nogil:
    cdef int slots = 0, size = 1, start
    cdef uint32_t block
    while full >> slots:
        slots += 1
    while size * 2 <= slots:
        size *= 2
    while size:
        block = ((<uint32_t>1) << size) - 1 if size < 32 else <uint32_t>0xFFFFFFFF
        start = 0
        while start + size <= slots:
            if (free_mask >> start) & block == block:
                return size
            start += size
        size //= 2
    return 0


cdef int distinct_count(const int32_t* values, const int32_t* devs, int m) noexcept nogil:
    """Distinct keys among devs; a device without a value (negative) is its own key."""
    cdef int i, j, total = 0
    cdef bint fresh
    for i in range(m):
        fresh = True
        for j in range(i):
            if devs[j] == devs[i] or (values[devs[i]] >= 0 and values[devs[j]] == values[devs[i]]):
                fresh = False
                break
        if fresh:
            total += 1
    return total


cdef void keep(State* s) noexcept nogil:
    """Score the current complete assignment (see allocator_ref.score); keep the best."""
    cdef int64_t sc[NSCORE]
    cdef int c, i, g, m, d, owner, isl, before, after
    cdef int32_t* devs
    cdef uint32_t used_mask
    cdef int32_t set_done[256]
    cdef int32_t island_loss[256]
    cdef int nsets_done = 0, j
    cdef bint seen, whole_free
    memset(sc, 0, sizeof(sc))
    memset(island_loss, 0, sizeof(island_loss))
    for g in range(s.G):
        sc[0] -= s.alts[g]
    for c in range(s.C):
        m = s.npicks[c]
        if m == 0:
            continue
        devs = s.pick_d + c * MAX_RESULTS
        sc[1] -= distinct_count(s.island, devs, m) - 1
        if m > 1:
            for i in range(m):
                sc[2] += s.bandwidth[devs[i]]
        sc[3] -= distinct_count(s.numa, devs, m) - 1
        sc[4] -= distinct_count(s.pcie, devs, m) - 1
    # MIG blocks: every touched set once, with the union of its picked slices.
    for c in range(s.C):
        for i in range(s.npicks[c]):
            owner = s.slice_set[s.pick_d[c * MAX_RESULTS + i]]
            if owner < 0:
                continue
            seen = False
            for j in range(nsets_done):
                if set_done[j] == owner:
                    seen = True
                    break
            if seen or nsets_done >= 256:
                continue
            set_done[nsets_done] = owner
            nsets_done += 1
            used_mask = 0
            for g in range(s.C):
                for m in range(s.npicks[g]):
                    d = s.pick_d[g * MAX_RESULTS + m]
                    if s.slice_set[d] == owner:
                        used_mask |= s.slice_mask[d]
            before = largest_block(s.set_free[owner], s.set_full[owner])
            after = largest_block(s.set_free[owner] & ~used_mask, s.set_full[owner])
            sc[5] += after * after - before * before
    # Islands: whole GPUs taken out of the free ones, each GPU (counter set) once.
    nsets_done = 0
    for c in range(s.C):
        for i in range(s.npicks[c]):
            d = s.pick_d[c * MAX_RESULTS + i]
            owner = s.slice_set[d]
            isl = s.island[d]
            if isl < 0 and owner >= 0:
                isl = s.set_island[owner]
            if isl < 0 or isl >= 256:
                continue
            whole_free = owner < 0 or s.set_free[owner] == s.set_full[owner]
            if owner >= 0:
                seen = False
                for j in range(nsets_done):
                    if set_done[j] == owner:
                        seen = True
                        break
                if seen:
                    continue
                if nsets_done < 256:
                    set_done[nsets_done] = owner
                    nsets_done += 1
            if whole_free:
                island_loss[isl] += 1
    for isl in range(min(s.NI, 256)):
        if island_loss[isl]:
            before = s.island_free[isl]
            after = before - island_loss[isl]
            sc[6] += after * after - before * before
    if s.has_best:
        for i in range(NSCORE):
            if sc[i] != s.best[i]:
                break
        else:
            return
        if sc[i] < s.best[i]:
            return
    s.has_best = 1
    memcpy(s.best, sc, sizeof(sc))
    memcpy(s.best_npicks, s.npicks, s.C * sizeof(int32_t))
    memcpy(s.best_pick_e, s.pick_e, s.C * MAX_RESULTS * sizeof(int32_t))
    memcpy(s.best_pick_d, s.pick_d, s.C * MAX_RESULTS * sizeof(int32_t))
    memcpy(s.best_alts, s.alts, s.G * sizeof(int32_t))


cdef const int8_t* _i8(object o) except NULL:
    cdef const int8_t[::1] v = o
    return &v[0]


cdef const int32_t* _i32(object o) except NULL:
    cdef const int32_t[::1] v = o
    return &v[0]


cdef const int64_t* _i64(object o) except NULL:
    cdef const int64_t[::1] v = o
    return &v[0]


cdef const uint32_t* _u32(object o) except NULL:
    cdef const uint32_t[::1] v = o
    return &v[0]


cdef const uint64_t* _u64(object o) except NULL:
    cdef const uint64_t[::1] v = o
    return &v[0]


# The arrays a `Prepared` reads (everything but what the ledger decides), by type.
_I8 = ("multi", "counted", "e_all", "e_admin", "e_fa", "e_has_err", "e_has_multi", "c_safe",
       "e_all_soft", "k_kind")
_I32 = ("dc_start", "dc_idx", "e_count", "e_all_start", "e_all_idx", "e_cons_start",
        "cons_dev", "cons_dim", "c_gstart", "g_estart", "c_kstart", "k_values", "k_gstart",
        "island", "bandwidth", "numa", "pcie", "slice_set", "set_island")
_I64 = ("dc_amt", "cons_amt")
_U32 = ("e_cmask", "slice_mask", "set_full")
_U64 = ("e_cand", "e_err", "k_groups", "k_has")


cdef class Dynamic:
    """What the allocated claims decide, as C arrays: devices in use, devices shared,
    devices blocked by an overdrawn pool, counters and capacities left, free MIG
    slices per GPU, free whole GPUs per NVLink island."""

    cdef uint64_t* base_inuse
    cdef int8_t* base_shared
    cdef int8_t* blocked
    cdef int64_t* counter_avail
    cdef int64_t* dim_avail
    cdef uint32_t* set_free
    cdef int32_t* island_free
    cdef int n, W, NC, ND, NS, NI

    def __cinit__(self, int n, int NC, int ND, int NS, int NI):
        self.n, self.W, self.NC, self.ND, self.NS, self.NI = n, max(1, (n + 63) // 64), NC, ND, NS, NI
        self.base_inuse = <uint64_t*>calloc(self.W, sizeof(uint64_t))
        self.base_shared = <int8_t*>calloc(max(1, n), sizeof(int8_t))
        self.blocked = <int8_t*>calloc(max(1, n), sizeof(int8_t))
        self.counter_avail = <int64_t*>calloc(max(1, NC), sizeof(int64_t))
        self.dim_avail = <int64_t*>calloc(max(1, ND), sizeof(int64_t))
        self.set_free = <uint32_t*>calloc(max(1, NS), sizeof(uint32_t))
        self.island_free = <int32_t*>calloc(max(1, NI), sizeof(int32_t))
        if (not self.base_inuse or not self.base_shared or not self.blocked
                or not self.counter_avail or not self.dim_avail or not self.set_free
                or not self.island_free):
            raise MemoryError()

    def __dealloc__(self):
        free(self.base_inuse)
        free(self.base_shared)
        free(self.blocked)
        free(self.counter_avail)
        free(self.dim_avail)
        free(self.set_free)
        free(self.island_free)


def dynamic(dict a):
    """The ledger's part of a packed problem (see driver/allocator/kernel.py)."""
    cdef const uint64_t[::1] base_inuse = a["base_inuse"]
    cdef const int8_t[::1] base_shared = a["base_shared"]
    cdef const int8_t[::1] blocked = a["blocked"]
    cdef const int64_t[::1] counter_avail = a["counter_avail"]
    cdef const int64_t[::1] dim_avail = a["dim_avail"]
    cdef const uint32_t[::1] set_free = a["set_free"]
    cdef const int32_t[::1] island_free = a["island_free"]
    cdef int n = a["n"]
    cdef Dynamic d = Dynamic(n, len(counter_avail), len(dim_avail), len(set_free),
                             len(island_free))
    memcpy(d.base_inuse, &base_inuse[0], d.W * sizeof(uint64_t))
    memcpy(d.base_shared, &base_shared[0], max(1, n) * sizeof(int8_t))
    memcpy(d.blocked, &blocked[0], max(1, n) * sizeof(int8_t))
    memcpy(d.counter_avail, &counter_avail[0], d.NC * sizeof(int64_t))
    memcpy(d.dim_avail, &dim_avail[0], d.ND * sizeof(int64_t))
    memcpy(d.set_free, &set_free[0], d.NS * sizeof(uint32_t))
    memcpy(d.island_free, &island_free[0], d.NI * sizeof(int32_t))
    return d


cdef class Tables:
    """One node's counters and topology as the ledger sees them, built once: from the
    devices the allocated claims hold, `state` computes a `Dynamic` in C.

    Devices are numbered as the search numbers them, then the devices of the same
    pools on other nodes (their allocations consume the pools' counters too). Only
    for nodes without devices that allow multiple allocations (base_shared and
    capacities stay empty)."""

    cdef int n, m, NC, NS, NI, npools
    cdef int32_t* x_start
    cdef int32_t* x_idx
    cdef int64_t* x_amt
    cdef int64_t* declared
    cdef int32_t* counter_pool
    cdef int32_t* dev_pool
    cdef int8_t* counted
    cdef int32_t* slot_start
    cdef int32_t* slot_bit
    cdef int32_t* slot_k
    cdef uint32_t* set_full
    cdef int32_t* slice_set
    cdef int32_t* member_start
    cdef int32_t* member_dev

    def __cinit__(self, int n, list uses, list declared, list counter_pool, list dev_pool,
                  list counted, list set_slots, list set_full, list slice_set, list islands):
        cdef int i, j, k, total
        self.n, self.m, self.NC = n, len(uses), len(declared)
        self.NS, self.NI = len(set_slots), len(islands)
        self.npools = max([p + 1 for p in counter_pool] + [p + 1 for p in dev_pool] + [1])
        total = sum(len(u) for u in uses)
        self.x_start = <int32_t*>calloc(self.m + 1, sizeof(int32_t))
        self.x_idx = <int32_t*>calloc(max(1, total), sizeof(int32_t))
        self.x_amt = <int64_t*>calloc(max(1, total), sizeof(int64_t))
        self.declared = <int64_t*>calloc(max(1, self.NC), sizeof(int64_t))
        self.counter_pool = <int32_t*>calloc(max(1, self.NC), sizeof(int32_t))
        self.dev_pool = <int32_t*>calloc(max(1, n), sizeof(int32_t))
        self.counted = <int8_t*>calloc(max(1, n), sizeof(int8_t))
        total = sum(len(s) for s in set_slots)
        self.slot_start = <int32_t*>calloc(self.NS + 1, sizeof(int32_t))
        self.slot_bit = <int32_t*>calloc(max(1, total), sizeof(int32_t))
        self.slot_k = <int32_t*>calloc(max(1, total), sizeof(int32_t))
        self.set_full = <uint32_t*>calloc(max(1, self.NS), sizeof(uint32_t))
        self.slice_set = <int32_t*>calloc(max(1, n), sizeof(int32_t))
        total = sum(len(members) for members in islands)
        self.member_start = <int32_t*>calloc(self.NI + 1, sizeof(int32_t))
        self.member_dev = <int32_t*>calloc(max(1, total), sizeof(int32_t))
        if (not self.x_start or not self.x_idx or not self.x_amt or not self.declared
                or not self.counter_pool or not self.dev_pool or not self.counted
                or not self.slot_start or not self.slot_bit or not self.slot_k
                or not self.set_full or not self.slice_set or not self.member_start
                or not self.member_dev):
            raise MemoryError()
        j = 0
        for i in range(self.m):
            for k, amount in uses[i]:
                self.x_idx[j] = k
                self.x_amt[j] = amount
                j += 1
            self.x_start[i + 1] = j
        for k in range(self.NC):
            self.declared[k] = declared[k]
            self.counter_pool[k] = counter_pool[k]
        for i in range(n):
            self.dev_pool[i] = dev_pool[i]
            self.counted[i] = 1 if counted[i] else 0
            self.slice_set[i] = slice_set[i]
        j = 0
        for i in range(self.NS):
            for bit, k in set_slots[i]:
                self.slot_bit[j] = bit
                self.slot_k[j] = k
                j += 1
            self.slot_start[i + 1] = j
            self.set_full[i] = set_full[i]
        j = 0
        for i in range(self.NI):
            for k in islands[i]:
                self.member_dev[j] = k
                j += 1
            self.member_start[i + 1] = j

    def __dealloc__(self):
        free(self.x_start)
        free(self.x_idx)
        free(self.x_amt)
        free(self.declared)
        free(self.counter_pool)
        free(self.dev_pool)
        free(self.counted)
        free(self.slot_start)
        free(self.slot_bit)
        free(self.slot_k)
        free(self.set_full)
        free(self.slice_set)
        free(self.member_start)
        free(self.member_dev)

    def state(self, list exclusive, list shared):
        """The `Dynamic` for claims holding `exclusive` devices whole and shares of
        `shared` ones (indexes as above; a device in both counts twice, as in
        NodeModel.problem); None where a counter leaves the kernel's range."""
        cdef Dynamic d = Dynamic(self.n, self.NC, 0, self.NS, self.NI)
        cdef int i, j, k, s
        cdef int64_t limit = (<int64_t>1) << 62
        cdef uint32_t bits
        cdef int8_t* negative = <int8_t*>calloc(self.npools, sizeof(int8_t))
        if not negative:
            raise MemoryError()
        try:
            memcpy(d.counter_avail, self.declared, self.NC * sizeof(int64_t))
            for held in (exclusive, shared):
                for i in held:
                    if i < 0 or i >= self.m:
                        raise IndexError(i)
                    for j in range(self.x_start[i], self.x_start[i + 1]):
                        d.counter_avail[self.x_idx[j]] -= self.x_amt[j]
            for i in exclusive:
                if i < self.n:
                    setbit(d.base_inuse, i)
            for k in range(self.NC):
                if not -limit < d.counter_avail[k] < limit:
                    return None
                if d.counter_avail[k] < 0:
                    negative[self.counter_pool[k]] = 1
            for i in range(self.n):
                d.blocked[i] = self.counted[i] and negative[self.dev_pool[i]]
            for s in range(self.NS):
                bits = 0
                for j in range(self.slot_start[s], self.slot_start[s + 1]):
                    if d.counter_avail[self.slot_k[j]] >= 1:
                        bits |= (<uint32_t>1) << self.slot_bit[j]
                d.set_free[s] = bits
            for k in range(self.NI):
                for j in range(self.member_start[k], self.member_start[k + 1]):
                    i = self.member_dev[j]
                    s = self.slice_set[i]
                    if not test(d.base_inuse, i) and (s < 0 or d.set_free[s] == self.set_full[s]):
                        d.island_free[k] += 1
            return d
        finally:
            free(negative)


cdef class Prepared:
    """A packed problem without the ledger's part, bound once: `run` searches it
    against any `Dynamic` of the same node."""

    cdef State t
    cdef list keep  # the arrays the pointers in t point into

    def __cinit__(self, dict a):
        memset(&self.t, 0, sizeof(State))
        self.keep = [a[k] for k in _I8 + _I32 + _I64 + _U32 + _U64]
        cdef State* s = &self.t
        s.n = a["n"]
        s.W = max(1, (s.n + 63) // 64)
        s.E = a["E"]
        s.K = a["K"]
        s.C = len(a["c_gstart"]) - 1
        s.G = len(a["g_estart"]) - 1
        s.multi = _i8(a["multi"])
        s.counted = _i8(a["counted"])
        s.dc_start = _i32(a["dc_start"])
        s.dc_idx = _i32(a["dc_idx"])
        s.dc_amt = _i64(a["dc_amt"])
        s.e_count = _i32(a["e_count"])
        s.e_all = _i8(a["e_all"])
        s.e_admin = _i8(a["e_admin"])
        s.e_fa = _i8(a["e_fa"])
        s.e_has_err = _i8(a["e_has_err"])
        s.e_has_multi = _i8(a["e_has_multi"])
        s.c_safe = _i8(a["c_safe"])
        s.e_cand = _u64(a["e_cand"])
        s.e_err = _u64(a["e_err"])
        s.e_all_start = _i32(a["e_all_start"])
        s.e_all_idx = _i32(a["e_all_idx"])
        s.e_all_soft = _i8(a["e_all_soft"])
        s.e_cmask = _u32(a["e_cmask"])
        s.e_cons_start = _i32(a["e_cons_start"])
        s.cons_dev = _i32(a["cons_dev"])
        s.cons_dim = _i32(a["cons_dim"])
        s.cons_amt = _i64(a["cons_amt"])
        s.c_gstart = _i32(a["c_gstart"])
        s.g_estart = _i32(a["g_estart"])
        s.c_kstart = _i32(a["c_kstart"])
        s.k_kind = _i8(a["k_kind"])
        s.k_values = _i32(a["k_values"])
        s.k_gstart = _i32(a["k_gstart"])
        s.k_groups = _u64(a["k_groups"])
        s.k_has = _u64(a["k_has"])
        s.island = _i32(a["island"])
        s.bandwidth = _i32(a["bandwidth"])
        s.numa = _i32(a["numa"])
        s.pcie = _i32(a["pcie"])
        s.slice_set = _i32(a["slice_set"])
        s.slice_mask = _u32(a["slice_mask"])
        s.set_full = _u32(a["set_full"])
        s.set_island = _i32(a["set_island"])

    def run(self, Dynamic d, int optimize, long long budget, int prune=1):
        """Returns (status, picks per claim as [(entry, device)], alternative per
        request, (error entry, error device, error kind), search steps, whether a
        best solution was kept)."""
        cdef State s = self.t
        cdef int status, c, i
        if d.n != s.n:
            raise ValueError(f"ledger state for {d.n} devices, problem of {s.n}")
        s.base_inuse = d.base_inuse
        s.base_shared = d.base_shared
        s.blocked = d.blocked
        s.counter_avail = d.counter_avail
        s.dim_avail = d.dim_avail
        s.set_free = d.set_free
        s.island_free = d.island_free
        s.NC = d.NC
        s.ND = d.ND
        s.NI = d.NI
        s.NS = d.NS
        s.budget = budget
        s.optimize = optimize
        s.prune = prune
        s.err_e = -1
        s.err_d = -1

        s.counter_used = <int64_t*>calloc(s.NC + 1, sizeof(int64_t))
        s.dim_used = <int64_t*>calloc(s.ND + 1, sizeof(int64_t))
        s.shares = <int32_t*>calloc(s.n + 1, sizeof(int32_t))
        s.alloc_any_count = <int32_t*>calloc(s.n + 1, sizeof(int32_t))
        s.alloc_any = <uint64_t*>calloc(s.W, sizeof(uint64_t))
        s.alloc_claim = <uint64_t*>calloc(max(1, s.C) * s.W, sizeof(uint64_t))
        s.k_count = <int32_t*>calloc(s.K + 1, sizeof(int32_t))
        s.k_value = <int32_t*>calloc(s.K + 1, sizeof(int32_t))
        s.k_seen = <int32_t*>calloc(max(1, s.K) * (s.n + 1), sizeof(int32_t))
        s.pick_e = <int32_t*>calloc(max(1, s.C) * MAX_RESULTS, sizeof(int32_t))
        s.pick_d = <int32_t*>calloc(max(1, s.C) * MAX_RESULTS, sizeof(int32_t))
        s.npicks = <int32_t*>calloc(max(1, s.C), sizeof(int32_t))
        s.alts = <int32_t*>calloc(max(1, s.G), sizeof(int32_t))
        # Recursion depth: one level per slot, request and claim, plus subrequest loops.
        cdef int depth_max = s.C * (MAX_RESULTS + 2) + 3 * s.G + 4
        s.scratch = <uint64_t*>calloc(2 * (depth_max + 1) * s.W, sizeof(uint64_t))
        s.best_pick_e = <int32_t*>calloc(max(1, s.C) * MAX_RESULTS, sizeof(int32_t))
        s.best_pick_d = <int32_t*>calloc(max(1, s.C) * MAX_RESULTS, sizeof(int32_t))
        s.best_npicks = <int32_t*>calloc(max(1, s.C), sizeof(int32_t))
        s.best_alts = <int32_t*>calloc(max(1, s.G), sizeof(int32_t))
        s.alone_fail = <int8_t*>calloc(max(1, s.C), sizeof(int8_t))
        s.stop_claim = s.C
        try:
            if (not s.counter_used or not s.dim_used or not s.shares or not s.alloc_any_count
                    or not s.alloc_any or not s.alloc_claim or not s.k_count or not s.k_value
                    or not s.k_seen or not s.pick_e or not s.pick_d or not s.npicks or not s.alts
                    or not s.scratch or not s.best_pick_e or not s.best_pick_d
                    or not s.best_npicks or not s.best_alts or not s.alone_fail):
                raise MemoryError()
            with nogil:
                if prune and s.C > 1:
                    claims_alone(&s)
                status = one(&s, 0, 0, 0, 0, False, 0, 0)
            if optimize:
                if s.has_best:
                    status = OK
                    memcpy(s.npicks, s.best_npicks, s.C * sizeof(int32_t))
                    memcpy(s.pick_e, s.best_pick_e, s.C * MAX_RESULTS * sizeof(int32_t))
                    memcpy(s.pick_d, s.best_pick_d, s.C * MAX_RESULTS * sizeof(int32_t))
                    memcpy(s.alts, s.best_alts, s.G * sizeof(int32_t))
                elif status != GAVEUP:
                    status = FAIL
            picks = []
            alts = []
            if status == OK:
                for c in range(s.C):
                    picks.append([(s.pick_e[c * MAX_RESULTS + i], s.pick_d[c * MAX_RESULTS + i])
                                  for i in range(s.npicks[c])])
                alts = [s.alts[i] for i in range(s.G)]
            return status, picks, alts, (s.err_e, s.err_d, s.err_kind), s.nodes, bool(s.has_best)
        finally:
            free(s.counter_used)
            free(s.dim_used)
            free(s.shares)
            free(s.alloc_any_count)
            free(s.alloc_any)
            free(s.alloc_claim)
            free(s.k_count)
            free(s.k_value)
            free(s.k_seen)
            free(s.pick_e)
            free(s.pick_d)
            free(s.npicks)
            free(s.alts)
            free(s.scratch)
            free(s.best_pick_e)
            free(s.best_pick_d)
            free(s.best_npicks)
            free(s.best_alts)
            free(s.alone_fail)


def run(dict a, int optimize, long long budget, int prune=1):
    """Search one packed problem (see driver/allocator/kernel.py for the layout):
    `Prepared(a).run(dynamic(a), ...)`."""
    return Prepared(a).run(dynamic(a), optimize, budget, prune)
