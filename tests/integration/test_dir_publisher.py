"""Local mode: ResourceSlices as YAML files (JSON, which YAML readers read as it is), written
atomically and only when changed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import MigMode, SliceOptions, build_slices
from driver.resourceslice.dirpublisher import DirPublisher
from driver.resourceslice.errors import PublishError
from driver.resourceslice.plan import content

DRIVER = "gpu.dra.dev"
NODE = "node-a"


def options(mig_mode: MigMode = "static") -> SliceOptions:
    return SliceOptions(driver=DRIVER, node=NODE, mig_mode=mig_mode)


def inventory(profile: str = "dgx-h100", state: Path | None = None) -> Inventory:
    return discover(mock_provider(profile, state))


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file in the slice folder, dotfiles too: name -> (inode, mtime_ns)."""
    folder = root / "resourceslices"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def load(root: Path, name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((root / "resourceslices" / f"{name}.yaml").read_text()))


def test_first_publish_writes_one_file_per_slice(tmp_path: Path) -> None:
    inv = inventory()
    result = DirPublisher(tmp_path, options("dynamic")).publish(inv)
    built = build_slices(inv, options("dynamic"), generation=1)
    assert len(built) > 1
    assert list(result.created) == [s["metadata"]["name"] for s in built]
    assert result.generation == 1 and result.updated == () and result.deleted == ()
    assert sorted(files(tmp_path)) == sorted(f"{n}.yaml" for n in result.created)
    assert [load(tmp_path, s["metadata"]["name"]) for s in built] == built


def test_a_restart_with_the_same_inventory_touches_no_file(tmp_path: Path) -> None:
    DirPublisher(tmp_path, options("dynamic")).publish(inventory())
    before = files(tmp_path)
    result = DirPublisher(tmp_path, options("dynamic")).publish(inventory())
    assert result.writes == 0 and result.generation == 1
    assert files(tmp_path) == before


def test_the_files_are_json_and_a_pool_written_as_yaml_before_is_found_unchanged(
        tmp_path: Path) -> None:
    built = DirPublisher(tmp_path, options("dynamic")).publish(inventory()).created
    paths = [tmp_path / "resourceslices" / f"{name}.yaml" for name in built]
    assert [json.loads(p.read_text()) for p in paths] == [load(tmp_path, n) for n in built]
    for path in paths:  # as an older release wrote them
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=False))
    before = files(tmp_path)
    result = DirPublisher(tmp_path, options("dynamic")).publish(inventory())
    assert result.writes == 0 and result.generation == 1
    assert files(tmp_path) == before


def test_a_mig_change_rewrites_the_pool_in_the_next_generation(tmp_path: Path) -> None:
    state = tmp_path / "mig-state.json"
    provider = mock_provider("a100-mig", state)
    publisher = DirPublisher(tmp_path / "out", options())
    first = publisher.publish(discover(provider))
    nvml = provider.nvml
    nvml.nvmlInit()
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    gi = nvml.nvmlDeviceGetGpuInstanceById(gpu, 10)  # the 1g.5gb at slice 3
    nvml.nvmlComputeInstanceDestroy(nvml.nvmlGpuInstanceGetComputeInstanceById(gi, 0))
    nvml.nvmlGpuInstanceDestroy(gi)
    changed = publisher.publish(discover(provider))
    assert changed.updated == first.created and changed.created == changed.deleted == ()
    assert changed.generation == 2
    names = [d["name"] for d in load(tmp_path / "out", first.created[0])["spec"]["devices"]]
    assert "gpu-0-mig-1g5gb-3" not in names and "gpu-0-mig-1g5gb-2" in names


def test_a_smaller_pool_removes_the_obsolete_files(tmp_path: Path) -> None:
    inv = inventory()
    DirPublisher(tmp_path, options("dynamic")).publish(inv)
    result = DirPublisher(tmp_path, options("static")).publish(inv)
    assert len(result.updated) == 1 and len(result.deleted) >= 1
    assert sorted(files(tmp_path)) == [f"{result.updated[0]}.yaml"]
    assert load(tmp_path, result.updated[0])["spec"]["pool"] == {
        "name": NODE, "generation": 2, "resourceSliceCount": 1}


def test_an_edited_file_is_restored_and_others_files_are_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "resourceslices"
    folder.mkdir()
    other = build_slices(inventory("l4-8x"), SliceOptions(DRIVER, "node-b"), generation=4)[0]
    (folder / f"{other['metadata']['name']}.yaml").write_text(yaml.safe_dump(other))
    (folder / "notes.yaml").write_text(": not a slice [")
    publisher = DirPublisher(tmp_path, options())
    name = publisher.publish(inventory()).created[0]
    good = load(tmp_path, name)
    edited = dict(good, spec=dict(good["spec"], devices=good["spec"]["devices"][:1]))
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(edited))

    result = publisher.publish(inventory())
    assert result.updated == (name,) and result.generation == 2
    assert content(load(tmp_path, name)) == content(good)
    assert yaml.safe_load((folder / f"{other['metadata']['name']}.yaml").read_text()) == other
    assert (folder / "notes.yaml").read_text() == ": not a slice ["
    assert publisher.cleanup() == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{other['metadata']['name']}.yaml", "notes.yaml"])


def test_a_crash_mid_publish_leaves_whole_files_and_the_next_publish_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inv = inventory()
    publisher = DirPublisher(tmp_path, options("dynamic"))
    first = publisher.publish(inv)
    real_replace = os.replace
    calls: list[str] = []

    def crash_on_second(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(OSError, match="No space left"):
        publisher.publish(inventory("dgx-a100"))
    monkeypatch.undo()
    assert sorted(files(tmp_path)) == sorted(f"{n}.yaml" for n in first.created), \
        "no temp file left behind"
    generations = [load(tmp_path, n)["spec"]["pool"]["generation"] for n in first.created]
    assert sorted(generations) == [1] * (len(generations) - 1) + [2], \
        "one file rewritten whole, the others untouched"

    finished = publisher.publish(inventory("dgx-a100"))
    assert finished.generation == 3
    assert {load(tmp_path, n)["spec"]["pool"]["generation"]
            for n in first.created} == {3}


def test_temp_files_of_a_killed_writer_are_swept(tmp_path: Path) -> None:
    publisher = DirPublisher(tmp_path, options())
    name = publisher.publish(inventory()).created[0]
    leftover = tmp_path / "resourceslices" / f".{name}.yaml.k9x2.tmp"
    leftover.write_text("apiVersion: resource.k8s.io/v1\nkind: Resou")
    assert publisher.publish(inventory()).writes == 0
    assert not leftover.exists()


def test_a_pool_that_breaks_the_api_rules_is_not_written(tmp_path: Path) -> None:
    bad = DirPublisher(tmp_path, SliceOptions(driver=DRIVER, node="Node_A"))
    with pytest.raises(PublishError, match=r"metadata\.name"):
        bad.publish(inventory())
    assert not (tmp_path / "resourceslices").exists()
