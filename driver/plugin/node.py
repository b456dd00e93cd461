"""The node a plugin serves, as `PluginState` and its records and effects see it: who the
plugin is there, where its files go, what it publishes, and the tools that act on the
host's devices. Each is a small frozen value, built once at start by the daemon."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driver.inventory.model import Gpu, Inventory
from driver.nvml import HostView
from driver.plugin.cdi import DriverFiles
from driver.plugin.devices import Target
from driver.plugin.driverfiles import HostDevices
from driver.plugin.mig import MigManager
from driver.plugin.mps import MpsDaemons
from driver.plugin.sharing import Timeslicer


@dataclass(frozen=True)
class Identity:
    """Who the plugin is: its driver name, its node (whose ResourceSlice pool has the
    node's name), and the boot it runs in (a checkpoint of another boot is void)."""

    driver: str
    node: str
    boot_id: str


@dataclass(frozen=True)
class Paths:
    """Where the plugin's files go."""

    checkpoint: Path  # the claims prepared, and half-done, on this node
    cdi_root: Path  # the claims' CDI specs
    node_lock: Path  # held by every call with work to do, across processes


@dataclass(frozen=True)
class Published:
    """What the node offers: the devices discovered, by the names the slices give them,
    the slices themselves (the devices and the counters they consume; the counter layout
    does not change them), whether MIG devices are created on demand, and the devices of
    the GPUs left alone (`--exclude-gpus`), so a stale allocation of one is named as such."""

    inventory: Inventory
    index: dict[str, Target]
    slices: Sequence[Mapping[str, Any]]
    dynamic_mig: bool
    excluded: Mapping[str, Gpu] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceTools:
    """What acts on the host's devices for a claim, and describes them to the runtime."""

    files: DriverFiles  # what every CDI spec carries: the driver's libraries and binaries
    devices: HostDevices  # the /dev nodes of GPUs and MIG devices
    host: HostView  # the MIG capability minors
    mig: MigManager  # creates and destroys MIG devices
    timeslicer: Timeslicer  # sets a GPU's time slice
    mps: MpsDaemons  # the claims' MPS daemons
