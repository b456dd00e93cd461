"""The health signals of real NVML (read-only): every GPU's events register or say why not,
a quiet watch yields no event, each GPU answers, and the recovery-action field is read or
reported unsupported."""

from __future__ import annotations

import pynvml

from driver.nvml.events import HealthWatch, Liveness, RecoveryAction
from driver.nvml.real import real_provider

QUIET_WATCH_S = 10.0  # a healthy idle machine delivers no XID or ECC event in this time


def uuids() -> list[str]:
    pynvml.nvmlInit()
    try:
        return [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def test_a_quiet_machine_registers_answers_and_reports_no_event() -> None:
    provider = real_provider()
    gpus = uuids()
    with HealthWatch(provider.nvml) as watch:
        registrations = [watch.register(uuid) for uuid in gpus]
        for registration in registrations:
            assert registration.monitored or registration.reason, registration
            assert registration.minor is not None
        print({r.uuid: sorted(r.kinds) for r in registrations})
        assert watch.wait(QUIET_WATCH_S) == []
        for uuid in gpus:
            assert watch.liveness(uuid).state is Liveness.OK
            action = watch.recovery_action(uuid)
            assert action is None or isinstance(action, RecoveryAction)
            print(uuid, "recovery action:", action)
