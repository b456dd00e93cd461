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

What driver/allocator/kernel.py hands over: the cdef classes DeviceArrays, ClaimArrays
and Dynamic below (typed fields; keyword constructors, ClaimArrays made by
`pack_claims`). The names of the sizes, the statuses and the search's State:
_alloc_types.pxd; the bit helpers: _bitset.pxd. Each owner of C arrays (a search run,
a `Dynamic`, a `Tables`) allocates them as one block.

`Prepared.run` returns a status (1 ok, 0 no solution, -1 result limit exceeded,
-2 error, -3 gave up: the work budget ran out before the search decided).
"""

from libc.stdint cimport int8_t, int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from cpython.array cimport array, clone

from _alloc_types cimport (
    ERROR, FAIL, GAVEUP, MAX_RESULTS, MAXSIZE, NSCORE, OK, State)
from _bitset cimport clear_before, clearbit, count_bits, lowest, popcount, setbit, test


cdef inline bint in_use(State* s, int d) noexcept nogil:
    return test(s.base_inuse, d) or test(s.alloc_any, d)


cdef bint capacity_fits(State* s, int e, int d) noexcept nogil:
    cdef int i
    for i in range(s.e_cons_start[e], s.e_cons_start[e + 1]):
        if (s.cons_dev[i] == d
                and s.dim_used[s.cons_dim[i]] + s.cons_amt[i] > s.dim_avail[s.cons_dim[i]]):
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
    cdef int value = s.k_values[k * s.n_devices + d]
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
        if s.k_seen[k * s.n_devices + i] == value:
            return False
    s.k_seen[k * s.n_devices + s.k_count[k]] = value
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
    if not multi and s.e_admin[e] and test(s.alloc_claim + c * s.words, d):
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
        setbit(s.alloc_claim + c * s.words, d)
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
        clearbit(s.alloc_claim + c * s.words, d)
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
    cdef int words = s.words, w, k, v, i
    cdef const uint64_t* cand = s.e_cand + e * words
    cdef const uint64_t* claim_alloc = s.alloc_claim + c * words
    for w in range(words):
        if s.e_admin[e]:
            out[w] = cand[w] & ~claim_alloc[w]
        else:
            out[w] = cand[w] & ~s.base_inuse[w] & ~s.alloc_any[w]
    clear_before(out, words, start)
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if not (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            continue
        for w in range(words):
            out[w] &= s.k_has[k * words + w]
        if s.k_kind[k] == 0:
            if s.k_count[k] > 0:
                v = s.k_gstart[k] + s.k_value[k]
                for w in range(words):
                    out[w] &= s.k_groups[v * words + w]
        else:
            for i in range(s.k_count[k]):
                v = s.k_gstart[k] + s.k_seen[k * s.n_devices + i]
                for w in range(words):
                    out[w] &= ~s.k_groups[v * words + w]
    return count_bits(out, words)


cdef bint distinct_short(State* s, int c, int e, const uint64_t* avail, int need) noexcept nogil:
    """A distinctAttribute of this request has fewer unused values among `avail`."""
    cdef int words = s.words, k, v, w, values
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if s.k_kind[k] != 1 or not (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            continue
        values = 0
        for v in range(s.k_gstart[k], s.k_gstart[k + 1]):
            for w in range(words):
                if s.k_groups[v * words + w] & avail[w]:
                    values += 1
                    break
        if values < need:
            return True
    return False


cdef int counter_fits_count(State* s, const uint64_t* avail) noexcept nogil:
    cdef int words = s.words, w, d, total = 0
    cdef uint64_t bits
    for w in range(words):
        bits = avail[w]
        while bits:
            d = w * 64 + lowest(bits)
            bits &= bits - 1
            if not s.counted[d] or skips_counters(s, d) or counters_fit(s, d):
                total += 1
    return total


cdef bint group_short(State* s, int c, int e, int d, const uint64_t* avail, int need,
                      uint64_t* tmp) noexcept nogil:
    """Picking d fixes a matchAttribute value whose group has too few usable devices
    after d to fill the remaining `need` slots."""
    cdef int words = s.words, k, v, w
    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
        if s.k_kind[k] != 0 or s.k_count[k] > 0 or not (s.e_cmask[e] >> (k - s.c_kstart[c])) & 1:
            continue
        v = s.k_gstart[k] + s.k_values[k * s.n_devices + d]
        for w in range(words):
            tmp[w] = avail[w] & s.k_groups[v * words + w]
        clear_before(tmp, words, d + 1)
        if count_bits(tmp, words) < need:
            return True
    return False


cdef bint fitting_at_least(State* s, const uint64_t* devices, int need) noexcept nogil:
    """At least `need` of `devices` fit the counters as they are now."""
    cdef int w, d, found = 0
    cdef uint64_t bits
    if need <= 0:
        return True
    for w in range(s.words):
        bits = devices[w]
        while bits:
            d = w * 64 + lowest(bits)
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
        if not s.multi[d] and test(s.alloc_claim + c * s.words, d):
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
    cdef int words = s.words
    for w in range(words):
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
                for w in range(words):
                    if s.e_admin[ee]:
                        tmp[w] = s.e_cand[ee * words + w] & ~s.alloc_claim[cc * words + w]
                    else:
                        tmp[w] = s.e_cand[ee * words + w] & ~s.base_inuse[w] & ~s.alloc_any[w]
                if cc == c:
                    for k in range(s.c_kstart[c], s.c_kstart[c + 1]):
                        if not (s.e_cmask[ee] >> (k - s.c_kstart[c])) & 1:
                            continue
                        for w in range(words):
                            tmp[w] &= s.k_has[k * words + w]
                        if s.k_kind[k] == 0 and s.k_count[k] > 0:
                            v = s.k_gstart[k] + s.k_value[k]
                            for w in range(words):
                                tmp[w] &= s.k_groups[v * words + w]
                if count_bits(tmp, words) >= s.e_count[ee] and fitting_at_least(
                        s, tmp, s.e_count[ee]):
                    feasible = True
                if s.e_admin[ee] or s.e_has_multi[ee]:
                    exclusive = False
                else:
                    for w in range(words):
                        uni[w] |= tmp[w]
                    if s.e_count[ee] < best_need:
                        best_need = s.e_count[ee]
            if not feasible:
                return True
            if exclusive and uni_ok:
                need_sum += best_need
                if count_bits(uni, words) < need_sum:
                    return True
            else:
                uni_ok = False
    return False


cdef int one(State* s, int c, int g, int a, int slot, bint in_sub, int start,
             int depth) noexcept nogil:
    """allocateOne."""
    cdef int e, d, result, alt, w, total, after, taken, words = s.words
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
            s, c, g, s.scratch + (2 * depth) * words, s.scratch + (2 * depth + 1) * words):
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
    avail = s.scratch + (2 * depth) * words
    tmp = s.scratch + (2 * depth + 1) * words
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
        for w in range(words):
            if s.e_admin[e]:
                avail[w] = ((s.e_cand[e * words + w] | s.e_err[e * words + w])
                            & ~s.alloc_claim[c * words + w])
            else:
                avail[w] = ((s.e_cand[e * words + w] | s.e_err[e * words + w])
                            & ~s.base_inuse[w] & ~s.alloc_any[w])
            if s.optimize:
                avail[w] &= ~s.e_err[e * words + w]
        clear_before(avail, words, start)
        total = count_bits(avail, words)
    after = total
    for w in range(words):
        bits = avail[w]
        while bits:
            d = w * 64 + lowest(bits)
            bits &= bits - 1
            after -= 1
            if not prune and test(s.e_err + e * words, d):
                s.err_e = e
                s.err_d = d
                s.err_kind = 1
                return ERROR
            if prune:
                if after < s.e_count[e] - slot - 1:
                    return FAIL
                if group_short(s, c, e, d, avail, s.e_count[e] - slot - 1, tmp):
                    continue
            elif not test(s.e_cand + e * words, d):
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
    memset(s.counter_used, 0, (s.n_counters + 1) * sizeof(int64_t))
    memset(s.dim_used, 0, (s.n_dims + 1) * sizeof(int64_t))
    memset(s.shares, 0, (s.n_devices + 1) * sizeof(int32_t))
    memset(s.alloc_any_count, 0, (s.n_devices + 1) * sizeof(int32_t))
    memset(s.alloc_any, 0, s.words * sizeof(uint64_t))
    memset(s.alloc_claim, 0, max(1, s.n_claims) * s.words * sizeof(uint64_t))
    memset(s.k_count, 0, (s.n_constraints + 1) * sizeof(int32_t))
    memset(s.npicks, 0, max(1, s.n_claims) * sizeof(int32_t))
    memset(s.alts, 0, max(1, s.n_groups) * sizeof(int32_t))


cdef void claims_alone(State* s) noexcept nogil:
    """Search each claim of a multi-claim problem on its own, first fit, with a small
    budget: a claim that fails alone fails with any other claims allocated before it
    (they only take devices and counters away), so the lookahead may cut there."""
    cdef int c, result, optimize = s.optimize
    cdef int64_t budget = s.budget
    s.optimize = 0
    for c in range(s.n_claims):
        s.stop_claim = c + 1
        s.budget = s.nodes + min(budget // (10 * s.n_claims), 1000000)
        result = one(s, c, s.c_gstart[c], 0, 0, False, 0, 0)
        s.alone_fail[c] = result == FAIL
        reset(s)
    s.optimize = optimize
    s.budget = budget
    s.stop_claim = s.n_claims
    s.err_e = -1
    s.err_d = -1
    s.err_kind = 0


cdef bint placeable(State* s, int d) noexcept nogil:
    """The device could be allocated before this search: not in use, not blocked, its
    counters available. Worked out once per run (s.free_now: 0 not yet, 1 yes, 2 no)."""
    cdef int j
    cdef int8_t verdict = 1
    if s.free_now[d] == 0:
        if test(s.base_inuse, d) or s.blocked[d]:
            verdict = 2
        else:
            for j in range(s.dc_start[d], s.dc_start[d + 1]):
                if s.dc_amt[j] > s.counter_avail[s.dc_idx[j]]:
                    verdict = 2
                    break
        s.free_now[d] = verdict
    return s.free_now[d] == 1


cdef int ruled_out(State* s, int owner, uint32_t used) noexcept nogil:
    """Memory slices of the placements on slice set `owner` that could be allocated
    now and overlap `used` (allocator_ref.ruled_out)."""
    cdef int i, d, lost = 0
    for i in range(s.set_dev_start[owner], s.set_dev_start[owner + 1]):
        d = s.set_dev[i]
        if s.slice_mask[d] & used and placeable(s, d):
            lost += popcount(s.slice_mask[d])
    return lost


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
    for g in range(s.n_groups):
        sc[0] -= s.alts[g]
    for c in range(s.n_claims):
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
    for c in range(s.n_claims):
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
            for g in range(s.n_claims):
                for m in range(s.npicks[g]):
                    d = s.pick_d[g * MAX_RESULTS + m]
                    if s.slice_set[d] == owner:
                        used_mask |= s.slice_mask[d]
            sc[5] -= ruled_out(s, owner, used_mask)
    # Islands: whole GPUs taken out of the free ones, each GPU (counter set) once.
    nsets_done = 0
    for c in range(s.n_claims):
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
    for isl in range(min(s.n_islands, 256)):
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
    memcpy(s.best_npicks, s.npicks, s.n_claims * sizeof(int32_t))
    memcpy(s.best_pick_e, s.pick_e, s.n_claims * MAX_RESULTS * sizeof(int32_t))
    memcpy(s.best_pick_d, s.pick_d, s.n_claims * MAX_RESULTS * sizeof(int32_t))
    memcpy(s.best_alts, s.alts, s.n_groups * sizeof(int32_t))


# --- memory: each owner's arrays are carved from one block ----------------------------

cdef void* carve(char* block, size_t* at, size_t count, size_t size) noexcept nogil:
    """The next `count` items of `size` bytes from `block`, at `at` (kept 8-byte aligned);
    `at` advances past them. With block NULL nothing is handed out: a first pass with
    NULL measures the block, a second carves it, from the same list of arrays."""
    cdef size_t start = at[0]
    at[0] = start + (count * size + 7) // 8 * 8
    return NULL if block == NULL else <void*>(block + start)


cdef void* one_block(size_t size) except NULL:
    cdef void* block = calloc(1, size)
    if block == NULL:
        raise MemoryError()
    return block


cdef size_t search_layout(State* s, char* block) noexcept nogil:
    """The arrays a search writes, zeroed; sizes from the bound problem and ledger."""
    cdef size_t at = 0
    cdef int claims = max(1, s.n_claims), groups = max(1, s.n_groups)
    # Recursion depth: one level per slot, request and claim, plus subrequest loops.
    cdef int depth_max = s.n_claims * (MAX_RESULTS + 2) + 3 * s.n_groups + 4
    s.counter_used = <int64_t*>carve(block, &at, s.n_counters + 1, sizeof(int64_t))
    s.dim_used = <int64_t*>carve(block, &at, s.n_dims + 1, sizeof(int64_t))
    s.alloc_any = <uint64_t*>carve(block, &at, s.words, sizeof(uint64_t))
    s.alloc_claim = <uint64_t*>carve(block, &at, claims * s.words, sizeof(uint64_t))
    s.scratch = <uint64_t*>carve(block, &at, 2 * (depth_max + 1) * s.words, sizeof(uint64_t))
    s.shares = <int32_t*>carve(block, &at, s.n_devices + 1, sizeof(int32_t))
    s.alloc_any_count = <int32_t*>carve(block, &at, s.n_devices + 1, sizeof(int32_t))
    s.k_count = <int32_t*>carve(block, &at, s.n_constraints + 1, sizeof(int32_t))
    s.k_value = <int32_t*>carve(block, &at, s.n_constraints + 1, sizeof(int32_t))
    s.k_seen = <int32_t*>carve(block, &at, max(1, s.n_constraints) * (s.n_devices + 1),
                               sizeof(int32_t))
    s.pick_e = <int32_t*>carve(block, &at, claims * MAX_RESULTS, sizeof(int32_t))
    s.pick_d = <int32_t*>carve(block, &at, claims * MAX_RESULTS, sizeof(int32_t))
    s.npicks = <int32_t*>carve(block, &at, claims, sizeof(int32_t))
    s.alts = <int32_t*>carve(block, &at, groups, sizeof(int32_t))
    s.best_pick_e = <int32_t*>carve(block, &at, claims * MAX_RESULTS, sizeof(int32_t))
    s.best_pick_d = <int32_t*>carve(block, &at, claims * MAX_RESULTS, sizeof(int32_t))
    s.best_npicks = <int32_t*>carve(block, &at, claims, sizeof(int32_t))
    s.best_alts = <int32_t*>carve(block, &at, groups, sizeof(int32_t))
    s.alone_fail = <int8_t*>carve(block, &at, claims, sizeof(int8_t))
    s.free_now = <int8_t*>carve(block, &at, s.n_devices + 1, sizeof(int8_t))
    return at


cdef size_t dynamic_layout(Dynamic d, char* block) noexcept:
    cdef size_t at = 0
    cdef int devices = max(1, d.n_devices)
    d.base_inuse = <uint64_t*>carve(block, &at, d.words, sizeof(uint64_t))
    d.counter_avail = <int64_t*>carve(block, &at, max(1, d.n_counters), sizeof(int64_t))
    d.dim_avail = <int64_t*>carve(block, &at, max(1, d.n_dims), sizeof(int64_t))
    d.set_free = <uint32_t*>carve(block, &at, max(1, d.n_slice_sets), sizeof(uint32_t))
    d.island_free = <int32_t*>carve(block, &at, max(1, d.n_islands), sizeof(int32_t))
    d.base_shared = <int8_t*>carve(block, &at, devices, sizeof(int8_t))
    d.blocked = <int8_t*>carve(block, &at, devices, sizeof(int8_t))
    return at


cdef size_t tables_layout(Tables t, char* block, int uses, int slots, int members
                          ) noexcept:
    """`uses`, `slots`, `members`: the lengths of the arrays the *_start arrays index."""
    cdef size_t at = 0
    cdef int devices = max(1, t.n_devices), counters = max(1, t.n_counters)
    t.x_amt = <int64_t*>carve(block, &at, max(1, uses), sizeof(int64_t))
    t.declared = <int64_t*>carve(block, &at, counters, sizeof(int64_t))
    t.x_start = <int32_t*>carve(block, &at, t.n_held + 1, sizeof(int32_t))
    t.x_idx = <int32_t*>carve(block, &at, max(1, uses), sizeof(int32_t))
    t.counter_pool = <int32_t*>carve(block, &at, counters, sizeof(int32_t))
    t.dev_pool = <int32_t*>carve(block, &at, devices, sizeof(int32_t))
    t.slot_start = <int32_t*>carve(block, &at, t.n_slice_sets + 1, sizeof(int32_t))
    t.slot_bit = <int32_t*>carve(block, &at, max(1, slots), sizeof(int32_t))
    t.slot_k = <int32_t*>carve(block, &at, max(1, slots), sizeof(int32_t))
    t.set_full = <uint32_t*>carve(block, &at, max(1, t.n_slice_sets), sizeof(uint32_t))
    t.slice_set = <int32_t*>carve(block, &at, devices, sizeof(int32_t))
    t.member_start = <int32_t*>carve(block, &at, t.n_islands + 1, sizeof(int32_t))
    t.member_dev = <int32_t*>carve(block, &at, max(1, members), sizeof(int32_t))
    t.counted = <int8_t*>carve(block, &at, devices, sizeof(int8_t))
    t.negative = <int8_t*>carve(block, &at, t.n_pools, sizeof(int8_t))
    return at


# --- what kernel.py hands over, and the ledger's tables ----------------------------------

cdef int check_length(str name, Py_ssize_t have, Py_ssize_t need) except -1:
    """An array holds at least `need` elements, and at least one."""
    if have < need or have < 1:
        raise ValueError(f"{name}: {have} elements, the kernel reads {max(1, need)}")
    return 0


cdef int check_range(str name, Py_ssize_t have, const int32_t[::1] start, int items
                     ) except -1:
    """An array indexed by `start` (items + 1 offsets) holds what the last one says."""
    return check_length(name, have, start[items])


cdef int words_for(int n_devices) except -1:
    if n_devices < 0:
        raise ValueError(f"n_devices: {n_devices}")
    return max(1, (n_devices + 63) // 64)


cdef class DeviceArrays:
    """The node's devices, counters and topology as the search reads them. Keyword
    arguments only, one per field; lengths in the sizes of _alloc_types.pxd."""

    cdef readonly int n_devices, words
    cdef const int8_t[::1] multi        # n_devices: allows multiple allocations
    cdef const int8_t[::1] counted      # n_devices: consumes counters
    cdef const int32_t[::1] dc_start    # n_devices + 1: device -> its counter uses
    cdef const int32_t[::1] dc_idx      # counter of each use
    cdef const int64_t[::1] dc_amt      # amount of each use
    cdef const int32_t[::1] island      # n_devices: NVLink island, -1 none
    cdef const int32_t[::1] bandwidth   # n_devices: NVLink bandwidth (GB/s)
    cdef const int32_t[::1] numa        # n_devices: NUMA node, -1 none
    cdef const int32_t[::1] pcie        # n_devices: PCIe root, -1 none
    cdef const int32_t[::1] slice_set   # n_devices: MIG slice set it draws from, -1 none
    cdef const uint32_t[::1] slice_mask  # n_devices: its memory slices in that set
    cdef const uint32_t[::1] set_full   # n_slice_sets: every slice of the set
    cdef const int32_t[::1] set_island  # n_slice_sets: NVLink island of the GPU, -1 none
    cdef const int32_t[::1] set_dev_start  # n_slice_sets + 1: set -> its devices
    cdef const int32_t[::1] set_dev     # the devices drawing from each set, in order

    def __cinit__(self, *, int n_devices, const int8_t[::1] multi, const int8_t[::1] counted,
                  const int32_t[::1] dc_start, const int32_t[::1] dc_idx,
                  const int64_t[::1] dc_amt, const int32_t[::1] island,
                  const int32_t[::1] bandwidth, const int32_t[::1] numa,
                  const int32_t[::1] pcie, const int32_t[::1] slice_set,
                  const uint32_t[::1] slice_mask, const uint32_t[::1] set_full,
                  const int32_t[::1] set_island, const int32_t[::1] set_dev_start,
                  const int32_t[::1] set_dev):
        self.n_devices, self.words = n_devices, words_for(n_devices)
        check_length("multi", multi.shape[0], n_devices)
        check_length("counted", counted.shape[0], n_devices)
        check_length("dc_start", dc_start.shape[0], n_devices + 1)
        check_range("dc_idx", dc_idx.shape[0], dc_start, n_devices)
        check_range("dc_amt", dc_amt.shape[0], dc_start, n_devices)
        check_length("island", island.shape[0], n_devices)
        check_length("bandwidth", bandwidth.shape[0], n_devices)
        check_length("numa", numa.shape[0], n_devices)
        check_length("pcie", pcie.shape[0], n_devices)
        check_length("slice_set", slice_set.shape[0], n_devices)
        check_length("slice_mask", slice_mask.shape[0], n_devices)
        check_length("set_island", set_island.shape[0], set_full.shape[0])
        check_length("set_dev_start", set_dev_start.shape[0], set_full.shape[0] + 1)
        check_range("set_dev", set_dev.shape[0], set_dev_start, set_full.shape[0])
        self.multi, self.counted = multi, counted
        self.dc_start, self.dc_idx, self.dc_amt = dc_start, dc_idx, dc_amt
        self.island, self.bandwidth, self.numa, self.pcie = island, bandwidth, numa, pcie
        self.slice_set, self.slice_mask = slice_set, slice_mask
        self.set_full, self.set_island = set_full, set_island
        self.set_dev_start, self.set_dev = set_dev_start, set_dev


cdef class ClaimArrays:
    """The claims' entries (requests, or the subrequests of a firstAvailable request),
    request groups and constraints as the search reads them, for a node of `n_devices`
    devices; made by `pack_claims`. Lengths in the sizes of _alloc_types.pxd."""

    cdef readonly int n_devices, words, n_entries, n_claims, n_groups, n_constraints
    cdef const int32_t[::1] e_count       # n_entries: devices the entry asks for
    cdef const int8_t[::1] e_all          # n_entries: allocationMode All
    cdef const int8_t[::1] e_admin        # n_entries: adminAccess
    cdef const int8_t[::1] e_fa           # n_entries: a subrequest of a firstAvailable request
    cdef const int8_t[::1] e_has_err      # n_entries: a candidate has a selector error
    cdef const int8_t[::1] e_has_multi    # n_entries: a candidate allows multiple allocations
    cdef const int8_t[::1] c_safe         # n_claims: can never exceed the result limit
    cdef const uint64_t[::1] e_cand       # n_entries * words: candidates
    cdef const uint64_t[::1] e_err        # n_entries * words: selector errors
    cdef const int32_t[::1] e_all_start   # n_entries + 1: entry -> its All devices
    cdef const int32_t[::1] e_all_idx     # device of each
    cdef const int8_t[::1] e_all_soft     # taking it fails without an error
    cdef const uint32_t[::1] e_cmask      # n_entries: the claim's constraints it is under
    cdef const int32_t[::1] e_cons_start  # n_entries + 1: entry -> capacity it consumes
    cdef const int32_t[::1] cons_dev      # device of each consumption
    cdef const int32_t[::1] cons_dim      # capacity dimension of each
    cdef const int64_t[::1] cons_amt      # amount of each
    cdef const int32_t[::1] c_gstart      # n_claims + 1: claim -> its request groups
    cdef const int32_t[::1] g_estart      # n_groups + 1: group -> its entries
    cdef const int32_t[::1] c_kstart      # n_claims + 1: claim -> its constraints
    cdef const int8_t[::1] k_kind         # n_constraints: 0 match, 1 distinct
    cdef const int32_t[::1] k_values      # n_constraints * n_devices: value id, -1 none
    cdef const int32_t[::1] k_gstart      # n_constraints + 1: constraint -> value groups
    cdef const uint64_t[::1] k_groups     # words per value group: devices with the value
    cdef const uint64_t[::1] k_has        # n_constraints * words: devices with a value

    def __init__(self) -> None:
        raise TypeError("ClaimArrays are made by pack_claims")

    cdef int set_sizes(self, int n_devices, int n_entries, int n_claims, int n_groups,
                       int n_constraints) except -1:
        self.words = words_for(n_devices)
        self.n_devices = n_devices
        self.n_entries, self.n_claims = n_entries, n_claims
        self.n_groups, self.n_constraints = n_groups, n_constraints
        return 0

    cdef int check(self) except -1:
        cdef int n_entries = self.n_entries, n_claims = self.n_claims
        cdef int n_constraints = self.n_constraints, words = self.words
        check_length("e_count", self.e_count.shape[0], n_entries)
        check_length("e_all", self.e_all.shape[0], n_entries)
        check_length("e_admin", self.e_admin.shape[0], n_entries)
        check_length("e_fa", self.e_fa.shape[0], n_entries)
        check_length("e_has_err", self.e_has_err.shape[0], n_entries)
        check_length("e_has_multi", self.e_has_multi.shape[0], n_entries)
        check_length("e_cmask", self.e_cmask.shape[0], n_entries)
        check_length("c_safe", self.c_safe.shape[0], n_claims)
        check_length("e_cand", self.e_cand.shape[0], n_entries * words)
        check_length("e_err", self.e_err.shape[0], n_entries * words)
        check_length("e_all_start", self.e_all_start.shape[0], n_entries + 1)
        check_range("e_all_idx", self.e_all_idx.shape[0], self.e_all_start, n_entries)
        check_range("e_all_soft", self.e_all_soft.shape[0], self.e_all_start, n_entries)
        check_length("e_cons_start", self.e_cons_start.shape[0], n_entries + 1)
        check_range("cons_dev", self.cons_dev.shape[0], self.e_cons_start, n_entries)
        check_range("cons_dim", self.cons_dim.shape[0], self.e_cons_start, n_entries)
        check_range("cons_amt", self.cons_amt.shape[0], self.e_cons_start, n_entries)
        check_length("c_gstart", self.c_gstart.shape[0], n_claims + 1)
        check_length("g_estart", self.g_estart.shape[0], self.n_groups + 1)
        check_length("c_kstart", self.c_kstart.shape[0], n_claims + 1)
        check_length("k_kind", self.k_kind.shape[0], n_constraints)
        check_length("k_values", self.k_values.shape[0], n_constraints * self.n_devices)
        check_length("k_gstart", self.k_gstart.shape[0], n_constraints + 1)
        check_length("k_groups", self.k_groups.shape[0],
                     self.k_gstart[n_constraints] * words)
        check_length("k_has", self.k_has.shape[0], n_constraints * words)
        return 0


AMOUNT_LIMIT = 1 << 62  # amounts at or beyond it leave the kernel's range (room for sums)
cdef array _I8 = array("b"), _I32 = array("i"), _U32 = array("I"), _I64 = array("q")
cdef array _U64 = array("Q")


cdef inline Py_ssize_t field(Py_ssize_t n) noexcept:
    """Elements a field takes: at least one (the kernel reads element 0 of an empty one)."""
    return n if n > 0 else 1


cdef int put_words(uint64_t* into, object bits, int words) except -1:
    """The bitset `bits` (a Python int) as `words` 64-bit words."""
    cdef int i
    if words == 1:
        into[0] = <uint64_t>bits
    else:
        for i in range(words):
            into[i] = <uint64_t>((bits >> (64 * i)) & 0xFFFFFFFFFFFFFFFF)
    return 0


def pack_claims(list entries, list claims, list constraints, int n_devices, object multi_bits):
    """ClaimArrays of compiled claims (driver/allocator/model.py: an `Entry` per request
    or subrequest, request groups of entry indexes per claim, `ConstraintPlan`s per
    claim), read straight from those objects into one array per element type: a cold
    call packs its claims once per scheduling decision. OverflowError where a capacity
    amount leaves the kernel's range."""
    cdef ClaimArrays out = ClaimArrays.__new__(ClaimArrays)
    cdef int w = words_for(n_devices), need, total
    cdef Py_ssize_t n_e = len(entries), n_c = len(claims), n_g = 0, n_k = 0
    cdef Py_ssize_t n_all = 0, n_cons = 0, n_vals = 0, n_kgroups = 0
    cdef Py_ssize_t e, i, at, c_at, k_at, v_at, g_at
    for entry in entries:
        n_all += len(entry.all_list)
        if entry.cons:
            for uses in (<dict>entry.cons).values():
                n_cons += len(uses)
    for groups in claims:
        n_g += len(groups)
    for plans in constraints:
        for plan in plans:
            n_k += 1
            n_vals += len(plan.values)
            n_kgroups += len(plan.groups)
    out.set_sizes(n_devices, n_e, n_c, n_g, n_k)
    # Each field's place in its type's array, in the order of ClaimArrays.
    cdef Py_ssize_t f_all = 0, f_admin = f_all + field(n_e), f_fa = f_admin + field(n_e)
    cdef Py_ssize_t f_has_err = f_fa + field(n_e), f_has_multi = f_has_err + field(n_e)
    cdef Py_ssize_t f_safe = f_has_multi + field(n_e), f_soft = f_safe + field(n_c)
    cdef Py_ssize_t f_kind = f_soft + field(n_all), n_i8 = f_kind + field(n_k)
    cdef Py_ssize_t f_count = 0, f_all_start = field(n_e), f_all_idx = f_all_start + n_e + 1
    cdef Py_ssize_t f_cons_start = f_all_idx + field(n_all)
    cdef Py_ssize_t f_cons_dev = f_cons_start + n_e + 1, f_cons_dim = f_cons_dev + field(n_cons)
    cdef Py_ssize_t f_gstart = f_cons_dim + field(n_cons), f_estart = f_gstart + n_c + 1
    cdef Py_ssize_t f_kstart = f_estart + n_g + 1, f_values = f_kstart + n_c + 1
    cdef Py_ssize_t f_kgstart = f_values + field(n_vals), n_i32 = f_kgstart + n_k + 1
    cdef Py_ssize_t f_cand = 0, f_err = field(n_e * w), f_groups = f_err + field(n_e * w)
    cdef Py_ssize_t f_has = f_groups + field(n_kgroups * w), n_u64 = f_has + field(n_k * w)
    cdef array a8 = clone(_I8, n_i8, True), a32 = clone(_I32, n_i32, True)
    cdef array au32 = clone(_U32, field(n_e), True), a64 = clone(_I64, field(n_cons), True)
    cdef array au64 = clone(_U64, n_u64, True)
    cdef int8_t* i8 = <int8_t*>a8.data.as_schars
    cdef int32_t* i32 = <int32_t*>a32.data.as_ints
    cdef uint32_t* cmask = <uint32_t*>au32.data.as_uints
    cdef int64_t* amounts = <int64_t*>a64.data.as_longlongs
    cdef uint64_t* u64 = <uint64_t*>au64.data.as_ulonglongs
    at = c_at = 0
    for e in range(n_e):
        entry = entries[e]
        i32[f_count + e] = entry.count
        i8[f_all + e] = 1 if entry.all_mode else 0
        i8[f_admin + e] = 1 if entry.admin else 0
        i8[f_fa + e] = 1 if entry.first_available else 0
        i8[f_has_err + e] = 1 if entry.err else 0
        i8[f_has_multi + e] = 1 if entry.cand & multi_bits else 0
        cmask[e] = entry.cmask
        put_words(u64 + f_cand + e * w, entry.cand, w)
        put_words(u64 + f_err + e * w, entry.err, w)
        all_list = entry.all_list
        if all_list:
            soft = entry.all_soft
            for i in range(len(all_list)):
                i32[f_all_idx + at] = all_list[i]
                i8[f_soft + at] = 1 if soft[i] else 0
                at += 1
        i32[f_all_start + e + 1] = at
        if entry.cons:
            for d, uses in sorted((<dict>entry.cons).items()):
                for k, value in uses:
                    if not -AMOUNT_LIMIT < value < AMOUNT_LIMIT:
                        raise OverflowError("amount out of the kernel's range")
                    i32[f_cons_dev + c_at] = d
                    i32[f_cons_dim + c_at] = k
                    amounts[c_at] = value
                    c_at += 1
        i32[f_cons_start + e + 1] = c_at
    g_at = 0
    for i in range(n_c):
        total = 0
        for ids in claims[i]:
            need = 0
            for e in ids:
                need = max(need, <int>entries[e].count)
            total += need
            i32[f_estart + g_at + 1] = i32[f_estart + g_at] + len(ids)
            g_at += 1
        i8[f_safe + i] = total <= MAX_RESULTS
        i32[f_gstart + i + 1] = g_at
    k_at = v_at = g_at = 0
    for i in range(n_c):
        for plan in constraints[i]:
            i8[f_kind + k_at] = plan.kind
            for value in plan.values:
                i32[f_values + v_at] = value
                v_at += 1
            has = 0
            for group in plan.groups:
                put_words(u64 + f_groups + g_at * w, group, w)
                g_at += 1
                has |= group
            put_words(u64 + f_has + k_at * w, has, w)
            i32[f_kgstart + k_at + 1] = i32[f_kgstart + k_at] + len(plan.groups)
            k_at += 1
        i32[f_kstart + i + 1] = k_at
    cdef const int8_t[::1] v8 = a8
    cdef const int32_t[::1] v32 = a32
    cdef const uint64_t[::1] v64 = au64
    out.e_all = v8[f_all:f_all + field(n_e)]
    out.e_admin = v8[f_admin:f_admin + field(n_e)]
    out.e_fa = v8[f_fa:f_fa + field(n_e)]
    out.e_has_err = v8[f_has_err:f_has_err + field(n_e)]
    out.e_has_multi = v8[f_has_multi:f_has_multi + field(n_e)]
    out.c_safe = v8[f_safe:f_safe + field(n_c)]
    out.e_all_soft = v8[f_soft:f_soft + field(n_all)]
    out.k_kind = v8[f_kind:n_i8]
    out.e_count = v32[f_count:f_count + field(n_e)]
    out.e_all_start = v32[f_all_start:f_all_idx]
    out.e_all_idx = v32[f_all_idx:f_cons_start]
    out.e_cons_start = v32[f_cons_start:f_cons_dev]
    out.cons_dev = v32[f_cons_dev:f_cons_dim]
    out.cons_dim = v32[f_cons_dim:f_gstart]
    out.c_gstart = v32[f_gstart:f_estart]
    out.g_estart = v32[f_estart:f_kstart]
    out.c_kstart = v32[f_kstart:f_values]
    out.k_values = v32[f_values:f_kgstart]
    out.k_gstart = v32[f_kgstart:n_i32]
    out.e_cmask = au32
    out.cons_amt = a64
    out.e_cand = v64[f_cand:f_err]
    out.e_err = v64[f_err:f_groups]
    out.k_groups = v64[f_groups:f_has]
    out.k_has = v64[f_has:n_u64]
    out.check()
    return out


cdef class Dynamic:
    """What the allocated claims decide, as C arrays: devices in use, devices shared,
    devices blocked by an overdrawn pool, counters and capacities left, free MIG
    slices per GPU, free whole GPUs per NVLink island. Made zeroed; `Tables.state` or
    `dynamic()` fill it."""

    cdef readonly int n_devices, words, n_counters, n_dims, n_slice_sets, n_islands
    cdef void* block               # the one allocation the arrays below are carved from
    cdef uint64_t* base_inuse      # words: devices allocated whole
    cdef int8_t* base_shared       # n_devices: devices with shares allocated
    cdef int8_t* blocked           # n_devices: consumes counters of an overdrawn pool
    cdef int64_t* counter_avail    # n_counters: left of each counter
    cdef int64_t* dim_avail        # n_dims: left of each capacity dimension
    cdef uint32_t* set_free        # n_slice_sets: free memory slices
    cdef int32_t* island_free      # n_islands: whole free GPUs

    def __cinit__(self, int n_devices, int n_counters, int n_dims, int n_slice_sets,
                  int n_islands):
        self.n_devices, self.words = n_devices, words_for(n_devices)
        self.n_counters, self.n_dims = n_counters, n_dims
        self.n_slice_sets, self.n_islands = n_slice_sets, n_islands
        self.block = one_block(dynamic_layout(self, NULL))
        dynamic_layout(self, <char*>self.block)

    def __dealloc__(self):
        free(self.block)


def dynamic(*, int n_devices, const uint64_t[::1] base_inuse, const int8_t[::1] base_shared,
            const int8_t[::1] blocked, const int64_t[::1] counter_avail,
            const int64_t[::1] dim_avail, const uint32_t[::1] set_free,
            const int32_t[::1] island_free):
    """The ledger's part of a problem from its arrays (see driver/allocator/kernel.py);
    each size is its array's length."""
    cdef Dynamic d = Dynamic(n_devices, len(counter_avail), len(dim_avail), len(set_free),
                             len(island_free))
    check_length("base_inuse", base_inuse.shape[0], d.words)
    check_length("base_shared", base_shared.shape[0], n_devices)
    check_length("blocked", blocked.shape[0], n_devices)
    check_length("counter_avail", counter_avail.shape[0], 1)
    check_length("dim_avail", dim_avail.shape[0], 1)
    check_length("set_free", set_free.shape[0], 1)
    check_length("island_free", island_free.shape[0], 1)
    memcpy(d.base_inuse, &base_inuse[0], d.words * sizeof(uint64_t))
    memcpy(d.base_shared, &base_shared[0], max(1, n_devices) * sizeof(int8_t))
    memcpy(d.blocked, &blocked[0], max(1, n_devices) * sizeof(int8_t))
    memcpy(d.counter_avail, &counter_avail[0], d.n_counters * sizeof(int64_t))
    memcpy(d.dim_avail, &dim_avail[0], d.n_dims * sizeof(int64_t))
    memcpy(d.set_free, &set_free[0], d.n_slice_sets * sizeof(uint32_t))
    memcpy(d.island_free, &island_free[0], d.n_islands * sizeof(int32_t))
    return d


cdef class Tables:
    """One node's counters and topology as the ledger sees them, built once: from the
    devices the allocated claims hold, `state` computes a `Dynamic` in C.

    Devices are numbered as the search numbers them, then the devices of the same
    pools on other nodes (their allocations consume the pools' counters too). Only
    for nodes without devices that allow multiple allocations (base_shared and
    capacities stay empty)."""

    # n_held: the node's devices, then the devices of its pools on other nodes
    cdef int n_devices, n_held, n_counters, n_slice_sets, n_islands, n_pools
    cdef void* block               # the one allocation the arrays below are carved from
    cdef int32_t* x_start          # n_held + 1: device -> its counter uses
    cdef int32_t* x_idx            # counter of each use
    cdef int64_t* x_amt            # amount of each use
    cdef int64_t* declared         # n_counters: what the pools declare
    cdef int32_t* counter_pool     # n_counters: pool of each counter
    cdef int32_t* dev_pool         # n_devices: pool of each device
    cdef int8_t* counted           # n_devices: consumes counters
    cdef int32_t* slot_start       # n_slice_sets + 1: set -> its slots
    cdef int32_t* slot_bit         # slice number of each slot
    cdef int32_t* slot_k           # counter of each slot
    cdef uint32_t* set_full        # n_slice_sets: every slice of the set
    cdef int32_t* slice_set        # n_devices: slice set it draws from, -1 none
    cdef int32_t* member_start     # n_islands + 1: island -> its whole GPUs
    cdef int32_t* member_dev       # device of each
    cdef int8_t* negative          # n_pools: scratch of `state`, an overdrawn pool

    def __cinit__(self, int n_devices, list uses, list declared, list counter_pool,
                  list dev_pool, list counted, list set_slots, list set_full,
                  list slice_set, list islands):
        cdef int i, j, k, n_uses, n_slots, n_members
        self.n_devices, self.n_held, self.n_counters = n_devices, len(uses), len(declared)
        self.n_slice_sets, self.n_islands = len(set_slots), len(islands)
        self.n_pools = max([p + 1 for p in counter_pool] + [p + 1 for p in dev_pool] + [1])
        n_uses = sum(len(u) for u in uses)
        n_slots = sum(len(s) for s in set_slots)
        n_members = sum(len(members) for members in islands)
        self.block = one_block(tables_layout(self, NULL, n_uses, n_slots, n_members))
        tables_layout(self, <char*>self.block, n_uses, n_slots, n_members)
        j = 0
        for i in range(self.n_held):
            for k, amount in uses[i]:
                self.x_idx[j] = k
                self.x_amt[j] = amount
                j += 1
            self.x_start[i + 1] = j
        for k in range(self.n_counters):
            self.declared[k] = declared[k]
            self.counter_pool[k] = counter_pool[k]
        for i in range(n_devices):
            self.dev_pool[i] = dev_pool[i]
            self.counted[i] = 1 if counted[i] else 0
            self.slice_set[i] = slice_set[i]
        j = 0
        for i in range(self.n_slice_sets):
            for bit, k in set_slots[i]:
                self.slot_bit[j] = bit
                self.slot_k[j] = k
                j += 1
            self.slot_start[i + 1] = j
            self.set_full[i] = set_full[i]
        j = 0
        for i in range(self.n_islands):
            for k in islands[i]:
                self.member_dev[j] = k
                j += 1
            self.member_start[i + 1] = j

    def __dealloc__(self):
        free(self.block)

    def state(self, list exclusive, list shared):
        """The `Dynamic` for claims holding `exclusive` devices whole and shares of
        `shared` ones (indexes as above; a device in both counts twice, as in
        NodeModel.problem); None where a counter leaves the kernel's range."""
        cdef Dynamic d = Dynamic(self.n_devices, self.n_counters, 0, self.n_slice_sets,
                                 self.n_islands)
        cdef int i, j, k, s
        cdef int64_t limit = (<int64_t>1) << 62
        cdef uint32_t bits
        cdef int8_t* negative = self.negative  # scratch: the GIL is held throughout
        memset(negative, 0, self.n_pools * sizeof(int8_t))
        memcpy(d.counter_avail, self.declared, self.n_counters * sizeof(int64_t))
        for held in (exclusive, shared):
            for i in held:
                if i < 0 or i >= self.n_held:
                    raise IndexError(i)
                for j in range(self.x_start[i], self.x_start[i + 1]):
                    d.counter_avail[self.x_idx[j]] -= self.x_amt[j]
        for i in exclusive:
            if i < self.n_devices:
                setbit(d.base_inuse, i)
        for k in range(self.n_counters):
            if not -limit < d.counter_avail[k] < limit:
                return None
            if d.counter_avail[k] < 0:
                negative[self.counter_pool[k]] = 1
        for i in range(self.n_devices):
            d.blocked[i] = self.counted[i] and negative[self.dev_pool[i]]
        for s in range(self.n_slice_sets):
            bits = 0
            for j in range(self.slot_start[s], self.slot_start[s + 1]):
                if d.counter_avail[self.slot_k[j]] >= 1:
                    bits |= (<uint32_t>1) << self.slot_bit[j]
            d.set_free[s] = bits
        for k in range(self.n_islands):
            for j in range(self.member_start[k], self.member_start[k + 1]):
                i = self.member_dev[j]
                s = self.slice_set[i]
                if not test(d.base_inuse, i) and (
                        s < 0 or d.set_free[s] == self.set_full[s]):
                    d.island_free[k] += 1
        return d


cdef class Prepared:
    """ClaimArrays bound to their node's DeviceArrays, once: `run` searches them
    against any `Dynamic` of the same node."""

    cdef State t
    cdef readonly DeviceArrays devices  # what the pointers in t point into
    cdef readonly ClaimArrays claims

    def __cinit__(self, DeviceArrays devices not None, ClaimArrays claims not None):
        if claims.n_devices != devices.n_devices:
            raise ValueError(f"claims packed for {claims.n_devices} devices, "
                             f"the node has {devices.n_devices}")
        memset(&self.t, 0, sizeof(State))
        self.devices, self.claims = devices, claims
        cdef State* s = &self.t
        s.n_devices, s.words = devices.n_devices, devices.words
        s.n_entries, s.n_claims = claims.n_entries, claims.n_claims
        s.n_groups, s.n_constraints = claims.n_groups, claims.n_constraints
        s.multi = &devices.multi[0]
        s.counted = &devices.counted[0]
        s.dc_start = &devices.dc_start[0]
        s.dc_idx = &devices.dc_idx[0]
        s.dc_amt = &devices.dc_amt[0]
        s.island = &devices.island[0]
        s.bandwidth = &devices.bandwidth[0]
        s.numa = &devices.numa[0]
        s.pcie = &devices.pcie[0]
        s.slice_set = &devices.slice_set[0]
        s.slice_mask = &devices.slice_mask[0]
        s.set_full = &devices.set_full[0]
        s.set_island = &devices.set_island[0]
        s.set_dev_start = &devices.set_dev_start[0]
        s.set_dev = &devices.set_dev[0]
        s.e_count = &claims.e_count[0]
        s.e_all = &claims.e_all[0]
        s.e_admin = &claims.e_admin[0]
        s.e_fa = &claims.e_fa[0]
        s.e_has_err = &claims.e_has_err[0]
        s.e_has_multi = &claims.e_has_multi[0]
        s.c_safe = &claims.c_safe[0]
        s.e_cand = &claims.e_cand[0]
        s.e_err = &claims.e_err[0]
        s.e_all_start = &claims.e_all_start[0]
        s.e_all_idx = &claims.e_all_idx[0]
        s.e_all_soft = &claims.e_all_soft[0]
        s.e_cmask = &claims.e_cmask[0]
        s.e_cons_start = &claims.e_cons_start[0]
        s.cons_dev = &claims.cons_dev[0]
        s.cons_dim = &claims.cons_dim[0]
        s.cons_amt = &claims.cons_amt[0]
        s.c_gstart = &claims.c_gstart[0]
        s.g_estart = &claims.g_estart[0]
        s.c_kstart = &claims.c_kstart[0]
        s.k_kind = &claims.k_kind[0]
        s.k_values = &claims.k_values[0]
        s.k_gstart = &claims.k_gstart[0]
        s.k_groups = &claims.k_groups[0]
        s.k_has = &claims.k_has[0]

    def run(self, Dynamic d not None, int optimize, long long budget, int prune=1):
        """Returns (status, picks per claim as [(entry, device)], alternative per
        request, (error entry, error device, error kind), search steps, whether a
        best solution was kept)."""
        cdef State s = self.t
        cdef int status, c, i
        cdef void* block
        if d.n_devices != s.n_devices:
            raise ValueError(f"ledger state for {d.n_devices} devices, "
                             f"problem of {s.n_devices}")
        s.base_inuse = d.base_inuse
        s.base_shared = d.base_shared
        s.blocked = d.blocked
        s.counter_avail = d.counter_avail
        s.dim_avail = d.dim_avail
        s.set_free = d.set_free
        s.island_free = d.island_free
        s.n_counters = d.n_counters
        s.n_dims = d.n_dims
        s.n_islands = d.n_islands
        s.n_slice_sets = d.n_slice_sets
        s.budget = budget
        s.optimize = optimize
        s.prune = prune
        s.err_e = -1
        s.err_d = -1
        s.stop_claim = s.n_claims
        block = one_block(search_layout(&s, NULL))
        search_layout(&s, <char*>block)
        try:
            with nogil:
                if prune and s.n_claims > 1:
                    claims_alone(&s)
                status = one(&s, 0, 0, 0, 0, False, 0, 0)
            if optimize:
                if s.has_best:
                    status = OK
                    memcpy(s.npicks, s.best_npicks, s.n_claims * sizeof(int32_t))
                    memcpy(s.pick_e, s.best_pick_e,
                           s.n_claims * MAX_RESULTS * sizeof(int32_t))
                    memcpy(s.pick_d, s.best_pick_d,
                           s.n_claims * MAX_RESULTS * sizeof(int32_t))
                    memcpy(s.alts, s.best_alts, s.n_groups * sizeof(int32_t))
                elif status != GAVEUP:
                    status = FAIL
            picks = []
            alts = []
            if status == OK:
                for c in range(s.n_claims):
                    picks.append([(s.pick_e[c * MAX_RESULTS + i], s.pick_d[c * MAX_RESULTS + i])
                                  for i in range(s.npicks[c])])
                alts = [s.alts[i] for i in range(s.n_groups)]
            return (status, picks, alts, (s.err_e, s.err_d, s.err_kind), s.nodes,
                    bool(s.has_best))
        finally:
            free(block)


def run(DeviceArrays devices, ClaimArrays claims, Dynamic ledger, int optimize,
        long long budget, int prune=1):
    """Search one packed problem (see driver/allocator/kernel.py):
    `Prepared(devices, claims).run(ledger, ...)`."""
    return Prepared(devices, claims).run(ledger, optimize, budget, prune)
