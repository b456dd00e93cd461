"""The admin's GPU health requests: the file `gpu-dra health` writes and the plugin reads."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from driver.health.classify import HealthSettings
from driver.health.model import GpuHealth, Manual, Observation
from driver.health.state import observe
from driver.plugin.admin import (
    ADMIN_FILE,
    AdminError,
    AdminWatch,
    Requests,
    dump,
    load,
    observations,
    parse,
    record,
    request,
)
from driver.plugin.monitor import HealthView

START = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
GPUS = {0: "GPU-aaaa", 3: "GPU-dddd"}


def t(seconds: float) -> datetime:
    return START + timedelta(seconds=seconds)


def test_a_clear_also_ends_out_of_service_and_a_return_ends_only_that() -> None:
    asked = request(Requests(), "out-of-service", "3", t(1), "RMA 42")
    assert asked.out_of_service["3"].reason == "RMA 42"
    assert request(asked, "return", "3", t(2)) == Requests({}, {})
    cleared = request(asked, "clear", "3", t(2))
    assert cleared.out_of_service == {} and cleared.clears == {"3": t(2)}


def test_the_file_round_trips() -> None:
    asked = request(request(Requests(), "out-of-service", "GPU-dddd", t(1), "fan"),
                    "clear", "0", t(2))
    assert parse(dump(asked), "f") == asked


@pytest.mark.parametrize(("doc", "field"), [
    (b"{", "not JSON"),
    (b"[]", "expected an object"),
    (b'{"outOfService": []}', "outOfService: expected an object"),
    (b'{"outOfService": {"3": {"reason": "x", "since": "soon"}}}', "outOfService.3.since"),
    (b'{"outOfService": {"3": {"reason": "x", "since": "2026-12-07T01:00:00"}}}',
     "no timezone"),
    (b'{"outOfService": {"3": "x"}}', "outOfService.3: expected"),
    (b'{"clear": {"3": 5}}', "clear.3"),
])
def test_a_bad_file_names_the_field(doc: bytes, field: str) -> None:
    with pytest.raises(AdminError, match=field):
        parse(doc, "health-admin.json")


def test_record_adds_to_what_is_there(tmp_path: Path) -> None:
    record(tmp_path, "out-of-service", "3", "RMA", t(1))
    record(tmp_path, "out-of-service", "GPU-aaaa", "", t(2))
    record(tmp_path, "clear", "0", at=t(3))
    assert load(tmp_path / ADMIN_FILE) == Requests(
        {"3": request(Requests(), "out-of-service", "3", t(1), "RMA").out_of_service["3"],
         "GPU-aaaa": request(Requests(), "out-of-service", "x", t(2)).out_of_service["x"]},
        {"0": t(3)})
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_requests_from_many_admins_at_once_all_land(tmp_path: Path) -> None:
    threads = [threading.Thread(target=record, args=(tmp_path, "out-of-service", str(i)))
               for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(load(tmp_path / ADMIN_FILE).out_of_service) == {str(i) for i in range(16)}


SETTINGS = HealthSettings()


class Gpus:
    """Watched GPUs whose health folds what the admin watch applies, as the monitor's."""

    def __init__(self, gpus: dict[int, str]) -> None:
        self.uuids = dict(gpus)
        self.health = {minor: GpuHealth(minor) for minor in gpus}
        self.applied: list[Manual] = []

    def view(self) -> HealthView:
        return HealthView(dict(self.health), {}, dict(self.uuids))

    def apply(self, found: list[Observation]) -> None:
        for o in found:
            assert isinstance(o, Manual)
            self.applied.append(o)
            self.health[o.gpu] = observe(self.health[o.gpu], o, SETTINGS)[0]

    def actions(self) -> list[tuple[int, str]]:
        return [(o.gpu, o.action) for o in self.applied]


def reconcile(gpus: Gpus, asked: Requests, at: datetime,
              cleared: dict[str, datetime] | None = None) -> dict[str, datetime]:
    found, after = observations(asked, gpus.health, gpus.uuids, cleared or {}, START, at)
    gpus.apply(found)
    return after


def test_out_of_service_by_minor_or_uuid_is_applied_until_the_gpu_has_it() -> None:
    gpus = Gpus(GPUS)
    asked = request(request(Requests(), "out-of-service", "3", t(1), "RMA"),
                    "out-of-service", "GPU-aaaa", t(1))
    reconcile(gpus, asked, t(2))
    assert gpus.applied == [Manual(0, t(2), "out-of-service", ""),
                            Manual(3, t(2), "out-of-service", "RMA")]
    reconcile(gpus, asked, t(3))
    assert len(gpus.applied) == 2
    # a new reason is a new request
    reconcile(gpus, request(asked, "out-of-service", "3", t(4), "RMA 43"), t(5))
    assert gpus.applied[-1] == Manual(3, t(5), "out-of-service", "RMA 43")


def test_a_gpu_whose_health_started_over_is_kept_out_again() -> None:
    gpus = Gpus(GPUS)
    asked = request(Requests(), "out-of-service", "3", t(1))
    reconcile(gpus, asked, t(2))
    gpus.health[3] = GpuHealth(3)  # gone and back after a re-discovery
    reconcile(gpus, asked, t(3))
    assert gpus.actions() == [(3, "out-of-service"), (3, "out-of-service")]


def test_a_return_is_applied_when_the_request_goes() -> None:
    gpus = Gpus(GPUS)
    asked = request(Requests(), "out-of-service", "3", t(1))
    reconcile(gpus, asked, t(2))
    reconcile(gpus, request(asked, "return", "3", t(3)), t(4))
    assert gpus.actions() == [(3, "out-of-service"), (3, "return")]
    assert gpus.health[3].status == "healthy"


def test_a_clear_is_applied_once_and_none_from_before_the_start() -> None:
    gpus = Gpus(GPUS)
    before = request(Requests(), "clear", "3", t(-10))
    reconcile(gpus, before, t(1))
    assert gpus.applied == []
    asked = request(before, "clear", "GPU-dddd", t(5))
    cleared = reconcile(gpus, asked, t(6))
    assert gpus.applied == [Manual(3, t(6), "clear")]
    reconcile(gpus, asked, t(7), cleared)
    assert len(gpus.applied) == 1


def test_a_clear_while_the_file_still_keeps_the_gpu_out_keeps_it_out() -> None:
    gpus = Gpus(GPUS)
    asked = request(Requests(), "out-of-service", "3", t(1), "RMA")
    reconcile(gpus, asked, t(2))
    reconcile(gpus, Requests(asked.out_of_service, {"3": t(3)}), t(4))  # written by hand
    assert gpus.actions()[1:] == [(3, "clear"), (3, "out-of-service")]
    assert [c.kind for c in gpus.health[3].conditions] == ["out-of-service"]


def test_the_watch_applies_the_file_as_it_changes(tmp_path: Path) -> None:
    gpus = Gpus(GPUS)
    watch = AdminWatch(tmp_path, gpus.view, gpus.apply)
    watch.check()
    assert gpus.applied == []
    record(tmp_path, "out-of-service", "3", "RMA")
    watch.check()
    watch.check()
    assert gpus.actions() == [(3, "out-of-service")]
    record(tmp_path, "out-of-service", "GPU-eeee", "spare")
    gpus.uuids[4], gpus.health[4] = "GPU-eeee", GpuHealth(4)  # re-discovery found it
    watch.check()
    assert gpus.actions()[-1] == (4, "out-of-service")
    record(tmp_path, "return", "3")
    watch.check()
    assert gpus.actions()[-1] == (3, "return")


def test_a_broken_file_is_logged_and_changes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gpus = Gpus(GPUS)
    watch = AdminWatch(tmp_path, gpus.view, gpus.apply)
    record(tmp_path, "out-of-service", "3")
    watch.check()
    (tmp_path / ADMIN_FILE).write_text(json.dumps({"outOfService": {"3": {"since": 1}}}))
    with caplog.at_level(logging.ERROR):
        watch.check()
    assert "outOfService.3.since" in caplog.text
    assert gpus.actions() == [(3, "out-of-service")]


def test_a_gpu_this_node_does_not_have_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    record(tmp_path, "out-of-service", "9")
    with caplog.at_level(logging.WARNING):
        gpus = Gpus(GPUS)
        AdminWatch(tmp_path, gpus.view, gpus.apply).check()
    assert "does not watch: 9" in caplog.text
