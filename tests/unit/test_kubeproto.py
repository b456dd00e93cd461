"""The protobuf walker (native/_kubeproto.pyx, driver/kube/protolist.py) on hand-built wire
bytes: the JSON shape of each field (omitempty, pointers, nil slices, Go's zero values),
every attribute kind, packed and unpacked repeated scalars, unknown fields skipped, and
broken input refused with the field and the byte it broke at. That the dicts equal the
real API server's JSON is tests/e2e/test_protobuf_list.py."""

from __future__ import annotations

import re

import pytest

from driver.kube.protolist import TYPES, ProtoError, decode


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: ten bytes, as Go writes them
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def f(number: int, value: int | bool | str | bytes) -> bytes:
    """One field: a varint for ints and bools, length-delimited for str and bytes."""
    if isinstance(value, int):
        return varint(number << 3) + varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def envelope(raw: bytes, kind: str = "ResourceSliceList",
             api_version: str = "resource.k8s.io/v1") -> bytes:
    return b"k8s\x00" + f(1, f(1, api_version) + f(2, kind)) + f(2, raw) + f(3, "") + f(4, "")


def slice_list(*items: bytes, continue_token: str = "") -> bytes:
    return envelope(f(1, f(2, "17") + f(3, continue_token)) + b"".join(f(2, i) for i in items))


def entry(key: str, value: bytes) -> bytes:
    return f(1, key) + f(2, value)


def quantity(text: str) -> bytes:
    return f(1, text)


DEVICE = b"".join([
    f(1, "gpu-0"),
    f(2, entry("int", f(2, 0))), f(2, entry("neg", f(2, -5))),
    f(2, entry("bool", f(3, False))), f(2, entry("str", f(4, ""))),
    f(2, entry("ver", f(5, "1.2.3"))),
    f(2, entry("ints", f(6, 1) + f(6, -2))),                       # unpacked
    f(2, entry("packed", f(6, varint(3) + varint(1 << 40)))),      # packed
    f(2, entry("bools", f(7, varint(1) + varint(0)))),
    f(2, entry("strings", f(8, "a") + f(8, "ü"))), f(2, entry("versions", f(9, "1.0.0"))),
    f(3, entry("memory", f(1, quantity("80Gi")) + f(2, f(3, quantity("1Gi"))
                                                     + f(4, f(1, quantity("0")))))),
    f(3, entry("empty", b"")),
    f(4, f(1, "gpu-0-set") + f(2, entry("mem", f(1, quantity("10Gi"))))),
    f(7, True),
    f(8, f(1, "gpu.dra.dev/xid") + f(2, "79") + f(3, "NoSchedule") + f(4, f(1, 1796666400))),
    f(8, f(1, "k") + f(2, "") + f(3, "None") + f(4, b"")),
])

SLICE = f(1, b"".join([
    f(1, "n1-gpu-0"), f(5, "uid-1"), f(6, "42"), f(7, 0), f(8, f(1, 1796666400)),
    f(11, entry("a", "1")), f(11, entry("empty", "")), f(12, entry("note", "x")),
    f(13, f(5, "v1") + f(1, "Node") + f(3, "n1") + f(4, "uid-n1") + f(6, True)),
    f(17, f(1, "gpu-dra") + f(2, "Update") + f(3, "resource.k8s.io/v1")
          + f(4, f(1, 1796666400)) + f(6, "FieldsV1")
          + f(7, f(1, b'{"f:spec":{"f:devices":{}}}'))),
])) + f(2, b"".join([
    f(1, "gpu.dra.dev"), f(2, f(1, "n1") + f(2, 0) + f(3, 1)), f(3, "n1"),
    f(4, b""), f(5, False),
    f(6, DEVICE), f(6, f(1, "gpu-1")),
    f(8, f(1, "gpu-0-set") + f(2, entry("mem", f(1, quantity("80Gi"))))),
]))

WANT = {
    "metadata": {
        "name": "n1-gpu-0", "uid": "uid-1", "resourceVersion": "42",
        "creationTimestamp": "2026-12-07T18:00:00Z",
        "labels": {"a": "1", "empty": ""}, "annotations": {"note": "x"},
        "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "n1",
                             "uid": "uid-n1", "controller": True}],
        "managedFields": [{"manager": "gpu-dra", "operation": "Update",
                           "apiVersion": "resource.k8s.io/v1",
                           "time": "2026-12-07T18:00:00Z", "fieldsType": "FieldsV1",
                           "fieldsV1": {"f:spec": {"f:devices": {}}}}],
    },
    "spec": {
        "driver": "gpu.dra.dev", "nodeName": "n1",
        "pool": {"name": "n1", "generation": 0, "resourceSliceCount": 1},
        "nodeSelector": {"nodeSelectorTerms": None}, "allNodes": False,
        "devices": [
            {"name": "gpu-0",
             "attributes": {"int": {"int": 0}, "neg": {"int": -5}, "bool": {"bool": False},
                            "str": {"string": ""}, "ver": {"version": "1.2.3"},
                            "ints": {"ints": [1, -2]}, "packed": {"ints": [3, 1 << 40]},
                            "bools": {"bools": [True, False]},
                            "strings": {"strings": ["a", "ü"]},
                            "versions": {"versions": ["1.0.0"]}},
             "capacity": {"memory": {"value": "80Gi",
                                     "requestPolicy": {"default": None,
                                                       "validValues": ["1Gi"],
                                                       "validRange": {"min": "0"}}},
                          "empty": {"value": "0"}},
             "consumesCounters": [{"counterSet": "gpu-0-set",
                                   "counters": {"mem": {"value": "10Gi"}}}],
             "allNodes": True,
             "taints": [{"key": "gpu.dra.dev/xid", "value": "79", "effect": "NoSchedule",
                         "timeAdded": "2026-12-07T18:00:00Z"},
                        {"key": "k", "effect": "None", "timeAdded": None}]},
            {"name": "gpu-1"},
        ],
        "sharedCounters": [{"name": "gpu-0-set", "counters": {"mem": {"value": "80Gi"}}}],
    },
}


def test_a_slice_decodes_to_its_json_shape() -> None:
    page = decode(slice_list(SLICE, continue_token="next"))
    assert page == {"kind": "ResourceSliceList", "apiVersion": "resource.k8s.io/v1",
                    "metadata": {"resourceVersion": "17", "continue": "next"},
                    "items": [WANT]}


def test_equal_small_messages_give_one_dict_and_different_ones_their_own() -> None:
    """A device's attribute values, capacities and counters repeat across devices and
    nodes: equal bytes of a shared message give the one dict made the first time (in
    this page or an earlier one); different bytes, or the same bytes as another message,
    their own."""
    device = f(1, "gpu-0") + f(2, entry("model", f(4, "H100"))) + f(2, entry("cores", f(2, 132))) \
        + f(3, entry("memory", f(1, quantity("80Gi")))) \
        + f(4, f(1, "gpu-0-set") + f(2, entry("memory", f(1, quantity("80Gi")))))
    other = f(1, "gpu-1") + f(2, entry("model", f(4, "H200"))) + f(2, entry("cores", f(2, 132)))
    spec = f(1, "gpu.dra.dev") + f(6, device) + f(6, device) + f(6, other)
    first, second, third = decode(slice_list(f(2, spec)))["items"][0]["spec"]["devices"]
    again = decode(slice_list(f(2, spec)))["items"][0]["spec"]["devices"][0]
    assert first == second and first is not second  # a device is never shared
    for name in ("model", "cores"):
        assert first["attributes"][name] is second["attributes"][name] \
            is again["attributes"][name]
    assert third["attributes"]["cores"] is first["attributes"]["cores"]
    assert third["attributes"]["model"] == {"string": "H200"} != first["attributes"]["model"]
    assert first["capacity"]["memory"] is again["capacity"]["memory"]
    assert first["consumesCounters"][0] is again["consumesCounters"][0]
    # a Counter and a DeviceCapacity of the same bytes are two messages: two dicts
    assert first["consumesCounters"][0]["counters"]["memory"] == first["capacity"]["memory"]
    assert first["consumesCounters"][0]["counters"]["memory"] is not first["capacity"]["memory"]


def test_absent_fields_are_what_the_json_writes_for_go_zero_values() -> None:
    """A value field the bytes lack is Go's zero value where the JSON writes it (no
    omitempty), left out where omitempty drops it; a nil slice without omitempty is
    null."""
    assert decode(slice_list(b"")) == {
        "kind": "ResourceSliceList", "apiVersion": "resource.k8s.io/v1",
        "metadata": {"resourceVersion": "17"},
        "items": [{"metadata": {},
                   "spec": {"driver": "", "pool": {"name": "", "generation": 0,
                                                   "resourceSliceCount": 0}}}]}
    assert decode(envelope(b""))["items"] == []  # the API server's JSON: "items":[]
    assert decode(slice_list(f(2, f(4, b""))))["items"][0]["spec"]["nodeSelector"] == {
        "nodeSelectorTerms": None}  # a nil slice without omitempty


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (f(15, 7) + f(15, "text") + varint(16 << 3 | 1) + bytes(8)
               + varint(17 << 3 | 5) + bytes(4) + f(1000, "far"))
    spec = f(2, f(1, "gpu.dra.dev") + unknown + f(2, f(1, "n1") + unknown + f(3, 1)))
    assert decode(slice_list(spec + unknown))["items"] == [
        {"metadata": {}, "spec": {"driver": "gpu.dra.dev",
                                  "pool": {"name": "n1", "generation": 0,
                                           "resourceSliceCount": 1}}}]


def test_an_error_status_decodes_to_its_json() -> None:
    status = (f(1, b"") + f(2, "Failure") + f(3, 'resourceslices "x" not found')
              + f(4, "NotFound") + f(5, f(1, "x") + f(2, "resource.k8s.io")
                                    + f(4, f(1, "FieldValueInvalid") + f(3, "spec"))) + f(6, 404))
    assert decode(envelope(status, "Status", "v1")) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'resourceslices "x" not found', "reason": "NotFound",
        "details": {"name": "x", "group": "resource.k8s.io",
                    "causes": [{"reason": "FieldValueInvalid", "field": "spec"}]},
        "code": 404}


def test_every_table_entry_is_a_known_go_type_with_a_unique_field_number() -> None:
    for name, fields in TYPES.items():
        numbers = [number for number, _, _ in fields]
        assert len(numbers) == len(set(numbers)), name
        for _, _, go_type in fields:
            base = re.sub(r"^(\[\]|map\[string\])?\*?", "", go_type)
            assert base in TYPES or base in {"string", "int64", "int32", "bool", "Quantity",
                                             "Time", "FieldsV1"}, (name, go_type)


@pytest.mark.parametrize(("body", "error"), [
    (b"{}", r"not Kubernetes protobuf"),
    (envelope(b"", kind="Pod", api_version="v1"), r"no message Pod in the table"),
    (b"k8s\x00" + f(1, f(2, "ResourceSliceList")) + f(3, "gzip"), r"content encoding 'gzip'"),
    # ResourceSlice.spec says 100 bytes follow; 3 do
    (slice_list(f(2, b"")[:-1] + varint(100) + b"abc"),
     r"^ResourceSlice\.spec \(field 2\) at byte \d+: truncated"),
    # a string where a varint belongs, inside the pool
    (slice_list(f(2, f(2, f(2, "x")))),
     r"^ResourcePool\.generation \(field 2\) at byte \d+: wire type 2, expected a varint"),
    (slice_list(f(2, f(1, 5))),
     r"^ResourceSliceSpec\.driver \(field 1\) at byte \d+: wire type 0, expected length"),
    (slice_list(f(2, varint(1 << 3 | 3))), r"ResourceSlice.* wire type 3 is not supported"),
    (slice_list(f(2, f(1, b"\xff\xfe"))), r"^ResourceSliceSpec\.driver .*utf-8"),
    # a map entry whose key's varint never ends
    (slice_list(f(2, f(6, f(1, "d") + f(2, varint(1 << 3) + b"\x80")))),
     r"^Device\.attributes \(field 2\) at byte \d+: truncated"),
])
def test_broken_input_names_the_field_and_the_byte(body: bytes, error: str) -> None:
    with pytest.raises(ProtoError, match=error):
        decode(body)


def test_the_byte_of_an_error_is_where_its_value_starts_in_the_body() -> None:
    body = slice_list(SLICE, f(2, f(1, 5)))  # the second item's spec.driver: a varint
    with pytest.raises(ProtoError) as raised:
        decode(body)
    found = re.search(r"^ResourceSliceSpec\.driver \(field 1\) at byte (\d+):", str(raised.value))
    assert found, raised.value
    assert int(found[1]) == body.rindex(b"\x08\x05") + 1  # the 5 after its tag
