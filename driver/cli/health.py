"""`gpu-dra health`: an admin's view of the GPUs' health on this node and their hand on
it (`driver.plugin.admin`): keep a GPU out of service, return it, clear what the monitor
found. Run on the node or in the plugin's pod (`kubectl exec`), where PLUGIN_DATA_DIR
and DRIVER_NAME already name the plugin's data directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driver.cli.flags import DEFAULT_DRIVER, EnvParser, env_flag
from driver.health.taints import rfc3339

if TYPE_CHECKING:
    from driver.plugin.admin import Requests

DEFAULT_PLUGINS = Path("/var/lib/kubelet/plugins")


def add_health_commands(commands: Any) -> None:
    health_cmd = commands.add_parser(
        "health", help="show the GPUs' health on this node; keep a GPU out of service, "
                       "return it, or clear what the monitor found")
    actions = health_cmd.add_subparsers(dest="health_command", required=True,
                                        metavar="ACTION", parser_class=EnvParser)
    status = actions.add_parser("status", help="each GPU's health as the plugin publishes "
                                               "it, and the admin's requests")
    status.add_argument("--output", "-o", choices=["table", "json"], default="table")
    out = actions.add_parser(
        "out-of-service", help="taint the GPU and every device of it (NoSchedule, or "
                               "NoExecute with --health-evict) until `return` or `clear`; "
                               "kept across plugin restarts")
    out.add_argument("--reason", default="", help="the taint's value (as a label value)")
    actions.add_parser("return", help="end the GPU's out-of-service; what the monitor found "
                                      "stays")
    actions.add_parser("clear", help="forget every condition on the GPU (the monitor's and "
                                     "out-of-service) until the next fault")
    for parser in actions.choices.values():
        env_flag(parser, "--plugin-data-dir", env="PLUGIN_DATA_DIR", type=Path,
                 metavar="DIR", help="the plugin's data directory; default /var/lib/"
                                     "kubelet/plugins/<driver> (env PLUGIN_DATA_DIR)")
        env_flag(parser, "--driver-name", env="DRIVER_NAME", default=DEFAULT_DRIVER,
                 help=f"DRA driver name (env DRIVER_NAME; default {DEFAULT_DRIVER})")
        if parser is not status:
            parser.add_argument("--gpu", required=True, metavar="MINOR|UUID",
                                help="the GPU's minor number (gpu-MINOR) or UUID")
    health_cmd.set_defaults(run=cmd_health)


def cmd_health(args: argparse.Namespace) -> int:
    # Here, not at the top: the plugin's health monitor (and prometheus_client) would load
    # with every command, 0.06 s of `gpu-dra explain`'s start.
    from driver.plugin.admin import AdminError, read_status, record

    plugin_dir = args.plugin_data_dir or DEFAULT_PLUGINS / args.driver_name
    try:
        if args.health_command == "status":
            return _status(plugin_dir, args.output)
        published = read_status(plugin_dir)
        if published is not None and not any(
                args.gpu in (str(g["gpu"]), g["uuid"]) for g in published["gpus"]):
            names = ", ".join(f"{g['gpu']} ({g['uuid']})" for g in published["gpus"])
            raise AdminError(f"no GPU {args.gpu!r} on this node; its GPUs: {names}")
        if not plugin_dir.is_dir():
            raise AdminError(f"{plugin_dir}: no such directory (is the plugin's data "
                             "directory elsewhere? --plugin-data-dir)")
        record(plugin_dir, args.health_command, args.gpu, getattr(args, "reason", ""))
    except (AdminError, OSError) as err:
        print(f"gpu-dra health {args.health_command}: {err}", file=sys.stderr)
        return 2
    what = {"out-of-service": "kept out of service", "return": "returned to service",
            "clear": "cleared"}[args.health_command]
    print(f"GPU {args.gpu}: {what}; the plugin applies it within a second"
          + ("" if published else " of its start (no plugin has published health here yet)"))
    return 0


def _status(plugin_dir: Path, output: str) -> int:
    from driver.plugin.admin import ADMIN_FILE, load, read_status

    published = read_status(plugin_dir)
    requests = load(plugin_dir / ADMIN_FILE)
    if output == "json":
        print(json.dumps({"published": published, "outOfService": {
            g: {"reason": o.reason, "since": o.since.isoformat()}
            for g, o in requests.out_of_service.items()}}, indent=2))
        return 0
    if published is None:
        print(f"no health published in {plugin_dir} yet (is the plugin running there?)")
    else:
        print(f"{'GPU':<4} {'UUID':<42} {'STATUS':<10} CONDITIONS")
        for gpu in published["gpus"]:
            conditions = ", ".join(
                f"{c['kind']}{'=' + c['value'] if c['value'] else ''}:{c['effect']} since "
                f"{c['since']}" for c in gpu["conditions"]) or "-"
            print(f"{gpu['gpu']:<4} {gpu['uuid']:<42} {gpu['status']:<10} {conditions}")
        print(f"(published {published['updated']})")
    print(_requests(requests))
    return 0


def _requests(requests: Requests) -> str:
    if not requests.out_of_service:
        return "out of service by the admin: none"
    return "out of service by the admin: " + ", ".join(
        f"{gpu} since {rfc3339(o.since)}" + (f" ({o.reason})" if o.reason else "")
        for gpu, o in sorted(requests.out_of_service.items()))
