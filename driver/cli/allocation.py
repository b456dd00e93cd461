"""`gpu-dra allocate` and `gpu-dra explain`: the allocator from the command line.

    gpu-dra allocate (--slices DIR | --mock PROFILE [--mig-mode static|dynamic])
        --claims PATH [--classes PATH] [--allocated PATH] [--taint-rules PATH]
        [--mode parity|topology] [--node NAME] [--output yaml|json|table]
    gpu-dra allocate --kubeconfig FILE --claim NAMESPACE/NAME [...]

PATH is a YAML file (one or more documents) or a directory of them. DeviceTaintRules
among the --slices documents or in --taint-rules (with --kubeconfig: the cluster's)
taint the devices they select, as the scheduler applies them. Claims are
allocated in order, each seeing the ones before, each on the first node (by name)
where it fits. Exit code 0 when all fit, 1 when some do not (printed without
allocation, the reason in the annotation `gpu.dra.dev/allocation-failure`), 2 for bad
input, with nothing printed on stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAILURE_ANNOTATION = "gpu.dra.dev/allocation-failure"
RESOURCE = "/apis/resource.k8s.io/v1"
TAINT_RULE = "DeviceTaintRule"
TEMPLATE = "ResourceClaimTemplate"
TAINT_RULE_VERSIONS = ("v1", "v1beta2")

SlicesFromProvider = Callable[[argparse.Namespace], list[dict[str, Any]]]


def add_allocation_commands(commands: Any, add_provider_args: Callable[..., None],
                            add_slice_args: Callable[..., None],
                            node_slices: SlicesFromProvider) -> None:
    for name, helptext in (
            ("allocate", "allocate ResourceClaims against ResourceSlices, as the scheduler "
                         "would (parity) or topology-aware"),
            ("explain", "say why claims do not fit, with numbers, and the nearest change "
                        "that would")):
        cmd = commands.add_parser(name, help=helptext)
        cmd.add_argument("--slices", type=Path, metavar="PATH",
                         help="ResourceSlices (a YAML/JSON file, lists too, or a directory "
                              "of them) instead of this node's GPUs (not with --mock)")
        add_provider_args(cmd)
        add_slice_args(cmd)
        cmd.add_argument("--claims", type=Path, metavar="PATH",
                         help="ResourceClaims: a YAML file or a directory of them")
        cmd.add_argument("--kubeconfig", type=Path, metavar="FILE",
                         help="read the ResourceSlices (of --driver-name), DeviceClasses, "
                              "DeviceTaintRules and allocated claims from this cluster "
                              "(instead of --slices, --classes, --allocated, --taint-rules)")
        cmd.add_argument("--claim", action="append", default=[], metavar="NAMESPACE/NAME",
                         help="with --kubeconfig: a ResourceClaim of the cluster (repeat for "
                              "more), instead of --claims")
        cmd.add_argument("--classes", type=Path, metavar="PATH",
                         help="DeviceClasses; default: the driver's own (<driver> for whole "
                              "GPUs, mig.<driver> for MIG devices)")
        cmd.add_argument("--allocated", type=Path, metavar="PATH",
                         help="ResourceClaims already allocated (with status.allocation)")
        cmd.add_argument("--taint-rules", type=Path, metavar="PATH",
                         help="DeviceTaintRules whose taints the devices they select carry "
                              "(those among the --slices documents count too)")
        cmd.add_argument("--mode", choices=["parity", "topology"], default="parity",
                         help="parity: what kube-scheduler v1.37 picks; topology: the best "
                              "NVLink/NUMA/PCIe set and MIG placement")
        cmd.add_argument("--node", metavar="NAME", help="only this node")
        if name == "allocate":
            cmd.add_argument("--output", "-o", choices=["yaml", "json", "table"],
                             default="yaml")
        cmd.set_defaults(run=lambda args, name=name: _guarded(args, name, node_slices))


def _guarded(args: argparse.Namespace, name: str, node_slices: SlicesFromProvider) -> int:
    # The allocator and its CEL environment load here, not when `gpu-dra` starts: the
    # plugin and the other commands never need them (about 0.2 s of every start-up).
    from driver.allocator.input import InputError
    from driver.cli.allocation_run import COMMANDS
    from driver.gcpause import collector_paused

    try:
        # A command of seconds that frees nothing by collection (the same peak RSS with
        # the collector off, measured at 100 dynamic-MIG nodes): the collector would
        # only walk the cluster's objects again and again (half of explain's time).
        with collector_paused():
            return COMMANDS[name](args, node_slices)
    except (InputError, OSError, ValueError) as err:
        print(f"gpu-dra {args.command}: {err}", file=sys.stderr)
        return 2
