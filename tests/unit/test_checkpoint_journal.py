"""The checkpoint's journal (issue 12, defect 11): a save appends only the records it
changes; the checkpoint is the snapshot with its journal's saves applied; a cut-off last
line is ignored, and so is a journal over other snapshot bytes; the snapshot is written
whole when the journal outgrows it or the lock goes to another process, in the format a
release that reads no journal reads."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from driver.plugin import checkpoint, journal
from driver.plugin.checkpoint import (
    MAX_BYTES,
    Checkpoint,
    CheckpointError,
    ClaimRecord,
    PreparedDevice,
    State,
    from_json,
)
from driver.plugin.metrics import Metrics
from driver.plugin.node import Identity
from driver.plugin.records import COMPACT_AT, Records
from driver.safeload import json_document, read_text
from tests.support.plugin import DRIVER, NODE, new_uid

BOOT = "boot-1"


def record(uid: str, state: State = "PrepareCompleted") -> ClaimRecord:
    device = PreparedDevice(("gpu",), NODE, "gpu-0", (f"k8s.{DRIVER}/claim={uid}-gpu-0",),
                            "GPU-1", admin_access=True)
    return ClaimRecord(uid, "ns", f"claim-{uid[:8]}", state, (device,))


def records(path: Path, metrics: Metrics | None = None) -> Records:
    return Records(Identity(DRIVER, NODE, BOOT), path, [], metrics or Metrics())


def older_release_reads(path: Path) -> dict[str, ClaimRecord]:
    """checkpoint.json alone, as the release before the journal read it (its `load`)."""
    return from_json(json_document(read_text(path, MAX_BYTES), str(path)), str(path)).claims


def started(path: Path) -> Records:
    """Records that wrote an empty checkpoint, as a start does."""
    held = records(path)
    held.save_all({})
    return held


def with_claim(tmp_path: Path) -> tuple[Path, Records, str]:
    """A checkpoint started, then one claim saved: its path, the records, the claim's UID."""
    path = tmp_path / "checkpoint.json"
    held = started(path)
    uid = new_uid()
    held.save({uid: record(uid)})
    return path, held, uid


def on_disk(path: Path) -> dict[str, ClaimRecord]:
    loaded = checkpoint.load(path)
    assert loaded is not None
    return loaded.claims


def journal_lines(path: Path) -> list[bytes]:
    return journal.path_for(path).read_bytes().splitlines()


def test_a_save_appends_the_records_it_changes_and_the_snapshot_stays(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    metrics = Metrics()
    held = records(path, metrics)
    held.save_all({})
    snapshot = path.read_bytes()
    a, b = new_uid(), new_uid()
    held.save({a: record(a, "PrepareStarted")})
    held.save({a: record(a), b: record(b, "PrepareStarted")})
    held.save({b: None})
    assert path.read_bytes() == snapshot
    lines = journal_lines(path)
    assert len(lines) == 4  # the header, then one line per save
    assert json.loads(lines[2]) == {"set": {a: checkpoint.claim_to_json(record(a)), b: (
        checkpoint.claim_to_json(record(b, "PrepareStarted")))}, "delete": []}
    assert json.loads(lines[3]) == {"set": {}, "delete": [b]}
    loaded = checkpoint.load(path)
    assert loaded is not None and loaded.claims == {a: record(a)} == dict(held)
    assert metrics.registry.get_sample_value("gpu_dra_prepared_claims") == 1
    assert held.lagging and older_release_reads(path) == {}


def test_compact_writes_every_claim_into_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    held = started(path)
    claims = {uid: record(uid) for uid in (new_uid(), new_uid())}
    held.save(claims)
    held.compact()
    assert not held.lagging
    assert older_release_reads(path) == claims
    assert journal_lines(path) == [journal.header(path.read_bytes()).rstrip(b"\n")]


@pytest.mark.parametrize("tail", [b'{"set":{"', b"not json\n"], ids=["no-newline", "not-json"])
def test_a_cut_off_last_line_is_ignored_and_cut_away_by_the_next_save(
        tmp_path: Path, tail: bytes) -> None:
    path, _, a = with_claim(tmp_path)
    b = new_uid()
    with open(journal.path_for(path), "ab") as out:  # a kill in the middle of a save
        out.write(tail)
    found = checkpoint.read(path)
    assert found is not None and found.checkpoint.claims == {a: record(a)}
    assert found.replay.ignored == 1
    after = records(path)  # the next process to take the lock
    after.reload()
    after.save({b: record(b)})
    assert len(journal_lines(path)) == 3  # the header and the two saves
    found = checkpoint.read(path)
    assert found is not None and found.replay.ignored == 0
    assert found.checkpoint.claims == {a: record(a), b: record(b)}


def test_a_damaged_line_before_the_last_is_refused_naming_it(tmp_path: Path) -> None:
    path, held, _ = with_claim(tmp_path)
    b = new_uid()
    held.save({b: record(b)})
    lines = journal_lines(path)
    journal.path_for(path).write_bytes(b"\n".join([lines[0], b"{oops", lines[2], b""]))
    with pytest.raises(CheckpointError, match=r"checkpoint journal .*\.journal: line 2: not JSON"):
        checkpoint.load(path)


@pytest.mark.parametrize("rewrite", ["older release", "compaction cut off"])
def test_a_journal_over_another_snapshot_is_ignored(tmp_path: Path, rewrite: str) -> None:
    """The snapshot written since the journal began: by a release that reads no journal
    (it knew only claim A), or by a compaction killed before it replaced the journal (the
    snapshot holds B already). Either way the snapshot says it all."""
    path, held, a = with_claim(tmp_path)
    b, c = new_uid(), new_uid()
    held.save({b: record(b)})
    snapshot = {a: record(a, "UnprepareStarted")} if rewrite == "older release" else \
        {a: record(a), b: record(b)}
    checkpoint.save(path, Checkpoint(BOOT, snapshot))
    found = checkpoint.read(path)
    assert found is not None and found.checkpoint.claims == snapshot
    assert (found.replay.end, found.replay.ignored) == (None, 2)
    held.reload()  # this process takes the lock again: its next save starts a fresh journal
    held.save({c: record(c)})
    assert checkpoint.load(path) == Checkpoint(BOOT, {**snapshot, c: record(c)})
    assert json.loads(journal_lines(path)[0])["snapshotSHA256"] == \
        json.loads(journal.header(path.read_bytes()))["snapshotSHA256"]


def test_the_snapshot_is_written_whole_once_the_journal_outgrows_it(tmp_path: Path) -> None:
    """Past max(COMPACT_AT, the snapshot's size): so a save's share of the whole writes
    stays constant however many claims are held."""
    path = tmp_path / "checkpoint.json"
    held = started(path)
    saved: dict[str, ClaimRecord] = {}
    compactions = 0
    for _ in range(COMPACT_AT // 200):  # lines of about 400 bytes
        uid = new_uid()
        before = journal.path_for(path).stat().st_size
        held.save({uid: record(uid)})
        saved[uid] = record(uid)
        size, snapshot = journal.path_for(path).stat().st_size, path.stat().st_size
        assert size <= max(COMPACT_AT, snapshot)
        if size < before:
            compactions += 1
            assert older_release_reads(path) == saved  # today's reader: every claim
            assert not held.lagging
    assert 1 <= compactions <= 3  # the threshold grows with the snapshot
    assert checkpoint.load(path) == Checkpoint(BOOT, saved)


def test_a_failed_save_leaves_the_journal_and_the_records_as_they_were(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, held, a = with_claim(tmp_path)
    b = new_uid()
    before = journal.path_for(path).read_bytes()

    def fails(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patched:
        patched.setattr(os, "fdatasync", fails)
        with pytest.raises(OSError, match="Input/output error"):
            held.save({b: record(b)})
    assert journal.path_for(path).read_bytes() == before
    assert dict(held) == {a: record(a)} == on_disk(path)
    held.save({b: record(b)})
    assert on_disk(path) == {a: record(a), b: record(b)}


def test_the_checkpoint_is_read_again_only_when_a_file_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, writer, a = with_claim(tmp_path)
    b = new_uid()
    reader = records(path)
    reads: list[Path] = []
    read = checkpoint.read

    def counted(p: Path) -> checkpoint.Read | None:
        reads.append(p)
        return read(p)

    monkeypatch.setattr(checkpoint, "read", counted)
    reader.reload()
    reader.reload()  # nothing changed since
    assert dict(reader) == {a: record(a)} and len(reads) == 1
    writer.save({b: record(b)})  # the other process: an append
    reader.reload()
    assert dict(reader) == {a: record(a), b: record(b)} and len(reads) == 2
    writer.compact()  # and a compaction
    reader.reload()
    reader.reload()
    assert len(reads) == 3


def test_a_save_that_is_not_durable_is_read_at_once_and_flushed_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, held, a = with_claim(tmp_path)
    b = new_uid()
    flushed: list[int] = []
    monkeypatch.setattr(os, "fdatasync", flushed.append)
    held.save({b: record(b, "PrepareStarted")}, durable=False)
    assert flushed == []
    assert on_disk(path) == {a: record(a), b: record(b, "PrepareStarted")}
    held.save({b: record(b)})
    assert len(flushed) == 1
    assert on_disk(path) == {a: record(a), b: record(b)}


def test_after_a_reboot_a_torn_journal_does_not_stop_the_start(tmp_path: Path) -> None:
    """A prepare flushes its two lines at once, so a power cut may tear the first: the
    node rebooted, so every record is void and the journal is not read; on the same boot
    the damage is still refused."""
    path, held, _ = with_claim(tmp_path)
    b = new_uid()
    held.save({b: record(b, "PrepareStarted")}, durable=False)
    held.save({b: record(b)})
    lines = journal_lines(path)
    torn = b"\n".join([*lines[:-2], lines[-2][:40], lines[-1]]) + b"\n"
    journal.path_for(path).write_bytes(torn)
    with pytest.raises(CheckpointError, match="line"):
        records(path).load()
    rebooted = Records(Identity(DRIVER, NODE, "boot-2"), path, [], Metrics())
    assert rebooted.load() == {}
