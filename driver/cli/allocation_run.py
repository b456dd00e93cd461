"""The work of `gpu-dra allocate` and `gpu-dra explain` (:mod:`driver.cli.allocation` has
their flags): imported only when one of them runs."""

from __future__ import annotations

import argparse
import json
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from driver.allocator.allocate import Allocator, Ledger, allocate_in_order, driver_classes
from driver.allocator.documents import load_documents
from driver.allocator.explain import explain_all
from driver.allocator.input import InputError, claim_key
from driver.cli.allocation import (
    FAILURE_ANNOTATION,
    RESOURCE,
    TAINT_RULE,
    TAINT_RULE_VERSIONS,
    TEMPLATE,
    SlicesFromProvider,
)
from driver.errors import KubeError
from driver.kube.api import ApiError, api_client, list_items
from driver.kube.forkedlist import ForkedList
from driver.kube.protolist import ProtoError


def _setup(args: argparse.Namespace, node_slices: SlicesFromProvider
           ) -> tuple[Allocator, list[Any], Ledger, list[str]]:
    if args.kubeconfig is not None:
        allocator, raw_claims, allocated = _from_cluster(args)
    else:
        slices, classes, raw_claims, allocated, rules = _from_files(args, node_slices)
        allocator = Allocator(slices, classes, rules)
    claims = allocator.parse(raw_claims)
    seen: set[str] = set()
    for claim in claims:
        if claim.key in seen:
            raise InputError(f"ResourceClaim {claim.key}: metadata.name: listed twice")
        seen.add(claim.key)
    # A claim asked about is not also one that holds devices (it would block itself).
    ledger = Ledger.of(c for c in allocated if claim_key(c) not in seen)
    nodes = allocator.nodes()
    if args.node:
        if args.node not in nodes:
            raise InputError(f"--node {args.node}: no slices for it (nodes: "
                             f"{', '.join(nodes) or 'none'})")
        nodes = [args.node]
    if not nodes:
        raise InputError("no node: the slices name no spec.nodeName")
    return allocator, claims, ledger, nodes


def _from_files(args: argparse.Namespace, node_slices: SlicesFromProvider
                ) -> tuple[list[dict[str, Any]], ...]:
    if args.claim:
        raise InputError("--claim NAMESPACE/NAME reads the claim from a cluster: give "
                         "--kubeconfig (or --claims PATH for files)")
    if args.claims is None:
        raise InputError("--claims PATH (or --kubeconfig FILE --claim NAMESPACE/NAME): "
                         "which claims?")
    if args.slices is not None and args.mock:
        raise InputError("--slices and --mock: give one of them")
    if args.slices is not None and args.exclude_gpus:
        raise InputError("--exclude-gpus applies to this node's GPUs (--mock or NVML), not to "
                         "--slices: leave those GPUs' devices out of the slices given")
    rules: list[dict[str, Any]] = []
    if args.slices is not None:
        documents = load_documents(args.slices)
        slices = [d for d in documents if d.get("kind") == "ResourceSlice"]
        if not slices:
            raise InputError(f"{args.slices}: no ResourceSlice documents")
        rules = [d for d in documents if d.get("kind") == TAINT_RULE]
    else:
        slices = node_slices(args)
    if args.taint_rules is not None and args.taint_rules != args.slices:
        given = [d for d in load_documents(args.taint_rules) if d.get("kind") == TAINT_RULE]
        if not given:
            raise InputError(f"{args.taint_rules}: no {TAINT_RULE} documents")
        rules += given
    classes = ([d for d in load_documents(args.classes) if d.get("kind") == "DeviceClass"]
               if args.classes else driver_classes(args.driver_name))
    raw_claims = [claim_of(d) for d in load_documents(args.claims)
                  if d.get("kind", "ResourceClaim") in ("ResourceClaim", TEMPLATE)]
    if not raw_claims:
        raise InputError(f"{args.claims}: no ResourceClaim or {TEMPLATE} documents")
    allocated = load_documents(args.allocated) if args.allocated else []
    return slices, classes, raw_claims, allocated, rules


def claim_of(document: dict[str, Any]) -> dict[str, Any]:
    """A ResourceClaimTemplate as the claim the controller makes of it for a pod, named
    as the template (files of pods, namespaces and templates allocate as they are)."""
    if document.get("kind") != TEMPLATE:
        return document
    spec = (document.get("spec") or {}).get("spec") or {}
    return {"apiVersion": document.get("apiVersion"), "kind": "ResourceClaim",
            "metadata": dict(document.get("metadata") or {}), "spec": spec}


def _from_cluster(args: argparse.Namespace) -> tuple[Allocator, list[Any], list[Any]]:
    """What the scheduler sees: every slice, class, claim and DeviceTaintRule of the
    cluster. The slices' pages are read by a child process (`ForkedList`) while this one
    builds the models of the nodes they complete: at 1,000 nodes the API server's
    writing and that work each take seconds, and here they overlap."""
    given = [flag for flag, value in (("--slices", args.slices), ("--mock", args.mock),
                                      ("--classes", args.classes),
                                      ("--allocated", args.allocated),
                                      ("--taint-rules", args.taint_rules),
                                      ("--exclude-gpus", args.exclude_gpus)) if value]
    if given:
        raise InputError(f"--kubeconfig reads them from the cluster: drop {', '.join(given)}")
    wanted = [_namespaced(name) for name in args.claim]
    if args.claims is not None:
        raise InputError("--kubeconfig takes the claims as --claim NAMESPACE/NAME")
    if not wanted:
        raise InputError("--kubeconfig needs --claim NAMESPACE/NAME (one or more)")
    from kubernetes.config import ConfigException
    from urllib3.exceptions import HTTPError

    try:
        api = api_client(args.kubeconfig)
        try:
            # Another driver's slices cannot hold a device of this one's classes. The
            # child is forked before any call or thread of this process.
            with ForkedList(api, f"{RESOURCE}/resourceslices", protobuf=True,
                            field_selector=f"spec.driver={args.driver_name}") as slices:
                with ThreadPoolExecutor(3) as others:
                    classes_read = others.submit(list_items, api, f"{RESOURCE}/deviceclasses")
                    claims_read = others.submit(list_items, api, f"{RESOURCE}/resourceclaims")
                    rules_read = others.submit(_taint_rules, api)
                    classes, claims, rules = (classes_read.result(), claims_read.result(),
                                              rules_read.result())
                allocator = Allocator([], classes, rules)
                _read_slices(slices, allocator, args.node)
        finally:
            api.close()
    except (KubeError, ConfigException, HTTPError, ProtoError) as err:
        raise InputError(f"--kubeconfig {args.kubeconfig}: {err}") from None
    by_key = {claim_key(c): c for c in claims}
    missing = [f"{ns}/{name}" for ns, name in wanted if f"{ns}/{name}" not in by_key]
    if missing:
        raise InputError(f"--claim {missing[0]}: no such ResourceClaim in the cluster")
    return allocator, [by_key[f"{ns}/{name}"] for ns, name in wanted], claims


def _read_slices(slices: ForkedList, allocator: Allocator, only: str | None) -> None:
    """Every page into `allocator`; while the next is on its way, the nodes whose pools
    are complete warmed (`Allocator.warm`), in the order they came (only `only`, where
    given)."""
    complete: deque[str] = deque()
    while not slices.done:
        items = slices.next_items(wait=not complete)
        if items is not None:
            complete += (n for n in allocator.add(items) if only in (None, n))
        elif complete:
            allocator.warm(complete.popleft())


def _taint_rules(api: Any) -> list[dict[str, Any]]:
    """The cluster's DeviceTaintRules from the newest version it serves (v1 since 1.37,
    v1beta2 on 1.36); none where it serves neither (the feature is off, and the
    scheduler applies none either)."""
    for version in TAINT_RULE_VERSIONS:
        try:
            return list_items(api, f"/apis/resource.k8s.io/{version}/devicetaintrules")
        except ApiError as err:
            if err.result.status != 404:
                raise
    return []


def _namespaced(name: str) -> tuple[str, str]:
    namespace, _, claim = name.partition("/")
    if not namespace or not claim or "/" in claim:
        raise InputError(f"--claim {name}: expected NAMESPACE/NAME")
    return namespace, claim


def _cmd_allocate(args: argparse.Namespace, node_slices: SlicesFromProvider) -> int:
    allocator, claims, ledger, nodes = _setup(args, node_slices)
    done = allocate_in_order(allocator, claims, ledger, nodes, args.mode)
    for claim, _, outcome in done:
        if outcome.status == "error":
            raise InputError(f"ResourceClaim {claim.key}: {outcome.field or 'spec.devices'}: "
                             f"{outcome.message}")
    objects = []
    rows = []
    for claim, node, outcome in done:
        obj = json.loads(json.dumps(claim.raw))
        obj.setdefault("apiVersion", "resource.k8s.io/v1")
        obj.setdefault("kind", "ResourceClaim")
        if outcome.status == "allocated":
            obj["status"] = {**(obj.get("status") or {}), "allocation": outcome.allocations[0]}
            devices = [f"{r['request']}={r['device']}"
                       for r in outcome.allocations[0]["devices"]["results"]]
            rows.append((claim.key, node, "allocated", " ".join(devices)))
        else:
            reason = (outcome.message if outcome.status == "gave-up"
                      else f"does not fit on {', '.join(nodes)}; see gpu-dra explain")
            obj.setdefault("metadata", {}).setdefault("annotations", {})[FAILURE_ANNOTATION] = \
                reason
            rows.append((claim.key, "", outcome.status, reason))
        objects.append(obj)
    if args.output == "json":
        print(json.dumps(objects if len(objects) > 1 else objects[0], indent=2))
    elif args.output == "table":
        print(_table(("CLAIM", "NODE", "STATUS", "DEVICES / REASON"), rows))
    else:
        print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0 if all(o.status == "allocated" for _, _, o in done) else 1


def _cmd_explain(args: argparse.Namespace, node_slices: SlicesFromProvider) -> int:
    allocator, claims, ledger, nodes = _setup(args, node_slices)
    explanations = explain_all(allocator, claims, ledger, nodes, args.mode)
    for item in explanations:
        verdict = "fits" if item.fits else "does not fit"
        print(f"{item.claim} on {item.node}: {verdict}")
        if not item.fits:
            for reason in item.reasons:
                print(f"  - {reason}")
            if item.nearest:
                print("  nearest change that fits:")
                for change in item.nearest:
                    print(f"  * {change}")
            else:
                print("  no single change found that fits")
    return 0 if all(e.fits for e in explanations) else 1


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(r, widths, strict=True))
                     .rstrip() for r in [header, *rows])


COMMANDS: dict[str, Callable[[argparse.Namespace, SlicesFromProvider], int]] = {
    "allocate": _cmd_allocate, "explain": _cmd_explain}
