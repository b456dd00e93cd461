"""GPU health through NVML's eyes: the mock's injected faults (one-shot events, lasting
conditions) as `driver.nvml.events` reads them, the same reader against a stand-in for the
real pynvml, and the state file that carries the faults between processes."""

from __future__ import annotations

import ctypes
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from driver.nvml.events import (
    EventKind,
    EventsLost,
    GpuLiveness,
    HealthWatch,
    Liveness,
    NvmlEvent,
    RecoveryAction,
)
from driver.nvml.faults import EVENTS_KEPT, Fault, apply_fault, xid_recovery_action
from driver.nvml.mock import MockNvml, inject, load_profile
from driver.nvml.profile import GpuCondition, HealthState, ProfileError

GPU3 = "GPU-68a37c14-cba3-5893-8527-70e1ada18b19"  # dgx-h100, minor 3


def dgx(state: Path | None = None, profile: str | Path = "dgx-h100") -> MockNvml:
    return MockNvml(load_profile(str(profile)), state)


@pytest.fixture
def watch() -> Iterator[tuple[MockNvml, HealthWatch]]:
    nvml = dgx()
    with HealthWatch(nvml) as opened:
        yield nvml, opened


def xid(n: int) -> Fault:
    return Fault("xid", n)


# --------------------------------------------------------------------------- what faults mean


@pytest.mark.parametrize(("number", "action"), [
    (13, RecoveryAction.NONE), (31, RecoveryAction.NONE), (43, RecoveryAction.NONE),
    (45, RecoveryAction.NONE), (68, RecoveryAction.NONE), (109, RecoveryAction.NONE),
    (79, RecoveryAction.NODE_REBOOT), (94, RecoveryAction.GPU_RESET),
    (48, RecoveryAction.GPU_RESET), (74, RecoveryAction.GPU_RESET),
    (95, RecoveryAction.GPU_RESET), (119, RecoveryAction.GPU_RESET)])
def test_an_xid_sets_the_recovery_action_of_nvidias_catalog(number: int,
                                                             action: RecoveryAction) -> None:
    assert xid_recovery_action(number) == action


def test_every_recovery_action_says_what_it_needs() -> None:
    assert {action.need for action in RecoveryAction} == {"none", "reset", "reboot", "drain"}
    assert (RecoveryAction.NODE_REBOOT.need, RecoveryAction.DRAIN_AND_RESET.need,
            RecoveryAction.RECOVER_IMEX_DOMAIN.need) == ("reboot", "drain", "none")


def test_the_most_severe_action_stays_until_a_reset() -> None:
    health = HealthState()
    for fault in (xid(79), xid(13), Fault("ecc-dbe")):
        health = apply_fault(health, GPU3, fault)
    assert health.gpus[GPU3].recoveryAction == RecoveryAction.NODE_REBOOT
    assert [(e.seq, e.kind, e.xid) for e in health.events] == [
        (1, "xid", 79), (2, "xid", 13), (3, "ecc-dbe", None)]
    healed = apply_fault(health, GPU3, Fault("recover"))
    assert GPU3 not in healed.gpus and healed.events == health.events


def test_remove_and_add_replace_every_condition() -> None:
    health = apply_fault(apply_fault(HealthState(), GPU3, Fault("lost")), GPU3, Fault("remove"))
    assert health.gpus[GPU3] == GpuCondition(removed=True)
    assert apply_fault(health, GPU3, Fault("recover")).gpus[GPU3] == GpuCondition(removed=True)
    assert GPU3 not in apply_fault(health, GPU3, Fault("add")).gpus


def test_the_event_log_keeps_the_latest() -> None:
    health = HealthState()
    for n in range(EVENTS_KEPT + 5):
        health = apply_fault(health, GPU3, xid(100 + n))
    assert health.seq == EVENTS_KEPT + 5 and len(health.events) == EVENTS_KEPT
    assert health.events[-1].xid == 100 + EVENTS_KEPT + 4


# --------------------------------------------------------------------------- events


def test_an_xid_is_delivered_once_to_each_set_registered_then(
        watch: tuple[MockNvml, HealthWatch]) -> None:
    nvml, first = watch
    registration = first.register(GPU3)
    assert registration.monitored and registration.minor == 3
    assert registration.kinds == set(EventKind)
    with HealthWatch(nvml) as second, HealthWatch(nvml) as unregistered:
        second.register(GPU3)
        nvml.inject(3, xid(79))
        with HealthWatch(nvml) as late:
            late.register(GPU3)
            expected = [NvmlEvent(minor=3, uuid=GPU3, kind=EventKind.XID, xid=79)]
            assert first.wait(1) == expected
            assert second.wait(1) == expected
            assert first.wait(0) == [] and second.wait(0) == []
            assert late.wait(0) == [], "registered after the XID came"
            assert unregistered.wait(0) == []


def test_events_of_other_gpus_and_types_not_registered_pass_by(
        watch: tuple[MockNvml, HealthWatch]) -> None:
    nvml, opened = watch
    opened.register(GPU3)
    nvml.inject(2, xid(79))
    nvml.inject(3, Fault("ecc-dbe"))
    nvml.inject(3, xid(13))
    assert opened.wait(1) == [NvmlEvent(3, GPU3, EventKind.DOUBLE_BIT_ECC),
                              NvmlEvent(3, GPU3, EventKind.XID, xid=13)], "a burst in one wait"


def test_a_wait_times_out_with_nothing(watch: tuple[MockNvml, HealthWatch]) -> None:
    _, opened = watch
    opened.register(GPU3)
    begin = time.monotonic()
    assert opened.wait(0.2) == []
    assert time.monotonic() - begin >= 0.2


def test_a_waiting_thread_gets_an_event_injected_meanwhile(
        watch: tuple[MockNvml, HealthWatch]) -> None:
    nvml, opened = watch
    opened.register(GPU3)
    threading.Timer(0.1, nvml.inject, (3, xid(48))).start()
    assert opened.wait(5) == [NvmlEvent(3, GPU3, EventKind.XID, xid=48)]


def test_a_gpu_without_event_support_is_unmonitored(edited_profile: Callable[..., Path]) -> None:
    path = edited_profile("dgx-h100", lambda d: d["gpus"][3].update(
        faults={"nvmlDeviceGetSupportedEventTypes": "NOT_SUPPORTED"}))
    with HealthWatch(dgx(profile=path)) as opened:
        registration = opened.register(GPU3)
        assert not registration.monitored and registration.kinds == frozenset()
        assert registration.reason == "events not supported: Not Supported"
        assert opened.register("GPU-00000000-0000-0000-0000-000000000000").reason == \
            "cannot open the GPU: Not Found"


def test_events_register_on_whole_gpus_only() -> None:
    nvml = dgx(profile="a100-mig")
    nvml.nvmlInit()
    event_set = nvml.nvmlEventSetCreate()
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceRegisterEvents(mig, pynvml.nvmlEventTypeXidCriticalError, event_set)
    nvml.nvmlEventSetFree(event_set)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlEventSetWait_v2(event_set, 0)


# --------------------------------------------------------------------------- conditions


def test_a_lost_gpu_fails_the_wait_once_and_every_query_until_recovered(
        watch: tuple[MockNvml, HealthWatch]) -> None:
    nvml, opened = watch
    opened.register(GPU3)
    nvml.inject(3, Fault("lost"))
    with pytest.raises(EventsLost):
        opened.wait(1)
    assert opened.wait(0) == []
    assert opened.liveness(GPU3) == GpuLiveness(GPU3, Liveness.LOST, detail="GPU is lost")
    assert opened.recovery_action(GPU3) is None
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetHandleByIndex(3)
    assert nvml.nvmlDeviceGetCount() == 8, "a lost GPU is still counted"
    nvml.inject(3, Fault("recover"))
    assert opened.liveness(GPU3) == GpuLiveness(GPU3, Liveness.OK)
    assert opened.recovery_action(GPU3) == RecoveryAction.NONE


def test_a_removed_gpu_is_gone_until_added(watch: tuple[MockNvml, HealthWatch]) -> None:
    nvml, opened = watch
    before = nvml.nvmlDeviceGetHandleByIndex(3)
    nvml.inject(3, Fault("remove"))
    assert nvml.nvmlDeviceGetCount() == 7
    assert [nvml.nvmlDeviceGetMinorNumber(nvml.nvmlDeviceGetHandleByIndex(i))
            for i in range(7)] == [0, 1, 2, 4, 5, 6, 7]
    assert opened.liveness(GPU3).state is Liveness.GONE
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetName(before)
    nvml.inject(3, Fault("add"))
    assert nvml.nvmlDeviceGetCount() == 8 and opened.liveness(GPU3).state is Liveness.OK
    assert nvml.nvmlDeviceGetIndex(before) == 3


@pytest.mark.parametrize(("fault", "liveness", "action"), [
    (xid(119), GpuLiveness(GPU3, Liveness.RESET_REQUIRED, detail="GPU requires restart"), None),
    (xid(64), GpuLiveness(GPU3, Liveness.ROW_REMAP_FAILED, detail="row remapping failed"),
     RecoveryAction.GPU_RESET),
    (Fault("ecc-dbe"), GpuLiveness(GPU3, Liveness.OK, remap_pending=True),
     RecoveryAction.GPU_RESET),
    (xid(79), GpuLiveness(GPU3, Liveness.OK), RecoveryAction.NODE_REBOOT),
    (xid(13), GpuLiveness(GPU3, Liveness.OK), RecoveryAction.NONE),
])
def test_conditions_until_a_reset(watch: tuple[MockNvml, HealthWatch], fault: Fault,
                                  liveness: GpuLiveness, action: RecoveryAction | None) -> None:
    nvml, opened = watch
    nvml.inject(3, fault)
    assert (opened.liveness(GPU3), opened.recovery_action(GPU3)) == (liveness, action)
    assert opened.liveness("GPU-6493d427-501d-5931-bd3f-97d1981f0fc8").state is Liveness.OK
    nvml.inject(3, Fault("recover"))
    assert (opened.liveness(GPU3), opened.recovery_action(GPU3)) == \
        (GpuLiveness(GPU3, Liveness.OK), RecoveryAction.NONE)


# --------------------------------------------------------------------------- the state file


def test_faults_reach_a_mock_of_another_process_through_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    running = dgx(state)  # the plugin's mock: it records the machine at start
    with HealthWatch(running) as opened:
        opened.register(GPU3)
        assert inject(state, 3, xid(79)) == GPU3  # what `gpu-dra mock inject` does
        assert inject(state, 3, Fault("lost")) == GPU3
        assert opened.wait(1) == [NvmlEvent(3, GPU3, EventKind.XID, xid=79)]
        with pytest.raises(EventsLost):
            opened.wait(1)
        assert dgx(state).nvmlInit() is None, "a restarted plugin reads the faults back"
        assert opened.liveness(GPU3).state is Liveness.LOST


def test_a_version_1_file_is_read_and_gains_the_machine(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    a100 = "GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271"
    state.write_text(json.dumps({"version": 1, "gpus": {a100: [{"profileId": 9, "start": 4}]},
                                 "migEnabled": {a100: True}}))
    with pytest.raises(ProfileError, match="machine: not recorded"):
        inject(state, 0, xid(79))
    nvml = dgx(state, "a100-mig")
    saved = json.loads(state.read_text())
    assert saved["version"] == 2 and saved["machine"][a100] == 0
    assert saved["gpus"][a100] == [{"profileId": 9, "start": 4, "computeInstances": []}]
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetMigMode(nvml.nvmlDeviceGetHandleByIndex(0)) == [1, 1]
    assert inject(state, 0, xid(79)) == a100


def test_mig_changes_keep_the_faults(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    nvml = dgx(state, "h100-80gb-hbm3")
    nvml.nvmlInit()
    inject(state, 0, xid(48))
    nvml.nvmlDeviceSetMigMode(nvml.nvmlDeviceGetHandleByIndex(0), pynvml.NVML_DEVICE_MIG_ENABLE)
    saved = json.loads(state.read_text())
    assert [e["xid"] for e in saved["health"]["events"]] == [48]
    assert saved["migEnabled"] == {nvml.profile.gpus[0].uuid: True}


@pytest.mark.parametrize(("content", "problem"), [
    (None, "no such mock state file"),
    ("{", "line 1: not JSON"),
    ('{"version": 2, "gpus": {}, "machine": {"GPU-x": "zero"}}', "machine.GPU-x"),
    ('{"version": 2, "gpus": {}, "machine": {"GPU-x": 0}}',
     "machine: no GPU with minor 3 (minors: 0)"),
])
def test_a_bad_file_or_gpu_is_refused_naming_it(tmp_path: Path, content: str | None,
                                                problem: str) -> None:
    state = tmp_path / "state.json"
    if content is not None:
        state.write_text(content)
    with pytest.raises(ProfileError) as err:
        inject(state, 3, Fault("lost"))
    assert str(err.value).startswith(f"{state}: ") and problem in str(err.value)
    assert state.read_text() == content if content is not None else not state.exists()


# --------------------------------------------------------------------------- the real library


class FakePynvml:
    """The pynvml functions HealthWatch calls, as the real library answers them, with a record
    of each call: one GPU, events queued by the test, an XID-capable mask."""

    def __init__(self, supported: int = 0xFF9F) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.supported = supported
        self.queue: list[pynvml.c_nvmlEventData_t | int] = []
        self.device = ctypes.cast(ctypes.c_void_p(0x1000), pynvml.c_nvmlDevice_t)
        self.event_set = ctypes.cast(ctypes.c_void_p(0x2000), pynvml.c_nvmlEventSet_t)
        self.field = pynvml.NVML_SUCCESS

    def __getattr__(self, name: str) -> Any:
        answers: dict[str, Callable[..., Any]] = {
            "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
            "nvmlEventSetCreate": lambda: self.event_set, "nvmlEventSetFree": lambda s: None,
            "nvmlDeviceGetHandleByUUID": lambda uuid: self.device,
            "nvmlDeviceGetMinorNumber": lambda h: 4,
            "nvmlDeviceGetSupportedEventTypes": lambda h: self.supported,
            "nvmlDeviceRegisterEvents": lambda h, mask, s: None,
            "nvmlEventSetWait_v2": self._wait,
            "nvmlDeviceGetRemappedRows": lambda h: (0, 0, 0, 0),
            "nvmlDeviceGetFieldValues": self._fields}
        answer = answers[name]

        def call(*args: Any) -> Any:
            self.calls.append((name, *args))
            return answer(*args)
        return call

    def _wait(self, event_set: Any, timeout_ms: int) -> Any:
        if not self.queue:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        item = self.queue.pop(0)
        if isinstance(item, int):
            raise pynvml.NVMLError(item)
        return item

    def _fields(self, handle: Any, ids: list[int]) -> Any:
        values = (pynvml.c_nvmlFieldValue_t * len(ids))()
        values[0].fieldId, values[0].nvmlReturn = ids[0], self.field
        values[0].value.uiVal = pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET
        return values

    def event(self, kind: int, data: int = 0, gi: int = 0xFFFFFFFF,
              ci: int = 0xFFFFFFFF) -> pynvml.c_nvmlEventData_t:
        return pynvml.c_nvmlEventData_t(device=self.device, eventType=kind, eventData=data,
                                        gpuInstanceId=gi, computeInstanceId=ci)


def test_the_real_library_is_called_as_nvml_documents() -> None:
    fake = FakePynvml()
    with HealthWatch(fake) as opened:
        assert opened.register("GPU-a").monitored
        fake.queue = [fake.event(pynvml.nvmlEventTypeXidCriticalError, 79, gi=2, ci=0),
                      fake.event(pynvml.nvmlEventTypePState)]
        assert opened.wait(2.5) == [NvmlEvent(4, "GPU-a", EventKind.XID, 79, 2, 0)]
        assert opened.recovery_action("GPU-a") == RecoveryAction.DRAIN_AND_RESET
    register = next(c for c in fake.calls if c[0] == "nvmlDeviceRegisterEvents")
    assert register == ("nvmlDeviceRegisterEvents", fake.device, 0xB, fake.event_set)
    waits = [c[2] for c in fake.calls if c[0] == "nvmlEventSetWait_v2"]
    assert waits == [2500, 0, 0], "the rest of a burst is read without waiting"
    fields = next(c for c in fake.calls if c[0] == "nvmlDeviceGetFieldValues")
    assert fields[2] == [230]  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION in nvml.h
    assert fake.calls[-2:] == [("nvmlEventSetFree", fake.event_set), ("nvmlShutdown",)]


def test_the_real_library_without_xid_events_or_the_field() -> None:
    fake = FakePynvml(supported=pynvml.nvmlEventTypePState)
    fake.field = pynvml.NVML_ERROR_NOT_SUPPORTED
    with HealthWatch(fake) as opened:
        registration = opened.register("GPU-a")
        assert not registration.monitored
        assert registration.reason == "NVML supports no XID events on this GPU"
        assert not any(c[0] == "nvmlDeviceRegisterEvents" for c in fake.calls)
        assert opened.recovery_action("GPU-a") is None
        fake.queue = [pynvml.NVML_ERROR_UNKNOWN]
        with pytest.raises(pynvml.NVMLError_Unknown):
            opened.wait(1)


def test_events_before_a_lost_gpu_come_first_then_the_loss() -> None:
    fake = FakePynvml()
    with HealthWatch(fake) as opened:
        opened.register("GPU-a")
        fake.queue = [fake.event(pynvml.nvmlEventTypeDoubleBitEccError),
                      pynvml.NVML_ERROR_GPU_IS_LOST]
        assert opened.wait(1) == [NvmlEvent(4, "GPU-a", EventKind.DOUBLE_BIT_ECC)]
        with pytest.raises(EventsLost):
            opened.wait(1)
        assert opened.wait(0) == []
