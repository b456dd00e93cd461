"""ResourceSlice lists read as Kubernetes protobuf, decoded into their JSON's dicts.

At 1,000 dgx-h100 nodes with dynamic MIG the slices are ~230 MiB of JSON: the API server
takes seconds to encode it and orjson seconds to decode it. The server writes the same
list as protobuf about twice as fast, a quarter fewer bytes (docs/benchmarks.md, issue 17
item 2); the native walker (native/_kubeproto.pyx) turns it into exactly the dicts
``orjson.loads`` gives for the JSON, so every consumer keeps the JSON shape. Equal
bytes of the small messages that repeat on every device and node (`SHARED`: attribute
values, capacities, counters) give one dict, made once: about half the decoding time of
a dynamic-MIG page, and less memory. So the dicts are to be read, never changed.

The field table below is the Go types' field numbers and JSON tags (k8s.io/api
resource/v1, core/v1 NodeSelector, apimachinery meta/v1, at v1.37.2), written as
``(number, json tag, Go type)``; :func:`_compile` turns the Go rules of encoding/json
into what the walker writes for a field that is absent or zero; one option is ours,
``nonempty``: the API server always sends a list's items, ``[]`` when there are none
(encoding/json would write a nil slice as null). A field missing from the table is
skipped: a newer server's new field is left out, not an error.
"""

from __future__ import annotations

from typing import Any

from driver._kubeproto import Decoder, ProtoError

PROTOBUF = "application/vnd.kubernetes.protobuf"

__all__ = ["PROTOBUF", "ProtoError", "decode", "decode_head"]

# The walker's enums (native/_kubeproto.pyx), in its order.
KINDS = {"string": 0, "int64": 1, "int32": 2, "bool": 3, "Quantity": 5, "Time": 6,
         "FieldsV1": 7}
MESSAGE = 4  # any other Go type: a message of the table
SHAPES = {"one": 0, "list": 1, "map": 2}
OMIT, NULL, ZERO, EMPTY = 0, 1, 2, 3

Fields = list[tuple[int, str, str]]

TYPES: dict[str, Fields] = {
    # runtime.TypeMeta, inside the envelope
    "TypeMeta": [(1, "apiVersion,omitempty", "string"), (2, "kind,omitempty", "string")],
    "ResourceSliceList": [(1, "metadata,omitempty", "ListMeta"),
                          (2, "items,nonempty", "[]ResourceSlice")],
    "Status": [(1, "metadata,omitempty", "ListMeta"), (2, "status,omitempty", "string"),
               (3, "message,omitempty", "string"), (4, "reason,omitempty", "string"),
               (5, "details,omitempty", "*StatusDetails"), (6, "code,omitempty", "int32")],
    "StatusDetails": [(1, "name,omitempty", "string"), (2, "group,omitempty", "string"),
                      (3, "kind,omitempty", "string"), (6, "uid,omitempty", "string"),
                      (4, "causes,omitempty", "[]StatusCause"),
                      (5, "retryAfterSeconds,omitempty", "int32")],
    "StatusCause": [(1, "reason,omitempty", "string"), (2, "message,omitempty", "string"),
                    (3, "field,omitempty", "string")],
    "ListMeta": [(1, "selfLink,omitempty", "string"),
                 (2, "resourceVersion,omitempty", "string"),
                 (3, "continue,omitempty", "string"),
                 (4, "remainingItemCount,omitempty", "*int64"),
                 (5, "shardInfo,omitempty", "*ShardInfo")],
    "ShardInfo": [(1, "selector", "string")],
    "ObjectMeta": [(1, "name,omitempty", "string"), (2, "generateName,omitempty", "string"),
                   (3, "namespace,omitempty", "string"), (4, "selfLink,omitempty", "string"),
                   (5, "uid,omitempty", "string"),
                   (6, "resourceVersion,omitempty", "string"),
                   (7, "generation,omitempty", "int64"),
                   (8, "creationTimestamp,omitempty,omitzero", "Time"),
                   (9, "deletionTimestamp,omitempty", "*Time"),
                   (10, "deletionGracePeriodSeconds,omitempty", "*int64"),
                   (11, "labels,omitempty", "map[string]string"),
                   (12, "annotations,omitempty", "map[string]string"),
                   (13, "ownerReferences,omitempty", "[]OwnerReference"),
                   (14, "finalizers,omitempty", "[]string"),
                   (17, "managedFields,omitempty", "[]ManagedFieldsEntry")],
    "OwnerReference": [(5, "apiVersion", "string"), (1, "kind", "string"),
                       (3, "name", "string"), (4, "uid", "string"),
                       (6, "controller,omitempty", "*bool"),
                       (7, "blockOwnerDeletion,omitempty", "*bool")],
    "ManagedFieldsEntry": [(1, "manager,omitempty", "string"),
                           (2, "operation,omitempty", "string"),
                           (3, "apiVersion,omitempty", "string"),
                           (4, "time,omitempty", "*Time"),
                           (6, "fieldsType,omitempty", "string"),
                           (7, "fieldsV1,omitempty", "*FieldsV1"),
                           (8, "subresource,omitempty", "string")],
    "ResourceSlice": [(1, "metadata,omitempty", "ObjectMeta"),
                      (2, "spec", "ResourceSliceSpec")],
    "ResourceSliceSpec": [(1, "driver", "string"), (2, "pool", "ResourcePool"),
                          (3, "nodeName,omitempty", "*string"),
                          (4, "nodeSelector,omitempty", "*NodeSelector"),
                          (5, "allNodes,omitempty", "*bool"),
                          (6, "devices,omitempty", "[]Device"),
                          (7, "perDeviceNodeSelection,omitempty", "*bool"),
                          (8, "sharedCounters,omitempty", "[]CounterSet"),
                          (9, "partitionTypeAttribute,omitempty", "*string"),
                          (10, "skipNodeOperations,omitempty", "[]string")],
    "ResourcePool": [(1, "name", "string"), (2, "generation", "int64"),
                     (3, "resourceSliceCount", "int64")],
    "NodeSelector": [(1, "nodeSelectorTerms", "[]NodeSelectorTerm")],
    "NodeSelectorTerm": [(1, "matchExpressions,omitempty", "[]NodeSelectorRequirement"),
                         (2, "matchFields,omitempty", "[]NodeSelectorRequirement")],
    "NodeSelectorRequirement": [(1, "key", "string"), (2, "operator", "string"),
                                (3, "values,omitempty", "[]string")],
    "CounterSet": [(1, "name", "string"), (2, "counters,omitempty", "map[string]Counter")],
    "Counter": [(1, "value", "Quantity")],
    "Device": [(1, "name", "string"),
               (2, "attributes,omitempty", "map[string]DeviceAttribute"),
               (3, "capacity,omitempty", "map[string]DeviceCapacity"),
               (4, "consumesCounters,omitempty", "[]DeviceCounterConsumption"),
               (5, "nodeName,omitempty", "*string"),
               (6, "nodeSelector,omitempty", "*NodeSelector"),
               (7, "allNodes,omitempty", "*bool"),
               (8, "taints,omitempty", "[]DeviceTaint"),
               (9, "bindsToNode,omitempty", "*bool"),
               (10, "bindingConditions,omitempty", "[]string"),
               (11, "bindingFailureConditions,omitempty", "[]string"),
               (12, "allowMultipleAllocations,omitempty", "*bool"),
               (14, "nodeAllocatableResources,omitempty",
                "map[string]NodeAllocatableResource")],
    "DeviceAttribute": [(2, "int,omitempty", "*int64"), (3, "bool,omitempty", "*bool"),
                        (4, "string,omitempty", "*string"),
                        (5, "version,omitempty", "*string"),
                        (6, "ints,omitempty", "[]int64"), (7, "bools,omitempty", "[]bool"),
                        (8, "strings,omitempty", "[]string"),
                        (9, "versions,omitempty", "[]string")],
    "DeviceCapacity": [(1, "value", "Quantity"),
                       (2, "requestPolicy,omitempty", "*CapacityRequestPolicy")],
    "CapacityRequestPolicy": [(1, "default", "*Quantity"),
                              (3, "validValues,omitempty", "[]Quantity"),
                              (4, "validRange,omitempty", "*CapacityRequestPolicyRange")],
    "CapacityRequestPolicyRange": [(1, "min,omitempty", "*Quantity"),
                                   (2, "max,omitempty", "*Quantity"),
                                   (3, "step,omitempty", "*Quantity")],
    "DeviceCounterConsumption": [(1, "counterSet", "string"),
                                 (2, "counters,omitempty", "map[string]Counter"),
                                 (3, "compatibilityGroups,omitempty", "[]string")],
    "DeviceTaint": [(1, "key", "string"), (2, "value,omitempty", "string"),
                    (3, "effect", "string"), (4, "timeAdded,omitempty", "*Time")],
    "NodeAllocatableResource": [(3, "mapping,omitempty", "*NodeAllocatableMapping"),
                                (4, "overhead,omitempty", "*NodeAllocatableOverhead")],
    "NodeAllocatableMapping": [(1, "capacityKey,omitempty", "*string"),
                               (2, "capacityMultiplier,omitempty", "*Quantity"),
                               (3, "deviceMultiplier,omitempty", "*Quantity")],
    "NodeAllocatableOverhead": [(1, "perPod,omitempty", "*Quantity"),
                                (2, "perContainer,omitempty", "*Quantity")],
}


def _compile(fields: Fields) -> list[tuple[int, str, int, str | None, int, int, bool]]:
    """Each field as the walker takes it: (number, JSON name, kind, message, shape, what
    an absent field is, whether a zero value is left out), by encoding/json's rules:
    omitempty leaves out "", 0, false and empty slices and maps, and nothing else (not a
    struct); a nil pointer, slice or map without it is null; omitzero leaves out the
    zero Time; a value field the protobuf lacks is the Go zero value; ``nonempty``: an
    empty slice or map, never null."""
    compiled = []
    for number, tag, go_type in fields:
        name, *options = tag.split(",")
        omitempty = "omitempty" in options
        shape, base = "one", go_type
        if base.startswith("[]"):
            shape, base = "list", base[2:]
        elif base.startswith("map[string]"):
            shape, base = "map", base[len("map[string]"):]
        pointer = base.startswith("*")
        base = base.lstrip("*")
        kind = KINDS.get(base, MESSAGE)
        message = base if kind == MESSAGE else None
        if "nonempty" in options:
            absent, drop_zero = EMPTY, False
        elif shape != "one" or pointer:
            absent, drop_zero = (OMIT if omitempty else NULL), False
        elif base == "Time":
            absent, drop_zero = (OMIT, True) if "omitzero" in options else (NULL, False)
        elif kind in (KINDS["string"], KINDS["int64"], KINDS["int32"], KINDS["bool"]):
            absent, drop_zero = (OMIT if omitempty else ZERO), omitempty
        else:
            absent, drop_zero = ZERO, False
        compiled.append((number, name, kind, message, SHAPES[shape], absent, drop_zero))
    return compiled


# Small messages that repeat across devices and nodes: one dict for equal bytes.
SHARED = frozenset({"DeviceAttribute", "DeviceCapacity", "Counter", "CounterSet",
                    "DeviceCounterConsumption"})

_DECODER = Decoder({name: _compile(fields) for name, fields in TYPES.items()}, SHARED)


def decode(body: bytes | memoryview) -> dict[str, Any]:
    """An API server's protobuf response body as the dict of its JSON (a
    ResourceSliceList, or the Status of an error); :class:`ProtoError` for bytes that
    are not one of them."""
    return _DECODER.decode_object(body)


# A list's metadata alone: its items are skipped as a field the table does not name.
_HEAD = Decoder({**{name: _compile(fields) for name, fields in TYPES.items()},
                 "ResourceSliceList": _compile(TYPES["ResourceSliceList"][:1])})


def decode_head(body: bytes) -> dict[str, Any]:
    """A protobuf ResourceSliceList as `decode` gives it, less its items: its metadata
    (the continue token) for a reader that hands the page to another process to decode."""
    return _HEAD.decode_object(body)
