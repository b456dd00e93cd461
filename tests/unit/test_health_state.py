"""The per-GPU health state machine: conditions from observations, each recovery rule,
the admin's overrides, and the transitions a caller logs and counts."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driver.health.classify import HealthSettings
from driver.health.model import (
    Check,
    EccEvent,
    GpuHealth,
    Manual,
    Observation,
    Transition,
    Unmonitored,
    XidEvent,
)
from driver.health.state import fold, label_value, observe

START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SETTINGS = HealthSettings(quiet_window_s=60)


def t(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def run(*observations: Observation, settings: HealthSettings = SETTINGS
        ) -> tuple[GpuHealth, tuple[Transition, ...]]:
    return fold(GpuHealth(3), observations, settings)


def kinds(health: GpuHealth) -> dict[str, str]:
    return {c.kind if c.xid is None else f"xid-{c.xid}": c.effect for c in health.conditions}


def test_a_new_gpu_is_healthy() -> None:
    assert GpuHealth(3).status == "healthy"


def test_xid_79_makes_the_gpu_unhealthy_and_the_transition_says_why() -> None:
    health, transitions = run(XidEvent(3, 79, t(0), gi=1, ci=0))
    assert health.status == "unhealthy"
    assert kinds(health) == {"xid-79": "NoSchedule"}
    [transition] = transitions
    assert (transition.gpu, transition.kind, transition.change) == (3, "xid", "set")
    assert (transition.before, transition.after) == ("healthy", "unhealthy")
    assert (transition.xid, transition.meaning) == (79, "GPU has fallen off the bus")
    assert "GI 1 CI 0" in transition.cause
    assert transition.at == t(0)


def test_an_informational_xid_leaves_the_gpu_healthy_until_quiet() -> None:
    health, _ = run(XidEvent(3, 13, t(0)))
    assert health.status == "healthy"
    assert kinds(health) == {"xid-13": "None"}


def test_quiet_window_gives_informational_conditions_back() -> None:
    health, transitions = run(XidEvent(3, 13, t(0)), Check(3, t(59), "answers"),
                              Check(3, t(60), "answers"))
    assert health.conditions == ()
    assert transitions[-1].change == "cleared"
    assert transitions[-1].xid == 13
    assert "quiet" in transitions[-1].cause


def test_the_quiet_window_counts_from_the_last_repeat() -> None:
    health, _ = run(XidEvent(3, 13, t(0)), XidEvent(3, 13, t(50)), Check(3, t(100), "answers"))
    assert kinds(health) == {"xid-13": "None"}


def test_a_repeat_keeps_the_time_the_condition_began() -> None:
    health, transitions = run(XidEvent(3, 79, t(0)), XidEvent(3, 79, t(5)))
    assert health.conditions[0].since == t(0)
    assert len(transitions) == 1  # the repeat changes nothing a caller would log


def test_fatal_xids_do_not_go_quiet() -> None:
    health, _ = run(XidEvent(3, 48, t(0)), Check(3, t(3600), "answers"))
    assert kinds(health) == {"xid-48": "NoSchedule"}


def test_reset_asked_for_by_the_driver_then_done_gives_the_gpu_back() -> None:
    health, transitions = run(
        XidEvent(3, 79, t(0), recovery="reset"),
        Check(3, t(5), "answers", recovery="reset"),
        Check(3, t(10), "answers", recovery="none"))
    assert health.status == "healthy"
    assert health.conditions == ()
    assert [(x.kind, x.change) for x in transitions] == [
        ("xid", "set"), ("recovery", "set"), ("recovery", "cleared"), ("xid", "cleared")]
    assert transitions[-1].after == "healthy"
    assert "answers again" in transitions[-1].cause


def test_a_gpu_that_needs_a_reset_and_gets_it_is_given_back() -> None:
    health, _ = run(XidEvent(3, 48, t(0)), Check(3, t(5), "requires-reset"),
                    Check(3, t(10), "answers"))
    assert health.conditions == ()


def test_a_gpu_lost_and_back_is_given_back_with_its_xid() -> None:
    health, transitions = run(XidEvent(3, 79, t(0)), Check(3, t(5), "lost"),
                              Check(3, t(10), "answers"))
    assert health.status == "healthy"
    assert {(x.kind, x.change) for x in transitions} >= {("gpu-lost", "set"),
                                                        ("gpu-lost", "cleared"),
                                                        ("xid", "cleared")}


def test_an_xid_reported_while_lost_is_cleared_when_the_gpu_returns() -> None:
    health, _ = run(Check(3, t(0), "lost"), XidEvent(3, 79, t(1)), Check(3, t(10), "answers"))
    assert health.conditions == ()


def test_answering_without_a_reset_gives_nothing_back() -> None:
    health, _ = run(XidEvent(3, 48, t(0)), Check(3, t(5), "answers"),
                    Check(3, t(10), "answers", recovery="none"))
    assert kinds(health) == {"xid-48": "NoSchedule"}


def test_a_fatal_event_after_the_reset_need_starts_over() -> None:
    health, _ = run(XidEvent(3, 79, t(0)), Check(3, t(5), "requires-reset"),
                    Check(3, t(8), "answers"), XidEvent(3, 95, t(9)),
                    Check(3, t(10), "answers"))
    assert kinds(health) == {"xid-95": "NoSchedule"}


def test_a_recovery_still_asked_for_keeps_the_gpu_out() -> None:
    health, _ = run(Check(3, t(0), "lost"), Check(3, t(5), "answers", recovery="reboot"))
    assert health.status == "unhealthy"
    assert {c.kind: c.value for c in health.conditions} == {"recovery": "reboot"}


def test_double_bit_ecc_is_fatal_until_reset() -> None:
    health, _ = run(EccEvent(3, t(0)))
    assert kinds(health) == {"ecc": "NoSchedule"}
    health, _ = run(EccEvent(3, t(0)), Check(3, t(1), "requires-reset"),
                    Check(3, t(2), "answers"))
    assert health.conditions == ()


def test_a_remapped_row_failure_lasts_while_checks_report_it() -> None:
    health, _ = run(Check(3, t(0), "remap-failure"), Check(3, t(5), "remap-failure"))
    assert kinds(health) == {"remap-failure": "NoSchedule"}
    assert health.conditions[0].since == t(0)
    health, _ = run(Check(3, t(0), "remap-failure"), Check(3, t(5), "answers"))
    assert health.conditions == ()


def test_eviction_setting_makes_fatal_conditions_noexecute() -> None:
    health, _ = run(XidEvent(3, 79, t(0)), Check(3, t(1), "lost"),
                    settings=HealthSettings(evict=True))
    assert kinds(health) == {"xid-79": "NoExecute", "gpu-lost": "NoExecute"}


def test_a_gpu_whose_events_nvml_cannot_deliver_is_unknown_never_healthy() -> None:
    health, transitions = run(Unmonitored(3, t(0)))
    assert health.status == "unknown"
    assert kinds(health) == {"unmonitored": "None"}
    assert (transitions[0].before, transitions[0].after) == ("healthy", "unknown")
    health, _ = run(Unmonitored(3, t(0)), Unmonitored(3, t(1), supported=True))
    assert health.status == "healthy"


def test_out_of_service_stays_through_recovery_until_cleared() -> None:
    health, transitions = run(Manual(3, t(0), "out-of-service", "RMA ticket 42"),
                              Check(3, t(5), "lost"), Check(3, t(10), "answers"),
                              Check(3, t(3600), "answers"))
    assert health.status == "unhealthy"
    assert {c.kind: c.value for c in health.conditions} == {"out-of-service": "RMA-ticket-42"}
    assert "RMA ticket 42" in transitions[0].cause


def test_a_manual_clear_removes_every_automatic_condition_but_unmonitored() -> None:
    health, transitions = run(Unmonitored(3, t(0)), XidEvent(3, 48, t(1)), EccEvent(3, t(2)),
                              Manual(3, t(3), "out-of-service"), Manual(3, t(4), "clear", "fixed"))
    assert kinds(health) == {"unmonitored": "None"}
    cleared = [x for x in transitions if x.change == "cleared"]
    assert {x.kind for x in cleared} == {"xid", "ecc", "out-of-service"}
    assert all(x.cause == "manual clear: fixed" for x in cleared)
    assert cleared[-1].after == "unknown"


def test_a_return_to_service_keeps_what_the_monitor_found() -> None:
    health, transitions = run(XidEvent(3, 79, t(0)), Manual(3, t(1), "out-of-service", "RMA"),
                              Manual(3, t(2), "return"))
    assert kinds(health) == {"xid-79": "NoSchedule"}
    assert [(x.kind, x.change) for x in transitions[-1:]] == [("out-of-service", "cleared")]
    health, _ = run(Manual(3, t(0), "out-of-service"), Manual(3, t(1), "return"))
    assert health.status == "healthy"


def test_a_fatal_event_after_a_manual_clear_is_a_new_failure() -> None:
    health, _ = run(XidEvent(3, 79, t(0)), Manual(3, t(1), "clear"), XidEvent(3, 79, t(2)))
    assert health.status == "unhealthy"
    assert health.conditions[0].since == t(2)


def test_an_observation_of_another_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match="GPU 4"):
        observe(GpuHealth(3), XidEvent(4, 79, t(0)), SETTINGS)


def test_label_value_makes_free_text_a_label_value() -> None:
    assert label_value("  disk/fan: bad! ") == "disk-fan-bad"
    assert len(label_value("x" * 100)) == 63


observations = st.lists(st.one_of(
    st.builds(XidEvent, gpu=st.just(3), xid=st.sampled_from([13, 31, 48, 79, 95, 4242]),
              at=st.just(START), recovery=st.sampled_from([None, "none", "reset", "reboot"])),
    st.builds(EccEvent, gpu=st.just(3), at=st.just(START)),
    st.builds(Check, gpu=st.just(3), at=st.just(START),
              liveness=st.sampled_from(["answers", "lost", "requires-reset", "remap-failure"]),
              recovery=st.sampled_from([None, "none", "reset", "drain"])),
    st.builds(Unmonitored, gpu=st.just(3), at=st.just(START), supported=st.booleans()),
    st.builds(Manual, gpu=st.just(3), at=st.just(START),
              action=st.sampled_from(["out-of-service", "return", "clear"])),
), max_size=20)


@given(observations, st.lists(st.integers(min_value=0, max_value=120), max_size=20))
def test_transitions_replay_the_conditions(items: list[Observation], gaps: list[int]) -> None:
    """Whatever happens, the transitions chain (each `before` is the previous `after`) and
    end at the GPU's status."""
    at, timed = START, []
    for item, gap in zip(items, gaps + [0] * len(items), strict=False):
        at += timedelta(seconds=gap)
        timed.append(replace(item, at=at))
    health, transitions = run(*timed)
    status = "healthy"
    for transition in transitions:
        assert transition.before == status
        status = transition.after
    assert status == health.status
