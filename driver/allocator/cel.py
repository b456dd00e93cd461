"""CEL device selectors in the Kubernetes DRA environment.

The one place that knows the CEL library (cel-expr-python, Google's cel-cpp):
everything else sees `compile_selector`, `device_input` and `Selector.matches`.

What the scheduler's environment has and how it is given here:
- `device.driver`, `device.allowMultipleAllocations`, `device.attributes[domain].id`,
  `device.capacity[domain].id`; unqualified names land in the driver's domain.
- An unknown domain is an empty map and an unknown id an error. The library has no
  maps with a default, so every domain the expression names as a string literal gets
  an empty map in the device's input.
- Version attributes are semver values and capacities quantities, with the
  Kubernetes functions (`semver()`, `quantity()`, `compareTo`, `isGreaterThan`, ...).
  The library cannot return opaque Python objects, so both travel as tagged maps
  (`{"__quantity__": "3/2"}`) whose text is canonical: equal values compare equal.
- The libraries of kube-scheduler's StoredExpressions environment (k8s.io/apiserver
  pkg/cel/environment/base.go at v0.37.2): ext.Bindings (`cel.bind`), optionals,
  ext.Sets, ext.Lists and two-variable comprehensions from cel-cpp; ext.Strings v2
  (celstrings), the Kubernetes lists, regex, IP, CIDR, URL and named-format libraries
  (celformats) in Python, with cel-go's results and runtime errors. IPs, CIDRs, URLs
  and formats travel as tagged maps too.
- Two environments. The checker's declares cel-go's types (Quantity, Semver, IP, CIDR,
  URL and NamedFormat as messages of their own, the typed device fields as variables,
  cel-go's overloads per element type and its cross-type orderings) and gives the
  compile errors, with cel-go's validators on its checked expression (homogeneous
  literals, regex and format literals, failing conversions of constants). The
  program runs unchecked in the runtime environment, dispatching on values as cel-go
  does for what it typed dyn; where cel-cpp's semantics differ from cel-go's
  (equality with a Kubernetes value, `in` against a constant list, conversions,
  `size`, `lists.range`, `cel.@mapInsert` it lacks, optional results), the parsed
  expression's calls are renamed to Python functions with cel-go's (`k8s@...`).
- The API server's cost limit (1,000,000) is checked on an estimate with the same
  size hints (32 entries per map, 64 per string or list) and the Kubernetes
  estimator's rules for list scans, equality, `join` and `lists.range`; it follows
  cel-go's model (comprehensions multiply their body by the range size) but is not
  the same code.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any
from urllib.parse import unquote_plus

from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings, ext_optional
from google.protobuf import descriptor_pb2, descriptor_pool

from driver.allocator import celformats, celstrings
from driver.errors import AllocatorError
from driver.kube.quantity import QuantityError, parse_quantity
from driver.kube.semver import SemverError, normalize_semver, parse_semver

MAX_EXPRESSION_LENGTH = 10 * 1024
MAX_COST = 1_000_000
MAP_SIZE_HINT = 32
VALUE_SIZE_HINT = 64

QUANTITY_TAG = "__quantity__"
SEMVER_TAG = "__semver__"
IP_TAG = "__ip__"
CIDR_TAG = "__cidr__"

# The cel-cpp libraries, at the versions that match kube-scheduler's cel-go libraries:
# ext.Lists v3 is v2 with cost support, which cel-cpp's lists v2 has the functions of.
# ext.Strings v2 is celstrings, in Python.
_LIBRARIES = """extensions:
  - name: lists
    version: 2
  - name: sets
  - name: two-var-comprehensions
"""


# A device field a selector reads: ("driver",), ("allowMultipleAllocations",),
# ("attributes" | "capacity", domain, id).
Read = tuple[str, ...]
# `device.driver|allowMultipleAllocations|attributes["d"].id ==|!= literal`: the read's
# position in `Selector.reads`, True for `==`, the literal (str, int or bool).
Test = tuple[int, bool, Any]


class SelectorError(AllocatorError, ValueError):
    """A selector that does not compile, costs too much, or fails on a device."""


@dataclass(frozen=True)
class Selector:
    expression: str
    program: Any = field(compare=False, repr=False)
    domains: frozenset[str] = field(compare=False)
    cost: int = field(compare=False)
    # The device fields the result depends on (`_device_reads`); None: possibly all.
    reads: tuple[Read, ...] | None = field(default=None, compare=False)
    # The expression as a conjunction of equality tests on `reads` (`_tests`), decided
    # without CEL where every value is of the literal's kind (`decide`); None: not one.
    tests: tuple[Test, ...] | None = field(default=None, compare=False)

    def matches(self, device: DeviceInput) -> bool:
        """True or False for one device; SelectorError when CEL reports an error."""
        _evaluation.panics = []
        try:
            value = self.program.eval(device.activation(self.domains))
        except (RuntimeError, ValueError) as err:
            # A failure inside cel-cpp that escapes as an exception, not an error value.
            raise SelectorError(f"CEL runtime error: {err}") from None
        if _evaluation.panics:
            raise SelectorError(f"CEL runtime error: internal error: {_evaluation.panics[0]}")
        kind = value.type().name()
        if kind == "BOOL":
            return bool(value.value())
        if kind == "ERROR":
            raise SelectorError(f"CEL runtime error: {value.value()}")
        raise SelectorError(f"CEL result must be bool, got {kind.lower()}")


@dataclass
class DeviceInput:
    """One device as CEL sees it, converted once and evaluated many times."""

    data: dict[str, Any]
    _activations: dict[frozenset[str], Any] = field(default_factory=dict)

    def activation(self, domains: frozenset[str]) -> Any:
        found = self._activations.get(domains)
        if found is None:
            data = self.data
            missing = [d for d in domains
                       if d not in data["attributes"] or d not in data["capacity"]]
            if missing:
                data = dict(data)
                data["attributes"] = {**{d: {} for d in missing}, **data["attributes"]}
                data["capacity"] = {**{d: {} for d in missing}, **data["capacity"]}
            found = _env().Activation(data={"device": data, **{
                variable: data[name] for name, variable in _TYPED_FIELDS.items()}, **{
                variable: {d: ids for d, ids in self.data[name].items() if ids}
                for name, variable in _DOMAIN_MAPS.items()}})
            self._activations[domains] = found
        return found


def device_input(driver: str, attributes: Mapping[str, Mapping[str, Any]],
                 capacity: Mapping[str, Mapping[str, Any]],
                 allow_multiple_allocations: bool) -> DeviceInput:
    """A device in API form (`{"int": 3}`, `{"value": "40Gi"}`) as CEL input."""
    attrs: dict[str, dict[str, Any]] = {driver: {}}
    for name, value in attributes.items():
        domain, ident = split_qualified(name, driver)
        attrs.setdefault(domain, {})[ident] = attribute_value(value)
    caps: dict[str, dict[str, Any]] = {driver: {}}
    for name, value in capacity.items():
        domain, ident = split_qualified(name, driver)
        caps.setdefault(domain, {})[ident] = quantity_value(parse_quantity(value["value"]))
    return DeviceInput({"driver": driver, "allowMultipleAllocations": allow_multiple_allocations,
                        "attributes": attrs, "capacity": caps})


def split_qualified(name: str, driver: str) -> tuple[str, str]:
    domain, sep, ident = name.partition("/")
    return (domain, ident) if sep else (driver, name)


def attribute_value(value: Mapping[str, Any]) -> Any:
    if "int" in value:
        return int(value["int"])
    if "bool" in value:
        return bool(value["bool"])
    if "string" in value:
        return str(value["string"])
    if "version" in value:
        return semver_value(value["version"])
    raise SelectorError(f"attribute value {dict(value)} has none of int, bool, string, version")


def quantity_value(value: Fraction) -> dict[str, str]:
    return {QUANTITY_TAG: f"{value.numerator}/{value.denominator}"}


def semver_value(text: str) -> dict[str, str]:
    parse_semver(text)
    return {SEMVER_TAG: text.split("+", 1)[0]}


_cache: dict[str, Selector] = {}


def compile_selector(expression: str) -> Selector:
    """Compile once per process; SelectorError names what is wrong."""
    found = _cache.get(expression)
    if found is not None:
        return found
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise SelectorError(f"CEL expression longer than {MAX_EXPRESSION_LENGTH} bytes")
    parsed = _parse(expression)
    root = _unchecked_tree(parsed)[0]
    reads = _device_reads(root)
    typed = _typed_fields(expression, parsed)
    checked = _compile(_checker_env(), typed)
    kind = checked.return_type().name()
    if kind not in ("BOOL", "DYN"):
        raise SelectorError(f"CEL expression must evaluate to bool, not {kind.lower()}")
    tree, types = _checked(checked.serialize())
    mixed = (_mixed_literal(tree, types) or _bad_regex_literal(tree)
             or _bad_format_literal(tree, types) or _folded_conversion_error(tree)
             or _bad_time_literal(tree) or _device_misuse(tree))
    if mixed:
        raise SelectorError(f"CEL compile error: {mixed}")
    cost = _Cost(types).of(tree)
    if cost > MAX_COST:
        raise SelectorError(f"CEL expression too expensive: estimated cost {cost} exceeds the "
                            f"limit of {MAX_COST}")
    program = _parse(typed)
    renames = _renames(tree, types)
    if renames:
        program = _env().deserialize(_renamed_calls(program.serialize(), renames))
    selector = Selector(expression, program, frozenset(_strings(tree) + _domain_fields(tree)),
                        cost, reads, _tests(root, reads) if reads is not None else None)
    _cache[expression] = selector
    return selector


def _parse(expression: str) -> Any:
    """The program, unchecked: types are the checker's business; unchecked, cel-cpp
    dispatches on the values, as cel-go does for what its checker typed dyn."""
    try:
        return _env().compile(expression, disable_check=True)
    except RuntimeError as err:
        raise SelectorError("CEL compile error: " + _first_line(str(err))) from None


# --- equality with a Kubernetes value ---------------------------------------------------
#
# cel-go asks the left operand: a quantity, semver, IP, CIDR or URL compared with a value
# of another type is an error for `==` ("no such overload", and `!=` is true), where
# cel-cpp's equality says false.
# `==` and `!=` whose left operand may hold one (typed dyn or a Kubernetes type) call
# `k8s@eq` / `k8s@ne` instead, renamed in the parsed expression.

_EQUALITY = {"_==_": "k8s@eq", "_!=_": "k8s@ne"}


def _renames(expr: Fields, types: Mapping[int, bytes]) -> dict[int, str]:
    """The ids of the calls to rename, and their new names: the equalities above, and
    `cel.@mapInsert` (transformMap, transformMapEntry), which cel-expr-python declares
    but does not implement."""
    found = {}
    for node in _nodes(expr):
        call = _one(node, 6)
        name = _text(call, 2) if call is not None else ""
        args = call.get(3, []) if call is not None else []
        if name == "cel.@mapInsert":
            found[_id(node)] = "k8s@mapInsert"
        if name == "lists.range":
            found[_id(node)] = "!k8s@range"
        if name in ("validate", "format.named") or (name == "named" and _is_ident(
                _one(call, 1) if call is not None else None, "format")):
            found[_id(node)] = _OPTIONAL_OF
        operand = _one(call, 1) if call is not None and 1 in call else (
            _wire(args[0]) if len(args) == 1 else None)
        kind = _wire(types.get(_id(operand), b"")) if operand is not None else {}
        loop = _one(node, 9)
        places = [operand] if name == "size" else (
            [_wire(a) for a in args[1:]] if name == "@in" else
            [_one(loop, 2)] if loop is not None else [])
        outer = [a for a in places if a is not None and _outer_map(a)]
        if outer:
            found[_id(outer[0])] = "=" + _DOMAIN_MAPS[_outer_map(outer[0])]
        elif name == "size" and operand is not None and (
                not kind or 1 in kind or 9 in kind):
            found[_id(node)] = "k8s@size"
        if name in _CONVERSIONS and len(args) == 1 and call is not None and 1 not in call and (
                not kind or 1 in kind):
            found[_id(node)] = f"k8s@{name}"
        element = _one(_one(kind, 6) or {}, 1) or {}
        timed = {2: "timestamp", 3: "duration"}.get(element.get(5, [0])[0])
        if name in ("max", "min", "sum") and operand is not None and timed:
            found[_id(node)] = f"k8s@{name}_{timed}"
        if name == "@in" and len(args) == 2 and _constant_list(_wire(args[1])) is not None:
            found[_id(node)] = "k8s@in_set" if _constant_list(_wire(args[1])) else ""
        if name in _EQUALITY and args:
            left = _wire(args[0])
            kind = _wire(types.get(_id(left), b""))
            literal = any(n in left for n in (3, 7, 8))
            if not literal and (not kind or 1 in kind or 9 in kind):
                found[_id(node)] = _EQUALITY[name]
    return found


# --- type conversions with cel-go's rules -------------------------------------------------
#
# cel-cpp's differ: int(true) is 1 there, an error in cel-go; int(duration) is its
# nanoseconds in cel-go. A conversion of a value typed dyn calls these instead; one of a
# constant that fails is a compile error, as cel-go folds it when building the program.

_GO_INT = re.compile(r"[+-]?[0-9]+")
_GO_BOOL = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
            "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def _to_int(value: Any) -> int:
    kind = _type_name(value)
    if (kind == "string" and _GO_INT.fullmatch(value)) or (
            kind == "double" and -(2.0**63) < value < 2.0**63):
        value = int(value)
    elif kind == "timestamp":
        value = int(value.timestamp())
    elif kind == "duration":
        value = (value.days * 86400 + value.seconds) * 10**9 + value.microseconds * 1000
    elif kind != "int":
        raise ValueError(f"type conversion error from '{kind}' to 'int'")
    if not -(2**63) <= value < 2**63:
        raise ValueError("range error converting to int")
    return int(value)


def _to_uint(value: Any) -> int:
    kind = _type_name(value)
    if (kind == "string" and _GO_INT.fullmatch(value) and value[0] != "-") or (
            kind == "double" and -1.0 < value < 2.0**64):
        value = int(value)
    elif kind != "int":
        raise ValueError(f"type conversion error from '{kind}' to 'uint'")
    if not 0 <= value < 2**64:
        raise ValueError("range error converting to uint")
    return int(value)


def _to_double(value: Any) -> float:
    kind = _type_name(value)
    if kind in ("int", "double"):
        return float(value)
    if kind == "string" and value == value.strip():
        try:
            return float.fromhex(value) if "0x" in value.lower() else float(value)
        except ValueError:
            pass
    raise ValueError(f"type conversion error from '{kind}' to 'double'")


def _to_bool(value: Any) -> bool:
    kind = _type_name(value)
    if kind == "bool":
        return bool(value)
    if kind == "string" and value in _GO_BOOL:
        return _GO_BOOL[value]
    raise ValueError(f"type conversion error from '{kind}' to 'bool'")


_CONVERSIONS: dict[str, Callable[[Any], Any]] = {
    "int": _to_int, "uint": _to_uint, "double": _to_double, "bool": _to_bool}


def _constant(node: Fields) -> Any:
    """The value of a literal (also inside `dyn()`), else a sentinel."""
    call = _one(node, 6)
    if call is not None and _text(call, 2) == "dyn" and len(call.get(3, [])) == 1:
        return _constant(_wire(call[3][0]))
    const = _one(node, 3)
    if const is None:
        return _NOT_CONSTANT
    if 5 in const:
        return struct.unpack("<d", const[5][0])[0]
    if 3 in const or 4 in const:
        value = int((const.get(3) or const[4])[0])
        return value - 2**64 if 3 in const and value >= 2**63 else value
    if 6 in const:
        return const[6][0].decode()
    return bool(const[2][0]) if 2 in const else _NOT_CONSTANT


_NOT_CONSTANT = object()


def _folded_conversion_error(expr: Fields) -> str:
    """cel-go's: a conversion of a constant that fails fails the program's creation."""
    for node in _nodes(expr):
        call = _one(node, 6)
        args = call.get(3, []) if call is not None else []
        if call is None or _text(call, 2) not in _CONVERSIONS or len(args) != 1 or 1 in call:
            continue
        value = _constant(_wire(args[0]))
        if value is _NOT_CONSTANT:
            continue
        try:
            _CONVERSIONS[_text(call, 2)](value)
        except ValueError as err:
            return f"program instantiation failed: {err}"
    return ""


_OPTIONAL_OF = "optional.ofNonZeroValue"  # a rename that wraps the call instead
# The device's maps with only the domains it has, for `in`, `size` and comprehensions:
# the expression's also hold an empty map for every domain it names (cel-go's maps
# answer any domain, but hold only the device's).
_DOMAIN_MAPS = {"attributes": "__attributes_held", "capacity": "__capacity_held"}


def _outer_map(node: Fields) -> str:
    """"attributes" or "capacity" for `device.attributes`, `device.capacity`, else ""."""
    if _is_ident(node, _TYPED_FIELDS["capacity"]):
        return "capacity"
    select = _one(node, 5)
    if select is not None and _is_ident(_one(select, 1), "device") and not select.get(3):
        field_name = _text(select, 2)
        return field_name if field_name in _DOMAIN_MAPS else ""
    return ""


def _is_ident(node: Fields | None, name: str) -> bool:
    ident = _one(node, 4) if node is not None else None
    return ident is not None and _text(ident, 1) == name


def _constant_list(node: Fields) -> list[Fields] | None:
    """The elements of a list literal of bool, int, uint, double or string constants,
    which cel-go turns into a hash set for `in`; None for any other expression."""
    listing = _one(node, 7)
    if listing is None or 2 in listing:
        return None
    consts = [_one(_wire(b), 3) for b in listing.get(1, [])]
    if all(c is not None and any(n in c for n in (2, 3, 4, 5, 6)) for c in consts):
        return [c for c in consts if c is not None]
    return None


# Where cel-go panics (a Go runtime error, recovered where the evaluation started): the
# whole evaluation fails, whatever `&&` or `||` around it would make of an error value.
# Per thread: the functions run on the thread that evaluates.
_evaluation = threading.local()


def _panic(message: str) -> ValueError:
    _evaluation.panics = [*getattr(_evaluation, "panics", []), message]
    return ValueError(message)


def _in_set(value: Any, items: list[Any]) -> bool:
    """cel-go's `in` against a constant list: a hash lookup, which a semver, a list or a
    map cannot take (a Go panic)."""
    kind = _type_name(value)
    if kind in ("kubernetes.Semver", "list", "map"):
        raise _panic(f"hash of unhashable type {kind}")
    if kind in _TAG_TYPES.values():
        return False
    return any(_cel_equal(value, item) for item in items)


def _range(count: int) -> list[int]:
    """cel-go's lists.range (cel-cpp's lets a C++ exception out for a negative size)."""
    if count < 0:
        raise ValueError(f"lists.range: size must be non-negative, got {count}")
    if count > 1_000_000:
        raise ValueError(f"lists.range: size {count} exceeds maximum allowed (1000000)")
    return list(range(count))


def _size(value: Any) -> int:
    if _type_name(value) in ("string", "bytes", "list", "map"):
        return len(value)
    raise ValueError("no such overload: size")


def _cel_equal(a: Any, b: Any) -> bool:
    """CEL's equality: numbers across int, uint and double; lists and maps by element."""
    kind_a, kind_b = _type_name(a), _type_name(b)
    if kind_a in _TAG_TYPES.values():
        if kind_b != kind_a:
            raise ValueError("no such overload")
        return bool(_q(a) == _q(b)) if kind_a == _TAG_TYPES[QUANTITY_TAG] else a == b
    numbers = ("int", "double")
    if kind_a != kind_b and not (kind_a in numbers and kind_b in numbers):
        return False
    if kind_a == "list":
        return len(a) == len(b) and all(_cel_equal(x, y) for x, y in zip(a, b, strict=True))
    if kind_a == "map":
        return a.keys() == b.keys() and all(_cel_equal(a[k], b[k]) for k in a)
    if kind_a == "type":
        return _type_text(a) == _type_text(b)
    return bool(a == b)


def _map_insert(entries: dict[Any, Any], key: Any, value: Any = None) -> dict[Any, Any]:
    """cel-go's cel.@mapInsert: a key already there is an error."""
    added = key if value is None and isinstance(key, dict) else {key: value}
    for k in added:
        if k in entries:
            raise ValueError(f"insert failed: key {k} already exists")
    return {**entries, **added}


def _cel_not_equal(a: Any, b: Any) -> bool:
    """cel-go's `!=`: true unless equality is true, an error included."""
    try:
        return not _cel_equal(a, b)
    except ValueError:
        return True


def _renamed_calls(serialized: bytes, names: Mapping[int, str]) -> bytes:
    """A serialized parsed expression with the calls of the given ids renamed."""
    wrapper = _ordered(serialized)
    parsed = _ordered(_value(wrapper, 2))
    expr = _rename(_value(parsed, 2), names)
    return _encode(_replaced(wrapper, 2, _encode(_replaced(parsed, 2, expr))))


Ordered = list[tuple[int, int, Any]]


def _ordered(buf: bytes) -> Ordered:
    """A message's fields in order, with their wire types, for re-encoding."""
    fields: Ordered = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, kind = key >> 3, key & 7
        value: Any
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            size = 8 if kind == 1 else 4
            value, i = buf[i:i + size], i + size
        fields.append((number, kind, value))
    return fields


def _value(fields: Ordered, number: int) -> Any:
    return next(value for n, _, value in fields if n == number)


def _replaced(fields: Ordered, number: int, value: bytes) -> Ordered:
    return [(n, k, value if n == number else v) for n, k, v in fields]


def _encode(fields: Ordered) -> bytes:
    out = bytearray()
    for number, kind, value in fields:
        out += _to_varint(number << 3 | kind)
        if kind == 0:
            out += _to_varint(value)
        elif kind == 2:
            out += _to_varint(len(value)) + value
        else:
            out += value
    return bytes(out)


def _to_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# Where a cel.expr.Expr holds other expressions: message field -> its Expr fields.
_EXPR_CHILDREN = {5: (1,), 6: (1, 3), 7: (1,), 9: (2, 4, 5, 6, 7)}


def _rename(buf: bytes, names: Mapping[int, str]) -> bytes:
    """The expression with the calls in `names` renamed; an empty name makes the call
    the constant false (cel-go folds `x in []`), optional.ofNonZeroValue wraps it (in a
    node of a new id, the call's plus 2**40), `=name` replaces the node by that
    variable."""
    fields = _ordered(buf)
    ident = next((v for n, _, v in fields if n == 2), 0)
    if names.get(ident) == "":
        return _encode([(2, 0, ident), (3, 2, _encode([(2, 0, 0)]))])
    if names.get(ident, "").startswith("="):
        return _encode([(2, 0, ident), (4, 2, _encode([(1, 2, names[ident][1:].encode())]))])
    if names.get(ident) == _OPTIONAL_OF:
        wrapped = _rename(buf, {k: v for k, v in names.items() if k != ident})
        return _encode([(2, 0, ident + 2**40), (6, 2, _encode(
            [(2, 2, _OPTIONAL_OF.encode()), (3, 2, wrapped)]))])
    out: Ordered = []
    for number, kind, value in fields:
        if number in _EXPR_CHILDREN and kind == 2:
            inner: Ordered = [
                (n, k, _rename(v, names) if n in _EXPR_CHILDREN[number] and k == 2 else v)
                for n, k, v in _ordered(value)]
            if number == 6 and ident in names:
                name = names[ident]
                # A namespaced function (`lists.range`) parses as a member call on the
                # namespace's name: the renamed call drops that target.
                inner = [(n, k, name.lstrip("!").encode() if n == 2 else v) for n, k, v in inner
                         if not (name.startswith("!") and n == 1)]
            value = _encode(inner)
        elif number == 8 and kind == 2:
            value = _encode([(n, k, _encode([(en, ek, _rename(ev, names) if en in (3, 4) else ev)
                                              for en, ek, ev in _ordered(v)]) if n == 2 else v)
                             for n, k, v in _ordered(value)])
        out.append((number, kind, value))
    return _encode(out)


# The device's fields whose type cel-go knows, and the checker's variables for them.
_TYPED_FIELDS = {"capacity": "__capacity", "driver": "__driver",
                 "allowMultipleAllocations": "__allowMultipleAllocations"}


def _typed_fields(expression: str, program: Any) -> str:
    """The expression with `device.capacity`, `device.driver` and
    `device.allowMultipleAllocations` spelled as variables of their own types, for the
    checker: the library's `device` is a map of dyn where cel-go has an object type."""
    root, info = _unchecked_tree(program)
    offsets = {}
    for entry in info.get(4, []):
        fields = _wire(entry)
        offsets[fields.get(1, [0])[0]] = fields.get(2, [0])[0]
    spans = []
    for node in _nodes(root):
        select = _one(node, 5)
        operand = _one(select, 1) if select is not None else None
        ident = _one(operand, 4) if operand is not None else None
        if (select is None or operand is None or ident is None or _text(ident, 1) != "device"
                or _text(select, 2) not in _TYPED_FIELDS or select.get(3, [0])[0]):
            continue
        start = offsets.get(_id(operand))
        found = re.compile(r"device\s*\.\s*" + _text(select, 2) + r"\b").match(
            expression, start) if start is not None else None
        if found:
            spans.append((found.start(), found.end(), _TYPED_FIELDS[_text(select, 2)]))
    for start, end, name in sorted(spans, reverse=True):
        expression = expression[:start] + name + expression[end:]
    return expression


def _unchecked_tree(program: Any) -> tuple[Fields, Fields]:
    """A parsed program's expression tree and source info, as wire fields."""
    wrapper = _wire(program.serialize())
    message = _wire(wrapper[2][0])
    checked = wrapper[1][0].endswith(b"CheckedExpr")
    return _wire(message[4 if checked else 2][0]), _wire(message[5 if checked else 3][0])


def _device_reads(root: Fields) -> tuple[Read, ...] | None:
    """The device fields the expression reads, when it reads the device only as
    `device.driver`, `device.allowMultipleAllocations` or
    `device.attributes|capacity["<domain>"].<id>` (`has()` of those too); None for any
    other use. Its result is then a function of those values alone (plus the device's
    input being valid), so devices that agree on them share one evaluation."""
    reads: set[Read] = set()
    placed: set[int] = set()
    for node in _nodes(root):
        if 9 in node:
            return None  # a comprehension may bind `device` to something else
        select = _one(node, 5)
        operand = _one(select, 1) if select is not None else None
        if select is None or operand is None:
            continue
        name = _text(select, 2)
        if _is_ident(operand, "device") and name in ("driver", "allowMultipleAllocations"):
            reads.add((name,))
            placed.add(_id(operand))
            continue
        call = _one(operand, 6)
        args = call.get(3, []) if call is not None else []
        if call is None or 1 in call or _text(call, 2) != "_[_]" or len(args) != 2:
            continue
        outer, key = _wire(args[0]), _constant(_wire(args[1]))
        field_ = _one(outer, 5)
        if (field_ is None or field_.get(3, [0])[0] or not isinstance(key, str)
                or _text(field_, 2) not in _DOMAIN_MAPS
                or not _is_ident(_one(field_, 1), "device")):
            continue
        reads.add((_text(field_, 2), key, name))
        placed.add(_id(_one(field_, 1) or {}))
    if any(_is_ident(node, "device") and _id(node) not in placed for node in _nodes(root)):
        return None
    return tuple(sorted(reads))


def _tests(root: Fields, reads: tuple[Read, ...]) -> tuple[Test, ...] | None:
    """The expression as `&&` of `read == literal` / `read != literal` (the read
    `device.driver`, `device.allowMultipleAllocations` or `device.attributes["d"].id`,
    the literal a string, int or bool constant on the right); None for any other shape."""
    tests: list[Test] = []
    stack = [root]
    while stack:
        call = _one(stack.pop(), 6)
        if call is None or 1 in call or len(call.get(3, [])) != 2:
            return None
        name = _text(call, 2)
        left, right = (_wire(arg) for arg in call[3])
        if name == "_&&_":
            stack += [left, right]
            continue
        read, literal = _plain_read(left), _literal(right)
        if name not in ("_==_", "_!=_") or read not in reads or literal is _NOT_CONSTANT:
            return None
        tests.append((reads.index(read), name == "_==_", literal))
    return tuple(tests)


def _plain_read(node: Fields) -> Read | None:
    """The device field a select node reads, for the fields `_tests` compares."""
    select = _one(node, 5)
    if select is None or select.get(3, [0])[0]:
        return None
    operand, name = _one(select, 1), _text(select, 2)
    if _is_ident(operand, "device"):
        return (name,) if name in ("driver", "allowMultipleAllocations") else None
    call = _one(operand, 6) if operand is not None else None
    if call is None or 1 in call or _text(call, 2) != "_[_]" or len(call.get(3, [])) != 2:
        return None
    outer, key = _one(_wire(call[3][0]), 5), _constant(_wire(call[3][1]))
    if (outer is None or outer.get(3, [0])[0] or _text(outer, 2) != "attributes"
            or not _is_ident(_one(outer, 1), "device") or not isinstance(key, str)):
        return None
    return ("attributes", key, name)


def _literal(node: Fields) -> Any:
    """A string, int (not uint) or bool constant, else _NOT_CONSTANT."""
    const = _one(node, 3)
    if const is None or not any(n in const for n in (2, 3, 6)):
        return _NOT_CONSTANT
    return _constant(node)


def decide(tests: tuple[Test, ...], values: tuple[Any, ...]) -> bool | None:
    """The conjunction on a device whose `reads` take `values` (`Device.values`:
    attributes as (kind, value), an absent one as ("absent",)): False where a test is
    false (CEL's `&&` is false then, whatever errors the others give), True where all
    are true, None where a test needs CEL (an absent attribute, another kind than the
    literal's: errors or cross-kind equality)."""
    undecided = False
    for position, equal, literal in tests:
        value = values[position]
        if isinstance(value, tuple):
            if len(value) != 2 or type(value[1]) is not type(literal) or value[0] == "version":
                undecided = True
                continue
            value = value[1]
        elif type(value) is not type(literal):
            undecided = True
            continue
        if (value == literal) != equal:
            return False
    return None if undecided else True


def _compile(env: Any, expression: str) -> Any:
    """The checked expression, or where cel-cpp cannot check it, the parsed one."""
    try:
        return env.compile(expression)
    except RuntimeError as err:
        message = str(err)
        # cel-cpp's checker rejects a comprehension over a value it typed `dyn`
        # (`device.attributes["d"].all(...)`), which cel-go accepts. Such
        # expressions run unchecked; the result type is checked at evaluation.
        if "cannot be the range of a comprehension" not in message:
            raise SelectorError("CEL compile error: " + _first_line(message)) from None
        return env.compile(expression, disable_check=True)


def _first_line(message: str) -> str:
    text = message.removeprefix("INVALID_ARGUMENT: ").removeprefix("ERROR: ")
    return text.split("\n", 1)[0].strip()


# --- the Kubernetes functions -----------------------------------------------------------

def _q(value: Any) -> Fraction:
    if isinstance(value, dict) and QUANTITY_TAG in value:
        return Fraction(value[QUANTITY_TAG])
    raise ValueError("not a quantity")


def _s(value: Any) -> tuple[Any, ...]:
    if isinstance(value, dict) and SEMVER_TAG in value:
        return parse_semver(value[SEMVER_TAG])
    raise ValueError("not a semver")


def _key(value: Any) -> Any:
    if isinstance(value, dict) and QUANTITY_TAG in value:
        return _q(value)
    return _s(value)


def _compare(a: Any, b: Any) -> int:
    left, right = _key(a), _key(b)
    return int(left > right) - int(left < right)


def _quantity(text: str) -> dict[str, str]:
    try:
        return quantity_value(parse_quantity(text))
    except QuantityError as err:
        raise ValueError(str(err)) from None


def _semver(text: str, normalize: bool = False) -> dict[str, str]:
    try:
        return semver_value(normalize_semver(text) if normalize else text)
    except SemverError as err:
        raise ValueError(str(err)) from None


def _is(parse: Callable[..., Any]) -> Callable[..., bool]:
    def check(*args: Any) -> bool:
        try:
            parse(*args)
        except ValueError:
            return False
        return True
    return check


def _as_integer(q: Any) -> int:
    value = _q(q)
    if value.denominator != 1 or not -(2**63) <= value < 2**63:
        raise ValueError("cannot convert value to integer")
    return int(value)


# --- the Kubernetes lists library (library/lists.go) ---------------------------------
#
# One overload on list(dyn) each: cel-cpp cannot declare the per-type overloads of
# cel-go with one implementation. Elements compare as cel-go's Compare does; a pair
# that does not compare is skipped, as cel-go skips its error value.

def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict) and QUANTITY_TAG in value:
        return "quantity"
    return type(value).__name__


_COMPARERS = ("bool", "number", "str", "bytes", "timedelta", "datetime")


def _comparer(value: Any) -> Any:
    """The value if cel-go's types compare it (a traits.Comparer), else the error."""
    if _kind(value) not in _COMPARERS:
        raise ValueError("no such overload")
    return value


def _cmp(a: Any, b: Any) -> int | None:
    """cel-go's Compare: -1, 0, 1, or None (its error value) for two kinds that do not
    compare."""
    if _kind(a) != _kind(b):
        return None
    return int(a > b) - int(a < b)


def _is_sorted(items: list[Any]) -> bool:
    for index, item in enumerate(items):
        _comparer(item)
        if index and _cmp(items[index - 1], item) == 1:
            return False
    return True


def _extreme(name: str, prefer: int) -> Callable[[list[Any]], Any]:
    def pick(items: list[Any]) -> Any:
        if not items:
            raise ValueError(f"{name} called on empty list")
        found = _comparer(items[0])
        for item in items[1:]:
            if _cmp(found, _comparer(item)) == prefer:
                found = item
        return found
    return pick


def _sum(items: list[Any]) -> Any:
    if not all(_kind(item) == "number" for item in items) and not all(
            _kind(item) == "timedelta" for item in items):
        raise ValueError("no such overload")
    total: Any = 0 if not items or _kind(items[0]) == "number" else datetime.timedelta()
    for item in items:
        total += item
        if isinstance(total, int) and not -(2**63) <= total < 2**63:
            raise ValueError("integer overflow")
    return total


def _equal(a: Any, b: Any) -> bool:
    kind = _kind(a)
    return kind == _kind(b) and (a == b if kind != "quantity" else _q(a) == _q(b))


def _index_of(items: list[Any], item: Any) -> int:
    return next((i for i, x in enumerate(items) if _equal(x, item)), -1)


def _last_index_of(items: list[Any], item: Any) -> int:
    return next((i for i in range(len(items) - 1, -1, -1) if _equal(items[i], item)), -1)


def _includes(target: Any, item: Any) -> bool:
    if isinstance(target, list):
        return _index_of(target, item) >= 0
    return _equal(target, item)


# --- the Kubernetes regex library (library/regex.go) --------------------------------

def _regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"Illegal regex: {err}") from None


def _find(text: str, pattern: str) -> str:
    found = _regex(pattern).search(text)
    return found.group(0) if found else ""


def _find_all(text: str, pattern: str, limit: int = -1) -> list[str]:
    """Go's FindAllString: an empty match right after the previous match is skipped."""
    found: list[str] = []
    previous_end = -1
    for match in _regex(pattern).finditer(text):
        if 0 <= limit <= len(found):
            break
        if match.start() == match.end() == previous_end:
            continue
        found.append(match.group(0))
        previous_end = match.end()
    return found


# --- the Kubernetes IP and CIDR libraries (library/ip.go, cidr.go), Go's netip rules --

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def _parse_ip(text: str) -> Address:
    if "%" in text:
        raise ValueError(f"IP address {text!r} with zone value is not allowed")
    try:
        address = ipaddress.ip_address(text)
    except ValueError as err:
        raise ValueError(f"IP Address {text!r} parse error during conversion from string: "
                         f"{err}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        raise ValueError(f"IPv4-mapped IPv6 address {text!r} is not allowed")
    return address


def _parse_cidr(text: str) -> Network:
    address, sep, bits = text.partition("/")
    if not sep or not bits.isdigit() or (len(bits) > 1 and bits[0] == "0"):
        raise ValueError(f"network address parse error during conversion from string: {text!r}")
    parsed = _parse_ip(address)
    if int(bits) > parsed.max_prefixlen:
        raise ValueError(f"network address parse error during conversion from string: {text!r}")
    return ipaddress.ip_interface(f"{parsed}/{bits}")


def _ip_text(address: Address) -> str:
    """Go's netip.Addr.String: RFC 5952, where a single zero group is not shortened."""
    text = str(address)
    if isinstance(address, ipaddress.IPv6Address) and "::" in text:
        groups = address.exploded.split(":")
        if sum(1 for g in groups if g == "0000") == 1 or text.count(":") == 8:
            text = ":".join(format(int(g, 16), "x") for g in groups)
    return text


def _ip_value(text: str) -> dict[str, str]:
    return {IP_TAG: _ip_text(_parse_ip(text))}


def _cidr_value(text: str) -> dict[str, str]:
    network = _parse_cidr(text)
    return {CIDR_TAG: f"{_ip_text(network.ip)}/{network.network.prefixlen}"}


def _ip(value: Any) -> Address:
    if isinstance(value, dict) and IP_TAG in value:
        return ipaddress.ip_address(value[IP_TAG])
    raise ValueError("no such overload")


def _cidr(value: Any) -> Network:
    if isinstance(value, dict) and CIDR_TAG in value:
        return ipaddress.ip_interface(value[CIDR_TAG])
    raise ValueError("no such overload")


def _contains_ip(cidr: Any, ip: Any) -> bool:
    address = _parse_ip(ip) if isinstance(ip, str) else _ip(ip)
    return address in _cidr(cidr).network


def _contains_cidr(cidr: Any, other: Any) -> bool:
    outer = _cidr(cidr).network
    inner = (_parse_cidr(other) if isinstance(other, str) else _cidr(other)).network
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def _tagged_text(value: Any) -> str:
    if isinstance(value, dict) and (IP_TAG in value or CIDR_TAG in value):
        return str(value.get(IP_TAG) or value[CIDR_TAG])
    raise ValueError("no such overload")


def _link_local_multicast(address: Address) -> bool:
    if address.version == 4:
        return address in ipaddress.ip_network("224.0.0.0/24")
    return int(address) >> 112 & 0xFF0F == 0xFF02


def _global_unicast(address: Address) -> bool:
    """Go's IsGlobalUnicast: private ranges count, unlike Python's is_global."""
    return not (address.is_unspecified or address.is_loopback or address.is_multicast
                or address.is_link_local or str(address) == "255.255.255.255")


def _checked_ip(check: Callable[[Address], bool]) -> Callable[[Any], bool]:
    return lambda value: check(_ip(value))


# --- the Kubernetes URL library (library/urls.go), Go's url.ParseRequestURI rules ------

URL_TAG = "__url__"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


@dataclass(frozen=True)
class _Url:
    scheme: str
    host: str
    path: str
    query: str


def _parse_url(text: str) -> _Url:
    """What Go's url.ParseRequestURI accepts, split as url.Parse splits it."""
    def fail(reason: str) -> ValueError:
        return ValueError(f"URL parse error during conversion from string: parse {text!r}: "
                          f"{reason}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise fail("net/url: invalid control character in URL")
    if not text:
        raise fail("empty url")
    scheme, rest = "", text
    head, colon, tail = text.partition(":")
    if colon and _SCHEME.fullmatch(head):
        scheme, rest = head.lower(), tail
    elif colon and head == "":
        raise fail("missing protocol scheme")
    rest, _, query = rest.partition("?")
    if text == "*":
        return _Url("", "", "*", "")
    if not rest.startswith("/"):
        if scheme:
            return _Url(scheme, "", "", query)
        raise fail("invalid URI for request")
    host = ""
    if scheme and rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        rest = slash + path
        host = authority.rpartition("@")[2]
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if host.startswith("[") and "]" not in host:
            raise fail("missing ']' in host")
        if ":" in port and not port.rpartition(":")[2].isdigit() and port.rpartition(":")[2]:
            raise fail(f"invalid port {':' + port.rpartition(':')[2]!r} after host")
    if re.search(r"%(?![0-9A-Fa-f]{2})", rest):
        raise fail("invalid URL escape")
    return _Url(scheme, host, rest.partition("#")[0], query.partition("#")[0])


def _url_value(text: str) -> dict[str, str]:
    _parse_url(text)
    return {URL_TAG: text}


def _url(value: Any) -> _Url:
    if isinstance(value, dict) and URL_TAG in value:
        return _parse_url(value[URL_TAG])
    raise ValueError("no such overload")


def _hostname(value: Any) -> str:
    host = _url(value).host
    if host.startswith("["):
        return host[1:host.index("]")]
    return host.rpartition(":")[0] if ":" in host else host


def _port(value: Any) -> str:
    host = _url(value).host
    tail = host.rpartition("]")[2] if host.startswith("[") else host
    return tail.rpartition(":")[2] if ":" in tail else ""


def _query(value: Any) -> dict[str, list[str]]:
    """Go's url.Values: keys and values unescaped, a pair that does not unescape dropped."""
    found: dict[str, list[str]] = {}
    for pair in _url(value).query.split("&"):
        if not pair:
            continue
        key, _, val = pair.partition("=")
        if re.search(r"%(?![0-9A-Fa-f]{2})", pair):
            continue
        found.setdefault(unquote_plus(key), []).append(unquote_plus(val))
    return found


FORMAT_TAG = "__format__"
_FORMATS = celformats.formats(lambda text: [str(e) for e in _errors(_parse_url, text)])


def _errors(parse: Callable[[str], Any], text: str) -> list[ValueError]:
    try:
        parse(text)
    except ValueError as err:
        return [err]
    return []


def _validate(named: Any, text: str) -> list[str]:
    """A format's errors for the text; wrapped in optional.ofNonZeroValue (see
    _renames): none where there is none, as cel-go's validate answers."""
    if not (isinstance(named, dict) and FORMAT_TAG in named):
        raise ValueError("no such overload")
    return _FORMATS[named[FORMAT_TAG]](text)


_env_instance: Any = None


def _env() -> Any:
    global _env_instance
    if _env_instance is None:
        t = cel.Type
        tagged = t.Map(t.STRING, t.STRING)

        def fn(name: str, *overloads: tuple[str, Any, list[Any], bool, Callable[..., Any]]) -> Any:
            return cel.FunctionDecl(name, [
                cel.Overload(oid, ret, params, is_member=member, impl=impl)
                for oid, ret, params, member, impl in overloads])

        functions = [
            fn("quantity", ("k8s_quantity", tagged, [t.STRING], False, _quantity)),
            fn("isQuantity", ("k8s_is_quantity", t.BOOL, [t.STRING], False, _is(parse_quantity))),
            fn("semver", ("k8s_semver", tagged, [t.STRING], False, _semver),
               ("k8s_semver_normalize", tagged, [t.STRING, t.BOOL], False, _semver)),
            fn("isSemver", ("k8s_is_semver", t.BOOL, [t.STRING], False, _is(_semver)),
               ("k8s_is_semver_normalize", t.BOOL, [t.STRING, t.BOOL], False, _is(_semver))),
            fn("compareTo", ("k8s_compare_to", t.INT, [tagged, tagged], True, _compare)),
            fn("isGreaterThan", ("k8s_is_greater_than", t.BOOL, [tagged, tagged], True,
                                 lambda a, b: _compare(a, b) > 0)),
            fn("isLessThan", ("k8s_is_less_than", t.BOOL, [tagged, tagged], True,
                              lambda a, b: _compare(a, b) < 0)),
            fn("sign", ("k8s_quantity_sign", t.INT, [tagged], True,
                        lambda q: (_q(q) > 0) - (_q(q) < 0))),
            fn("add", ("k8s_quantity_add", tagged, [tagged, tagged], True,
                       lambda a, b: quantity_value(_q(a) + _q(b))),
               ("k8s_quantity_add_int", tagged, [tagged, t.INT], True,
                lambda a, b: quantity_value(_q(a) + b))),
            fn("sub", ("k8s_quantity_sub", tagged, [tagged, tagged], True,
                       lambda a, b: quantity_value(_q(a) - _q(b))),
               ("k8s_quantity_sub_int", tagged, [tagged, t.INT], True,
                lambda a, b: quantity_value(_q(a) - b))),
            fn("asInteger", ("k8s_quantity_as_integer", t.INT, [tagged], True, _as_integer)),
            fn("isInteger", ("k8s_quantity_is_integer", t.BOOL, [tagged], True,
                             lambda q: _q(q).denominator == 1 and -(2**63) <= _q(q) < 2**63)),
            fn("asApproximateFloat", ("k8s_quantity_as_float", t.DOUBLE, [tagged], True,
                                      lambda q: float(_q(q)))),
            fn("major", ("k8s_semver_major", t.INT, [tagged], True, lambda s: _s(s)[0])),
            fn("minor", ("k8s_semver_minor", t.INT, [tagged], True, lambda s: _s(s)[1])),
            fn("patch", ("k8s_semver_patch", t.INT, [tagged], True, lambda s: _s(s)[2])),
            *_list_functions(fn),
            fn("find", ("k8s_find", t.STRING, [t.STRING, t.STRING], True, _find)),
            fn("findAll", ("k8s_find_all", t.List(t.STRING), [t.STRING, t.STRING], True,
                           _find_all),
               ("k8s_find_all_limit", t.List(t.STRING), [t.STRING, t.STRING, t.INT], True,
                _find_all)),
            *_network_functions(fn, tagged),
            *_string_functions(fn),
            fn("k8s@eq", ("k8s_equals", t.BOOL, [t.DYN, t.DYN], False, _cel_equal)),
            fn("k8s@ne", ("k8s_not_equals", t.BOOL, [t.DYN, t.DYN], False, _cel_not_equal)),
            fn("k8s@mapInsert", ("k8s_map_insert", t.Map(t.DYN, t.DYN),
                                 [t.Map(t.DYN, t.DYN), t.DYN, t.DYN], False, _map_insert),
               ("k8s_map_insert_map", t.Map(t.DYN, t.DYN),
                [t.Map(t.DYN, t.DYN), t.Map(t.DYN, t.DYN)], False, _map_insert)),
            *(fn(f"k8s@{name}", (f"k8s_to_{name}", result, [t.DYN], False, _CONVERSIONS[name]))
              for name, result in (("int", t.INT), ("uint", t.UINT), ("double", t.DOUBLE),
                                   ("bool", t.BOOL))),
            fn("k8s@range", ("k8s_range", t.List(t.INT), [t.INT], False, _range)),
            fn("k8s@size", ("k8s_size", t.INT, [t.DYN], False, _size),
               ("k8s_size_member", t.INT, [t.DYN], True, _size)),
            fn("k8s@in_set", ("k8s_in_set", t.BOOL, [t.DYN, t.List(t.DYN)], False, _in_set)),
            *(fn(f"k8s@{name}_{kind.name().lower()}", (
                f"k8s_{name}_{kind.name().lower()}", kind, [t.List(kind)], True, impl))
              for kind in (t.DURATION, t.TIMESTAMP)
              for name, impl in (("max", _extreme("max", -1)), ("min", _extreme("min", 1)),
                                 ("sum", _sum))),
            *(fn(f"format.{name}", (f"k8s_format_{name}", tagged, [], False,
                                    lambda name=name: {FORMAT_TAG: name}))
              for name in _FORMATS),
            fn("format.named", ("k8s_format_named", tagged, [t.STRING], False,
                                lambda name: {FORMAT_TAG: name} if name in _FORMATS else {})),
            fn("validate", ("k8s_format_validate", t.List(t.STRING), [tagged, t.STRING], True,
                            _validate)),
            fn("url", ("k8s_url", tagged, [t.STRING], False, _url_value)),
            fn("isURL", ("k8s_is_url", t.BOOL, [t.STRING], False, _is(_parse_url))),
            fn("getScheme", ("k8s_url_scheme", t.STRING, [tagged], True,
                             lambda u: _url(u).scheme)),
            fn("getHost", ("k8s_url_host", t.STRING, [tagged], True, lambda u: _url(u).host)),
            fn("getHostname", ("k8s_url_hostname", t.STRING, [tagged], True, _hostname)),
            fn("getPort", ("k8s_url_port", t.STRING, [tagged], True, _port)),
            fn("getEscapedPath", ("k8s_url_path", t.STRING, [tagged], True,
                                  lambda u: _url(u).path)),
            fn("getQuery", ("k8s_url_query", t.Map(t.STRING, t.List(t.STRING)), [tagged], True,
                            _query)),
        ]
        _env_instance = cel.NewEnv(
            config=cel.NewEnvConfigFromYaml(_LIBRARIES),
            variables={"device": t.Map(t.STRING, t.DYN),
                       **{v: t.DYN for v in _TYPED_FIELDS.values()},
                       **{v: t.Map(t.STRING, t.DYN) for v in _DOMAIN_MAPS.values()}},
            # An extension, not `functions`: `string` merges with the standard library's.
            extensions=[ext_bindings.ExtBindings(), ext_optional.ExtOptional(),
                        cel.CelExtension("kubernetes", functions)])
    return _env_instance


Declare = Callable[..., Any]
_COMPARABLE = ("int", "uint", "double", "bool", "duration", "timestamp", "string", "bytes")

# The type checker's view: the declarations of cel-go's Kubernetes libraries with their
# own types (Q quantity, S semver, IP, CIDR; L(x) a list), for compile errors where
# cel-go has them. Programs are never run from it. (name, member, parameters, result)
_SIGNATURES: tuple[tuple[str, bool, tuple[str, ...], str], ...] = (
    ("quantity", False, ("string",), "Q"), ("isQuantity", False, ("string",), "bool"),
    ("semver", False, ("string",), "S"), ("semver", False, ("string", "bool"), "S"),
    ("isSemver", False, ("string",), "bool"), ("isSemver", False, ("string", "bool"), "bool"),
    *((name, True, (k, k), result) for k in ("Q", "S") for name, result in
      (("compareTo", "int"), ("isGreaterThan", "bool"), ("isLessThan", "bool"))),
    ("sign", True, ("Q",), "int"), ("add", True, ("Q", "Q"), "Q"), ("add", True, ("Q", "int"), "Q"),
    ("sub", True, ("Q", "Q"), "Q"), ("sub", True, ("Q", "int"), "Q"),
    ("asInteger", True, ("Q",), "int"), ("isInteger", True, ("Q",), "bool"),
    ("asApproximateFloat", True, ("Q",), "double"),
    ("major", True, ("S",), "int"), ("minor", True, ("S",), "int"), ("patch", True, ("S",), "int"),
    *(("isSorted", True, (f"L({k})",), "bool") for k in _COMPARABLE),
    *((name, True, (f"L({k})",), k) for k in _COMPARABLE for name in ("max", "min")),
    *(("sum", True, (f"L({k})",), k) for k in ("int", "uint", "double", "duration")),
    ("indexOf", True, ("L(dyn)", "dyn"), "int"), ("lastIndexOf", True, ("L(dyn)", "dyn"), "int"),
    ("includes", True, ("dyn", "dyn"), "bool"),
    *((name, True, ("string", "string", *offset), "int") for name in ("indexOf", "lastIndexOf")
      for offset in ((), ("int",))),
    ("charAt", True, ("string", "int"), "string"),
    *((name, True, ("string",), "string") for name in ("lowerAscii", "upperAscii", "trim")),
    ("replace", True, ("string", "string", "string"), "string"),
    ("replace", True, ("string", "string", "string", "int"), "string"),
    ("split", True, ("string", "string"), "L(string)"),
    ("split", True, ("string", "string", "int"), "L(string)"),
    ("substring", True, ("string", "int"), "string"),
    ("substring", True, ("string", "int", "int"), "string"),
    ("join", True, ("L(string)",), "string"), ("join", True, ("L(string)", "string"), "string"),
    ("format", True, ("string", "L(dyn)"), "string"),
    ("strings.quote", False, ("string",), "string"),
    ("find", True, ("string", "string"), "string"),
    ("findAll", True, ("string", "string"), "L(string)"),
    ("findAll", True, ("string", "string", "int"), "L(string)"),
    ("ip", False, ("string",), "IP"), ("ip", True, ("CIDR",), "IP"),
    ("isIP", False, ("string",), "bool"), ("ip.isCanonical", False, ("string",), "bool"),
    *((name, True, ("IP",), "bool") for name in (
        "isUnspecified", "isLoopback", "isLinkLocalMulticast", "isLinkLocalUnicast",
        "isGlobalUnicast")),
    ("family", True, ("IP",), "int"), ("string", False, ("IP",), "string"),
    ("cidr", False, ("string",), "CIDR"), ("isCIDR", False, ("string",), "bool"),
    ("containsIP", True, ("CIDR", "string"), "bool"), ("containsIP", True, ("CIDR", "IP"), "bool"),
    ("containsCIDR", True, ("CIDR", "string"), "bool"),
    ("containsCIDR", True, ("CIDR", "CIDR"), "bool"),
    ("prefixLength", True, ("CIDR",), "int"), ("masked", True, ("CIDR",), "CIDR"),
    ("string", False, ("CIDR",), "string"),
    ("url", False, ("string",), "URL"), ("isURL", False, ("string",), "bool"),
    *((name, True, ("URL",), "string") for name in (
        "getScheme", "getHost", "getHostname", "getPort", "getEscapedPath")),
    ("getQuery", True, ("URL",), "M(string,L(string))"),
    *((f"format.{name}", False, (), "F") for name in (
        "dns1123Label", "dns1123Subdomain", "dns1035Label", "qualifiedName",
        "dns1123LabelPrefix", "dns1123SubdomainPrefix", "dns1035LabelPrefix", "labelValue",
        "uri", "uuid", "byte", "date", "datetime")),
)

# Functions with optional results, which only the configuration can declare.
_OPTIONAL_RESULTS = """functions:
  - name: format.named
    overloads:
      - id: k8s_format_named
        args:
          - type_name: string
        return:
          type_name: optional_type
          params:
            - type_name: kubernetes.NamedFormat
  - name: validate
    overloads:
      - id: k8s_format_validate
        target:
          type_name: kubernetes.NamedFormat
        args:
          - type_name: string
        return:
          type_name: optional_type
          params:
            - type_name: list
              params:
                - type_name: string
"""


# cel-go's CrossTypeNumericComparisons (`1 < 1.5`), which cel-cpp's checker lacks: the
# checker's orderings are declared anew with the mixed numeric overloads. (The runtime
# compares mixed numbers already.)
_ORDERING_REPLACED = """stdlib:
  exclude_functions:
    - name: _<_
    - name: _<=_
    - name: _>_
    - name: _>=_
"""
_ORDERED = ("int", "uint", "double", "string", "bytes", "bool", "timestamp", "duration")
_NUMBERS = ("int", "uint", "double")
_SIGNATURES += tuple(
    (op, False, (a, b), "bool") for op in ("_<_", "_<=_", "_>_", "_>=_")
    for a, b in [(k, k) for k in _ORDERED]
    + [(a, b) for a in _NUMBERS for b in _NUMBERS if a != b])

_OPAQUE = {"Q": "kubernetes.Quantity", "S": "kubernetes.Semver", "IP": "net.IP",
           "CIDR": "net.CIDR", "URL": "kubernetes.URL", "F": "kubernetes.NamedFormat"}


def _type(name: str) -> Any:
    t = cel.Type
    if name.startswith("L("):
        return t.List(_type(name[2:-1]))
    if name.startswith("M("):
        key, value = name[2:-1].split(",", 1)
        return t.Map(_type(key), _type(value))
    return t(_OPAQUE[name]) if name in _OPAQUE else getattr(t, name.upper())


def _opaque_types() -> descriptor_pool.DescriptorPool:
    """cel-go's opaque Kubernetes types as empty messages: types of their own for the
    checker, where cel-cpp's abstract types would collide as overload parameters."""
    pool = descriptor_pool.DescriptorPool()
    for package in ("kubernetes", "net"):
        file = descriptor_pb2.FileDescriptorProto(name=f"gpu_dra_cel_{package}.proto",
                                                  package=package, syntax="proto3")
        for full in _OPAQUE.values():
            if full.startswith(package + "."):
                file.message_type.add(name=full.split(".", 1)[1])
        pool.Add(file)
    return pool


_checker_instance: Any = None


def _checker_env() -> Any:
    global _checker_instance
    if _checker_instance is None:
        overloads: dict[str, list[Any]] = {}
        for number, (name, member, params, result) in enumerate(_SIGNATURES):
            oid = f"k8s_checked_{number}"
            overloads.setdefault(name, []).append(cel.Overload(
                oid, _type(result), [_type(p) for p in params], is_member=member))
        t = cel.Type
        # `string` joins the standard library's declaration, as an extension.
        conversions = cel.FunctionDecl("string", overloads.pop("string"))
        _checker_instance = cel.NewEnv(
            descriptor_pool=_opaque_types(),
            config=cel.NewEnvConfigFromYaml(_ORDERING_REPLACED + _LIBRARIES
                                             + _OPTIONAL_RESULTS),
            variables={"device": t.Map(t.STRING, t.DYN),
                       "__capacity": t.Map(t.STRING, t.Map(t.STRING, _type("Q"))),
                       "__driver": t.STRING, "__allowMultipleAllocations": t.BOOL},
            extensions=[ext_bindings.ExtBindings(), ext_optional.ExtOptional(),
                        cel.CelExtension("kubernetes", [conversions])],
            functions=[cel.FunctionDecl(name, decl) for name, decl in overloads.items()])
    return _checker_instance


def _string_functions(fn: Declare) -> list[Any]:
    """ext.Strings v2 (celstrings), with the list overloads of `indexOf`,
    `lastIndexOf` (Kubernetes lists) in the same declarations."""
    t = cel.Type
    s, i, items = t.STRING, t.INT, t.List(t.DYN)
    return [
        fn("charAt", ("k8s_char_at", s, [s, i], True, celstrings.char_at)),
        fn("indexOf", ("k8s_index_of", i, [s, s], True, celstrings.index_of),
           ("k8s_index_of_offset", i, [s, s, i], True, celstrings.index_of),
           ("k8s_list_index_of", i, [items, t.DYN], True, _index_of)),
        fn("lastIndexOf", ("k8s_last_index_of", i, [s, s], True, celstrings.last_index_of),
           ("k8s_last_index_of_offset", i, [s, s, i], True, celstrings.last_index_of),
           ("k8s_list_last_index_of", i, [items, t.DYN], True, _last_index_of)),
        fn("lowerAscii", ("k8s_lower_ascii", s, [s], True, celstrings.ascii_case(False))),
        fn("upperAscii", ("k8s_upper_ascii", s, [s], True, celstrings.ascii_case(True))),
        fn("replace", ("k8s_replace", s, [s, s, s], True, celstrings.replace),
           ("k8s_replace_n", s, [s, s, s, i], True, celstrings.replace)),
        fn("split", ("k8s_split", t.List(s), [s, s], True, celstrings.split),
           ("k8s_split_n", t.List(s), [s, s, i], True, celstrings.split)),
        fn("substring", ("k8s_substring", s, [s, i], True, celstrings.substring),
           ("k8s_substring_range", s, [s, i, i], True, celstrings.substring)),
        fn("trim", ("k8s_trim", s, [s], True, celstrings.trim)),
        fn("join", ("k8s_join", s, [t.List(s)], True, celstrings.join),
           ("k8s_join_separator", s, [t.List(s), s], True, celstrings.join)),
        fn("format", ("k8s_format", s, [s, items], True,
                      celstrings.format_with(_type_name, _type_text))),
        fn("strings.quote", ("k8s_quote", s, [s], False, celstrings.quote)),
        fn("includes", ("k8s_list_includes", t.BOOL, [t.DYN, t.DYN], True, _includes)),
    ]


_TAG_TYPES = {QUANTITY_TAG: "kubernetes.Quantity", SEMVER_TAG: "kubernetes.Semver",
              IP_TAG: "net.IP", CIDR_TAG: "net.CIDR", URL_TAG: "kubernetes.URL",
              FORMAT_TAG: "kubernetes.NamedFormat"}


_TYPE_TEXTS = {"NULL": "null_type", "TIMESTAMP": "google.protobuf.Timestamp",
               "DURATION": "google.protobuf.Duration"}


def _type_text(value: Any) -> str:
    """A CEL type value as cel-go writes it (`int`, `null_type`)."""
    name = str(value.name())
    return _TYPE_TEXTS.get(name, name.lower())


def _type_name(value: Any) -> str:
    """A run-time value's CEL type name, Kubernetes values by their tag."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        tags = [_TAG_TYPES[k] for k in value if k in _TAG_TYPES]
        return tags[0] if len(value) == 1 and tags else "map"
    names = {bool: "bool", int: "int", float: "double", str: "string", bytes: "bytes",
             bytearray: "bytes", list: "list", datetime.timedelta: "duration",
             datetime.datetime: "timestamp"}
    return names.get(type(value)) or ("type" if isinstance(value, cel.Type) else "map")


def _list_functions(fn: Declare) -> list[Any]:
    t = cel.Type
    items = t.List(t.DYN)
    return [
        fn("isSorted", ("k8s_list_is_sorted", t.BOOL, [items], True, _is_sorted)),
        fn("sum", ("k8s_list_sum", t.DYN, [items], True, _sum)),
        fn("max", ("k8s_list_max", t.DYN, [items], True, _extreme("max", -1))),
        fn("min", ("k8s_list_min", t.DYN, [items], True, _extreme("min", 1))),
    ]


def _network_functions(fn: Declare, tagged: Any) -> list[Any]:
    t = cel.Type
    is_ip = ("k8s_ip_is", t.BOOL, [t.STRING], False, _is(_parse_ip))
    return [
        fn("ip", ("k8s_ip", tagged, [t.STRING], False, _ip_value),
           ("k8s_cidr_ip", tagged, [tagged], True,
            lambda c: {IP_TAG: _ip_text(_cidr(c).ip)})),
        fn("isIP", is_ip),
        fn("ip.isCanonical", ("k8s_ip_is_canonical", t.BOOL, [t.STRING], False,
                              lambda text: _ip_text(_parse_ip(text)) == text)),
        fn("family", ("k8s_ip_family", t.INT, [tagged], True, lambda a: _ip(a).version)),
        fn("isUnspecified", ("k8s_ip_is_unspecified", t.BOOL, [tagged], True,
                             _checked_ip(lambda a: a.is_unspecified))),
        fn("isLoopback", ("k8s_ip_is_loopback", t.BOOL, [tagged], True,
                          _checked_ip(lambda a: a.is_loopback))),
        fn("isLinkLocalMulticast", ("k8s_ip_is_ll_multicast", t.BOOL, [tagged], True,
                                    _checked_ip(_link_local_multicast))),
        fn("isLinkLocalUnicast", ("k8s_ip_is_ll_unicast", t.BOOL, [tagged], True,
                                  _checked_ip(lambda a: a.is_link_local))),
        fn("isGlobalUnicast", ("k8s_ip_is_global_unicast", t.BOOL, [tagged], True,
                               _checked_ip(_global_unicast))),
        fn("cidr", ("k8s_cidr", tagged, [t.STRING], False, _cidr_value)),
        fn("isCIDR", ("k8s_cidr_is", t.BOOL, [t.STRING], False, _is(_parse_cidr))),
        fn("containsIP", ("k8s_cidr_contains_ip", t.BOOL, [tagged, t.DYN], True, _contains_ip)),
        fn("containsCIDR", ("k8s_cidr_contains_cidr", t.BOOL, [tagged, t.DYN], True,
                            _contains_cidr)),
        fn("prefixLength", ("k8s_cidr_prefix_length", t.INT, [tagged], True,
                            lambda c: _cidr(c).network.prefixlen)),
        fn("masked", ("k8s_cidr_masked", tagged, [tagged], True,
                      lambda c: {CIDR_TAG: str(_cidr(c).network)})),
        fn("string", ("k8s_network_string", t.STRING, [tagged], False, _tagged_text)),
    ]


# --- the checked expression tree, for the cost estimate and the named domains ------------
#
# `Expression.serialize()` is a google.protobuf.Any holding a cel.expr.CheckedExpr (or
# ParsedExpr when unchecked). The few fields needed are read straight off the wire.

Fields = dict[int, list[Any]]


def _wire(buf: bytes) -> Fields:
    fields: Fields = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, kind = key >> 3, key & 7
        value: int | bytes
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif kind == 1:
            value, i = buf[i:i + 8], i + 8
        elif kind == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unexpected wire type {kind}")
        fields.setdefault(number, []).append(value)
    return fields


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def _checked(serialized: bytes) -> tuple[Fields, dict[int, bytes]]:
    """The expression and, when it was checked, the type of each node by id."""
    wrapper = _wire(serialized)
    message = _wire(wrapper[2][0])
    if not wrapper[1][0].endswith(b"CheckedExpr"):
        return _wire(message[2][0]), {}
    types = {}
    for entry in message.get(3, []):
        fields = _wire(entry)
        types[fields.get(1, [0])[0]] = fields.get(2, [b""])[0]
    return _wire(message[4][0]), types


def _mixed_literal(expr: Fields, types: Mapping[int, bytes]) -> str:
    """cel-go's homogeneous aggregate literal check: the elements of a list literal,
    and the keys and the values of a map literal, all of one type, except inside
    `format` calls. An empty string when the expression passes."""
    exempt = {_id(inner) for node in _nodes(expr) if (call := _one(node, 6)) is not None
              and _text(call, 2) == "format" for b in call.get(3, [])
              for inner in _nodes(_wire(b))}
    for node in _nodes(expr):
        if _id(node) in exempt:
            continue
        listing = _one(node, 7)
        if listing is not None and 2 not in listing and len(
                {types.get(_id(_wire(e))) for e in listing.get(1, [])}) > 1:
            return "list literal elements of different types"
        struct = _one(node, 8)
        if struct is not None and 1 not in struct:
            entries = [_wire(b) for b in struct.get(2, [])]
            for part in (3, 4):
                if len({types.get(_id(_wire(e[part][0]))) for e in entries if part in e}) > 1:
                    return "map literal entries of different types"
    return ""


def _bad_format_literal(expr: Fields, types: Mapping[int, bytes]) -> str:
    """cel-go's check of `"literal".format([literal list])` at compile time."""
    for node in _nodes(expr):
        call = _one(node, 6)
        target = _one(call, 1) if call is not None else None
        const = _one(target, 3) if target is not None else None
        args = call.get(3, []) if call is not None else []
        listing = _one(_wire(args[0]), 7) if len(args) == 1 else None
        if (call is None or _text(call, 2) != "format" or const is None or 6 not in const
                or listing is None):
            continue
        elements = [_wire(b) for b in listing.get(1, [])]

        def nested(index: int, elements: list[Fields] = elements) -> list[str]:
            return [_static_kind(types.get(_id(n), b"")) for n in _literal_members(
                elements[index])]
        error = celstrings.format_errors(
            const[6][0].decode(), [_static_kind(types.get(_id(e), b"")) for e in elements],
            nested)
        if error:
            return error
    return ""


def _literal_members(node: Fields) -> list[Fields]:
    """The elements of a list literal, the keys and values of a map literal, and theirs."""
    listing, struct = _one(node, 7), _one(node, 8)
    members = ([_wire(b) for b in listing.get(1, [])] if listing is not None else
               _children(8, struct) if struct is not None and 1 not in struct else [])
    return [m for member in members for m in (member, *_literal_members(member))]


def _static_kind(encoded: bytes) -> str:
    """A checked type (cel.expr.Type) as the format check names it."""
    kind = _wire(encoded)
    if 3 in kind:
        return {1: "bool", 2: "int", 3: "uint", 4: "double", 5: "string", 6: "bytes"}.get(
            kind[3][0], "dyn")
    if 5 in kind:
        return {2: "timestamp", 3: "duration"}.get(kind[5][0], "dyn")
    named = {2: "null", 6: "list", 7: "map", 11: "type"}
    found = [name for number, name in named.items() if number in kind]
    if found:
        return found[0]
    return kind[9][0].decode() if 9 in kind else "dyn"


_REGEX_FUNCTIONS = frozenset({"matches", "find", "findAll"})


def _bad_regex_literal(expr: Fields) -> str:
    """cel-go compiles a literal pattern with the program: a bad one does not compile."""
    for node in _nodes(expr):
        call = _one(node, 6)
        if call is not None and _text(call, 2) in _REGEX_FUNCTIONS:
            args = [_wire(b) for b in call.get(3, [])]
            pattern = args[0 if 1 in call else 1] if len(args) > (0 if 1 in call else 1) else None
            const = _one(pattern, 3) if pattern is not None else None
            if const is not None and 6 in const:
                try:
                    re.compile(const[6][0].decode())
                except re.error as err:
                    return f"error parsing regexp: {err}"
    return ""


def _id(expr: Fields) -> int:
    return int(expr.get(2, [0])[0])


def _one(fields: Fields, number: int) -> Fields | None:
    values = fields.get(number)
    return _wire(values[0]) if values else None


def _text(fields: Fields, number: int) -> str:
    values = fields.get(number)
    return values[0].decode() if values else ""


def _nodes(expr: Fields) -> Iterator[Fields]:
    """Every node of the expression."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        for number in (5, 6, 7, 8, 9):
            child = _one(node, number)
            if child is not None:
                stack.extend(_children(number, child))


def _domain_fields(expr: Fields) -> list[str]:
    """The domains named as fields of the device's maps (`device.attributes.example`)."""
    selects = (_one(node, 5) for node in _nodes(expr))
    return [_text(select, 2) for select in selects
            if select is not None and (operand := _one(select, 1)) is not None
            and _outer_map(operand)]


def _device_misuse(expr: Fields) -> str:
    """cel-go's `device` is an object of four fields: anything else done with it does
    not compile (the library's is a map)."""
    fields = {"driver", "attributes", "capacity", "allowMultipleAllocations"}
    selected = set()
    for node in _nodes(expr):
        select = _one(node, 5)
        operand = _one(select, 1) if select is not None else None
        if select is not None and operand is not None and _is_ident(operand, "device"):
            if _text(select, 2) not in fields:
                return f"undefined field '{_text(select, 2)}' of kubernetes.DRADevice"
            selected.add(_id(operand))
    used = [_id(node) for node in _nodes(expr) if _is_ident(node, "device")]
    if any(ident not in selected for ident in used):
        return "kubernetes.DRADevice used other than by its fields"
    return ""


_GO_DURATION = re.compile(r"[-+]?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|ms|s|m|h))+)")


def _bad_time_literal(expr: Fields) -> str:
    """cel-go's duration and timestamp literal validators."""
    for node in _nodes(expr):
        call = _one(node, 6)
        args = call.get(3, []) if call is not None else []
        if call is None or len(args) != 1 or _text(call, 2) not in ("duration", "timestamp"):
            continue
        value = _constant(_wire(args[0]))
        if not isinstance(value, str):
            continue
        if _text(call, 2) == "duration" and not _GO_DURATION.fullmatch(value):
            return f"invalid duration argument: {value!r}"
        if _text(call, 2) == "timestamp" and not _rfc3339(value):
            return f"invalid timestamp argument: {value!r}"
    return ""


def _rfc3339(text: str) -> bool:
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                        r"(Z|[+-][0-9]{2}:[0-9]{2})", text):
        return False
    try:
        datetime.datetime.fromisoformat(
            re.sub(r"\.[0-9]+", "", text.upper()).replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _strings(expr: Fields) -> list[str]:
    """Every string literal of the expression."""
    consts = (_one(node, 3) for node in _nodes(expr))
    return [const[6][0].decode() for const in consts if const is not None and 6 in const]


def _children(kind: int, body: Fields) -> list[Fields]:
    if kind == 5:
        return [_wire(b) for b in body.get(1, [])]
    if kind == 6:
        return [_wire(b) for b in body.get(1, []) + body.get(3, [])]
    if kind == 7:
        return [_wire(b) for b in body.get(1, [])]
    if kind == 8:
        entries = [_wire(b) for b in body.get(2, [])]
        return [_wire(b) for e in entries for b in e.get(3, []) + e.get(4, [])]
    return [_wire(b) for n in (2, 4, 5, 6, 7) for b in body.get(n, [])]


_STRING_FUNCTIONS = {"contains", "startsWith", "endsWith", "lowerAscii", "upperAscii", "split",
                     "replace", "join", "substring", "trim", "indexOf", "lastIndexOf", "format",
                     "charAt", "reverse", "quote", "quantity", "isQuantity", "semver", "isSemver"}


# Functions whose result cel-go sizes as their receiver.
_SIZE_KEEPING = frozenset({"distinct", "reverse", "sort", "sortBy", "slice", "lowerAscii",
                           "upperAscii", "trim", "substring"})


def _int_literal(const: Fields) -> int:
    """An int constant's value, negative as 0 (cel-go's size of lists.range(-1)); a
    constant of another type is unbounded."""
    if 3 not in const:
        return _UNBOUNDED
    value = int(const[3][0])
    return 0 if value >= 2**63 else value


def _literal_size(node: Fields) -> int | None:
    """The number of elements or entries of a list or map literal, else None."""
    listing = _one(node, 7)
    if listing is not None:
        return len(listing.get(1, []))
    struct = _one(node, 8)
    return len(struct.get(2, [])) if struct is not None else None


_LIST_SCANS = frozenset({"isSorted", "sum", "max", "min", "indexOf", "lastIndexOf", "includes"})
_UNBOUNDED = 2**64 - 1  # cel-go's estimate for a size it cannot bound


@dataclass
class _Cost:
    """An upper bound in the spirit of cel-go's estimator with the DRA size hints."""

    types: Mapping[int, bytes] = field(default_factory=dict)
    # The sizes of the comprehension and binding variables in scope (None: unknown).
    scopes: dict[str, int | None] = field(default_factory=dict)

    def of(self, node: Fields) -> int:
        if 3 in node:
            return 0
        if 4 in node:
            return 1
        select = _one(node, 5)
        if select is not None:
            operand = _one(select, 1)
            return 1 + (self.of(operand) if operand is not None else 0)
        call = _one(node, 6)
        if call is not None:
            parts = [_wire(b) for b in call.get(1, []) + call.get(3, [])]
            return sum(self.of(p) for p in parts) + self._call(_text(call, 2), call)
        listing = _one(node, 7)
        if listing is not None:
            return 10 + sum(self.of(_wire(b)) for b in listing.get(1, []))
        struct = _one(node, 8)
        if struct is not None:
            return 30 + sum(self.of(c) for c in _children(8, struct))
        loop = _one(node, 9)
        if loop is not None:
            def part(number: int) -> int:
                child = _one(loop, number)
                return self.of(child) if child is not None else 0
            size = self._size(_one(loop, 2))
            outer = dict(self.scopes)
            self.scopes.update(self._loop_variables(loop))
            try:
                return part(2) + part(4) + size * (part(5) + part(6)) + part(7)
            finally:
                self.scopes = outer
        return 1

    def _loop_variables(self, loop: Fields) -> dict[str, int | None]:
        """A comprehension's variables and their sizes: the element's of a list literal
        (unknown when one is), a map's value size for the device's maps, 1 for an index."""
        over = _one(loop, 2)
        init = _one(loop, 4)
        element: int | None = VALUE_SIZE_HINT
        listing = _one(over, 7) if over is not None else None
        if listing is not None:
            sizes = [self._known_size(_wire(b)) for b in listing.get(1, [])]
            element = None if None in sizes else max(
                (size for size in sizes if size is not None), default=0)
        variables = {_text(loop, 3): self._known_size(init) if init is not None else None}
        if 8 in loop:
            variables.update({_text(loop, 1): 1 if listing is not None else VALUE_SIZE_HINT,
                              _text(loop, 8): element})
        else:
            variables[_text(loop, 1)] = element
        return variables

    def _call(self, function: str, call: Fields) -> int:
        target = _one(call, 1)
        if function == "join" and target is not None:
            # The Kubernetes estimator multiplies by an element size it has no bound for.
            return self._size(target) * _UNBOUNDED
        if function in _LIST_SCANS and target is not None and self._is_list(target):
            # The Kubernetes estimator charges each element, and a string element its
            # length, which it cannot bound for the elements of a list.
            return self._size(target) * (_UNBOUNDED if self._has_text(target) else 1)
        if function == "lists.range":
            count = [_one(_wire(b), 3) for b in call.get(3, [])]
            return _int_literal(count[0]) if count and count[0] else _UNBOUNDED
        if function in ("_==_", "_!=_"):
            return self._equality([_wire(b) for b in call.get(3, [])], function == "_==_")
        if function == "matches":
            return math.ceil(0.1 * VALUE_SIZE_HINT) * math.ceil(0.25 * VALUE_SIZE_HINT)
        if function in _STRING_FUNCTIONS or function == "_+_":
            return 1 + math.ceil(0.1 * VALUE_SIZE_HINT)
        return 1

    def _equality(self, operands: list[Fields], equals: bool) -> int:
        """cel-go's: O(1) for `==` of two values of one Kubernetes type (the Kubernetes
        estimator has no case for `!=`), else a traversal of the smaller operand,
        unbounded when neither size is known."""
        kinds = [_wire(self.types.get(_id(o), b"")).get(9) for o in operands]
        if equals and len(kinds) == 2 and kinds[0] is not None and kinds[0] == kinds[1]:
            return 1
        sizes = [size for size in map(self._known_size, operands) if size is not None]
        return math.ceil(0.1 * min(sizes)) if sizes else _UNBOUNDED

    def _known_size(self, node: Fields) -> int | None:
        """The size cel-go's estimator knows for a node, or None."""
        const = _one(node, 3)
        if const is not None:
            text = const.get(6) or const.get(7)
            return len(text[0].decode(errors="replace")) if text else 1
        literal = _literal_size(node)
        if literal is not None:
            return literal
        kind = _wire(self.types.get(_id(node), b""))
        if (kind.get(3, [0])[0] in (1, 2, 3, 4) or 2 in kind
                or kind.get(5, [0])[0] in (2, 3)):  # scalars, null, timestamp, duration
            return 1
        ident = _one(node, 4)
        if ident is not None and _text(ident, 1) != "device":
            return self.scopes.get(_text(ident, 1), VALUE_SIZE_HINT)
        call = _one(node, 6)
        if call is not None and _text(call, 2) == "dyn" and call.get(3):
            return self._known_size(_wire(call[3][0]))
        listing = _one(_wire(call[3][0]), 7) if call is not None and _text(
            call, 2) == "_[_]" and call.get(3) else None
        if listing is not None:
            sizes = [self._known_size(_wire(b)) for b in listing.get(1, [])]
            return max(sizes, default=0) if None not in sizes else None  # type: ignore[type-var]
        target = _one(call, 1) if call is not None else None
        if call is not None and target is not None and _text(call, 2) in _SIZE_KEEPING:
            return self._known_size(target)
        if call is not None and _text(call, 2) == "lists.range":
            count = [_one(_wire(b), 3) for b in call.get(3, [])]
            return _int_literal(count[0]) if count and count[0] else None
        if any(inner is not None and self._is_attributes(inner) for inner in self._operands(node)):
            return VALUE_SIZE_HINT
        return None

    @classmethod
    def _is_attributes(cls, node: Fields) -> bool:
        """`device.attributes[domain]`."""
        return any(inner is not None and cls._is_outer(inner) and _text(_one(inner, 5) or {}, 2)
                   == "attributes" for inner in cls._operands(node))

    def _element(self, node: Fields) -> Fields | None:
        """The element type of a list-typed node, from the checker's types."""
        listing = _one(_wire(self.types.get(_id(node), b"")), 6)
        return _one(listing, 1) if listing is not None else None

    def _is_list(self, node: Fields) -> bool:
        return _one(_wire(self.types.get(_id(node), b"")), 6) is not None

    def _has_text(self, node: Fields) -> bool:
        element = self._element(node)
        return element is not None and element.get(3, [0])[0] in (5, 6)  # STRING, BYTES

    def _size(self, node: Fields | None) -> int:
        if node is None:
            return 0
        literal = _literal_size(node)
        if literal is not None:
            return literal
        if self._is_device_map(node):
            return MAP_SIZE_HINT
        return VALUE_SIZE_HINT

    @classmethod
    def _is_device_map(cls, node: Fields) -> bool:
        """`device.attributes`, `device.capacity` and the per-domain maps inside them."""
        return cls._is_outer(node) or any(
            inner is not None and cls._is_outer(inner) for inner in cls._operands(node))

    @classmethod
    def _is_outer(cls, node: Fields) -> bool:
        ident = _one(node, 4)
        if ident is not None:
            return _text(ident, 1) == _TYPED_FIELDS["capacity"]
        select = _one(node, 5)
        if select is None:
            return False
        operand = _one(select, 1)
        ident = _one(operand, 4) if operand is not None else None
        return (ident is not None and _text(ident, 1) == "device"
                and _text(select, 2) in ("attributes", "capacity"))

    @staticmethod
    def _operands(node: Fields) -> list[Fields | None]:
        select = _one(node, 5)
        if select is not None:
            return [_one(select, 1)]
        call = _one(node, 6)
        if call is not None and _text(call, 2) == "_[_]":
            return [_wire(b) for b in call.get(3, [])[:1]]
        return []
