# cython: language_level=3
"""Kubernetes protobuf to the dicts that `orjson.loads` makes of the same object's JSON.

The API server writes a large list of ResourceSlices about twice as fast as protobuf as
it writes the JSON, and the bytes are a quarter fewer (docs/benchmarks.md, issue 17
item 2). Consumers keep reading the JSON shape: this walker turns the wire format into
exactly those dicts, following a field table (driver/kube/protolist.py) that says for
each field its JSON name, its kind and what the JSON writes when the field is absent or
zero (Go's `omitempty`, pointers, nil slices). Fields the table does not know are
skipped.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_FromLongLong
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy

import orjson


cdef extern from "<time.h>":
    ctypedef long time_t
    struct tm:
        pass
    tm* gmtime_r(const time_t* timer, tm* result)
    size_t strftime(char* s, size_t maxsize, const char* fmt, const tm* t)

cdef extern from "Python.h":
    Py_ssize_t PyUnicode_GET_LENGTH(object s)
    const void* PyUnicode_DATA(object s)
    bint PyUnicode_IS_ASCII(object s)


cdef enum:
    MAX_FIELD = 63          # field numbers above are skipped as unknown
    CACHE_SLOTS = 16384     # the string cache: a power of two
    CACHE_MAX_LEN = 64      # longer strings are not cached
    SHARE_SLOTS = 16384     # the shared messages' cache: a power of two
    SHARE_MAX_LEN = 512     # longer messages are not shared

# The kinds of value (protolist.py: KINDS, in this order).
cdef enum:
    K_STRING
    K_INT64
    K_INT32
    K_BOOL
    K_MESSAGE
    K_QUANTITY
    K_TIME
    K_JSON

# How a field repeats (protolist.py: SHAPES).
cdef enum:
    S_ONE
    S_LIST
    S_MAP

# What the JSON writes for a field the message does not hold (protolist.py: OMIT, NULL,
# ZERO, EMPTY).
cdef enum:
    A_OMIT
    A_NULL
    A_ZERO
    A_EMPTY

cdef enum:
    WT_VARINT = 0
    WT_FIXED64 = 1
    WT_BYTES = 2
    WT_FIXED32 = 5


cdef struct Field:
    PyObject* key       # the JSON name; NULL: not in the table
    int kind
    int sub             # the message of a K_MESSAGE value
    int shape
    int absent
    bint drop_zero      # omitempty on a value: "", 0, false (an empty Time) left out


cdef struct Message:
    Field fields[MAX_FIELD + 1]
    uint64_t defaulted  # the fields whose absence the JSON still writes
    bint shared         # equal bytes give one dict (see Decoder.__init__)


class ProtoError(ValueError):
    """Bytes that are not the message the table describes."""


cdef inline uint64_t _hash(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """A hash of p[:n], eight bytes at a time, for the caches' slots."""
    cdef uint64_t h = <uint64_t>n * 0x9E3779B97F4A7C15ULL, w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        h = (h ^ w) * 0xC2B2AE3D27D4EB4FULL
        i += 8
    if i < n:
        w = 0
        memcpy(&w, p + i, n - i)
        h = (h ^ w) * 0xC2B2AE3D27D4EB4FULL
    return h ^ (h >> 29)


cdef inline Py_ssize_t _varint(const uint8_t* p, Py_ssize_t i, Py_ssize_t end,
                               uint64_t* out) noexcept nogil:
    """The varint at p[i]: the offset after it, -1 if it runs past `end` or 10 bytes."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    while i < end and shift < 70:
        b = p[i]
        i += 1
        v |= <uint64_t>(b & 0x7F) << shift
        if b < 0x80:
            out[0] = v
            return i
        shift += 7
    return -1


cdef inline Py_ssize_t _field(const uint8_t* p, Py_ssize_t i, Py_ssize_t end, uint64_t tag,
                              uint64_t* v, uint64_t* size) noexcept nogil:
    """Past the value of field `tag` at p[i]: the offset after it, -1 if it runs past
    `end`, -2 for a wire type that is not varint, fixed64, length-delimited or fixed32;
    `v` a varint's value, `size` a length-delimited value's length (it ends at the offset
    returned)."""
    cdef int wt = tag & 7
    size[0] = 0
    if wt == WT_VARINT:
        return _varint(p, i, end, v)
    if wt == WT_BYTES:
        i = _varint(p, i, end, size)
        if i < 0 or size[0] > <uint64_t>(end - i):
            return -1
        return i + <Py_ssize_t>size[0]
    if wt == WT_FIXED64:
        return i + 8 if i + 8 <= end else -1
    if wt == WT_FIXED32:
        return i + 4 if i + 4 <= end else -1
    return -2


cdef inline Py_ssize_t _next(const uint8_t* p, Py_ssize_t i, Py_ssize_t end, uint64_t* tag,
                             uint64_t* v, uint64_t* size, Py_ssize_t* at) noexcept nogil:
    """The field at p[i]: its tag, its value (as `_field`) starting at `at`, and the offset
    after it; else -1 or -2 (as `_field`) with `at` where it broke and, if the tag itself
    did, `tag` 0."""
    at[0] = _varint(p, i, end, tag)
    if at[0] < 0:
        at[0] = i
        tag[0] = 0
        return -1
    return _field(p, at[0], end, tag[0], v, size)


cdef class Decoder:
    """The field table, compiled; one decoder holds its caches across calls."""

    cdef Message* messages
    cdef list names             # message names, by index
    cdef dict index             # message name -> index
    cdef list keep              # the JSON names the fields point to
    cdef PyObject** cache
    cdef PyObject** share_keys  # a shared message's bytes (see __init__) ...
    cdef PyObject** share_vals  # ... the dict made of them ...
    cdef int* share_of          # ... and which message they are

    def __cinit__(self) -> None:
        self.messages = NULL
        self.cache = <PyObject**>calloc(CACHE_SLOTS, sizeof(PyObject*))
        self.share_keys = <PyObject**>calloc(SHARE_SLOTS, sizeof(PyObject*))
        self.share_vals = <PyObject**>calloc(SHARE_SLOTS, sizeof(PyObject*))
        self.share_of = <int*>calloc(SHARE_SLOTS, sizeof(int))
        if self.cache == NULL or self.share_keys == NULL or self.share_vals == NULL \
                or self.share_of == NULL:
            raise MemoryError()

    def __init__(self, dict table, shared=frozenset()) -> None:
        """`table`: message name -> [(number, json name, kind, sub-message name or None,
        shape, absent, drop_zero)], the numbers of protolist.py's enums. `shared`: the
        messages whose equal bytes give one dict, made once (a device's attribute
        values, capacities and counters repeat across devices and nodes): the dicts a
        decode returns are then to be read, never changed."""
        cdef Message* m
        cdef Field* f
        self.names = list(table)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.keep = []
        self.messages = <Message*>calloc(len(self.names), sizeof(Message))
        if self.messages == NULL:
            raise MemoryError()
        for i, name in enumerate(self.names):
            m = &self.messages[i]
            for number, key, kind, sub, shape, absent, drop_zero in table[name]:
                if not 0 < number <= MAX_FIELD:
                    raise ValueError(f"{name}.{key}: field number {number} not in 1..{MAX_FIELD}")
                if sub is not None and sub not in self.index:
                    raise ValueError(f"{name}.{key}: no message {sub} in the table")
                key = str(key)
                self.keep.append(key)
                f = &m.fields[number]
                f.key = <PyObject*>key
                f.kind = kind
                f.sub = self.index[sub] if sub is not None else -1
                f.shape = shape
                f.absent = absent
                f.drop_zero = drop_zero
                if absent != A_OMIT:
                    m.defaulted |= <uint64_t>1 << number
        for name in shared:
            if name not in self.index:
                raise ValueError(f"shared: no message {name} in the table")
            self.messages[<int>self.index[name]].shared = True

    def __dealloc__(self) -> None:
        cdef int i
        free(self.messages)
        if self.cache != NULL:
            for i in range(CACHE_SLOTS):
                Py_XDECREF(self.cache[i])
            free(self.cache)
        if self.share_keys != NULL and self.share_vals != NULL:
            for i in range(SHARE_SLOTS):
                Py_XDECREF(self.share_keys[i])
                Py_XDECREF(self.share_vals[i])
        free(self.share_keys)
        free(self.share_vals)
        free(self.share_of)

    def decode_object(self, const uint8_t[::1] data not None):
        """An API server's protobuf body (``k8s\\0``, then a runtime.Unknown: typeMeta = 1
        {apiVersion = 1, kind = 2}, raw = 2, contentEncoding = 3): the dict of its object,
        decoded as the message named by its kind, with the apiVersion and kind its JSON
        has."""
        cdef Py_ssize_t n = data.shape[0], i = 4, j, start = 0, size_raw = 0
        cdef uint64_t tag = 0, size, v = 0
        cdef const uint8_t* p
        if n < 4 or memcmp(&data[0], b"k8s\x00", 4) != 0:
            raise ProtoError("not Kubernetes protobuf: the body does not start with k8s\\0")
        p = &data[0]
        type_meta = {}
        encoding = ""
        while i < n:
            i = _next(p, i, n, &tag, &v, &size, &j)
            if i < 0:
                self._broken(-1, <int>(tag >> 3), j, i, tag)
            if tag == (1 << 3 | WT_BYTES):
                type_meta = self._message(p + i - size, size, i - size, self.index["TypeMeta"])
            elif tag == (2 << 3 | WT_BYTES):
                start, size_raw = i - size, size
            elif tag == (3 << 3 | WT_BYTES):
                encoding = self._string(p + i - size, size)
        kind = type_meta.get("kind", "")
        if encoding:
            raise ProtoError(f"{kind}: content encoding {encoding!r} is not supported")
        if kind not in self.index:
            raise ProtoError(f"no message {kind or '(no kind)'} in the table")
        body = self._message(p + start, size_raw, start, self.index[kind])
        return {"kind": kind, "apiVersion": type_meta.get("apiVersion", ""), **body}

    cdef int _broken(self, int m, int number, Py_ssize_t at, Py_ssize_t code,
                     uint64_t tag) except -1:
        """The error for what _varint or _field found wrong at byte `at`."""
        if code == -2:
            return self._fail(m, number, at, f"wire type {tag & 7} is not supported")
        return self._fail(m, number, at, "truncated: runs past the end of its message")

    cdef int _fail(self, int m, int number, Py_ssize_t at, str what) except -1:
        """A ProtoError naming the message, the field and the byte of the input."""
        if m < 0:
            raise ProtoError(f"Unknown (field {number}) at byte {at}: {what}")
        field = self.messages[m].fields[number].key if 0 < number <= MAX_FIELD else NULL
        name = f"{self.names[m]}.{<object>field}" if field != NULL else self.names[m]
        raise ProtoError(f"{name} (field {number}) at byte {at}: {what}")

    cdef str _string(self, const uint8_t* p, Py_ssize_t n):
        """The UTF-8 string p[:n]; short ASCII ones shared through the cache (a device's
        attribute names and most values repeat on every node: one object each, as
        orjson does for keys)."""
        cdef uint64_t h = <uint64_t>n, a = 0, b = 0
        cdef PyObject* hit
        if n > CACHE_MAX_LEN:
            return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
        if n >= 8:  # the first and the last 8 bytes and the length pick the slot
            memcpy(&a, p, 8)
            memcpy(&b, p + n - 8, 8)
        else:
            memcpy(&a, p, n)
        h = (a * 0x9E3779B97F4A7C15ULL) ^ (b * 0xC2B2AE3D27D4EB4FULL) ^ h
        h = (h ^ (h >> 32)) & (CACHE_SLOTS - 1)
        hit = self.cache[h]
        if hit != NULL and PyUnicode_GET_LENGTH(<object>hit) == n \
                and memcmp(PyUnicode_DATA(<object>hit), p, n) == 0:
            return <str>hit
        s = PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
        if PyUnicode_IS_ASCII(s):  # its characters are its UTF-8 bytes
            Py_INCREF(s)
            Py_XDECREF(hit)
            self.cache[h] = <PyObject*>s
        return s

    cdef int _inner(self, const uint8_t* p, Py_ssize_t n, Py_ssize_t at, int m, int number,
                    uint64_t want, uint64_t* v, Py_ssize_t* start) except -1:
        """Whether the message p[:n], whose fields the table does not list (a Quantity's
        text, a FieldsV1's JSON, a Time's seconds), holds the field with tag `want` (the
        last one wins): a varint's value through `v`; a length-delimited one's offset
        through `start` and its length through `v`."""
        cdef Py_ssize_t i = 0, j
        cdef uint64_t tag = 0, size, value = 0
        cdef int found = 0
        while i < n:
            i = _next(p, i, n, &tag, &value, &size, &j)
            if i < 0:
                self._broken(m, number, at + j, i, tag)
            if tag == want:
                found = 1
                v[0] = value if tag & 7 == WT_VARINT else size
                start[0] = i - <Py_ssize_t>size
        return found

    cdef object _time(self, const uint8_t* p, Py_ssize_t n, Py_ssize_t at, int m, int number):
        """A metav1.Time (seconds = 1) as its JSON: RFC 3339 in UTC to the second; None
        for the zero time (an empty message)."""
        cdef uint64_t v = 0
        cdef Py_ssize_t unused
        cdef time_t seconds
        cdef tm parts
        cdef char text[40]
        if n == 0:
            return None
        self._inner(p, n, at, m, number, 1 << 3 | WT_VARINT, &v, &unused)
        seconds = <int64_t>v
        if gmtime_r(&seconds, &parts) == NULL or \
                strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &parts) == 0:
            self._fail(m, number, at, f"time {<int64_t>v} out of range")
        return text.decode("ascii")

    cdef object _value(self, const Field* f, int wt, uint64_t v, const uint8_t* p,
                       Py_ssize_t n, Py_ssize_t at, int m, int number):
        """One value of field `f`: varint `v`, or p[:n] for a length-delimited one."""
        cdef uint64_t size
        cdef Py_ssize_t start
        if f.kind == K_INT64 or f.kind == K_INT32 or f.kind == K_BOOL:
            if wt != WT_VARINT:
                self._fail(m, number, at, f"wire type {wt}, expected a varint")
            if f.kind == K_BOOL:
                return v != 0
            if f.kind == K_INT32:
                return PyLong_FromLongLong(<int32_t>v)
            return PyLong_FromLongLong(<int64_t>v)
        if wt != WT_BYTES:
            self._fail(m, number, at, f"wire type {wt}, expected length-delimited")
        if f.kind == K_STRING:
            try:
                return self._string(p, n)
            except UnicodeDecodeError as err:
                self._fail(m, number, at, str(err))
        if f.kind == K_MESSAGE:
            return self._message(p, n, at, f.sub)
        if f.kind == K_TIME:
            return self._time(p, n, at, m, number)
        # a Quantity {string = 1}; a FieldsV1 {Raw = 1}: JSON, null when empty
        if not self._inner(p, n, at, m, number, 1 << 3 | WT_BYTES, &size, &start):
            return "0" if f.kind == K_QUANTITY else None
        if f.kind == K_QUANTITY:
            return self._string(p + start, size)
        return orjson.loads((<const char*>p)[start:start + size]) if size else None

    cdef int _map_entry(self, dict into, const Field* f, const uint8_t* p, Py_ssize_t n,
                        Py_ssize_t at, int m, int number) except -1:
        """A map entry (key: field 1, value: field 2) put into `into`."""
        cdef Py_ssize_t i = 0, j
        cdef uint64_t tag = 0, size, v = 0
        key = ""
        value = None
        while i < n:
            i = _next(p, i, n, &tag, &v, &size, &j)
            if i < 0:
                self._broken(m, number, at + j, i, tag)
            if tag == (1 << 3 | WT_BYTES):
                key = self._string(p + i - size, size)
            elif tag >> 3 == 1:
                self._fail(m, number, at + j, "map key is not a string")
            elif tag >> 3 == 2:
                value = self._value(f, tag & 7, v, p + i - size, size, at + i - size, m,
                                    number)
        into[key] = self._zero_value(f) if value is None else value
        return 0

    cdef object _zero_value(self, const Field* f):
        """What Go's zero value of the field's type is in JSON."""
        if f.kind == K_STRING:
            return ""
        if f.kind == K_INT64 or f.kind == K_INT32:
            return 0
        if f.kind == K_BOOL:
            return False
        if f.kind == K_MESSAGE:
            return self._message(NULL, 0, 0, f.sub)
        if f.kind == K_QUANTITY:
            return "0"
        return None

    cdef dict _message(self, const uint8_t* p, Py_ssize_t n, Py_ssize_t at, int m):
        """The dict of message `m` in p[:n], which starts at byte `at` of the input; for a
        shared message, the dict made before of the same bytes, if its slot holds it."""
        cdef uint64_t h
        cdef PyObject* key
        if not self.messages[m].shared or n == 0 or n > SHARE_MAX_LEN:
            return self._fields(p, n, at, m)
        h = (_hash(p, n) + <uint64_t>m) & (SHARE_SLOTS - 1)
        key = self.share_keys[h]
        if key != NULL and self.share_of[h] == m and PyBytes_GET_SIZE(<object>key) == n \
                and memcmp(PyBytes_AS_STRING(<object>key), p, n) == 0:
            return <dict>self.share_vals[h]
        out = self._fields(p, n, at, m)
        made = PyBytes_FromStringAndSize(<const char*>p, n)
        Py_INCREF(made)
        Py_INCREF(out)
        Py_XDECREF(self.share_keys[h])
        Py_XDECREF(self.share_vals[h])
        self.share_keys[h] = <PyObject*>made
        self.share_vals[h] = <PyObject*>out
        self.share_of[h] = m
        return out

    cdef dict _fields(self, const uint8_t* p, Py_ssize_t n, Py_ssize_t at, int m):
        """The dict of message `m` in p[:n], decoded field by field."""
        cdef const Message* msg = &self.messages[m]
        cdef const Field* f
        cdef PyObject* seqs[MAX_FIELD + 1]
        cdef uint64_t seen = 0, tag = 0, v = 0, size, missing
        cdef Py_ssize_t i = 0, j, start, end
        cdef int number, wt
        cdef dict out = {}
        while i < n:
            i = _next(p, i, n, &tag, &v, &size, &j)
            if i < 0:
                self._broken(m, <int>(tag >> 3) if tag >> 3 <= MAX_FIELD else 0, at + j, i, tag)
            number = <int>(tag >> 3) if tag >> 3 <= MAX_FIELD else 0
            f = &msg.fields[number]
            if number == 0 or f.key == NULL:
                continue  # not in the table
            wt = tag & 7
            start = j if wt == WT_VARINT else i - <Py_ssize_t>size  # where the value starts
            if f.shape == S_ONE:
                seen |= <uint64_t>1 << number
                if f.drop_zero and (v == 0 if wt == WT_VARINT else size == 0):
                    continue
                out[<object>f.key] = self._value(f, wt, v, p + start, size, at + start, m,
                                                 number)
                continue
            if not (seen >> number) & 1:
                seen |= <uint64_t>1 << number
                seq = [] if f.shape == S_LIST else {}
                out[<object>f.key] = seq
                seqs[number] = <PyObject*>seq  # the dict holds it
            if f.shape == S_MAP:
                self._map_entry(<dict>seqs[number], f, p + start, size, at + start, m, number)
            elif wt == WT_BYTES and f.kind in (K_INT64, K_INT32, K_BOOL):
                end = i
                while start < end:  # packed
                    j = _varint(p, start, end, &v)
                    if j < 0:
                        self._broken(m, number, at + start, -1, tag)
                    (<list>seqs[number]).append(
                        self._value(f, WT_VARINT, v, NULL, 0, at + start, m, number))
                    start = j
            else:
                (<list>seqs[number]).append(
                    self._value(f, wt, v, p + start, size, at + start, m, number))
        missing = msg.defaulted & ~seen
        while missing:
            number = 0
            while not (missing >> number) & 1:
                number += 1
            missing &= missing - 1
            f = &msg.fields[number]
            if f.absent == A_EMPTY:
                out[<object>f.key] = [] if f.shape == S_LIST else {}
            elif f.absent == A_NULL or f.shape != S_ONE:
                out[<object>f.key] = None
            else:
                out[<object>f.key] = self._zero_value(f)
        return out
