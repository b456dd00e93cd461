"""Local mode: the pool as files in a directory, written atomically, only what changed."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from driver.atomicfile import remove_leftovers, write_atomically
from driver.health.model import GpuHealth
from driver.inventory.model import Inventory
from driver.resourceslice.build import SliceOptions, slice_name
from driver.resourceslice.plan import PublishResult, desired, plan, result_of

# The publishers' logger from before they had modules of their own: log lines name it.
log = logging.getLogger("driver.resourceslice.publish")


class DirPublisher:
    """Local mode: ``<root>/resourceslices/<name>.yaml``, one file per slice, each written
    atomically (temp file in the same folder, fsync, rename). Files of other drivers or
    nodes in the folder are left alone; names starting with ``.`` are never slices.

    Slices are written as JSON, which is YAML too: json's C codec reads and writes a
    dynamic-MIG pool in a few milliseconds where PyYAML's (Python) representer and
    constructor take about 0.1 s each, on the plugin's start path. A file that is not
    JSON (written by hand, by another tool or an older release) is read as YAML."""

    def __init__(self, root: Path, options: SliceOptions,
                 on_writes: Callable[[int], None] | None = None) -> None:
        self.directory = Path(root) / "resourceslices"
        self.options = options
        self.on_writes = on_writes  # told how many files each publish wrote (metrics)

    def _existing(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for path in sorted(self.directory.glob("[!.]*.yaml")):
            try:
                obj = _load(path.read_text())
                ours = (obj["metadata"]["name"] == path.stem
                        and obj["spec"]["driver"] == self.options.driver
                        and obj["spec"].get("nodeName") == self.options.node)
            except (yaml.YAMLError, TypeError, KeyError) as err:
                log.warning("%s: not a ResourceSlice, left alone (%s)", path, err)
                continue
            if ours:
                found.append(obj)
        return found

    def publish(self, inventory: Inventory, timeout: float | None = None,
                health: Mapping[int, GpuHealth] | None = None) -> PublishResult:
        """Local files never make us wait: ``timeout`` is accepted for the protocol only."""
        slices = desired(inventory, self.options, health)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Temp files a writer killed mid-write left; our slice names share this prefix.
        remove_leftovers(self.directory, slice_name(self.options, 0)[:-1])
        todo = plan(self._existing(), slices)
        for obj in todo.delete:
            (self.directory / f"{obj['metadata']['name']}.yaml").unlink(missing_ok=True)
        for obj in (*todo.update, *todo.create):
            obj["metadata"].pop("resourceVersion", None)
            write_atomically(self.directory / f"{obj['metadata']['name']}.yaml",
                             json.dumps(obj, indent=2).encode(), durable=True)
        if todo.writes and self.on_writes is not None:
            self.on_writes(todo.writes)
        return result_of(todo)

    def cleanup(self) -> int:
        """Delete this node's slices of this driver; returns how many."""
        existing = self._existing() if self.directory.is_dir() else []
        for obj in existing:
            (self.directory / f"{obj['metadata']['name']}.yaml").unlink(missing_ok=True)
        return len(existing)


def _load(text: str) -> Any:
    """A slice file's object: JSON as written here, else YAML."""
    try:
        return json.loads(text)
    except ValueError:
        return yaml.load(text, Loader=yaml.CSafeLoader)
