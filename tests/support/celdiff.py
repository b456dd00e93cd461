"""Differential run of CEL selectors: ours against kube-scheduler's CEL (the Go oracle).

    .venv/bin/python -m tests.support.celdiff --count 5000 --seed 1

A fixed-seed generator writes selectors from templates that cover every library of the
scheduler's environment (and a few it lacks), on devices with int, bool, string and
version attributes and capacities. Both sides give a verdict: compile-error,
runtime-error, true or false; every difference is a mismatch.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from driver.allocator.cel import SelectorError, compile_selector, device_input
from tests.support.oracle import Oracle, oracle_binary

DRIVER = "gpu.dra.dev"
OTHER = "example.com"

Device = dict[str, Any]
Pick = Callable[[random.Random], str]


def device(rng: random.Random) -> Device:
    """A device in API form, with every attribute type and two capacities."""
    major = rng.randint(0, 3)
    return {
        "driver": DRIVER,
        "allowMultipleAllocations": rng.random() < 0.5,
        "attributes": {
            "index": {"int": rng.randint(-2, 9)},
            "mig": {"bool": rng.random() < 0.5},
            "name": {"string": rng.choice(["h100", "a100-80gb", "L4", "", "gpu-10.0.0.1",
                                           "a/b", "YQ==", "2020-02-29",
                                           "2020-02-03T10:00:00Z", "uri-", "-x",
                                           "0f8fad5b-d9cb-469f-a165-70867728950e"])},
            "driverVersion": {"version": f"{major}.{rng.randint(0, 12)}.{rng.randint(0, 3)}"},
            f"{OTHER}/zone": {"string": rng.choice(["10.0.0.7", "fe80::1", "a"])},
            f"{OTHER}/count": {"int": rng.choice([0, 2**62, -(2**62), 5])},
        },
        "capacity": {
            "memory": {"value": rng.choice(["80Gi", "40Gi", "1500m", "0"])},
            f"{OTHER}/slots": {"value": rng.choice(["4", "1k", "2.5"])},
        },
    }


A = f'device.attributes["{DRIVER}"]'
C = f'device.capacity["{DRIVER}"]'
X = f'device.attributes["{OTHER}"]'


def _ints(rng: random.Random) -> str:
    return "[" + ", ".join(str(rng.randint(-3, 5)) for _ in range(rng.randint(0, 4))) + "]"


def _doubles(rng: random.Random) -> str:
    return "[" + ", ".join(f"{rng.randint(-3, 5)}.5" for _ in range(rng.randint(0, 3))) + "]"


def _strings(rng: random.Random) -> str:
    words = ["'a'", "'b'", "'h100'", "'L4'", "''"]
    return "[" + ", ".join(rng.choice(words) for _ in range(rng.randint(0, 4))) + "]"


def _list(rng: random.Random) -> str:
    return rng.choice([_ints, _ints, _doubles, _strings])(rng)


def _attr(rng: random.Random) -> str:
    return rng.choice([f"{A}.index", f"{A}.mig", f"{A}.name", f"{X}.count", f"{X}.zone",
                       f"{A}.missing", f"{A}.driverVersion", f"{C}.memory"])


def _int(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(-2, 6)), f"{A}.index", f"{X}.count"])


def _regex(rng: random.Random) -> str:
    return rng.choice(["'[0-9]+'", "'[a-z]'", "'h.*'", "'a*'", "'('", "'^$'", "'x?'"])


def _ip(rng: random.Random) -> str:
    return rng.choice(["'10.0.0.1'", "'127.0.0.1'", "'::1'", "'fe80::1'", "'0.0.0.0'",
                       "'224.0.0.5'", "'ff02::2'", "'8.8.8.8'", "'192.168.1.1'", "'1.02.3.4'",
                       "'::ffff:1.2.3.4'", "'2001:db8::1'", "'2001:db8:0:1:1:1:1:1'",
                       "'fe80::1%eth0'", "'x'", f"{X}.zone"])


def _cidr(rng: random.Random) -> str:
    return rng.choice(["'10.0.0.0/8'", "'10.0.0.1/24'", "'::1/128'", "'fe80::/10'",
                       "'2001:db8::/32'", "'0.0.0.0/0'", "'1.2.3.4/33'", "'1.2.3.0/024'",
                       "'10.0.0.0'", "'192.168.0.0/16'"])


def _url(rng: random.Random) -> str:
    return rng.choice(["'https://a.example/p?x=1&y=2&x=3'", "'https://user@a.b:8080/p%20q#f'",
                       "'http://[::1]:80/'", "'/a/b?c=d'", "'a/b'", "'mailto:x'", "''",
                       "'http://a:b/'", "'https://a/%zz'", "'*'", f"{X}.zone"])


_FORMATS = ("dns1123Label", "dns1123Subdomain", "dns1035Label", "qualifiedName",
            "dns1123LabelPrefix", "dns1123SubdomainPrefix", "dns1035LabelPrefix", "labelValue",
            "uri", "uuid", "byte", "date", "datetime")


def _dom(rng: random.Random) -> str:
    return rng.choice([f"'{DRIVER}'", f"'{OTHER}'", "'unknown.example'", "device.driver"])


def _dur(rng: random.Random) -> str:
    return rng.choice(["'1h30m'", "'-.5s'", "'1x'", "'0'", "'1'", "'90s'", "'1.5h'", "''"])


def _ts(rng: random.Random) -> str:
    return rng.choice(["'2020-02-30T00:00:00Z'", "'2021-01-01T00:00:00.123456789Z'",
                       "'2021-01-01t00:00:00z'", "'2021-01-01T00:00:00+01:00'",
                       "'2021-01-01'", "'0000-01-01T00:00:00Z'"])


def _fmt(rng: random.Random) -> str:
    return rng.choice(_FORMATS)


def _fmt_name(rng: random.Random) -> str:
    return rng.choice([f"'{rng.choice(_FORMATS)}'", "'nope'", f"{A}.name"])


def _sum_list(rng: random.Random) -> str:
    return rng.choice([_ints(rng), _doubles(rng), f"[{X}.count, {X}.count]",
                       f"[{A}.index, {X}.count]", "[9223372036854775807, 1]"])


def _dyn_list(rng: random.Random) -> str:
    return "[" + ", ".join(_attr(rng) for _ in range(rng.randint(1, 3))) + "]"


def _cmp(rng: random.Random) -> str:
    return rng.choice(["==", "!=", "<", ">", "<=", ">="])


# Each template is a format string whose {name} fields are filled by PICKS[name].
PICKS: Mapping[str, Pick] = {
    "ints": _ints, "doubles": _doubles, "strings": _strings, "list": _list,
    "attr": _attr, "int": _int, "regex": _regex, "ip": _ip, "cidr": _cidr,
    "url": _url, "fmt": _fmt, "fmtname": _fmt_name, "dom": _dom,
    "dur": _dur, "ts": _ts,
    "sumlist": _sum_list, "dynlist": _dyn_list, "cmp": _cmp,
    "int2": _int, "list2": _list, "ip2": _ip, "cidr2": _cidr, "attr2": _attr,
}

TEMPLATES: tuple[str, ...] = (
    # the Kubernetes lists library
    "{list}.isSorted()", "{dynlist}.isSorted()", "!{list}.isSorted() || {int} > 0",
    "{sumlist}.sum() {cmp} {int}", "{doubles}.sum() {cmp} 1.5",
    "{list}.max() == {list2}.min()", "{ints}.max() {cmp} {int}", "{strings}.min() < 'b'",
    "{dynlist}.max() == {attr}", "{dynlist}.min() == {attr}",
    "{ints}.indexOf({int}) {cmp} {int2}", "{strings}.lastIndexOf('a') == {int}",
    "{dynlist}.indexOf({attr}) >= 0", "{list}.includes({attr})", "{ints}.includes({int})",
    # ext.Lists
    "{list}.slice(0, {int}).size() == {int2}", "[{ints}, {ints}].flatten().size() {cmp} {int}",
    "lists.range({int}).size() == {int2}", "{list}.distinct() == {list2}.reverse()",
    "{list}.sort() == {list2}", "{ints}.sortBy(v, -v).isSorted()", "{dynlist}.sort().size() > 0",
    "{list}.first().orValue({attr}) == {attr2}", "{strings}.last().hasValue()",
    # ext.Sets
    "sets.contains({ints}, {ints})", "sets.equivalent({strings}, {strings})",
    "sets.intersects({list}, {list2})", "sets.contains({dynlist}, [{attr}])",
    # two-variable comprehensions
    "{ints}.all(i, v, v >= i)", "{list}.exists(i, v, i == {int})",
    "{strings}.existsOne(i, v, v == 'a')", "{ints}.transformList(i, v, v * i) == {ints}",
    "{ints}.transformList(i, v, v > 0, v) == {list}",
    "{A}.all(k, v, k != '' && v == v)".replace("{A}", A),
    "{A}.exists(k, v, k == 'index' && v == {int})".replace("{A}", A),
    "{ints}.transformMap(i, v, v) == {{0: 1}}",
    "{strings}.transformMapEntry(i, v, {{v: i}}).size() > 0",
    # regex
    "{attr}.find({regex}) == ''", "'gpu-10'.find({regex}) == '10'",
    "{attr}.findAll({regex}).size() {cmp} {int}", "'abab'.findAll({regex}, {int}).size() == {int2}",
    "{attr}.matches({regex})",
    # IP and CIDR
    "isIP({ip})", "ip({ip}).family() == {int}", "ip.isCanonical({ip})",
    "ip({ip}).isLoopback()", "ip({ip}).isUnspecified()", "ip({ip}).isGlobalUnicast()",
    "ip({ip}).isLinkLocalUnicast()", "ip({ip}).isLinkLocalMulticast()",
    "string(ip({ip})) == {ip2}", "ip({ip}) == ip({ip2})",
    "isCIDR({cidr})", "cidr({cidr}).containsIP({ip})", "cidr({cidr}).containsIP(ip({ip}))",
    "cidr({cidr}).containsCIDR({cidr2})", "cidr({cidr}).containsCIDR(cidr({cidr2}))",
    "cidr({cidr}).prefixLength() {cmp} {int}", "string(cidr({cidr}).masked()) == {cidr2}",
    "cidr({cidr}).ip() == ip({ip})", "string(cidr({cidr})) == {cidr2}",
    # ext.Strings v2 and format
    "'%d-%s'.format([{int}, {attr}]) == 'x'", "'%s'.format([{list}]) == {attr}",
    "'%.2f'.format([{attr}]) != ''", "{attr}.upperAscii() == 'H100'",
    "{attr}.indexOf('0') {cmp} {int}", "{attr}.lastIndexOf('1', 2) == {int}",
    "strings.quote({attr}) != ''", "[{attr}, 'x'].join('-') == 'a-x'",
    "'abc'.reverse() == 'cba'", "{attr}.split('-').size() == {int}",
    "{attr}.charAt({int}) == 'a'", "{attr}.substring({int}) == ''",
    # quantity, semver, bindings, optionals, the device
    "{C}.memory.compareTo(quantity('40Gi')) {cmp} {int}".replace("{C}", C),
    "{C}.memory.isGreaterThan({attr})".replace("{C}", C),
    "{A}.driverVersion.isGreaterThan(semver('1.2.0'))".replace("{A}", A),
    "semver({attr}).major() == {int}", "isSemver({attr}) == isQuantity({attr2})",
    "cel.bind(x, {list}, x.size() {cmp} {int})", "{A}.?missing.orValue({attr}) == {attr2}"
    .replace("{A}", A),
    "device.allowMultipleAllocations == ({int} > 0)", "device.driver == 'gpu.dra.dev'",
    "{attr} {cmp} {attr2}", "{attr} == {int} || {attr2}",
    # literals, and libraries the scheduler does not have
    "[{attr}, {int}].size() > 0", "[1, 'a'].size() == 2", "{{'a': 1, 'b': {attr}}}.size() > 0",
    "math.greatest(1, {int}) == 1", "base64.encode(b'a') == 'YQ=='",
    "regex.replace('a', 'a', 'b') == 'b'",
    # URLs
    "isURL({url})", "url({url}).getScheme() == 'https'", "url({url}).getHost() == {attr}",
    "url({url}).getHostname() != ''", "url({url}).getPort() == '80'",
    "url({url}).getEscapedPath().size() {cmp} {int}", "url({url}).getQuery().size() == {int}",
    "url({url}) == url({url})",
    "{list}.size()", "{int}",
    # other types, operators and conversions around the libraries
    "[1u, 2u].sum() == 3u", "[2u, 1u].isSorted()", "[b'a', b'b'].max() == b'b'",
    "[duration('1s'), duration('2m')].sum() == duration('121s')",
    "[duration('1s'), duration('2m')].max() == duration('2m')",
    "[timestamp('2020-01-01T00:00:00Z'), timestamp('2021-01-01T00:00:00Z')].isSorted()",
    "'%s|%d|%x'.format([duration('90s'), {int}, b'hi']) != ''",
    "'%s'.format([{{'k': {list}}}]).size() {cmp} {int}", "'%b'.format([{attr}]) == '1'",
    "'%o %X'.format([{int}, {int2}]) != ''", "'%e'.format([{attr}]).size() > 0",
    "{attr} in {list}", "{int} in {dynlist}", "has({A}.index) && {A}.index {cmp} {int}"
    .replace("{A}", A),
    "{dynlist}.exists(x, {dynlist}.all(y, x == y))", "{dynlist}[{int}] == {attr}",
    "string({attr}) == '3'", "int({attr}) == {int}", "double({attr}) > 0.5",
    "{attr} / {int} == 1", "{attr} + {attr2} == {attr}", "{attr}.size() == {int}",
    "{ints}.map(x, x * 2).filter(y, y > 0).sum() {cmp} {int}",
    "{ints}.exists_one(x, x > {int})", "{strings}.transformList(i, v, v.upperAscii())"
    ".exists(v, v == 'A')",
    "{ints}.transformMap(i, v, v > 0, string(v)).size() {cmp} {int}",
    "{X}.transformMap(k, v, string(v)).size() == 2".replace("{X}", X),
    "optional.of({attr}).orValue({attr2}) == {attr}", "{A}.?name.hasValue()".replace("{A}", A),
    "{list}[?{int}].orValue({attr}) == {attr2}", "'h100'.substring({int}, {int2}) == 'h'",
    "'a,b,,c'.split(',', {int}).size() == {int2}", "'abab'.replace('b', 'x', {int}) == 'axab'",
    "'abcabc'.lastIndexOf({attr}, {int}) == {int2}", "'abc'.indexOf({attr}, {int}) == {int2}",
    "'  a\\t '.trim() == 'a'", "{attr}.lowerAscii().upperAscii() == {attr2}",
    "quantity({attr}).isInteger()", "semver({attr}, true).minor() == {int}",
    "ip({ip}) in [ip({ip2})]", "cidr({cidr}) == cidr({cidr2})",
    "url({url}).getQuery()['x'] == ['1', '3']",
    # the device's maps themselves, unknown domains and ids
    "device.attributes['vendor.example'].size() == 0", "device.capacity['x.y'].exists(k, true)",
    "device.attributes[{dom}].exists(k, k == 'index')", "{dom} in device.attributes",
    "device.attributes[{dom}].all(k, v, v != {attr})", "has(device.attributes[{dom}].mig)",
    "device.attributes[{dom}].exists(k, device.attributes[{dom}][k] == {attr})",
    "device.capacity[{dom}].all(k, v, v.isGreaterThan(quantity('1')))",
    "device.attributes[{dom}].map(k, k).size() {cmp} {int}",
    "device.attributes[{dom}].?index.orValue(0) {cmp} {int}",
    "device.driver.startsWith('gpu') && device.driver + 1 == 'x'",
    "device.allowMultipleAllocations || {attr}",
    "has(device.attributes.vendor) && device.attributes.vendor.size() == {int}",
    "device['driver'] == 'gpu.dra.dev'", "device.foo == {int}", "has(device.driver)",
    "duration({dur}) > duration('1s')", "timestamp({ts}) > timestamp('2020-01-01T00:00:00Z')",
    # named formats
    "format.{fmt}().validate({attr}).hasValue()", "format.named({fmtname}).hasValue()",
    "format.named({fmtname}).orValue(format.uuid()).validate({attr}).orValue([]).size() "
    "{cmp} {int}",
    "format.{fmt}().validate({ip}).hasValue() == format.{fmt}().validate({url}).hasValue()",
)


# Selectors made of two others: the libraries' values meeting operators, bindings,
# comprehensions and each other's errors.
COMPOSED: tuple[str, ...] = (
    "({sel}) && ({sel2})", "({sel}) || !({sel2})", "({sel}) == ({sel2})",
    "({sel}) ? ({sel2}) : {attr} == {attr2}", "cel.bind(b, {attr}, ({sel}) || b == {attr2})",
    "{dynlist}.exists(v, ({sel}) && v == {attr})", "[({sel}), ({sel2})].exists_one(x, x)",
    "'%s'.format([({sel})]) == 'true'", "[{attr}].all(i, v, ({sel}) != (v == {attr2}))",
)


def selector(rng: random.Random, composed: bool = True) -> str:
    """One selector; a fifth are two others composed (one level deep)."""
    if composed and rng.random() < 0.2:
        template = rng.choice(COMPOSED)
        fields = {name: pick(rng) for name, pick in PICKS.items()
                  if "{" + name + "}" in template}
        fields.update(sel=selector(rng, False), sel2=selector(rng, False))
        return template.format(**fields)
    template = rng.choice(TEMPLATES)
    fields = {name: pick(rng) for name, pick in PICKS.items() if "{" + name + "}" in template}
    return template.format(**fields)


def our_verdict(expression: str, dev: Device) -> tuple[str, str]:
    try:
        compiled = compile_selector(expression)
    except SelectorError as err:
        return "compile-error", str(err)
    data = device_input(dev["driver"], dev["attributes"], dev["capacity"],
                        dev["allowMultipleAllocations"])
    try:
        return str(compiled.matches(data)).lower(), ""
    except SelectorError as err:
        return "runtime-error", str(err)


def oracle_verdict(oracle: Oracle, expression: str, dev: Device) -> tuple[str, str]:
    answer = oracle.run({"celExpression": expression, "device": dev})
    return answer["status"], answer.get("error", "")


@dataclass
class Report:
    count: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    mismatches: list[tuple[str, Device, tuple[str, str], tuple[str, str]]] = field(
        default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.count} selectors in {self.seconds:.1f}s; scheduler verdicts "
                f"{dict(sorted(self.verdicts.items()))}; {len(self.mismatches)} mismatches")


def run(oracle: Oracle, count: int, seed: int) -> Report:
    rng = random.Random(seed)
    report = Report()
    start = time.perf_counter()
    for _ in range(count):
        expression, dev = selector(rng), device(rng)
        theirs = oracle_verdict(oracle, expression, dev)
        mine = our_verdict(expression, dev)
        report.count += 1
        report.verdicts[theirs[0]] += 1
        if theirs[0] != mine[0]:
            report.mismatches.append((expression, dev, theirs, mine))
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    binary = oracle_binary()
    if binary is None:
        print("Go is not installed: cannot build the oracle", file=sys.stderr)
        return 2
    with Oracle(binary) as oracle:
        report = run(oracle, args.count, args.seed)
    for expression, dev, theirs, mine in report.mismatches[:40]:
        print(f"{expression}\n  device {dev['attributes']} {dev['capacity']}\n"
              f"  scheduler {theirs}\n  ours      {mine}")
    print(report.summary())
    return 1 if report.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
