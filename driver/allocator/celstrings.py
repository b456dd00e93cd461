"""cel-go's strings extension at the version kube-scheduler enables (ext.Strings v2), in
Python: cel-expr-python's own differs from it at the edges (offsets past the end of a
string, `format` of an int with `%f`, of a Kubernetes value, locale grouping) and its
functions cannot be replaced one by one.

`format` follows cel-go's formatter of that version (ext/formatting.go): the clauses
`%s %d %f %e %b %x %X %o`, `%.Nf`, the en_US grouping of `%f`, lists and maps written
as CEL literals; `format_errors` is its compile-time check of a literal format string
against the types of a literal argument list.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

# A value's CEL type as the formatter sees it; Kubernetes values are tagged maps.
Kinds = Callable[[Any], str]

_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            "\v": "\\v", "\\": "\\\\", '"': '\\"'}
_GO_SPACE = frozenset("\t\n\v\f\r \x85\xa0")
STRING_CLAUSE_TYPES = ("strings, bools, bytes, ints, doubles, maps, lists, types, durations, "
                       "and timestamps")


def char_at(text: str, index: int) -> str:
    if not 0 <= index <= len(text):
        raise ValueError(f"index out of range: {index}")
    return text[index:index + 1]


def index_of(text: str, sub: str, offset: int = 0) -> int:
    found = _at_offset(text, sub, offset)
    return found if found is not None else text.find(sub, offset)


def last_index_of(text: str, sub: str, offset: int | None = None) -> int:
    if offset is None:
        if not sub:
            return len(text)
        if len(text.encode()) < len(sub.encode()):
            return -1
        offset = len(text) - 1
    found = _at_offset(text, sub, offset)
    return found if found is not None else text.rfind(
        sub, 0, min(offset, len(text) - len(sub)) + len(sub))


def _at_offset(text: str, sub: str, offset: int) -> int | None:
    """cel-go's answers before a search: a negative offset is an error, an empty
    substring is found at the offset (at most the end), past the end nothing is."""
    if offset < 0:
        raise ValueError(f"index out of range: {offset}")
    if not sub:
        return min(offset, len(text))
    return -1 if offset >= len(text) else None


def ascii_case(upper: bool) -> Callable[[str], str]:
    def convert(text: str) -> str:
        return "".join((c.upper() if upper else c.lower()) if c < "\x80" else c for c in text)
    return convert


def replace(text: str, old: str, new: str, count: int = -1) -> str:
    return text.replace(old, new, count if count >= 0 else -1)


def split(text: str, sep: str, count: int = -1) -> list[str]:
    """Go's strings.SplitN: an empty separator splits into characters."""
    if count == 0:
        return []
    if not sep:
        chars = list(text)
        return chars if count < 0 or count >= len(chars) else [
            *chars[:count - 1], "".join(chars[count - 1:])]
    return text.split(sep, count - 1 if count > 0 else -1)


def substring(text: str, start: int, end: int | None = None) -> str:
    if end is not None and start > end:
        raise ValueError(f"invalid substring range. start: {start}, end: {end}")
    for index in (start, end):
        if index is not None and not 0 <= index <= len(text):
            raise ValueError(f"index out of range: {index}")
    return text[start:end]


def trim(text: str) -> str:
    """Go's strings.TrimSpace: Unicode white space, not Python's wider set."""
    def space(c: str) -> bool:
        return c in _GO_SPACE or (c.isspace() and c > "\xa0")
    start, end = 0, len(text)
    while start < end and space(text[start]):
        start += 1
    while end > start and space(text[end - 1]):
        end -= 1
    return text[start:end]


def join(items: list[Any], sep: str = "") -> str:
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"join: invalid input: {item}")
    return sep.join(items)


def quote(text: str) -> str:
    return '"' + "".join(_ESCAPES.get(c, c) for c in text) + '"'


def _go_quote(text: str) -> str:
    """Go's %q of a string (strconv.Quote)."""
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c.isprintable() or c == " ":
            out.append(c)
        elif ord(c) < 0x80:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def go_double(value: float) -> str:
    """CEL's string(double), Go's strconv.FormatFloat(f, 'g', -1, 64)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    text = "".join(map(str, digits))
    exp = len(digits) + int(exponent) - 1
    prefix = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exp < 0:
        return f"{prefix}0.{'0' * (-exp - 1)}{text}"
    if exp + 1 >= len(text):
        return prefix + text + "0" * (exp + 1 - len(text))
    return f"{prefix}{text[:exp + 1]}.{text[exp + 1:]}"


def _go_duration(value: datetime.timedelta) -> str:
    seconds = Decimal(value.days * 86400 + value.seconds) + Decimal(value.microseconds) / 10**6
    return f"{seconds.normalize():f}s"


def _go_timestamp(value: datetime.datetime) -> str:
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _scientific(value: float) -> str:
    """golang.org/x/text's en_US printing of %e: 1.2345e3 as 1.234500, a multiplication
    sign, 10 and the exponent in superscript digits (at least two)."""
    if math.isnan(value) or math.isinf(value):
        return _grouped(value, 0)
    mantissa, _, exponent = f"{value:.6e}".partition("e")
    sign = "-" if exponent[0] == "-" else ""
    return f"{mantissa}\u00d710{(sign + exponent[1:]).translate(_SUPERSCRIPT)}"


def _grouped(value: float, precision: int) -> str:
    """golang.org/x/text's en_US printing of %.Nf: thousands grouped with commas."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:,.{precision}f}"


class _Formatter:
    """One `format` call at run time, with cel-go's clause rules."""

    def __init__(self, kind: Kinds, type_text: Callable[[Any], str]) -> None:
        self.kind = kind
        self.type_text = type_text

    def string(self, value: Any) -> str:
        kind = self.kind(value)
        if kind == "list":
            return "[" + ", ".join(self._member(v) for v in value) + "]"
        if kind == "map":
            return self._map(value)
        if kind == "double":
            return go_double(value)
        if kind == "bool":
            return "true" if value else "false"
        if kind == "bytes":
            try:
                return bytes(value).decode()
            except UnicodeDecodeError:
                raise ValueError("error during formatting: invalid UTF-8 in bytes") from None
        if kind == "null":
            return "null"
        if kind == "duration":
            return _go_duration(value)
        if kind == "timestamp":
            return _go_timestamp(value)
        if kind == "type":
            return self.type_text(value)
        if kind in ("int", "string"):
            return str(value)
        raise ValueError(f"error during formatting: string clause can only be used on "
                         f"{STRING_CLAUSE_TYPES}, was given {kind}")

    def _member(self, value: Any) -> str:
        kind = self.kind(value)
        if kind == "double":
            text = f"{value:.6f}"
            return f'"{go_double(value)}"' if math.isnan(value) or math.isinf(value) else text
        if kind == "string":
            return _go_quote(value)
        if kind == "bytes":
            return "b" + _go_quote(value.decode(errors="replace"))
        if kind == "duration":
            return f'duration("{_go_duration(value)}")'
        if kind == "timestamp":
            return f'timestamp("{_go_timestamp(value)}")'
        if kind in ("int", "bool", "null", "list", "map", "type"):
            return self.string(value)
        raise ValueError(f"no formatting function for {kind}")

    def _map(self, value: dict[Any, Any]) -> str:
        pairs = []
        for key, item in value.items():
            if self.kind(key) not in ("string", "bool", "int"):
                raise ValueError(f"no formatting function for map key of type {self.kind(key)}")
            pairs.append((self._member(key), self._member(item)))
        pairs.sort(key=lambda pair: pair[0])
        return "{" + ", ".join(f"{k}:{v}" for k, v in pairs) + "}"

    def clause(self, verb: str, precision: int | None, value: Any) -> str:
        kind = self.kind(value)
        if verb == "s":
            return self.string(value)
        if verb == "d" and kind == "int":
            return str(value)
        if verb in "fe" and (kind == "double" or (
                kind == "string" and value in ("NaN", "Infinity", "-Infinity"))):
            number = float(value)
            return _grouped(number, 6 if precision is None else precision) if verb == "f" \
                else _scientific(number)
        if verb == "b" and kind in ("int", "bool"):
            return format(int(value), "b")
        if verb in "xX" and kind in ("int", "string", "bytes"):
            text = (format(value, "x") if kind == "int"
                    else (value if kind == "bytes" else value.encode()).hex())
            return text.upper() if verb == "X" else text
        if verb == "o" and kind == "int":
            return format(value, "o")
        names = {"d": "decimal", "f": "fixed-point", "e": "scientific", "b": "binary",
                 "x": "hex", "X": "hex", "o": "octal"}
        raise ValueError(f"error during formatting: {names[verb]} clause cannot be used on "
                         f"{kind}")


def parse_format(text: str) -> list[str | tuple[str, int | None]]:
    """The literal parts and the clauses (verb, precision) of a format string; cel-go's
    parse errors as ValueError."""
    parts: list[str | tuple[str, int | None]] = []
    i = 0
    literal: list[str] = []
    while i < len(text):
        if text[i] != "%":
            literal.append(text[i])
            i += 1
            continue
        if text[i + 1:i + 2] == "%":
            literal.append("%")
            i += 2
            continue
        if i + 1 >= len(text):
            raise ValueError("unexpected end of string")
        parts.append("".join(literal))
        literal = []
        i += 1
        precision = None
        if text[i] == ".":
            digits_end = i + 1
            while digits_end < len(text) and text[digits_end].isascii() \
                    and text[digits_end].isdigit():
                digits_end += 1
            if digits_end >= len(text):
                raise ValueError("could not parse formatting clause: could not find end of "
                                 "precision specifier")
            if digits_end == i + 1:
                raise ValueError("could not parse formatting clause: error while converting "
                                 "precision to integer")
            precision = int(text[i + 1:digits_end])
            i = digits_end
        verb = text[i]
        if verb not in "sdfebxXo":
            raise ValueError(f"could not parse formatting clause: unrecognized formatting "
                             f"clause \"{verb}\"")
        parts.append((verb, precision))
        i += 1
    parts.append("".join(literal))
    return parts


def format_with(kind: Kinds, type_text: Callable[[Any], str]
                ) -> Callable[[str, list[Any]], str]:
    """`format` at run time, values classified by `kind`, type values named by
    `type_text`."""
    formatter = _Formatter(kind, type_text)

    def format_string(text: str, args: list[Any]) -> str:
        out = []
        index = 0
        for part in _checked_parts(text, len(args)):
            if isinstance(part, str):
                out.append(part)
                continue
            verb, precision = part
            out.append(formatter.clause(verb, precision, args[index]))
            index += 1
        return "".join(out)
    return format_string


def _checked_parts(text: str, count: int) -> list[str | tuple[str, int | None]]:
    parts = parse_format(text)
    clauses = sum(1 for p in parts if not isinstance(p, str))
    if clauses > count:
        raise ValueError(f"index {count} out of range")
    return parts


# The clause checks of cel-go's compile-time validator: which static types each takes.
_STATIC = {"s": ("list", "map", "int", "uint", "double", "bool", "string", "timestamp",
                 "bytes", "duration", "type", "null"),
           "d": ("int", "uint"), "f": ("double", "string"), "e": ("double", "string"),
           "b": ("int", "uint", "bool"), "x": ("int", "uint", "string", "bytes"),
           "X": ("int", "uint", "string", "bytes"), "o": ("int", "uint")}


def format_errors(text: str, arg_kinds: Sequence[str],
                  nested: Callable[[int], Sequence[str]]) -> str:
    """cel-go's compile-time check of `"literal".format([literal list])`: an empty
    string, or the error. `arg_kinds` are the static kinds of the list's elements (dyn
    passes), `nested(i)` the kinds inside element i when it is itself a literal."""
    try:
        parts = parse_format(text)
    except ValueError as err:
        return str(err)
    clauses = [p for p in parts if not isinstance(p, str)]
    for index, (verb, _) in enumerate(clauses):
        if index >= len(arg_kinds):
            return f"index {index} out of range"
        kinds = [arg_kinds[index], *(nested(index) if verb == "s" else ())]
        bad = [k for k in kinds if k != "dyn" and k not in _STATIC[verb]]
        if bad:
            return f"error during formatting: clause {verb} cannot be used on {bad[0]}"
    if len(arg_kinds) > len(clauses):
        return (f"too many arguments supplied to string.format (expected {len(clauses)}, "
                f"got {len(arg_kinds)})")
    return ""
