"""The checkpoint's journal: a save writes the claims it changes, not every claim held.

The snapshot (`checkpoint.json`, in the format every release reads: `checkpoint`) is written
whole only now and then (a compaction, see `records`); `checkpoint.json.journal` beside it
holds the saves since: a header line naming the SHA-256 of the snapshot bytes it extends,
then one JSON line per save, `{"set": {uid: claim}, "delete": [uid, ...]}` (disjoint),
appended by one write() and flushed before the save returns (a PrepareStarted save is
flushed by the save that finishes its call, see `state`). The checkpoint is the
snapshot with the journal's saves applied in order, if the header names that snapshot. A
journal that names other bytes is stale and ignored: the snapshot was written since by
a release that knows no journal, by hand, or by a compaction cut off before it replaced
the journal, and each of those wrote every claim it knew into the snapshot. A last line
without its newline, or not JSON, was cut off before its flush returned, so its save was
never acknowledged: it is ignored, and cut away before the next append.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.atomicfile import write_all, write_atomically
from driver.safeload import LoadError, json_document

SUFFIX = ".journal"
VERSION = 1  # in the header, for people: lines only gain fields, as the snapshot's records do


def path_for(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + SUFFIX)


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _digest(snapshot: bytes) -> str:
    return hashlib.sha256(snapshot).hexdigest()


def header(snapshot: bytes) -> bytes:
    return _line({"journal": VERSION, "snapshotSHA256": _digest(snapshot)})


def entry(changed: Mapping[str, Any], deleted: Collection[str]) -> bytes:
    """One save: the claims set (as the snapshot encodes them) and the UIDs deleted."""
    return _line({"set": dict(changed), "delete": sorted(deleted)})


@dataclass(frozen=True)
class Save:
    changed: dict[str, Any]
    deleted: list[str]


@dataclass(frozen=True)
class Replay:
    """What a journal holds for a snapshot: its saves, the bytes they end at (None if the
    journal is stale: it extends other snapshot bytes), and the lines ignored (all of a
    stale journal's, or a cut-off last one)."""

    saves: list[Save]
    end: int | None
    ignored: int


def replay(data: bytes, snapshot: bytes, where: str) -> Replay:
    """The saves of journal `data` over `snapshot`; LoadError for a damaged line that is not
    the last (a kill cuts only the last; a power cut, which may tear two lines a prepare
    flushes at once, reboots the node, and the journal of another boot is not read)."""
    lines = data.split(b"\n")  # the last item is what follows the last newline
    try:
        head = json.loads(lines[0]) if len(lines) > 1 else None
    except ValueError:
        head = None
    if not isinstance(head, dict) or head.get("snapshotSHA256") != _digest(snapshot):
        return Replay([], None, sum(1 for line in lines[1:] if line))
    saves, end, whole = [], len(lines[0]) + 1, lines[1:-1]
    for number, line in enumerate(whole, start=2):
        try:
            saves.append(_save(json_document(line, where)))
        except LoadError as err:
            if number <= len(whole):
                raise LoadError(where, err.problem, f"line {number}") from None
            return Replay(saves, end, 1 + bool(lines[-1]))  # the last line: cut off
        end += len(line) + 1
    return Replay(saves, end, int(bool(lines[-1])))


def _save(value: Any) -> Save:
    changed = value.get("set", {}) if isinstance(value, dict) else None
    deleted = value.get("delete", []) if isinstance(value, dict) else None
    if not isinstance(changed, dict) or not isinstance(deleted, list) or \
            not all(isinstance(uid, str) for uid in deleted):
        raise LoadError("", 'not a save ({"set": {...}, "delete": [...]})')
    return Save(changed, deleted)


class Journal:
    """This process's appends to the journal; the caller holds the node lock, so nobody
    else writes it meanwhile."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Where this process's next save goes; None: unknown (never read or written, stale,
        # or a failed append left it uncertain), so the next save rewrites the snapshot.
        self.end: int | None = None

    def reset(self, snapshot: bytes) -> os.stat_result:
        """Replace the journal, atomically and durably, by a fresh one for `snapshot`."""
        self.end = None
        data = header(snapshot)
        write_atomically(self.path, data, durable=True)
        self.end = len(data)
        return os.stat(self.path)

    def append(self, line: bytes, durable: bool = True) -> os.stat_result:
        """Append one save, flushed (fdatasync: the data and the file's size) before this
        returns unless not `durable` (the next durable append flushes it with its own);
        OSError leaves the journal as it was, or `end` None if it cannot tell."""
        end = self.end
        assert end is not None, "reset the journal first"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            try:
                if os.fstat(fd).st_size > end:
                    os.ftruncate(fd, end)  # a line cut off by a kill: never acknowledged
                write_all(fd, line)
                if durable:
                    os.fdatasync(fd)
                written = os.fstat(fd)
            except OSError:
                self._cut(fd, end)
                raise
            self.end = end + len(line)
            return written
        finally:
            os.close(fd)

    def _cut(self, fd: int, end: int) -> None:
        """Back to `end` bytes after a failed append."""
        try:
            os.ftruncate(fd, end)
            os.fdatasync(fd)
        except OSError:
            self.end = None  # the save may be on disk: the next one rewrites the snapshot
