"""Random allocation problems for the differential test, reproducible from a seed.

Two kinds of node, drawn at random:
- a mock machine (every shipped profile, static or dynamic MIG) as the driver
  publishes it, sometimes with tainted devices, a second driver's pool, an
  incomplete or stale pool;
- a small synthetic pool with numeric/string/version attributes, shared counters,
  devices that allow multiple allocations with capacity policies, per-device node
  selection.
Then 1-3 claims (counts, All, firstAvailable, selectors from a list that includes
runtime errors, matchAttribute/distinctAttribute, adminAccess, tolerations,
capacity requests) and claims already allocated (some consistent, some
over-committing counters, some shared). Last (so the rest of an instance does not
depend on it), sometimes DeviceTaintRules selecting one device, a pool, a driver,
every device or (without a selector) none.
"""

from __future__ import annotations

import copy
import random
from functools import cache
from typing import Any

from driver.allocator import driver_classes
from driver.inventory.discovery import discover
from driver.kube.quantity import parse_quantity
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices

PROFILES = ("h200-141gb", "h100-80gb-hbm3", "dgx-h100", "dgx-a100", "a100-pcie-4x", "l4-8x",
            "a100-mig", "mesh-4x")
GPU = "gpu.dra.dev"
EX = "dev.example.com"
NODE = "node-a"

GPU_SELECTORS = (
    'device.attributes["gpu.dra.dev"].productName.startsWith("NVIDIA")',
    'device.attributes["resource.kubernetes.io"].numaNode == 0',
    'device.attributes["resource.kubernetes.io"].numaNode == 1',
    'device.capacity["gpu.dra.dev"].memory.compareTo(quantity("40Gi")) >= 0',
    'device.capacity["gpu.dra.dev"].memory.isLessThan(quantity("24Gi"))',
    'has(device.attributes["gpu.dra.dev"].profile) && '
    'device.attributes["gpu.dra.dev"].profile.startsWith("1g.")',
    'has(device.attributes["gpu.dra.dev"].profile) && '
    'device.attributes["gpu.dra.dev"].profile.startsWith("3g.")',
    'device.attributes["gpu.dra.dev"].cudaComputeCapability.isGreaterThan(semver("8.5.0"))',
    'device.attributes["gpu.dra.dev"].?nvlinkIsland.orValue(-1) == 0',
    'device.attributes["gpu.dra.dev"].type == "gpu"',
    'device.attributes["gpu.dra.dev"].type == "mig"',
    'device.attributes["other.example.com"].size() == 0',
)
# Runtime errors where the attribute is missing, as in the scheduler.
GPU_ERROR_SELECTORS = (
    'device.attributes["gpu.dra.dev"].profile.startsWith("2g.")',
    'device.attributes["gpu.dra.dev"].nvlinkIsland == 1',
)
GPU_MATCH = ("gpu.dra.dev/nvlinkIsland", "resource.kubernetes.io/numaNode",
             "resource.kubernetes.io/pcieRoot", "gpu.dra.dev/parentUUID",
             "gpu.dra.dev/productName", "gpu.dra.dev/profile")
GPU_DISTINCT = ("resource.kubernetes.io/numaNode", "gpu.dra.dev/uuid", "gpu.dra.dev/parentUUID",
                "resource.kubernetes.io/pcieRoot", "gpu.dra.dev/placementStart")
EX_SELECTORS = (
    'device.attributes["dev.example.com"].model == "a"',
    'device.attributes["dev.example.com"].numa < 2',
    'device.attributes["dev.example.com"].mem >= 32',
    'device.capacity["dev.example.com"].memory.compareTo(quantity("32Gi")) >= 0',
    'device.attributes["dev.example.com"].version.isGreaterThan(semver("1.1.0"))',
    'device.allowMultipleAllocations',
    '!device.allowMultipleAllocations',
    'has(device.attributes["dev.example.com"].island)',
)
EX_ERROR_SELECTORS = ('device.attributes["dev.example.com"].island == 1',)
EX_MATCH = ("dev.example.com/numa", "dev.example.com/island", "dev.example.com/model",
            "dev.example.com/version")
EX_DISTINCT = ("dev.example.com/numa", "dev.example.com/island", "dev.example.com/serial",
               "dev.example.com/model")
TAINT_KEYS = ("gpu.dra.dev/unhealthy", "example.com/maintenance")


@cache
def _mock_slices(profile: str, mig_mode: str) -> tuple[dict[str, Any], ...]:
    inventory = discover(mock_provider(profile))
    return tuple(build_slices(inventory, SliceOptions(driver=GPU, node=NODE, mig_mode=mig_mode),
                              generation=1))


def instance(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.6:
        slices, classes, selectors, match, distinct = _mock_node(rng)
    else:
        slices, classes, selectors, match, distinct = _synthetic_node(rng)
    devices = [(s, d) for s in slices for d in s["spec"].get("devices") or []]
    allocated = _allocated(rng, slices, devices)
    claims = [_claim(rng, f"claim-{i}", classes, selectors, match, distinct, devices)
              for i in range(rng.choice((1, 1, 1, 2, 2, 3)))]
    return {"node": {"name": NODE, "labels": {"zone": rng.choice(("a", "b"))}},
            "classes": classes, "slices": slices, "allocated": allocated, "claims": claims,
            "taintRules": _taint_rules(rng, devices) if rng.random() < 0.25 else []}


def _taint_rules(rng: random.Random, devices: list[tuple[dict[str, Any], dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    if not devices:  # a node with nothing to taint (e.g. every device left out)
        return []
    rules = []
    for i in range(rng.choice((1, 1, 2))):
        s, device = rng.choice(devices)
        spec = s["spec"]
        selector = rng.choice((
            {"driver": spec["driver"], "pool": spec["pool"]["name"], "device": device["name"]},
            {"device": device["name"]}, {"pool": spec["pool"]["name"]},
            {"driver": spec["driver"]}, {}, None))
        taint = {"key": rng.choice(TAINT_KEYS), "value": rng.choice(("", "x")),
                 "effect": rng.choice(("NoSchedule", "NoExecute", "None"))}
        rules.append({"metadata": {"name": f"rule-{i}"},
                      "spec": {"taint": taint,
                               **({"deviceSelector": selector} if selector is not None else {})}})
    return rules


def _mock_node(rng: random.Random) -> tuple[Any, ...]:
    slices = copy.deepcopy(list(_mock_slices(rng.choice(PROFILES),
                                             rng.choice(("static", "dynamic")))))
    if rng.random() < 0.3:
        for s in slices:
            devices = s["spec"].get("devices") or []
            if len(devices) > 64:
                continue
            for device in devices:
                if rng.random() < 0.15:
                    device["taints"] = [{"key": rng.choice(TAINT_KEYS), "value": "",
                                         "effect": rng.choice(("NoSchedule", "NoExecute",
                                                               "None"))}]
    extra = rng.random()
    if extra < 0.1 and len(slices) > 1:
        del slices[rng.randrange(len(slices))]  # incomplete pool
    elif extra < 0.15:
        stale = copy.deepcopy(slices[0])
        stale["metadata"]["name"] += "-old"
        stale["spec"]["pool"]["generation"] = 0
        slices.append(stale)
    elif extra < 0.25:
        slices += _synthetic_slices(rng, "other-pool")
    classes = driver_classes(GPU)
    classes.append({"metadata": {"name": "any-gpu-dra"},
                    "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{GPU}"'}}]}})
    classes.append({"metadata": {"name": "everything"}, "spec": {}})
    if rng.random() < 0.2:
        classes[0]["spec"]["config"] = [{"opaque": {"driver": GPU, "parameters": {"a": 1}}}]
    return slices, classes, (GPU_SELECTORS, GPU_ERROR_SELECTORS), GPU_MATCH, GPU_DISTINCT


def _synthetic_node(rng: random.Random) -> tuple[Any, ...]:
    slices = _synthetic_slices(rng, "pool-a")
    if rng.random() < 0.3:
        slices += _synthetic_slices(rng, "pool-b")
    classes = [{"metadata": {"name": "ex"},
                "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{EX}"'}}]}},
               {"metadata": {"name": "ex-big"},
                "spec": {"selectors": [{"cel": {"expression":
                    f'device.capacity["{EX}"].memory.compareTo(quantity("32Gi")) >= 0'}}]}},
               {"metadata": {"name": "everything"}, "spec": {}}]
    return slices, classes, (EX_SELECTORS, EX_ERROR_SELECTORS), EX_MATCH, EX_DISTINCT


def _synthetic_slices(rng: random.Random, pool: str) -> list[dict[str, Any]]:
    n = rng.randint(2, 10)
    counters = rng.random() < 0.4
    per_device_nodes = rng.random() < 0.15
    devices = []
    for i in range(n):
        attributes: dict[str, Any] = {
            "numa": {"int": rng.randint(0, 2)}, "model": {"string": rng.choice("ab")},
            "mem": {"int": rng.choice((16, 32, 64))}, "serial": {"string": f"s{i}"},
            "version": {"version": rng.choice(("1.0.0", "1.2.0", "2.0.0"))}}
        if rng.random() < 0.8:
            attributes["island"] = {"int": rng.randint(0, 2)}
        device: dict[str, Any] = {"name": f"dev-{i}", "attributes": attributes,
                                  "capacity": {"memory": {"value": rng.choice(("16Gi", "32Gi",
                                                                               "64Gi"))}}}
        if rng.random() < 0.25:
            device["allowMultipleAllocations"] = True
            device["capacity"]["bandwidth"] = {"value": "100", "requestPolicy": rng.choice((
                {"default": "10", "validRange": {"min": "10", "max": "100", "step": "10"}},
                {"default": "25", "validValues": ["25", "50", "100"]},
                {}))}
            if not device["capacity"]["bandwidth"]["requestPolicy"]:
                del device["capacity"]["bandwidth"]["requestPolicy"]
        if counters and rng.random() < 0.8:
            device["consumesCounters"] = [{"counterSet": "shared", "counters": {
                "mem": {"value": rng.choice(("16", "32", "48"))},
                f"slot-{i % 4}": {"value": "1"}}}]
        if rng.random() < 0.1:
            device["taints"] = [{"key": rng.choice(TAINT_KEYS), "value": "x",
                                 "effect": rng.choice(("NoSchedule", "None"))}]
        if per_device_nodes:
            choice = rng.random()
            if choice < 0.4:
                device["nodeName"] = rng.choice((NODE, "node-b"))
            elif choice < 0.7:
                device["allNodes"] = True
            else:
                device["nodeSelector"] = {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": [rng.choice("ab")]}]}]}
        devices.append(device)
    spec: dict[str, Any] = {"driver": EX, "pool": {"name": pool, "generation": 1,
                                                   "resourceSliceCount": 1}}
    if per_device_nodes:
        spec["perDeviceNodeSelection"] = True
    else:
        spec["nodeName"] = NODE
    cut = rng.randint(1, n) if rng.random() < 0.3 else n
    chunks = [devices[:cut], devices[cut:]] if cut < n else [devices]
    slices = []
    for k, chunk in enumerate(chunks):
        slices.append({"metadata": {"name": f"{pool}-{rng.choice('xyz')}{k}"},
                       "spec": {**copy.deepcopy(spec), "devices": chunk}})
    if counters:
        slices.append({"metadata": {"name": f"{pool}-counters"},
                       "spec": {**copy.deepcopy(spec), "sharedCounters": [{"name": "shared",
                        "counters": {"mem": {"value": rng.choice(("64", "96", "128"))},
                                     **{f"slot-{k}": {"value": "1"} for k in range(4)}}}]}})
        if "perDeviceNodeSelection" in slices[-1]["spec"]:
            del slices[-1]["spec"]["perDeviceNodeSelection"]
            slices[-1]["spec"]["nodeName"] = NODE
    for s in slices:
        s["spec"]["pool"]["resourceSliceCount"] = len(slices)
    return slices


def _allocated(rng: random.Random, slices: list[dict[str, Any]],
               devices: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
    if not devices or rng.random() < 0.3:
        return []
    consistent = rng.random() < 0.8
    left: dict[tuple[str, str, str], float] = {}
    for s in slices:
        for counter_set in s["spec"].get("sharedCounters") or []:
            for name, value in counter_set["counters"].items():
                left[(s["spec"]["pool"]["name"], counter_set["name"], name)] = _number(
                    value["value"])
    results = []
    for s, device in rng.sample(devices, k=min(len(devices), rng.randint(1, 8))):
        pool = s["spec"]["pool"]["name"]
        uses = [((pool, use["counterSet"], name), _number(v["value"]))
                for use in device.get("consumesCounters") or []
                for name, v in use["counters"].items()]
        if consistent and any(left.get(k, 0) < amount for k, amount in uses):
            continue
        for k, amount in uses:
            left[k] = left.get(k, 0) - amount
        result: dict[str, Any] = {"request": "r", "driver": s["spec"]["driver"], "pool": pool,
                                  "device": device["name"]}
        if device.get("allowMultipleAllocations"):
            result["shareID"] = f"00000000-0000-0000-0000-{len(results):012d}"
            if "bandwidth" in device.get("capacity", {}):
                result["consumedCapacity"] = {"bandwidth": rng.choice(("10", "50", "100"))}
        elif rng.random() < 0.1:
            result["adminAccess"] = True
        results.append(result)
    return [{"metadata": {"name": f"old-{i}", "namespace": "default"},
             "spec": {"devices": {"requests": []}},
             "status": {"allocation": {"devices": {"results": [r]}}}}
            for i, r in enumerate(results)]


def _number(text: str) -> float:
    return float(parse_quantity(text))


def _claim(rng: random.Random, name: str, classes: list[dict[str, Any]],
           selectors: tuple[tuple[str, ...], tuple[str, ...]], match: tuple[str, ...],
           distinct: tuple[str, ...], devices: list[Any]) -> dict[str, Any]:
    class_names = [c["metadata"]["name"] for c in classes]
    requests = []
    for r in range(rng.choice((1, 1, 1, 2, 2, 3))):
        if rng.random() < 0.25:
            subs = [dict(_exact(rng, class_names, selectors, devices, sub=True), name=f"s{k}")
                    for k in range(rng.randint(1, 3))]
            requests.append({"name": f"req-{r}", "firstAvailable": subs})
        else:
            requests.append({"name": f"req-{r}",
                             "exactly": _exact(rng, class_names, selectors, devices, sub=False)})
    constraints = []
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2))):
        names = [q["name"] for q in requests]
        constraint: dict[str, Any] = (
            {"matchAttribute": rng.choice(match)} if rng.random() < 0.6
            else {"distinctAttribute": rng.choice(distinct)})
        if len(names) > 1 and rng.random() < 0.5:
            constraint["requests"] = rng.sample(names, k=rng.randint(1, len(names)))
        constraints.append(constraint)
    devices_spec: dict[str, Any] = {"requests": requests}
    if constraints:
        devices_spec["constraints"] = constraints
    if rng.random() < 0.15:
        devices_spec["config"] = [{"requests": [requests[0]["name"]] if rng.random() < 0.5
                                   else [], "opaque": {"driver": GPU, "parameters": {"x": 1}}}]
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"devices": devices_spec}}


def _exact(rng: random.Random, class_names: list[str],
           selectors: tuple[tuple[str, ...], tuple[str, ...]], devices: list[Any], sub: bool
           ) -> dict[str, Any]:
    request: dict[str, Any] = {"deviceClassName": rng.choice(class_names)}
    if rng.random() < 0.35:
        pool = selectors[1] if rng.random() < 0.1 else selectors[0]
        request["selectors"] = [{"cel": {"expression": rng.choice(pool)}}
                                for _ in range(rng.choice((1, 1, 2)))]
    if rng.random() < 0.07:
        request["allocationMode"] = "All"
    else:
        request["count"] = rng.choice((1, 1, 1, 1, 2, 2, 3, 4))
    if not sub and rng.random() < 0.08:
        request["adminAccess"] = True
    if rng.random() < 0.15:
        request["tolerations"] = [rng.choice((
            {"key": rng.choice(TAINT_KEYS), "operator": "Exists"},
            {"operator": "Exists", "effect": "NoSchedule"},
            {"key": "example.com/maintenance", "operator": "Equal", "value": "x"}))]
    if rng.random() < 0.1:
        request["capacity"] = {"requests": {rng.choice(("bandwidth", "memory")):
                                            rng.choice(("5", "30", "60", "16Gi"))}}
    return request
