"""XID classification: NVIDIA's table, the driver's recovery action first, the admin's
ignored XIDs and opt-in eviction, and settings refused with the setting named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from driver.errors import DriverError
from driver.health.classify import (
    UNKNOWN,
    XIDS,
    HealthSettings,
    HealthSettingsError,
    classify,
)

DEFAULT = HealthSettings()


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 68, 109])
def test_application_xids_are_informational(xid: int) -> None:
    verdict = classify(xid, None, DEFAULT)
    assert verdict.effect == "None"
    assert not verdict.fatal


@pytest.mark.parametrize("xid", [48, 63, 64, 74, 79, 94, 95, 119, 120])
def test_hardware_xids_take_the_gpu_out_of_scheduling(xid: int) -> None:
    assert classify(xid, None, DEFAULT).effect == "NoSchedule"


def test_xid_79_says_what_happened() -> None:
    assert classify(79, None, DEFAULT).meaning == "GPU has fallen off the bus"


def test_every_xid_in_the_table_has_a_one_line_meaning() -> None:
    for xid, row in XIDS.items():
        assert row.meaning and "\n" not in row.meaning, xid


def test_an_unknown_xid_is_fatal_and_says_so() -> None:
    verdict = classify(4242, None, DEFAULT)
    assert (verdict.effect, verdict.meaning) == ("NoSchedule", UNKNOWN)


@pytest.mark.parametrize("recovery", ["reset", "reboot", "drain"])
def test_a_recovery_the_driver_asks_for_makes_any_xid_fatal(recovery: Any) -> None:
    verdict = classify(13, recovery, DEFAULT)
    assert verdict.effect == "NoSchedule"
    assert recovery in verdict.why


def test_no_recovery_from_the_driver_makes_a_table_fatal_xid_informational() -> None:
    assert classify(79, "none", DEFAULT).effect == "None"


def test_ignored_xids_are_informational_whatever_the_driver_says() -> None:
    settings = HealthSettings(ignored_xids=frozenset({79}))
    assert classify(79, None, settings).effect == "None"
    assert classify(79, "reset", settings).effect == "None"
    assert classify(48, None, settings).effect == "NoSchedule"


def test_eviction_is_opt_in() -> None:
    evict = HealthSettings(evict=True)
    assert classify(79, None, evict).effect == "NoExecute"
    assert classify(13, None, evict).effect == "None"
    assert classify(79, None, DEFAULT).effect == "NoSchedule"


@pytest.mark.parametrize("kwargs, field", [
    ({"ignored_xids": frozenset({0})}, "ignored_xids"),
    ({"ignored_xids": frozenset({-13})}, "ignored_xids"),
    ({"ignored_xids": frozenset({"13"})}, "ignored_xids"),
    ({"ignored_xids": frozenset({True})}, "ignored_xids"),
    ({"ignored_xids": [13]}, "ignored_xids"),
    ({"evict": "yes"}, "evict"),
    ({"quiet_window_s": 0}, "quiet_window_s"),
    ({"quiet_window_s": -1.0}, "quiet_window_s"),
    ({"quiet_window_s": float("inf")}, "quiet_window_s"),
    ({"quiet_window_s": "300"}, "quiet_window_s"),
])
def test_bad_settings_are_refused_naming_the_setting(kwargs: dict[str, Any],
                                                     field: str) -> None:
    with pytest.raises(HealthSettingsError, match=f"^{field}: ") as caught:
        HealthSettings(**kwargs)
    assert isinstance(caught.value, DriverError)
    assert caught.value.reason == "health"


def test_good_settings_are_kept() -> None:
    settings = HealthSettings(ignored_xids=frozenset({13, 999}), evict=True,
                              quiet_window_s=30)
    assert settings.ignored_xids == {13, 999}
    assert settings.fatal_effect == "NoExecute"


def test_the_readme_xid_table_is_the_code_table() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## GPU health"):]
    section = section[:section.index("\n## ")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows[int(cells[0])] = (cells[1], cells[2])
    assert rows == {xid: (row.meaning, "fatal" if row.fatal else "informational")
                    for xid, row in XIDS.items()}
