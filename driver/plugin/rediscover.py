"""Re-discovery: the node's GPUs read again while the plugin runs, every `interval` seconds
and whenever asked (SIGHUP), so the slices follow a GPU that vanished or came back, a MIG
mode or static MIG layout an admin changed, or a driver upgrade, without a restart.

`changes` is the pure part: what differs between two inventories, in words for the log
(empty: nothing to do, and nothing is written). `Rediscoverer` is the trigger: one daemon
thread that runs a pass on the timer or on `trigger`; the pass itself (discover, compare,
swap what is published, re-publish) is the daemon's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace

from driver.inventory.model import Gpu, Inventory

log = logging.getLogger(__name__)


def _key(gpu: Gpu) -> str:
    """A GPU as the slices name it (its minor); one discovery could not read, by index."""
    return f"GPU {gpu.minor}" if gpu.minor >= 0 else f"unreadable GPU at index {gpu.index}"


def _mig_layout(gpu: Gpu) -> list[str]:
    return [f"{m.profile}@{m.placement.start}" for m in gpu.mig_devices]


def _gpu_changes(key: str, old: Gpu, new: Gpu) -> list[str]:
    """How one GPU (same minor) changed, most telling first."""
    if old.uuid != new.uuid:
        return [f"{key} replaced ({old.uuid or 'unreadable'} -> {new.uuid or 'unreadable'})"]
    found = []
    if old.health_error != new.health_error:
        found.append(f"{key} unreadable: {new.health_error}" if new.health_error
                     else f"{key} readable again")
    if (old.mig_enabled, old.mig_pending) != (new.mig_enabled, new.mig_pending):
        found.append(f"{key} MIG mode {_mig_mode(old)} -> {_mig_mode(new)}")
    elif _mig_layout(old) != _mig_layout(new):
        found.append(f"{key} MIG devices [{', '.join(_mig_layout(old))}] -> "
                     f"[{', '.join(_mig_layout(new))}]")
    if not found and old != new:
        found.append(f"{key} details changed")
    return found


def _mig_mode(gpu: Gpu) -> str:
    """MIG mode as nvidia-smi shows it: current, and pending where a reset would change it."""
    def word(on: bool) -> str:
        return "on" if on else "off"

    if gpu.mig_pending == gpu.mig_enabled:
        return word(gpu.mig_enabled)
    return f"{word(gpu.mig_enabled)} (pending {word(gpu.mig_pending)})"


def _published_part(inventory: Inventory) -> Inventory:
    """The inventory less what dynamic MIG changes itself per claim (MIG mode, the MIG
    devices) on GPUs it partitions: the slices offer their placements whatever is live."""
    return replace(inventory, gpus=tuple(
        replace(g, mig_enabled=False, mig_pending=False, mig_devices=()) if g.mig_profiles
        else g for g in inventory.gpus))


def changes(old: Inventory, new: Inventory, dynamic_mig: bool = False) -> list[str]:
    """What re-discovery found different, one phrase per change; empty when nothing did
    (an NVML index shifted by a vanished GPU is no change of its own: names use minors).
    In dynamic MIG mode the plugin's own MIG changes are none."""
    if dynamic_mig:
        old, new = _published_part(old), _published_part(new)
    if old == new:
        return []
    found = []
    if old.driver_version != new.driver_version:
        found.append(f"driver {old.driver_version} -> {new.driver_version}")
    if old.cuda_driver_version != new.cuda_driver_version:
        found.append(f"CUDA {old.cuda_driver_version} -> {new.cuda_driver_version}")
    before = {_key(g): g for g in old.gpus}
    after = {_key(g): g for g in new.gpus}
    for key in sorted(before.keys() - after.keys()):
        found.append(f"{key} gone ({before[key].uuid or 'unreadable'})")
    for key in sorted(after.keys() - before.keys()):
        found.append(f"{key} new ({after[key].uuid or 'unreadable'})")
    for key in sorted(before.keys() & after.keys()):
        found += _gpu_changes(key, before[key], replace(after[key], index=before[key].index))
    if not found:
        found.append("NVLink/PCIe topology changed")
    return found


def keep_unreadable(old: Inventory, new: Inventory) -> Inventory:
    """`new`, where a GPU that was readable (and so watched by the health monitor) and is
    enumerated but unreadable now (lost, needing a reset: NVML answers its queries with an
    error) is kept as it was: such a GPU is not gone, the monitor taints it and gives it
    back when it answers again. Matched by minor where NVML still gives it, else by NVML
    index, which only a GPU leaving the enumeration shifts; a GPU that left it is gone."""
    readable = [gpu for gpu in old.gpus if gpu.healthy and gpu.minor >= 0]
    by_minor = {gpu.minor: gpu for gpu in readable}
    by_index = {gpu.index: gpu for gpu in readable}
    present = {gpu.minor for gpu in new.gpus if gpu.healthy and gpu.minor >= 0}
    kept: dict[int, Gpu] = {}  # by NVML index now
    for gpu in new.gpus:
        was = None if gpu.healthy else \
            by_minor.get(gpu.minor) if gpu.minor >= 0 else by_index.get(gpu.index)
        if was is not None and was.minor not in present:
            kept[gpu.index] = replace(was, index=gpu.index)
    if not kept:
        return new
    # the kept GPUs' links, where both ends are still at their NVML index of before
    gpus = tuple(kept.get(gpu.index, gpu) for gpu in new.gpus)
    was_at = {gpu.index: gpu.minor for gpu in old.gpus}
    same = {gpu.index for gpu in gpus if gpu.minor >= 0 and was_at.get(gpu.index) == gpu.minor}
    links = {**new.links, **{pair: label for pair, label in old.links.items()
                             if kept.keys() & set(pair) and set(pair) <= same}}
    return replace(new, gpus=gpus, links=links)


class Rediscoverer:
    """Runs `rediscover` every `interval` seconds (0: only when triggered) and at once on
    `trigger`, in a daemon thread of its own; a pass that raises is logged and the next
    one runs as planned."""

    def __init__(self, rediscover: Callable[[], object], interval: float) -> None:
        self._rediscover = rediscover
        self._interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rediscover", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def trigger(self) -> None:
        """A pass now (SIGHUP); safe from a signal handler (it only sets an event)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval or None)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                self._rediscover()
            except Exception:  # a bug: the plugin keeps serving what it published
                log.exception("re-discovery failed")
