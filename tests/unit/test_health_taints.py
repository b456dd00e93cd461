"""A GPU's conditions as device taints: keys and values the API accepts, effects by
classification, XIDs merged into one taint, at most 4, timeAdded stable."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

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
    Unmonitored,
    XidEvent,
)
from driver.health.state import fold
from driver.health.taints import MAX_TAINTS, conditions_text, gpu_taints, rfc3339

DRIVER = "gpu.dra.dev"
START = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

# apimachinery: a qualified name (label key) and a label value.
_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def is_qualified_name(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (not prefix or (len(prefix) <= 253 and bool(_SUBDOMAIN.fullmatch(prefix)))) \
        and len(name) <= 63 and bool(_NAME.fullmatch(name))


def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_NAME.fullmatch(value)))


def t(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def health(*observations: Observation, settings: HealthSettings | None = None) -> GpuHealth:
    return fold(GpuHealth(3), observations, settings or HealthSettings())[0]


def api(*observations: Observation, settings: HealthSettings | None = None
        ) -> list[dict[str, str]]:
    return [taint.to_api() for taint in gpu_taints(health(*observations, settings=settings),
                                                   DRIVER)]


def test_a_healthy_gpu_has_no_taints() -> None:
    assert gpu_taints(GpuHealth(3), DRIVER) == ()


def test_xid_79_is_a_noschedule_taint_with_the_xid_and_when_it_began() -> None:
    assert api(XidEvent(3, 79, t(0))) == [
        {"key": "gpu.dra.dev/xid", "value": "79", "effect": "NoSchedule",
         "timeAdded": "2026-12-01T12:00:00Z"}]


def test_eviction_opt_in_makes_it_noexecute() -> None:
    [taint] = api(XidEvent(3, 79, t(0)), settings=HealthSettings(evict=True))
    assert taint["effect"] == "NoExecute"


def test_lost_unmonitored_and_out_of_service_have_their_own_keys() -> None:
    taints = api(Unmonitored(3, t(0)), Check(3, t(1), "lost"),
                 Manual(3, t(2), "out-of-service", "bad fan"))
    assert [(x["key"], x.get("value"), x["effect"]) for x in taints] == [
        ("gpu.dra.dev/out-of-service", "bad-fan", "NoSchedule"),
        ("gpu.dra.dev/gpu-lost", None, "NoSchedule"),
        ("gpu.dra.dev/unmonitored", None, "None")]


def test_xids_merge_into_one_taint_of_the_most_severe_effect() -> None:
    [taint] = api(XidEvent(3, 48, t(0)), XidEvent(3, 79, t(10)), XidEvent(3, 13, t(20)))
    # the informational 13 came last but does not hide the fatal 79; timeAdded is when
    # the GPU first went out at that severity
    assert (taint["value"], taint["effect"], taint["timeAdded"]) == (
        "79", "NoSchedule", rfc3339(t(0)))


def test_informational_xids_merge_to_the_latest() -> None:
    [taint] = api(XidEvent(3, 13, t(0)), XidEvent(3, 31, t(10)))
    assert (taint["value"], taint["effect"], taint["timeAdded"]) == ("31", "None", rfc3339(t(0)))


def test_time_added_is_stable_while_the_condition_lasts() -> None:
    before = api(XidEvent(3, 79, t(0)), Check(3, t(1), "lost"))
    after = api(XidEvent(3, 79, t(0)), Check(3, t(1), "lost"), XidEvent(3, 79, t(30)),
                Check(3, t(35), "lost"))
    assert before == after


def test_never_more_than_four_taints_and_the_most_severe_kept() -> None:
    taints = api(Unmonitored(3, t(0)), XidEvent(3, 13, t(1)), EccEvent(3, t(2)),
                 Check(3, t(3), "remap-failure"), Check(3, t(4), "requires-reset"),
                 Manual(3, t(5), "out-of-service"))
    assert len(taints) == MAX_TAINTS
    assert [x["key"].split("/")[1] for x in taints] == [
        "out-of-service", "ecc", "recovery", "remap-failure"]
    assert all(x["effect"] == "NoSchedule" for x in taints)


def test_a_kubernetes_134_server_gets_no_informational_taints() -> None:
    state = health(Unmonitored(3, t(0)), XidEvent(3, 13, t(1)), XidEvent(3, 79, t(2)))
    assert [x.key for x in gpu_taints(state, DRIVER, effect_none=False)] == [
        "gpu.dra.dev/xid"]
    assert gpu_taints(health(Unmonitored(3, t(0))), DRIVER, effect_none=False) == ()


def test_a_time_without_a_timezone_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        rfc3339(datetime(2026, 12, 1))


def test_rfc3339_is_utc_to_the_second() -> None:
    at = datetime(2026, 12, 1, 13, 0, 0, 900000, tzinfo=timezone(timedelta(hours=1)))
    assert rfc3339(at) == "2026-12-01T12:00:00Z"


events = st.lists(st.one_of(
    st.builds(XidEvent, gpu=st.just(3), xid=st.integers(min_value=1, max_value=2**31 - 1),
              at=st.just(START), recovery=st.sampled_from([None, "none", "reset", "drain"])),
    st.builds(EccEvent, gpu=st.just(3), at=st.just(START)),
    st.builds(Check, gpu=st.just(3), at=st.just(START),
              liveness=st.sampled_from(["answers", "lost", "requires-reset", "remap-failure"]),
              recovery=st.sampled_from([None, "none", "reboot"])),
    st.builds(Unmonitored, gpu=st.just(3), at=st.just(START), supported=st.booleans()),
    st.builds(Manual, gpu=st.just(3), at=st.just(START),
              action=st.sampled_from(["out-of-service", "clear"]), reason=st.text(max_size=80)),
), max_size=25)


@given(events, st.booleans())
def test_every_taint_is_valid_for_the_api(observations: list[Observation], evict: bool) -> None:
    taints = api(*observations, settings=HealthSettings(evict=evict))
    assert len(taints) <= MAX_TAINTS
    assert len({x["key"] for x in taints}) == len(taints)
    for taint in taints:
        assert is_qualified_name(taint["key"]), taint
        assert is_label_value(taint.get("value", "")), taint
        assert taint["effect"] in ("None", "NoSchedule", "NoExecute")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", taint["timeAdded"])


def test_the_stream_message_names_every_condition_most_severe_first() -> None:
    health, _ = fold(GpuHealth(3), [
        Unmonitored(3, START), XidEvent(3, 79, START + timedelta(seconds=1)),
        Check(3, START + timedelta(seconds=2), "answers", "reboot")], HealthSettings())
    assert conditions_text(health) == (
        "xid=79 (GPU has fallen off the bus):NoSchedule since 2026-12-01T12:00:01Z; "
        "recovery=reboot:NoSchedule since 2026-12-01T12:00:02Z; "
        "unmonitored:None since 2026-12-01T12:00:00Z")
    assert conditions_text(GpuHealth(3)) == ""
