"""Opaque device configuration: our versioned schema, strict, and which config applies where.

A ResourceClaim (or its DeviceClass) carries `opaque.parameters` for this driver. They are
decoded strictly: an unknown field, a wrong type (no coercion of "50" to 50) or a bad value
is an error naming the field's full path, so a typo never silently means "no sharing".
The shapes are NVIDIA's resource.nvidia.com/v1beta1 GpuConfig and MigDeviceConfig, and that
apiVersion is accepted beside ours, decoded by the same models (NVIDIA's driver decodes
them strictly too), so a claim written for NVIDIA's driver prepares unchanged.

Precedence follows the upstream convention: class configs first, then claim configs, and a
later config replaces an earlier one for the requests it names.

The models are pydantic's, in `driver.plugin.configschema`, loaded by the first config
decoded: a plugin that starts, or prepares claims without configs, never loads pydantic.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from driver.errors import PluginError
from driver.kube.quantity import parse_quantity

if TYPE_CHECKING:
    from driver.plugin.configschema import DeviceConfig

GROUP = "gpu.dra.dev"
API_VERSION = f"{GROUP}/v1alpha1"
NVIDIA_API_VERSION = "resource.nvidia.com/v1beta1"
ApiVersion = Literal["gpu.dra.dev/v1alpha1", "resource.nvidia.com/v1beta1"]
MAX_PARAMETERS_BYTES = 10 * 1024  # what the API server allows for opaque parameters

# nvidia-smi compute-policy --set-timeslice values.
TIMESLICE_INTERVALS: dict[str, int] = {"Default": 0, "Short": 1, "Medium": 2, "Long": 3}

class ConfigError(PluginError, ValueError):
    """A config that cannot be used; the message names the field."""


def memory_bytes(quantity: str) -> int:
    """A whole-byte Kubernetes quantity (`1Gi`, `512M`, `1073741824`) in bytes."""
    value = parse_quantity(quantity)
    if value.denominator != 1:
        raise ValueError(f"{quantity!r} is not a whole number of bytes")
    if value <= 0:
        raise ValueError("must be more than 0 bytes")
    return int(value)


def parse_parameters(parameters: Any, where: str) -> DeviceConfig:
    """One opaque.parameters object -> a config; ConfigError names `where` + the field."""
    if not isinstance(parameters, dict):
        raise ConfigError(f"{where}: must be an object, not {type(parameters).__name__}")
    size = len(json.dumps(parameters, separators=(",", ":")).encode())
    if size > MAX_PARAMETERS_BYTES:
        raise ConfigError(f"{where}: {size} bytes, at most {MAX_PARAMETERS_BYTES}")
    if parameters.get("apiVersion") not in (API_VERSION, NVIDIA_API_VERSION):
        raise ConfigError(f"{where}.apiVersion: must be {API_VERSION} or {NVIDIA_API_VERSION},"
                          f" not {parameters.get('apiVersion')!r}")
    if parameters.get("kind") not in ("GpuConfig", "MigDeviceConfig"):
        raise ConfigError(f"{where}.kind: must be GpuConfig or MigDeviceConfig, not "
                          f"{parameters.get('kind')!r}")
    from pydantic import ValidationError

    from driver.plugin.configschema import CONFIG  # pydantic: see its module

    try:
        return CONFIG.validate_python(parameters)
    except ValidationError as err:
        raise ConfigError("; ".join(_problem(where, e) for e in err.errors())) from None


def _problem(where: str, error: Any) -> str:
    # the discriminator's tag ("GpuConfig") is not a field of the document
    loc = [str(part) for part in error["loc"][1:]]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    path = ".".join([where, *loc])
    # a model validator's message starts with the field below the model it checks
    if error["type"] == "value_error" and ": " in message:
        field, message = message.split(": ", 1)
        path = f"{path}.{field}"
    return f"{path}: {message}"


@dataclass(frozen=True)
class OpaqueConfig:
    """One entry of status.allocation.devices.config for this driver, decoded."""

    index: int
    source: str  # FromClass | FromClaim
    requests: tuple[str, ...]  # empty: every request
    config: DeviceConfig

    def applies_to(self, request: str) -> bool:
        """`request` is a result's request (`gpu` or `gpu/sub0`); a config may name either."""
        return not self.requests or request in self.requests or \
            request.split("/", 1)[0] in self.requests


def parse_allocation_configs(entries: Any, driver: str) -> list[OpaqueConfig]:
    """This driver's configs of an allocation, class configs first, each decoded.

    Configs for other drivers are skipped unread; a malformed one of ours is an error.
    """
    where = "status.allocation.devices.config"
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: must be a list")
    configs: list[OpaqueConfig] = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: must be an object")
        opaque = entry.get("opaque")
        if not isinstance(opaque, dict) or opaque.get("driver") != driver:
            continue
        source = entry.get("source")
        if source not in ("FromClass", "FromClaim"):
            raise ConfigError(f"{at}.source: must be FromClass or FromClaim, not {source!r}")
        requests = entry.get("requests") or []
        if not (isinstance(requests, list) and all(isinstance(r, str) for r in requests)):
            raise ConfigError(f"{at}.requests: must be a list of request names")
        configs.append(OpaqueConfig(i, source, tuple(requests),
                                    parse_parameters(opaque.get("parameters"),
                                                     f"{at}.opaque.parameters")))
    return sorted(configs, key=lambda c: (c.source != "FromClass", c.index))


def config_for(configs: Sequence[OpaqueConfig], request: str) -> OpaqueConfig | None:
    """The config that wins for a result's request: the last that applies."""
    winner = None
    for config in configs:
        if config.applies_to(request):
            winner = config
    return winner
