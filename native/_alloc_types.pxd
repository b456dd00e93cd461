# cython: language_level=3
# The allocation kernel's types (driver._alloc, _alloc.pyx cimports them): the names of
# its sizes, its statuses and limits, and the State a search runs on.
#
# driver/allocator/kernel.py hands the kernel three typed objects, the cdef classes of
# _alloc.pyx (each array field there says its element type and length, in the sizes
# below), and nothing else:
#   DeviceArrays  the node's devices, counters and topology: built once per node model;
#   ClaimArrays   the claims' requests, candidates and constraints: once per claim list;
#   Dynamic       what the allocated claims decide (the ledger's part): per call, made
#                 in C by `Tables.state`, or from arrays by `dynamic()`.
# `Prepared(devices, claims)` binds the first two once; `Prepared.run(ledger, ...)`
# searches. Arrays are C-contiguous and hold at least one element (an empty list packs
# as [0]); the constructors check each array's type (a wrong typecode raises
# ValueError) and length.
#
# (Not named _alloc.pxd: for the extension driver._alloc Cython looks for its own .pxd
# as driver/_alloc.pxd, and a cdef class declared in another .pxd would belong to
# another module; so the classes are declared where they are defined, in _alloc.pyx.)
#
# Sizes. One name each, here and in _alloc.pyx; array lengths are written with them.
#
#   name           what it counts
#   -------------  ----------------------------------------------------------------------
#   n_devices      devices the search numbers, in scan order: bit d of a bitset is device d
#   words          64-bit words of one device bitset: max(1, ceil(n_devices / 64))
#   n_entries      entries: each request, or each firstAvailable subrequest, of all claims
#   n_claims       claims searched together, in order
#   n_groups       requests of all claims; a group's entries are the request's alternatives
#   n_constraints  matchAttribute / distinctAttribute constraints of all claims
#   n_counters     shared counters of the node's pools (counter sets' counters)
#   n_dims         capacity dimensions of the devices that allow multiple allocations
#   n_islands      NVLink islands
#   n_slice_sets   MIG slice sets: the physical GPUs whose memory slices are counters
#
# An array named *_start holds offsets: item i's part of the arrays it indexes is
# [start[i], start[i + 1]), so it has one element more than there are items.

from libc.stdint cimport int8_t, int32_t, int64_t, uint32_t, uint64_t


cdef enum:
    OK = 1
    FAIL = 0
    MAXSIZE = -1
    ERROR = -2
    GAVEUP = -3
    MAX_RESULTS = 32
    NSCORE = 7


# One search: the arrays it reads (pointers into a Prepared's DeviceArrays and
# ClaimArrays and into a Dynamic) and the arrays it writes (one block per run).
cdef struct State:
    # sizes (see the table above)
    int n_devices, words, n_entries, n_claims, n_groups, n_constraints
    int n_counters, n_dims, n_islands, n_slice_sets
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
    int64_t* counter_used      # n_counters + 1
    const int64_t* dim_avail
    int64_t* dim_used          # n_dims + 1
    int32_t* shares            # n_devices + 1: shares being allocated
    int32_t* alloc_any_count   # n_devices + 1: claims allocating the device
    uint64_t* alloc_any        # words: allocating for any claim
    uint64_t* alloc_claim      # n_claims * words: allocating for claim c
    # entries
    const int32_t* e_count
    const int8_t* e_all
    const int8_t* e_admin
    const int8_t* e_fa
    const int8_t* e_has_err
    const int8_t* e_has_multi
    const int8_t* c_safe
    const uint64_t* e_cand
    const uint64_t* e_err
    const int32_t* e_all_start
    const int32_t* e_all_idx
    const int8_t* e_all_soft
    const uint32_t* e_cmask
    const int32_t* e_cons_start
    const int32_t* cons_dev
    const int32_t* cons_dim
    const int64_t* cons_amt
    # claims and request groups
    const int32_t* c_gstart
    const int32_t* g_estart
    # constraints
    const int32_t* c_kstart
    const int8_t* k_kind
    const int32_t* k_values
    const int32_t* k_gstart
    const uint64_t* k_groups
    const uint64_t* k_has
    int32_t* k_count           # n_constraints + 1: devices in (match) / values seen (distinct)
    int32_t* k_value           # n_constraints + 1: match: the fixed value
    int32_t* k_seen            # n_constraints * (n_devices + 1): distinct: seen values
    # results
    int32_t* pick_e            # n_claims * MAX_RESULTS
    int32_t* pick_d            # n_claims * MAX_RESULTS
    int32_t* npicks            # n_claims
    int32_t* alts              # n_groups
    # control
    int stop_claim             # the search ends before this claim (n_claims, or c + 1)
    int8_t* alone_fail         # n_claims: the claim cannot be allocated even on its own
    int8_t* free_now           # n_devices + 1: could be allocated before the search (score)
    int64_t nodes
    int64_t budget
    int optimize
    int prune
    int err_e, err_d, err_kind
    uint64_t* scratch          # depth-indexed bitsets: 2 * (max depth + 1) * words
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
    const int32_t* set_dev_start
    const int32_t* set_dev
    const int32_t* island_free
    int has_best
    int64_t best[NSCORE]
    int32_t* best_pick_e       # n_claims * MAX_RESULTS
    int32_t* best_pick_d       # n_claims * MAX_RESULTS
    int32_t* best_npicks       # n_claims
    int32_t* best_alts         # n_groups
