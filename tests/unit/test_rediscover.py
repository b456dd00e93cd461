"""Re-discovery's pure part: what differs between two inventories, in the words the log
gives; an unreadable (lost) GPU is kept, a GPU gone from the enumeration is not; the
trigger runs a pass on SIGHUP's event and on its timer; and the health monitor's GPUs
follow a re-discovery."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from driver.health.classify import HealthSettings
from driver.inventory.discovery import discover
from driver.inventory.model import Gpu, Inventory, MigDevice, Placement
from driver.nvml.events import Liveness
from driver.nvml.mock import mock_provider
from driver.plugin.metrics import Metrics
from driver.plugin.monitor import HealthMonitor
from driver.plugin.rediscover import Rediscoverer, changes, keep_unreadable
from tests.unit.test_plugin_monitor import FakeWatch, Reports, opener, sample


@pytest.fixture(scope="module")
def dgx() -> Inventory:
    return discover(mock_provider("dgx-h100"))


def without(inventory: Inventory, minor: int) -> Inventory:
    """The inventory NVML gives once GPU `minor` left the enumeration: later indexes shift."""
    gpus = [g for g in inventory.gpus if g.minor != minor]
    return replace(inventory, gpus=tuple(replace(g, index=i) for i, g in enumerate(gpus)),
                   links={})


def with_gpu(inventory: Inventory, minor: int, **changed: object) -> Inventory:
    return replace(inventory, gpus=tuple(replace(g, **changed) if g.minor == minor else g
                                         for g in inventory.gpus))


def unreadable(index: int) -> Gpu:
    return Gpu(index=index, minor=-1, uuid="", product_name="", brand="Unknown",
               architecture="Unknown", cuda_compute_capability="0.0", memory_bytes=0,
               pci_bus_id="", pcie_root=None, numa_node=None, mig_enabled=False,
               mig_pending=False, health_error="nvmlDeviceGetHandleByIndex: GPU is lost")


MIG = MigDevice(uuid="MIG-1", gi_id=1, ci_id=0, profile_id=19, profile="1g.10gb",
                placement=Placement(0, 1), ci_profile_id=0, gi_cap_minor=None,
                ci_cap_minor=None)


def test_the_same_inventory_is_no_change(dgx: Inventory) -> None:
    assert changes(dgx, replace(dgx)) == []


def test_a_gpu_that_left_and_came_back_is_named(dgx: Inventory) -> None:
    uuid = next(g.uuid for g in dgx.gpus if g.minor == 3)
    gone = without(dgx, 3)
    assert changes(dgx, gone) == [f"GPU 3 gone ({uuid})"]
    assert changes(gone, dgx) == [f"GPU 3 new ({uuid})"]


def test_a_replaced_gpu_mig_changes_and_a_driver_upgrade_are_named(dgx: Inventory) -> None:
    old_uuid = next(g.uuid for g in dgx.gpus if g.minor == 5)
    assert changes(dgx, with_gpu(dgx, 5, uuid="GPU-new")) == [
        f"GPU 5 replaced ({old_uuid} -> GPU-new)"]
    mig_on = with_gpu(dgx, 2, mig_enabled=True, mig_pending=True)
    assert changes(dgx, mig_on) == ["GPU 2 MIG mode off -> on"]
    assert changes(dgx, with_gpu(dgx, 2, mig_pending=True)) == [
        "GPU 2 MIG mode off -> off (pending on)"]
    assert changes(mig_on, with_gpu(mig_on, 2, mig_devices=(MIG,))) == [
        "GPU 2 MIG devices [] -> [1g.10gb@0]"]
    assert changes(dgx, replace(dgx, driver_version="999.1")) == [
        f"driver {dgx.driver_version} -> 999.1"]
    assert changes(dgx, with_gpu(dgx, 1, health_error="nvmlDeviceGetName: Unknown Error")) \
        == ["GPU 1 unreadable: nvmlDeviceGetName: Unknown Error"]


def test_dynamic_mig_changes_of_the_plugins_own_are_none(dgx: Inventory) -> None:
    """In dynamic MIG mode the plugin switches MIG mode and makes MIG devices per claim."""
    live = with_gpu(dgx, 2, mig_enabled=True, mig_pending=True, mig_devices=(MIG,))
    assert changes(dgx, live, dynamic_mig=True) == []
    assert changes(dgx, live) != []


def test_a_lost_gpu_is_kept_a_removed_one_is_not(dgx: Inventory) -> None:
    """NVML enumerates a lost GPU but cannot read it: it stays published (tainted by the
    monitor); a GPU NVML no longer enumerates is gone."""
    lost = replace(dgx, gpus=tuple(unreadable(g.index) if g.minor == 3 else g
                                   for g in dgx.gpus), links={
        pair: label for pair, label in dgx.links.items() if 3 not in pair})
    kept = keep_unreadable(dgx, lost)
    assert kept == dgx and changes(dgx, kept) == []
    failing = with_gpu(dgx, 3, uuid="", health_error="nvmlDeviceGetUUID: GPU is lost")
    assert keep_unreadable(dgx, failing) == dgx  # its minor still answered
    assert keep_unreadable(dgx, without(dgx, 3)) == without(dgx, 3)


def test_the_trigger_runs_a_pass_at_once_and_the_timer_runs_them_again() -> None:
    ran = threading.Semaphore(0)

    def rediscover() -> None:
        ran.release()
        raise RuntimeError("a bug: logged, and the next pass still runs")

    on_demand = Rediscoverer(rediscover, interval=0)  # no timer
    on_demand.start()
    try:
        assert not ran.acquire(timeout=0.2)
        on_demand.trigger()
        assert ran.acquire(timeout=5)
        on_demand.trigger()
        assert ran.acquire(timeout=5)
    finally:
        on_demand.stop()
    timed = Rediscoverer(rediscover, interval=0.01)
    timed.start()
    try:
        assert all(ran.acquire(timeout=5) for _ in range(3))
    finally:
        timed.stop()


def test_the_monitor_follows_the_gpus_a_rediscovery_found() -> None:
    """A GPU gone is forgotten (its health and its metric); one back starts healthy and is
    registered in a new watch."""
    watch, reports, metrics = FakeWatch(), Reports(), Metrics()
    registered: list[str] = []
    register = watch.register
    watch.register = lambda uuid: (registered.append(uuid), register(uuid))[1]  # type: ignore[method-assign]
    monitor = HealthMonitor(opener(watch), {0: "GPU-0", 3: "GPU-3"}, HealthSettings(),
                            metrics, reports, check_interval=0.05)
    monitor.start()
    try:
        watch.liveness_of["GPU-3"] = Liveness.GONE
        reports.wait_for(lambda v: v.gpus[3].status == "unhealthy")
        monitor.watch({0: "GPU-0"})
        assert set(monitor.view.gpus) == {0}
        assert sample(metrics, "gpu_dra_gpu_health", gpu="3", uuid="GPU-3") is None
        watch.liveness_of["GPU-3"] = Liveness.OK
        registered.clear()
        monitor.watch({0: "GPU-0", 3: "GPU-3"})
        assert monitor.view.gpus[3].status == "healthy"
        assert sample(metrics, "gpu_dra_gpu_health", gpu="3", uuid="GPU-3") == 1
        deadline = time.monotonic() + 5
        while "GPU-3" not in registered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "GPU-3" in registered
    finally:
        monitor.stop()
