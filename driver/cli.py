"""The `gpu-dra` command.

Exit codes: 0 success, 1 the operation ran but found a problem, 2 bad input or
an environment that cannot work (no NVML, a bad profile). Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from driver.discovery import discover
from driver.inventory_view import inventory_table, inventory_to_dict
from driver.nvml import Provider
from driver.slices import SliceOptions, build_slices

DEFAULT_DRIVER = "gpu.dra.dev"


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def provider_from_args(args: argparse.Namespace) -> Provider:
    if args.mock:
        from driver.nvml.mock import ProfileError, mock_provider

        try:
            return mock_provider(args.mock)
        except ProfileError as err:
            raise UsageError(str(err)) from err
    from driver.nvml.real import NvmlUnavailable, real_provider

    try:
        return real_provider(driver_root=args.driver_root)
    except NvmlUnavailable as err:
        raise UsageError(str(err)) from err


def add_provider_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mock", metavar="NAME|PATH",
                        help="use a mock NVML machine profile (a shipped name or a YAML file) "
                             "instead of the real GPUs")
    parser.add_argument("--driver-root", type=Path, metavar="DIR",
                        help="root of the NVIDIA driver install holding libnvidia-ml.so.1 "
                             "(e.g. /driver-root); default: the dynamic linker's path")


def cmd_discover(args: argparse.Namespace) -> int:
    inventory = discover(provider_from_args(args))
    if args.output == "table":
        print(inventory_table(inventory))
    elif args.output == "json":
        print(json.dumps(inventory_to_dict(inventory), indent=2))
    else:
        print(yaml.safe_dump(inventory_to_dict(inventory), sort_keys=False), end="")
    return 0


def cmd_slices(args: argparse.Namespace) -> int:
    options = SliceOptions(driver=args.driver_name, node=args.node_name,
                           mig_mode=args.mig_mode, counter_layout=args.counter_layout)
    slices = build_slices(discover(provider_from_args(args)), options, generation=1)
    if args.output == "json":
        print(json.dumps(slices, indent=2))
    else:
        print(yaml.safe_dump_all(slices, sort_keys=False), end="")
    return 0


def add_slice_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver-name", default=os.environ.get("DRIVER_NAME", DEFAULT_DRIVER),
                        help=f"DRA driver name (env DRIVER_NAME; default {DEFAULT_DRIVER})")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME", socket.gethostname()),
                        help="this node's name, also the pool name (env NODE_NAME; default: "
                             "the host name)")
    parser.add_argument("--mig-mode", choices=["static", "dynamic"],
                        default=os.environ.get("MIG_MODE", "static"),
                        help="static: publish the MIG devices that exist; dynamic: publish "
                             "every profile and placement as partitionable devices (env MIG_MODE)")
    parser.add_argument("--counter-layout", choices=["split", "combined"], default="split",
                        help="where shared counters go: split, in their own slices "
                             "(Kubernetes 1.35+), or combined with the devices (1.34)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-dra", description="Kubernetes DRA node driver for NVIDIA GPUs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    discover_cmd = commands.add_parser(
        "discover", help="show the GPUs, MIG profiles and topology NVML reports")
    add_provider_args(discover_cmd)
    discover_cmd.add_argument("--output", "-o", choices=["table", "json", "yaml"],
                              default="table")
    discover_cmd.set_defaults(run=cmd_discover)

    slices_cmd = commands.add_parser(
        "slices", help="print the ResourceSlices this node would publish")
    add_provider_args(slices_cmd)
    add_slice_args(slices_cmd)
    slices_cmd.add_argument("--output", "-o", choices=["yaml", "json"], default="yaml")
    slices_cmd.set_defaults(run=cmd_slices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as err:
        print(f"gpu-dra {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
