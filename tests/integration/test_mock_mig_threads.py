"""The mock's persistent MIG state under the plugin's threads: changes to different GPUs
at once, while another thread reads, lose nothing and leave no handle stale (a reader
once rebuilt the layouts under a change in flight)."""

from __future__ import annotations

import threading
from pathlib import Path

from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.plugin.mig import MigManager
from tests.support.plugin import live_mig

ROUNDS = 40


def test_concurrent_changes_on_different_gpus_with_a_reader(tmp_path: Path) -> None:
    state = tmp_path / "mig-state.json"
    provider = mock_provider("dgx-h100", state)
    inventory = discover(provider)
    provider.nvml.nvmlInit()
    mig = MigManager(provider)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(index: int) -> None:
        gpu = inventory.gpus[index]
        profile = next(p for p in gpu.mig_profiles if p.name == "1g.10gb")
        try:
            for _ in range(ROUNDS):
                for placement in profile.placements[:3]:
                    mig.create(gpu, profile, placement)
                for placement in profile.placements[:3]:
                    mig.destroy(gpu.uuid, profile.id, placement.start)
        except BaseException as err:  # reported below, with the thread's GPU
            errors.append(err)

    def reader() -> None:
        handle = provider.nvml.nvmlDeviceGetHandleByIndex(7)
        while not stop.is_set():
            provider.nvml.nvmlDeviceGetMigMode(handle)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert live_mig(state) == {}
