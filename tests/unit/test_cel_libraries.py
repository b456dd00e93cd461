"""Every library of kube-scheduler's CEL environment compiles and answers as cel-go does."""

from __future__ import annotations

import pytest

from driver.allocator.cel import SelectorError, compile_selector, device_input

A = 'device.attributes["gpu.dra.dev"]'
GPU = device_input(
    "gpu.dra.dev",
    {"index": {"int": 3}, "name": {"string": "h100-sxm"}, "zone": {"string": "10.0.0.7"},
     "mig": {"bool": False}, "driverVersion": {"version": "580.95.5"}},
    {"memory": {"value": "80Gi"}}, allow_multiple_allocations=False)


def matches(expression: str) -> bool:
    return compile_selector(expression).matches(GPU)


@pytest.mark.parametrize("expression", [
    # Kubernetes lists
    "[1, 2, 2].isSorted() && ![2, 1].isSorted() && [1.5, 2.5].isSorted()",
    "[1, 2, 3].sum() == 6 && [1.5, 2.5].sum() == 4.0 && [].sum() == 0",
    "[3, 1, 2].max() == 3 && [3, 1, 2].min() == 1 && [true, false].max()",
    f"[{A}.index, dyn(7)].max() == 7",
    "[1, 2, 1].indexOf(1) == 0 && [1, 2, 1].lastIndexOf(1) == 2 && [1].indexOf(5) == -1",
    "[1, 2].includes(2) && ![1].includes(3)",
    "'abcabc'.indexOf('c') == 2 && 'abcabc'.lastIndexOf('c') == 5",
    # ext.Lists
    "[1, 2, 3, 4].slice(1, 3) == [2, 3]", "[[1], [2, 3]].flatten() == [1, 2, 3]",
    "lists.range(3) == [0, 1, 2]", "[1, 2, 1].distinct() == [1, 2]",
    "[1, 2].reverse() == [2, 1]", "[3, 1, 2].sort() == [1, 2, 3]",
    "['bb', 'a'].sortBy(s, s.size()) == ['a', 'bb']",
    # ext.Sets
    "sets.contains([1, 2, 3], [1, 3])", "sets.equivalent([1, 1, 2], [2, 1])",
    "sets.intersects(['a', 'b'], ['b'])",
    # two-variable comprehensions
    "[10, 20].all(i, v, v == (i + 1) * 10)", "[10, 20].exists(i, v, i == 1 && v == 20)",
    "[1, 2, 2].existsOne(i, v, v == 1)", "[1, 2].transformList(i, v, i + v) == [1, 3]",
    "[1, -2].transformList(i, v, v > 0, v * 10) == [10]",
    f"{A}.exists(k, v, k == 'index' && v == 3)",
    # regex
    f"{A}.name.find('[0-9]+') == '100'", "'a1b22'.findAll('[0-9]+') == ['1', '22']",
    "'a1b22c3'.findAll('[0-9]+', 2) == ['1', '22']", "'abc'.find('x') == ''",
    # IP and CIDR
    f"ip({A}.zone).family() == 4 && isIP('::1') && !isIP('1.2.3')",
    "ip.isCanonical('2001:db8::1') && !ip.isCanonical('2001:DB8::1')",
    "ip('127.0.0.1').isLoopback() && ip('::').isUnspecified()",
    "ip('192.168.1.1').isGlobalUnicast() && !ip('fe80::1').isGlobalUnicast()",
    "ip('fe80::1').isLinkLocalUnicast() && ip('224.0.0.5').isLinkLocalMulticast()",
    "string(ip('10.0.0.1')) == '10.0.0.1' && ip('10.0.0.1') == ip('10.0.0.1')",
    f"cidr('10.0.0.0/8').containsIP({A}.zone) && cidr('10.0.0.0/8').containsIP(ip('10.9.9.9'))",
    "cidr('10.0.0.0/8').containsCIDR('10.1.0.0/16')",
    "!cidr('10.0.0.0/16').containsCIDR(cidr('10.0.0.0/8'))",
    "cidr('10.1.2.3/8').masked() == cidr('10.0.0.0/8') && cidr('10.1.2.3/8').prefixLength() == 8",
    "cidr('10.1.2.3/8').ip() == ip('10.1.2.3') && isCIDR('::1/128') && !isCIDR('10.0.0.0')",
    "string(cidr('10.0.0.0/8')) == '10.0.0.0/8'",
    # ext.Strings v2 and its format
    "'%d GiB on %s'.format([80, 'h100']) == '80 GiB on h100'",
    "strings.quote('a\"b') == '\"a\\\\\"b\"'", "'a-b'.split('-') == ['a', 'b']",
    "[].join(',') == ''", "'Ab'.lowerAscii() == 'ab'",
    "'%.2f|%e|%x|%s'.format([1234.5, 1234.5, 255, [1.5, 'a']]) == "
    "'1,234.50|1.234500\u00d710\u2070\u00b3|ff|[1.500000, \"a\"]'",
    "'abc'.indexOf('c', 5) == -1 && ''.lastIndexOf('1', 2) == -1 && 'abc'.charAt(3) == ''",
    # optionals, bindings, quantity and semver, as before
    f"{A}.?missing.orValue(1) == 1 && [1, 2].first().value() == 1",
    f"cel.bind(d, {A}, d.index == 3)",
    f"{A}.driverVersion.isGreaterThan(semver('580.9.0'))",
    'device.capacity["gpu.dra.dev"].memory.isGreaterThan(quantity("40Gi"))',
])
def test_each_function_compiles_and_answers_true(expression: str) -> None:
    assert matches(expression) is True


@pytest.mark.parametrize("expression, message", [
    ("[].max() == 1", "max called on empty list"),
    ("[].min() == 1", "min called on empty list"),
    ("[9223372036854775807, 1].sum() > 0", "integer overflow"),
    (f"[{A}.driverVersion, {A}.driverVersion].isSorted()", "no such overload"),
    ("ip('fe80::1%eth0').family() == 6", "zone value is not allowed"),
    ("ip('::ffff:1.2.3.4').family() == 6", "IPv4-mapped"),
    ("cidr('10.0.0.0').prefixLength() == 0", "network address parse error"),
    (f"'%.2f'.format([{A}.index]) == ''", "fixed-point clause cannot be used on int"),
    (f"'%s'.format([{A}.driverVersion]) == ''", "was given kubernetes.Semver"),
    (f"{A}.name.find({A}.name + '(') == ''", "Illegal regex"),
])
def test_runtime_errors_are_those_of_cel_go(expression: str, message: str) -> None:
    with pytest.raises(SelectorError, match=rf"runtime error.*{message}"):
        matches(expression)


def test_mixed_types_that_do_not_compare_are_skipped_as_cel_go_skips_them() -> None:
    # cel-go's isSorted and max ignore the error of comparing an int with a string.
    assert matches(f"[{A}.index, {A}.name].isSorted()")
    assert matches(f"[{A}.index, {A}.name].max() == 3")


@pytest.mark.parametrize("expression, message", [
    ("[1, 'a'].size() == 2", "list literal elements of different types"),
    ("{'a': 1, 'b': 'x'}.size() == 2", "map literal entries of different types"),
    ("'a'.matches('(')", "error parsing regexp"),
    ("'%d'.format(['a']) == ''", "cannot be used on string"),
    ("'%s %s'.format([1]) == ''", "index 1 out of range"),
    ("'%s'.format([1, 2]) == ''", "too many arguments"),
    ("'abc'.reverse() == 'cba'", "no matching overload"),
    ("math.greatest(1, 2) == 2", "undeclared reference to 'math'"),
    ("base64.encode(b'a') == 'YQ=='", "undeclared reference to 'base64'"),
    ("regex.replace('a', 'a', 'b') == 'b'", "undeclared reference to 'regex'"),
])
def test_what_the_scheduler_does_not_compile(expression: str, message: str) -> None:
    with pytest.raises(SelectorError, match=rf"compile error.*{message}"):
        compile_selector(expression)


@pytest.mark.parametrize("expression", [
    "['a', 'b'].isSorted()", "['b', 'a'].max() == 'b'", "['a'].includes('a')",
    "['a', 'b'].join(',') == 'a,b'",
    f"lists.range({A}.index).size() == 3",
    f"[{A}.index, {A}.mig].max() == device.capacity['gpu.dra.dev'].memory",
])
def test_what_the_api_server_estimates_over_its_cost_limit(expression: str) -> None:
    # The Kubernetes estimator charges a list's string elements their length, which it
    # cannot bound, and a range or an equality of two values of unknown size likewise.
    with pytest.raises(SelectorError, match="too expensive"):
        compile_selector(expression)


def test_format_arguments_may_mix_types() -> None:
    assert matches("'%s-%d'.format(['a', 1]) == 'a-1'")


def test_transform_map_and_its_duplicate_key_error() -> None:
    # cel-expr-python declares the macros' cel.@mapInsert but has no implementation: the
    # driver's stands in for it.
    assert matches("[10, 20].transformMap(i, v, v + i) == {0: 10, 1: 21}")
    assert matches("{'a': 1, 'b': -1}.transformMap(k, v, v > 0, v * 2) == {'a': 2}")
    assert matches("['x', 'y'].transformMapEntry(i, v, {v: i}) == {'x': 0, 'y': 1}")
    with pytest.raises(SelectorError, match="key x already exists"):
        matches("['x', 'x'].transformMapEntry(i, v, {v: i}).size() == 1")


def test_equality_of_a_kubernetes_value_with_another_type_is_an_error_as_in_cel_go() -> None:
    with pytest.raises(SelectorError, match="no such overload"):
        matches(f"{A}.driverVersion == '580.95.5'")
    assert matches(f"{A}.driverVersion != '580.95.5'")
    assert matches(f"{A}.driverVersion == semver('580.95.5')")
    assert not matches(f"{A}.name == {A}.driverVersion")


@pytest.mark.parametrize("expression", [
    "url('https://a.example:8080/p?x=1&x=2').getHost() == 'a.example:8080'",
    "url('https://a.example:8080/p').getHostname() == 'a.example'",
    "url('https://[::1]:80/').getPort() == '80'",
    "url('https://a/p%20q').getEscapedPath() == '/p%20q'",
    "url('https://a/?x=1&x=2&y=').getQuery() == {'x': ['1', '2'], 'y': ['']}",
    "url('/relative/path').getScheme() == '' && isURL('mailto:x') && !isURL('a/b')",
])
def test_urls_as_in_go(expression: str) -> None:
    assert matches(expression) is True


@pytest.mark.parametrize("expression, expected", [
    # cel-go's `in` against a constant list is a hash lookup: a semver cannot take it,
    # and `x in []` is false without evaluating x.
    (f"{A}.missing in []", False),
    (f"{A}.index in [3.0, 4.0]", True),
    ("[duration('1s'), duration('2m')].sum() == duration('121s')", True),
    ("[timestamp('2020-01-01T00:00:00Z')].max() == timestamp('2020-01-01T00:00:00Z')", True),
    ("int(dyn(duration('1s'))) == 1000000000 && double(dyn('0x1p-2')) == 0.25", True),
    (f"size({A}.name) == 8 && {A}.name.size() == 8", True),
    # An error value, as in cel-go, which `||` absorbs (cel-cpp's escaped as an exception).
    ("lists.range(-2).size() == 1 || true", True),
])
def test_operators_and_conversions_as_in_cel_go(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


@pytest.mark.parametrize("expression, message", [
    (f"{A}.driverVersion in ['1', '2']", "hash of unhashable type"),
    # A Go panic in cel-go: the whole evaluation fails, `|| true` notwithstanding.
    (f"{A}.driverVersion in ['1', '2'] || true", "hash of unhashable type"),
    (f"{A}.driverVersion.size() == 1", "no such overload: size"),
    (f"int({A}.mig) == 0", "type conversion error from 'bool' to 'int'"),
    ("lists.range(-1).size() == 0", "size must be non-negative"),
])
def test_runtime_errors_of_operators_and_conversions(expression: str, message: str) -> None:
    with pytest.raises(SelectorError, match=rf"runtime error.*{message}"):
        matches(expression)


@pytest.mark.parametrize("expression", [
    "int(dyn(true)) == 1", "int(' 1') == 1", "bool('yes')", "uint(dyn(-1)) == 1u"])
def test_a_conversion_of_a_constant_that_fails_does_not_compile(expression: str) -> None:
    # cel-go folds constant conversions when it builds the program.
    with pytest.raises(SelectorError, match="compile error: program instantiation failed"):
        compile_selector(expression)


@pytest.mark.parametrize("expression, expected", [
    ("format.dns1123Label().validate('gpu-0').hasValue()", False),
    ("format.dns1123Label().validate('GPU_0').value().size() > 0", True),
    ("format.named('uuid').hasValue() && !format.named('nope').hasValue()", True),
    (f"format.named('dns1035Label').value().validate({A}.name).hasValue()", False),
    ("format.qualifiedName().validate('example.com/a/b').hasValue()", True),
    ("format.date().validate('2020-02-30').hasValue()", True),
    ("format.datetime().validate('2020-02-03T10:00:00Z').hasValue()", False),
    ("format.byte().validate('YQ==').hasValue() || format.uri().validate('a/b').hasValue()",
     True),
])
def test_named_formats(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


@pytest.mark.parametrize("expression, expected", [
    ("semver('v1.2', true) == semver('1.2.0')", True),
    ("semver('01.02.03-rc.1', true).patch() == 3", True),
    ("isSemver('1.2-rc.1', true)", False),
])
def test_loose_semver_as_the_apiserver_normalizes_it(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


@pytest.mark.parametrize("expression, expected", [
    # cel-go's device maps answer any domain (an empty map) but hold only the device's.
    ("device.attributes['vendor.example'].size() == 0", True),
    ("'vendor.example' in device.attributes", False),
    ("'gpu.dra.dev' in device.attributes && device.attributes.size() == 1", True),
    ("device.attributes.exists(d, d == 'vendor.example')", False),
    ("device.capacity.all(d, v, d == 'gpu.dra.dev' && v.size() == 1)", True),
])
def test_domains_as_cel_go_sees_them(expression: str, expected: bool) -> None:
    assert matches(expression) is expected


@pytest.mark.parametrize("expression, message", [
    ("device['driver'] == 'gpu.dra.dev'", "kubernetes.DRADevice"),
    ("device.foo == 1", "undefined field 'foo'"),
    ("duration('1x') == duration('1s')", "invalid duration argument"),
    ("timestamp('2020-02-30T00:00:00Z') > timestamp('2019-01-01T00:00:00Z')",
     "invalid timestamp argument"),
])
def test_device_object_and_time_literals_as_cel_go_checks_them(expression: str,
                                                               message: str) -> None:
    with pytest.raises(SelectorError, match=f"compile error.*{message}"):
        compile_selector(expression)


def test_a_domain_named_as_a_field_is_an_empty_map() -> None:
    assert matches("has(device.attributes.vendor) && device.attributes.vendor.size() == 0")
