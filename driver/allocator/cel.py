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
- ext.Bindings (`cel.bind`), ext.Strings, optionals.
- The API server's cost limit (1,000,000) is checked on an estimate with the same
  size hints (32 entries per map, 64 per string or list); the estimate follows
  cel-go's model (comprehensions multiply their body by the range size) but is not
  bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings, ext_optional, ext_strings

from driver.errors import AllocatorError
from driver.kube.quantity import QuantityError, parse_quantity
from driver.kube.semver import SemverError, normalize_semver, parse_semver

MAX_EXPRESSION_LENGTH = 10 * 1024
MAX_COST = 1_000_000
MAP_SIZE_HINT = 32
VALUE_SIZE_HINT = 64

QUANTITY_TAG = "__quantity__"
SEMVER_TAG = "__semver__"


class SelectorError(AllocatorError, ValueError):
    """A selector that does not compile, costs too much, or fails on a device."""


@dataclass(frozen=True)
class Selector:
    expression: str
    program: Any = field(compare=False, repr=False)
    domains: frozenset[str] = field(compare=False)
    cost: int = field(compare=False)

    def matches(self, device: DeviceInput) -> bool:
        """True or False for one device; SelectorError when CEL reports an error."""
        value = self.program.eval(device.activation(self.domains))
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
            found = _env().Activation(data={"device": data})
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
    env = _env()
    try:
        program = env.compile(expression)
    except RuntimeError as err:
        message = str(err)
        # cel-cpp's checker rejects a comprehension over a value it typed `dyn`
        # (`device.attributes["d"].all(...)`), which cel-go accepts. Such
        # expressions run unchecked; the result type is checked at evaluation.
        if "cannot be the range of a comprehension" not in message:
            raise SelectorError("CEL compile error: " + _first_line(message)) from None
        program = env.compile(expression, disable_check=True)
    kind = program.return_type().name()
    if kind not in ("BOOL", "DYN"):
        raise SelectorError(f"CEL expression must evaluate to bool, not {kind.lower()}")
    tree = _root(program.serialize())
    cost = _Cost().of(tree)
    if cost > MAX_COST:
        raise SelectorError(f"CEL expression too expensive: estimated cost {cost} exceeds the "
                            f"limit of {MAX_COST}")
    selector = Selector(expression, program, frozenset(_strings(tree)), cost)
    _cache[expression] = selector
    return selector


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
        ]
        _env_instance = cel.NewEnv(
            variables={"device": t.Map(t.STRING, t.DYN)},
            extensions=[ext_bindings.ExtBindings(), ext_strings.ExtStrings(),
                        ext_optional.ExtOptional()],
            functions=functions)
    return _env_instance


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


def _root(serialized: bytes) -> Fields:
    wrapper = _wire(serialized)
    message = _wire(wrapper[2][0])
    checked = wrapper[1][0].endswith(b"CheckedExpr")
    return _wire(message[4 if checked else 2][0])


def _one(fields: Fields, number: int) -> Fields | None:
    values = fields.get(number)
    return _wire(values[0]) if values else None


def _text(fields: Fields, number: int) -> str:
    values = fields.get(number)
    return values[0].decode() if values else ""


def _strings(expr: Fields) -> list[str]:
    """Every string literal of the expression."""
    found: list[str] = []
    stack = [expr]
    while stack:
        node = stack.pop()
        const = _one(node, 3)
        if const is not None and 6 in const:
            found.append(const[6][0].decode())
        for number in (5, 6, 7, 8, 9):
            child = _one(node, number)
            if child is not None:
                stack.extend(_children(number, child))
    return found


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


class _Cost:
    """An upper bound in the spirit of cel-go's estimator with the DRA size hints."""

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
            return sum(self.of(p) for p in parts) + self._call(_text(call, 2))
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
            return part(2) + part(4) + size * (part(5) + part(6)) + part(7)
        return 1

    @staticmethod
    def _call(function: str) -> int:
        if function == "matches":
            return math.ceil(0.1 * VALUE_SIZE_HINT) * math.ceil(0.25 * VALUE_SIZE_HINT)
        if function in _STRING_FUNCTIONS or function in ("_==_", "_!=_", "_+_"):
            return 1 + math.ceil(0.1 * VALUE_SIZE_HINT)
        return 1

    def _size(self, node: Fields | None) -> int:
        if node is None:
            return 0
        listing = _one(node, 7)
        if listing is not None:
            return len(listing.get(1, []))
        struct = _one(node, 8)
        if struct is not None:
            return len(struct.get(2, []))
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
