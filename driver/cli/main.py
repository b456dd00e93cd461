"""The `gpu-dra` command.

Exit codes: 0 success, 1 the operation ran but found a problem, 2 bad input or
an environment that cannot work (no NVML, a bad profile). Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml

from driver.cli.allocation import add_allocation_commands
from driver.cli.flags import (
    EnvParser,
    add_plugin_args,
    add_provider_args,
    add_slice_args,
    seconds,
)
from driver.cli.health import add_health_commands
from driver.errors import CliError
from driver.health.classify import HealthSettings
from driver.inventory.exclude import Split, describe, split
from driver.inventory.model import Inventory
from driver.inventory.view import inventory_table, inventory_to_dict
from driver.nvml import Provider


class UsageError(CliError):
    """Bad input from the user: printed as one line, exit code 2."""


def provider_from_args(args: argparse.Namespace) -> Provider:
    if args.mock:
        from driver.nvml.mock import mock_provider
        from driver.nvml.profile import ProfileError

        try:
            return mock_provider(args.mock, getattr(args, "mock_state", None))
        except ProfileError as err:
            raise UsageError(str(err)) from err
    from driver.nvml.real import NvmlUnavailable, real_provider

    try:
        return real_provider(driver_root=args.driver_root)
    except NvmlUnavailable as err:
        raise UsageError(str(err)) from err


def node_inventory(args: argparse.Namespace) -> tuple[Inventory, Split]:
    """This node's GPUs, discovered, and those `--exclude-gpus` keeps out. An entry that
    names no GPU is a UsageError, unless some GPU could not be read (it may be that one:
    then a warning on stderr)."""
    # Here, not at the top: pynvml is not needed by the commands that read a cluster.
    from driver.inventory.discovery import discover

    inventory = discover(provider_from_args(args))
    parts = split(inventory, args.exclude_gpus)
    if parts.unmatched:
        problem = (f"--exclude-gpus (env EXCLUDE_GPUS): no GPU has the minor number or UUID "
                   f"{', '.join(parts.unmatched)} (GPUs: "
                   f"{', '.join(str(g.minor) for g in inventory.gpus if g.minor >= 0)})")
        if not parts.unreadable:
            raise UsageError(problem)
        print(f"gpu-dra {args.command}: warning: {problem}; {parts.unreadable} GPU(s) could "
              "not be read and may be the ones named", file=sys.stderr)
    return inventory, parts


def cmd_discover(args: argparse.Namespace) -> int:
    inventory, parts = node_inventory(args)
    excluded = {g.index for g in parts.excluded}
    if args.output == "table":
        print(inventory_table(inventory, excluded))
    elif args.output == "json":
        print(json.dumps(inventory_to_dict(inventory, excluded), indent=2))
    else:
        print(yaml.safe_dump(inventory_to_dict(inventory, excluded), sort_keys=False), end="")
    return 0


def cmd_slices(args: argparse.Namespace) -> int:
    _, parts = node_inventory(args)
    slices = slices_of(args, parts)
    if parts.excluded:  # stderr: stdout stays ResourceSlices to apply
        print(f"gpu-dra slices: not published, excluded by --exclude-gpus: "
              f"{describe(parts.excluded)}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(slices, indent=2))
    else:
        print(yaml.safe_dump_all(slices, sort_keys=False), end="")
    return 0


def cmd_plugin(args: argparse.Namespace) -> int:
    from driver.plugin.checkpoint import CheckpointError
    from driver.plugin.daemon import PluginOptions, run
    from driver.plugin.exclusion import NodeExclusionError
    from driver.plugin.logs import setup_logging

    setup_logging(args.log_format, args.verbosity)
    if args.mock_state is not None and not args.mock:
        raise UsageError("--mock-state needs --mock")
    plugin_dir = args.plugin_data_dir or Path("/var/lib/kubelet/plugins") / args.driver_name
    try:
        options = PluginOptions(
            driver=args.driver_name, node=args.node_name,
            registry_dir=args.kubelet_registry_dir, plugin_dir=plugin_dir,
            cdi_root=args.cdi_root, driver_root=args.driver_root or Path("/"),
            mock_driver_root=plugin_dir / "mock-driver-root"
            if args.mock and args.driver_root is None else None,
            host_driver_root=args.host_driver_root, mig_mode=args.mig_mode,
            counter_layout=args.counter_layout, gpu_sharing=args.gpu_sharing,
            local_dir=args.local_dir,
            kubeconfig=args.kubeconfig, health_port=args.health_port or None,
            metrics_port=args.metrics_port or None, cleanup=args.cleanup,
            cdi_hook=args.nvidia_cdi_hook, pod_uid=args.pod_uid,
            pod_namespace=args.pod_namespace, image=args.image,
            health=HealthSettings(ignored_xids=args.health_ignored_xids,
                                  evict=args.health_evict,
                                  quiet_window_s=args.health_quiet_window),
            health_check_interval=args.health_check_interval,
            rediscover_interval=args.rediscover_interval, exclude=args.exclude_gpus)
    except ValueError as err:
        raise UsageError(str(err)) from None
    from driver.plugin.sockets import SocketInUse
    from driver.resourceslice.errors import PublishError

    try:
        return run(options, provider_from_args(args))
    except CheckpointError as err:
        raise UsageError(f"{err}; not starting: it records the claims prepared on this "
                         "node, so repair the field named or restore the file") from err
    except SocketInUse as err:
        raise UsageError(f"cannot start: {err}") from err
    except PublishError as err:
        raise UsageError(f"cannot publish ResourceSlices: {err}") from err
    except NodeExclusionError as err:
        raise UsageError(f"cannot start: {err}; it says which GPUs to leave alone") from err
    except OSError as err:  # a port in use, a directory that cannot be created
        raise UsageError(f"cannot start: {err}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = EnvParser(prog="gpu-dra", description="Kubernetes DRA node driver for NVIDIA GPUs")
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

    plugin_cmd = commands.add_parser(
        "plugin", help="run the kubelet plugin: publish this node's GPUs, prepare claims")
    add_provider_args(plugin_cmd)
    add_slice_args(plugin_cmd)
    add_plugin_args(plugin_cmd)
    # unset: the API server publisher picks by the server's version; local mode: split
    plugin_cmd.set_env_default("counter_layout", "auto")
    plugin_cmd.set_defaults(run=cmd_plugin)

    mps_cmd = commands.add_parser(
        "mps-daemon", help="run one claim's MPS control daemon with its limits (in the "
                           "pod the plugin creates for it in a cluster)")
    mps_cmd.add_argument("--claim-dir", type=Path, required=True,
                         help="the claim's MPS directory (its claim.json, pipe/, log/)")
    mps_cmd.add_argument("--driver-root", type=Path, default=Path("/"),
                         help="where the driver's nvidia-cuda-mps-control and "
                              "libnvidia-ml.so.1 are")
    mps_cmd.add_argument("--probe", action="store_true",
                         help="start nothing: exit 0 if the claim's daemon answers through "
                              "its pipe, 1 if not (its pod's liveness probe)")
    mps_cmd.add_argument("--probe-timeout", type=seconds, metavar="SECONDS",
                         help="with --probe: how long to wait for the answer (default 5)")
    mps_cmd.set_defaults(run=cmd_mps_daemon)

    add_allocation_commands(commands, add_provider_args, add_slice_args, node_slices)
    add_mock_commands(commands)
    add_health_commands(commands)

    demo_cmd = commands.add_parser(
        "demo", help="the driver end to end on a mock machine: no cluster, no GPU")
    demo_cmd.add_argument("--profile", default="dgx-h100", metavar="NAME|PATH",
                          help="mock machine profile: a shipped name or a YAML file")
    demo_cmd.add_argument("--claims", type=Path, metavar="PATH",
                          help="ResourceClaims (a YAML file or a directory); default: the "
                               "shipped examples")
    demo_cmd.add_argument("--keep", action="store_true",
                          help="leave the temporary folder (sockets, slices, claims, CDI "
                               "specs) to inspect")
    demo_cmd.add_argument("--cluster", action="store_true",
                          help="run against a real local control plane with the kubelet "
                               "stand-in on a fake GPU node; print a kubeconfig and wait "
                               "for Ctrl-C (needs the e2e binaries: KUBEBUILDER_ASSETS or Go)")
    demo_cmd.add_argument("--mig-mode", choices=["static", "dynamic"],
                          help="with --cluster: the plugin's MIG mode (default dynamic)")
    demo_cmd.add_argument("--kubeconfig-out", type=Path, metavar="PATH",
                          help="with --cluster: also write the kubeconfig to PATH (left "
                               "there on exit)")
    demo_cmd.set_defaults(run=cmd_demo)
    return parser


def cmd_mps_daemon(args: argparse.Namespace) -> int:
    from driver.plugin.logs import setup_logging
    from driver.plugin.mpspod import PROBE_TIMEOUT, probe, serve

    if args.probe:
        return probe(args.claim_dir, args.driver_root, args.probe_timeout or PROBE_TIMEOUT)
    setup_logging("text", 0)
    return serve(args.claim_dir, args.driver_root)


def cmd_demo(args: argparse.Namespace) -> int:
    from driver.allocator.input import InputError
    from driver.demo.local import EXAMPLE_CLAIMS, DemoOptions, StepFailed, run_demo

    try:
        if args.cluster:
            return _cluster_demo(args)
        for flag, value in (("--kubeconfig-out", args.kubeconfig_out),
                            ("--mig-mode", args.mig_mode)):
            if value is not None:
                raise UsageError(f"{flag} needs --cluster")
        return run_demo(DemoOptions(args.profile, args.claims or EXAMPLE_CLAIMS, args.keep))
    except InputError as err:
        raise UsageError(str(err)) from err
    except StepFailed as err:
        print(f"gpu-dra demo: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `gpu-dra demo | head`: the reader left; the folder is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1


def _cluster_demo(args: argparse.Namespace) -> int:
    try:
        from driver.demo.cluster import ClusterDemoOptions, MissingBinaries, run_cluster_demo
    except ModuleNotFoundError as err:  # the devcluster extra is not installed
        raise UsageError(f"--cluster needs the devcluster extra (missing {err.name}): "
                         "pip install 'gpu-dra-driver[devcluster]'") from err

    if args.claims is not None:
        raise UsageError("--claims runs without --cluster; with it, kubectl apply your claims")
    try:
        return run_cluster_demo(ClusterDemoOptions(
            profile=args.profile, mig_mode=args.mig_mode or "dynamic",
            kubeconfig_out=args.kubeconfig_out,
            keep=args.keep), out=lambda line: print(line, flush=True))
    except MissingBinaries as err:
        raise UsageError(str(err)) from err


def add_mock_commands(commands: Any) -> None:
    """`gpu-dra mock inject`: its command line is a contract (checks outside the project
    use it), so its flags and exit codes only grow."""
    mock_cmd = commands.add_parser(
        "mock", help="act on the mock GPUs of a running `gpu-dra plugin --mock ... "
                     "--mock-state FILE`")
    actions = mock_cmd.add_subparsers(dest="mock_command", required=True, metavar="ACTION",
                                      parser_class=OneLineParser)
    inject = actions.add_parser(
        "inject", help="inject a fault into one mock GPU: an event for the event sets "
                       "registered now, or a lasting condition until --recover / --add",
        prog="gpu-dra mock inject")
    inject.add_argument("--mock-state", type=Path, metavar="FILE", required=True,
                        help="the plugin's --mock-state file")
    inject.add_argument("--gpu", type=minor_number, metavar="MINOR", required=True,
                        help="the GPU's minor number (gpu-MINOR)")
    fault = inject.add_mutually_exclusive_group(required=True)
    fault.add_argument("--xid", type=positive_int, metavar="N", action=OnlyOnce,
                       help="an XID event (XidCriticalError with N as its data)")
    fault.add_argument("--ecc-dbe", action="store_true",
                       help="a double-bit ECC error event (a row remap pending a reset)")
    fault.add_argument("--lost", action="store_true",
                       help="the GPU fell off the bus: it answers GPU_IS_LOST")
    fault.add_argument("--recover", action="store_true",
                       help="the GPU was reset and answers again: its faults are cleared")
    fault.add_argument("--remove", action="store_true",
                       help="the GPU is gone: no longer counted or found")
    fault.add_argument("--add", action="store_true", help="a removed GPU is back")
    inject.set_defaults(run=cmd_mock_inject)


class OneLineParser(EnvParser):
    """A parser whose usage errors are one line on stderr (scripts read it), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


class OnlyOnce(argparse.Action):
    """A flag given twice is two faults: refused, as two different fault flags are."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "give one fault only")
        setattr(namespace, self.dest, values)


def minor_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a GPU minor number, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def cmd_mock_inject(args: argparse.Namespace) -> int:
    from driver.nvml.faults import FAULT_KINDS, Fault
    from driver.nvml.mock import inject
    from driver.nvml.profile import ProfileError

    kind = next(k for k in FAULT_KINDS if getattr(args, k.replace("-", "_")) not in
                (None, False))
    try:
        uuid = inject(args.mock_state, args.gpu, Fault(kind, args.xid))
    except (ProfileError, OSError) as err:  # OSError: no lock file in a read-only folder
        problem = err if isinstance(err, ProfileError) else \
            f"{args.mock_state}: {err.strerror or err}"
        print(f"gpu-dra mock inject: {problem}", file=sys.stderr)
        return 2
    what = f"XID {args.xid}" if kind == "xid" else kind
    print(f"gpu-{args.gpu} ({uuid}): {what} recorded")
    return 0


def node_slices(args: argparse.Namespace) -> list[dict[str, Any]]:
    """This node's ResourceSlices, as `gpu-dra slices` prints them."""
    return slices_of(args, node_inventory(args)[1])


def slices_of(args: argparse.Namespace, parts: Split) -> list[dict[str, Any]]:
    """The ResourceSlices of the GPUs the driver serves."""
    from driver.resourceslice.build import SliceOptions, build_slices

    try:
        options = SliceOptions(driver=args.driver_name, node=args.node_name,
                               mig_mode=args.mig_mode, counter_layout=args.counter_layout,
                               gpu_sharing=args.gpu_sharing)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return build_slices(parts.served, options, generation=1)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except UsageError as err:
        print(f"gpu-dra {args.command}: {err}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The `gpu-dra` process: `main`, then an exit whose collections skip what is still
    alive. The interpreter's exit runs the cyclic collector several times over every
    object left, such as the allocator's caches of a cluster's slices: 1.3-1.7 s after
    explain or allocate had answered at 1,000 dynamic-MIG nodes. Frozen, they are freed
    by reference counts at exit or left to the OS, as any process leaves what it holds;
    atexit handlers still run."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
