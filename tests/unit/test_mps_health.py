"""A claim's down MPS daemon on the KEP-4680 health stream: its devices' health and
message (`HealthStreamServicer._health`), the rule for a device several claims share
(`mps_problems`), and the board waking the streams when the problems change."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from driver._proto.drahealth_v1 import api_pb2 as health_v1
from driver.health.model import Condition, GpuHealth
from driver.inventory.model import Gpu
from driver.plugin.devices import Target
from driver.plugin.monitor import HealthView
from driver.plugin.servers import HealthBoard, HealthStreamServicer, StreamSlots
from driver.plugin.state import MpsProblem, mps_problems

GPU = Gpu(index=0, minor=0, uuid="GPU-0", product_name="NVIDIA H100", brand="Nvidia",
          architecture="Hopper", cuda_compute_capability="9.0", memory_bytes=80 * 2**30,
          pci_bus_id="00000000:18:00.0", pcie_root="pci0000:15", numa_node=0,
          mig_enabled=False, mig_pending=False)
TARGET = Target(name="gpu-0", gpu=GPU)
DOWN = MpsProblem("MPS daemon of claim ns/a (uid-a) is down: gone; starting it again",
                  unhealthy=True)
NOW = datetime.now(UTC)


def servicer(board: HealthBoard | None = None) -> HealthStreamServicer:
    return HealthStreamServicer("node", lambda: {"gpu-0": TARGET}, health_v1, StreamSlots(4),
                                board or HealthBoard())


def view(*conditions: Condition) -> HealthView:
    return HealthView({0: GpuHealth(0, conditions)}, {0: "xid 79"}, {0: "GPU-0"})


def test_a_down_daemon_makes_a_healthy_device_unhealthy_with_its_message() -> None:
    assert servicer()._health(TARGET, view(), None) == (health_v1.HEALTHY, "xid 79")
    assert servicer()._health(TARGET, view(), DOWN) == (health_v1.UNHEALTHY, DOWN.message)


def test_a_shared_device_with_working_daemons_stays_healthy_and_names_the_down_one() -> None:
    shared = MpsProblem(DOWN.message, unhealthy=False)
    assert servicer()._health(TARGET, view(), shared) == (health_v1.HEALTHY, DOWN.message)


def test_an_unhealthy_gpu_keeps_its_verdict_and_message_first() -> None:
    lost = Condition("gpu-lost", "NoExecute", NOW, NOW)
    health, message = servicer()._health(TARGET, view(lost), DOWN)
    assert health == health_v1.UNHEALTHY
    assert message.startswith("gpu-lost") and message.endswith(f"; {DOWN.message}")


def test_a_device_is_unhealthy_only_when_no_claim_on_it_has_a_working_daemon() -> None:
    down = {"gpu-0": [("a", "a is down")], "gpu-1": [("a", "a is down"), ("b", "b is down")]}
    users = {"gpu-0": {"a", "b"}, "gpu-1": {"a", "b"}}
    assert mps_problems(down, users) == {
        "gpu-0": MpsProblem("a is down", unhealthy=False),
        "gpu-1": MpsProblem("a is down; b is down", unhealthy=True)}
    assert mps_problems({"gpu-0": [("a", "a is down")]}, {"gpu-0": {"a"}}) == {
        "gpu-0": MpsProblem("a is down", unhealthy=True)}


def test_the_board_wakes_the_streams_when_the_problems_change_only() -> None:
    board, wake = HealthBoard(), threading.Event()
    board.listen(wake)
    board.set_mps_problems({"gpu-0": DOWN})
    assert wake.is_set() and board.mps_problems == {"gpu-0": DOWN}
    wake.clear()
    board.set_mps_problems({"gpu-0": DOWN})
    assert not wake.is_set()
    report = servicer(board)._report(board.view, board.mps_problems)
    assert [(d.device.device_name, d.health, d.message) for d in report.devices] == [
        ("gpu-0", health_v1.UNHEALTHY, DOWN.message)]
    board.set_mps_problems({})
    assert wake.is_set() and board.mps_problems == {}
