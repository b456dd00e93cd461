"""The flag groups of `gpu-dra`, each flag with the environment variable that sets it.

A DaemonSet configures the plugin through environment variables, so an environment value
is checked exactly like the flag's: the same type and choices; a bad one ends the command
with exit code 2 and one line naming the variable and what it accepts. A flag on the
command line wins over its variable; an empty variable counts as unset (a chart value left
blank). Switches accept true/false, 1/0, yes/no.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.errors import CliError
from driver.health.classify import HealthSettings, HealthSettingsError
from driver.inventory.exclude import Exclusion, ExclusionError, parse_exclusion

DEFAULT_DRIVER = "gpu.dra.dev"
TRUE = ("1", "true", "yes")
FALSE = ("0", "false", "no")


class _Unset:
    """The parsed value of a flag that was not given: its variable or default decides."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class EnvSetting:
    variable: str
    default: Any


class EnvError(CliError):
    """An environment variable holds a value its flag would refuse."""

    def __init__(self, variable: str, value: str, accepted: str) -> None:
        super().__init__(f"environment variable {variable}={value!r} is not valid: "
                         f"{accepted}")
        self.variable = variable


class EnvParser(argparse.ArgumentParser):
    """An ArgumentParser whose flags may be backed by environment variables (`env_flag`).

    Subcommand parsers are of the same class, so each resolves its own flags' variables
    after parsing: only the command that runs reads its variables.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env_settings: dict[str, EnvSetting] = {}  # by dest

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extra = super().parse_known_args(args, namespace)
        actions = {a.dest: a for a in self._actions}
        for dest, setting in self.env_settings.items():
            if getattr(parsed, dest, None) is not UNSET:
                continue
            raw = os.environ.get(setting.variable, "")
            try:
                value = env_value(actions[dest], setting.variable, raw) if raw \
                    else default_value(actions[dest], setting.default)
            except EnvError as err:
                print(f"{self.prog}: {err}", file=sys.stderr)
                sys.exit(2)
            setattr(parsed, dest, value)
        return parsed, extra

    def set_env_default(self, dest: str, default: Any) -> None:
        """Change the default of an env-backed flag (one subcommand's own default)."""
        self.env_settings[dest] = EnvSetting(self.env_settings[dest].variable, default)


def env_flag(parser: EnvParser, *names: str, env: str, default: Any = None,
             **kwargs: Any) -> argparse.Action:
    """`parser.add_argument(*names, ...)`, also set by the variable `env`."""
    action = parser.add_argument(*names, default=UNSET, **kwargs)
    parser.env_settings[action.dest] = EnvSetting(env, default)
    return action


def env_value(action: argparse.Action, variable: str, raw: str) -> Any:
    """The value `raw` gives the flag, checked as argparse checks the flag's argument."""
    if action.nargs == 0:  # a switch
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise EnvError(variable, raw, f"expected one of {', '.join(TRUE + FALSE)}")
    convert = action.type if callable(action.type) else str
    try:
        value = convert(raw)
    except argparse.ArgumentTypeError as err:  # the type says what it accepts
        raise EnvError(variable, raw, str(err)) from None
    except (ValueError, TypeError):
        kind = getattr(convert, "__name__", "value")
        raise EnvError(variable, raw, f"expected {'an integer' if convert is int else kind}"
                       ) from None
    if action.choices is not None and value not in action.choices:
        raise EnvError(variable, raw, f"choose from {', '.join(map(str, action.choices))}")
    return value


def default_value(action: argparse.Action, default: Any) -> Any:
    """The default, converted as argparse converts a string default."""
    if isinstance(default, str) and callable(action.type):
        return action.type(default)
    return default


def _number(raw: str) -> float:
    """A finite number, or NaN (which no bound accepts)."""
    try:
        value = float(raw)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def seconds(raw: str) -> float:
    """A number of seconds above 0 (a flag's type)."""
    value = _number(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {raw!r}")
    return value


def seconds_or_off(raw: str) -> float:
    """A number of seconds, 0 or more (a flag's type; 0 turns what it times off)."""
    value = _number(raw)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 or more, got "
                                         f"{raw!r}")
    return value


def xids(raw: str) -> frozenset[int]:
    """A comma-separated list of XIDs (a flag's type), checked as HealthSettings checks
    them."""
    try:
        found = frozenset(int(part) for part in raw.split(",") if part.strip())
        HealthSettings(ignored_xids=found)
    except (ValueError, HealthSettingsError) as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated XIDs such as 13,43 ({err})") from None
    return found


def gpu_list(raw: str) -> Exclusion:
    """A comma-separated list of GPU minors and UUIDs (a flag's type)."""
    try:
        return parse_exclusion(raw)
    except ExclusionError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated GPU minors or UUIDs: "
                                         f"{err}") from None


# --- the groups ------------------------------------------------------------------------------


def add_provider_args(parser: EnvParser) -> None:
    env_flag(parser, "--mock", env="MOCK_PROFILE", metavar="NAME|PATH",
             help="use a mock NVML machine profile (a shipped name or a YAML file) instead "
                  "of the real GPUs; the plugin, without --driver-root, lays out a mock "
                  "driver root in <plugin-data-dir>/mock-driver-root for its CDI specs: "
                  "placeholder libraries and tools, a stand-in nvidia-cdi-hook that logs "
                  "its calls, and device nodes made with mknod where allowed (root), else "
                  "given by type, major and minor in the specs, so a container runtime "
                  "injects the mock GPUs (env MOCK_PROFILE)")
    env_flag(parser, "--driver-root", env="DRIVER_ROOT", type=Path, metavar="DIR",
             help="root of the NVIDIA driver install holding libnvidia-ml.so.1 (e.g. "
                  "/driver-root); default: the dynamic linker's path (env DRIVER_ROOT)")
    env_flag(parser, "--exclude-gpus", env="EXCLUDE_GPUS", type=gpu_list, default="",
             metavar="LIST",
             help="GPUs this driver leaves alone (to a device plugin): comma-separated minor "
                  "numbers (gpu-<minor>, /dev/nvidia<minor>) and GPU UUIDs; never "
                  "published, prepared or MIG-managed (env EXCLUDE_GPUS)")


def add_slice_args(parser: EnvParser) -> None:
    env_flag(parser, "--driver-name", env="DRIVER_NAME", default=DEFAULT_DRIVER,
             help=f"DRA driver name (env DRIVER_NAME; default {DEFAULT_DRIVER})")
    env_flag(parser, "--node-name", env="NODE_NAME", default=socket.gethostname(),
             help="this node's name, also the pool name (env NODE_NAME; default: the host "
                  "name)")
    env_flag(parser, "--mig-mode", env="MIG_MODE", default="static",
             choices=["static", "dynamic"],
             help="static: publish the MIG devices that exist; dynamic: publish every "
                  "profile and placement as partitionable devices (env MIG_MODE)")
    env_flag(parser, "--counter-layout", env="COUNTER_LAYOUT", default="split",
             choices=["split", "combined"],
             help="where shared counters go: split, in their own slices (Kubernetes 1.35+), "
                  "or combined with the devices (1.34) (env COUNTER_LAYOUT)")
    env_flag(parser, "--gpu-sharing", env="GPU_SHARING", default="exclusive",
             choices=["exclusive", "consumable"],
             help="exclusive: a GPU goes to one claim; consumable: whole GPUs (not in MIG "
                  "mode) are published with allowMultipleAllocations and consumable memory "
                  "and compute capacities, so the scheduler packs several claims onto one "
                  "GPU by what they ask, and the plugin gives each its own MPS daemon with "
                  "those limits (in a cluster, in a pod of its own: needs --pod-namespace "
                  "and --image) (env GPU_SHARING)")


def add_plugin_args(parser: EnvParser) -> None:
    env_flag(parser, "--kubelet-registry-dir", env="KUBELET_REGISTRY_DIR", type=Path,
             metavar="DIR", default="/var/lib/kubelet/plugins_registry",
             help="where the kubelet watches for registration sockets "
                  "(env KUBELET_REGISTRY_DIR)")
    env_flag(parser, "--plugin-data-dir", env="PLUGIN_DATA_DIR", type=Path, metavar="DIR",
             help="the DRA socket and the checkpoint; default /var/lib/kubelet/plugins/"
                  "<driver> (env PLUGIN_DATA_DIR)")
    env_flag(parser, "--cdi-root", env="CDI_ROOT", type=Path, metavar="DIR",
             default="/var/run/cdi", help="where CDI specs are written (env CDI_ROOT)")
    env_flag(parser, "--host-driver-root", env="HOST_DRIVER_ROOT", type=Path, metavar="DIR",
             help="the driver root as the container runtime on the host sees it, for paths "
                  "in CDI specs; default: --driver-root (env HOST_DRIVER_ROOT)")
    env_flag(parser, "--nvidia-cdi-hook", env="NVIDIA_CDI_HOOK", type=Path, metavar="PATH",
             help="host path of nvidia-cdi-hook, which the CDI specs' hooks run "
                  "(create-symlinks, enable-cuda-compat, update-ldcache, "
                  "disable-device-node-modification); default: the first found under the "
                  "driver root in its bin folders or the GPU operator's "
                  "usr/local/nvidia/toolkit; none found: specs without hooks, a warning, "
                  "a Node event and gpu_dra_cdi_hook_available 0 (env NVIDIA_CDI_HOOK)")
    env_flag(parser, "--mock-state", env="MOCK_STATE", type=Path, metavar="FILE",
             help="with --mock: keep the mock GPUs' MIG devices in this file, as real GPUs "
                  "keep them across plugin restarts, and read the faults `gpu-dra mock "
                  "inject` records there (env MOCK_STATE)")
    env_flag(parser, "--kubeconfig", env="KUBECONFIG", type=Path, metavar="FILE",
             help="kubeconfig of the API server; default: in-cluster (env KUBECONFIG)")
    env_flag(parser, "--local-dir", env="LOCAL_DIR", type=Path, metavar="DIR",
             help="no cluster: write ResourceSlices to DIR/resourceslices/ and read claims "
                  "from DIR/resourceclaims/<namespace>/<name>.yaml (env LOCAL_DIR)")
    env_flag(parser, "--health-port", env="HEALTH_PORT", type=int, metavar="PORT",
             default="51515",
             help="TCP port of the grpc.health.v1 service for probes; 0: off "
                  "(env HEALTH_PORT)")
    env_flag(parser, "--metrics-port", env="METRICS_PORT", type=int, metavar="PORT",
             default="8080",
             help="TCP port of the Prometheus /metrics; 0: off (env METRICS_PORT)")
    env_flag(parser, "--log-format", env="LOG_FORMAT", choices=["text", "json"],
             default="text", help="(env LOG_FORMAT)")
    env_flag(parser, "-v", "--verbosity", env="LOG_VERBOSITY", type=int, metavar="N",
             default="0", help="0: info; 1 or more: debug (env LOG_VERBOSITY)")
    env_flag(parser, "--pod-namespace", env="POD_NAMESPACE", metavar="NAMESPACE",
             help="the plugin pod's namespace: in a cluster each MPS claim's daemon runs "
                  "in a pod of its own there (env POD_NAMESPACE)")
    env_flag(parser, "--image", env="GPU_DRA_IMAGE", metavar="IMAGE",
             help="the driver's image, which the MPS daemons' pods run (env GPU_DRA_IMAGE)")
    env_flag(parser, "--pod-uid", env="POD_UID", metavar="UID",
             help="this pod's UID (downward API metadata.uid): name the sockets "
                  "<driver>-<uid>-reg.sock and dra-<uid>.sock so the old and the new pod of "
                  "a rolling update (kubelet 1.33+) serve side by side; unset: "
                  "<driver>-reg.sock and dra.sock (env POD_UID)")
    env_flag(parser, "--health-check-interval", env="HEALTH_CHECK_INTERVAL", type=seconds,
             metavar="SECONDS", default="5",
             help="how often every GPU is checked: it still answers, and the recovery "
                  "action the driver reports (env HEALTH_CHECK_INTERVAL)")
    env_flag(parser, "--health-ignored-xids", env="HEALTH_IGNORED_XIDS", type=xids,
             metavar="XID,...", default="",
             help="XIDs that never take a GPU out of service, whatever the XID table or the "
                  "driver says: informational taints (env HEALTH_IGNORED_XIDS)")
    env_flag(parser, "--health-evict", env="HEALTH_EVICT", action="store_true",
             default=False,
             help="fatal GPU conditions taint NoExecute instead of NoSchedule: running pods "
                  "on the GPU are evicted (env HEALTH_EVICT=true)")
    env_flag(parser, "--health-quiet-window", env="HEALTH_QUIET_WINDOW", type=seconds,
             metavar="SECONDS", default="300",
             help="an informational XID's taint goes after this long without that XID again "
                  "(env HEALTH_QUIET_WINDOW)")
    env_flag(parser, "--rediscover-interval", env="REDISCOVER_INTERVAL", type=seconds_or_off,
             metavar="SECONDS", default="60",
             help="how often the GPUs are discovered again (a GPU gone or back, MIG changes, "
                  "a driver upgrade), as SIGHUP does at once; 0: only on SIGHUP "
                  "(env REDISCOVER_INTERVAL)")
    env_flag(parser, "--cleanup", env="CLEANUP_ON_EXIT", action="store_true", default=False,
             help="on exit, delete this node's ResourceSlices (uninstall); refused with "
                  "--pod-uid (env CLEANUP_ON_EXIT=true)")
