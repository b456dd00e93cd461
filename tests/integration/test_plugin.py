"""The kubelet plugin in-process, driven over its real unix sockets as the kubelet drives it:
registration, prepare/unprepare of whole GPUs from the local directory, CDI specs, the
checkpoint, bad input, concurrency, health, metrics, shutdown and restart."""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driver._proto.dra_v1 import api_pb2 as dra_v1
from driver._proto.drahealth_v1 import api_pb2 as health_v1
from driver._proto.drahealth_v1 import api_pb2_grpc as health_v1_grpc
from driver._proto.drahealth_v1alpha1 import api_pb2 as health_v1alpha1
from driver._proto.drahealth_v1alpha1 import api_pb2_grpc as health_v1alpha1_grpc
from driver._proto.pluginregistration_v1 import api_pb2 as reg_v1
from driver._proto.pluginregistration_v1 import api_pb2_grpc as reg_v1_grpc
from driver.allocator import DeviceRef
from driver.plugin import cdi, checkpoint, journal
from driver.plugin.checkpoint import CheckpointError, ClaimRecord, PreparedDevice
from driver.plugin.claims import ClaimRef, DirClaimSource
from tests.support.plugin import (
    DRIVER,
    NODE,
    Claim,
    Node,
    Start,
    cdi_problems,
    cdi_specs,
    gpu_config,
    make_claim,
    new_uid,
    opaque,
    result,
    write_claim,
)


def test_registration_answers_what_the_kubelet_needs(node: Node, start: Start) -> None:
    running = start()
    info = running.kubelet.get_info()
    assert (info.type, info.name, info.endpoint) == ("DRAPlugin", DRIVER, str(node.dra_socket))
    assert list(info.supported_versions[:2]) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    slices = node.slices()
    assert [d["name"] for s in slices for d in s["spec"].get("devices", [])] == \
        [f"gpu-{i}" for i in range(8)]


def test_prepare_writes_a_valid_spec_and_records_the_claim(node: Node, start: Start) -> None:
    running = start()
    claim = make_claim(node.local, [result("gpu-3"), result("gpu-5", request="extra/h100")])
    answer = running.kubelet.prepare([claim])[claim.uid]
    assert answer.error == ""
    assert [(d["device"], d["requestNames"], d["pool"]) for d in answer.devices] == \
        [("gpu-3", ["gpu"], NODE), ("gpu-5", ["extra"], NODE)]
    assert answer.devices[0]["cdiDeviceIDs"] == [f"k8s.{DRIVER}/claim={claim.uid}-gpu-3"]
    spec = cdi_specs(node.cdi_root)[claim.uid]
    assert cdi_problems(spec) == []
    assert {d["name"]: d["containerEdits"]["deviceNodes"] for d in spec["devices"]} == {
        f"{claim.uid}-gpu-3": [{"path": "/dev/nvidia3"}],
        f"{claim.uid}-gpu-5": [{"path": "/dev/nvidia5"}]}
    assert node.records()[claim.uid].state == "PrepareCompleted"


def test_a_prepare_flushes_the_checkpoint_once_before_it_answers(
        node: Node, start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """PrepareStarted is written before the spec, and flushed to disk with
    PrepareCompleted by the one fdatasync of the call."""
    running = start()
    claim = make_claim(node.local, [result("gpu-1")])
    journal_file = journal.path_for(node.checkpoint)
    flushes: list[bytes] = []
    fdatasync = os.fdatasync

    def flush(fd: int) -> None:
        flushes.append(journal_file.read_bytes().splitlines()[-1])
        fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", flush)
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert [json.loads(line)["set"][claim.uid]["state"] for line in flushes] == \
        ["PrepareCompleted"]
    saves = journal_file.read_bytes().splitlines()[-2:]
    assert [json.loads(line)["set"][claim.uid]["state"] for line in saves] == \
        ["PrepareStarted", "PrepareCompleted"]


def test_a_second_prepare_answers_the_same_and_changes_nothing(node: Node, start: Start) -> None:
    running = start()
    claim = make_claim(node.local, [result("gpu-0")])
    first = running.kubelet.prepare([claim])
    files = [node.checkpoint, node.cdi_root / cdi.spec_file_name(DRIVER, claim.uid)]
    before = [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files]
    assert running.kubelet.prepare([claim]) == first
    assert running.kubelet.prepare([claim], version="v1beta1") == first
    assert [(os.stat(f).st_ino, os.stat(f).st_mtime_ns) for f in files] == before


def test_unprepare_removes_the_spec_and_the_record_and_may_repeat(node: Node,
                                                                  start: Start) -> None:
    running = start()
    claim = make_claim(node.local, [result("gpu-1")])
    running.kubelet.prepare([claim], version="v1beta1")
    assert running.kubelet.unprepare([claim], version="v1beta1") == {claim.uid: ""}
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    # a claim the plugin never saw (deleted from the API server before a restart) too
    assert running.kubelet.unprepare([Claim("ns", "gone", new_uid())])


def test_each_bad_claim_fails_alone_and_leaves_nothing(node: Node, start: Start) -> None:
    running = start()
    local = node.local
    good = make_claim(local, [result("gpu-0")])
    missing = Claim("ns", "missing", new_uid())
    replaced = write_claim(local, Claim("ns", "replaced", new_uid()), [result("gpu-1")],
                           uid=new_uid())
    unallocated = write_claim(local, Claim("ns", "pending", new_uid()), [result("gpu-1")],
                              allocated=False)
    elsewhere = make_claim(local, [result("gpu-1", pool="node-b")])
    unknown = make_claim(local, [result("gpu-99")])
    malformed = make_claim(local, [result("gpu-1")],
                           [opaque(gpu_config(strategy="TimeSlicing", interval="Long"))])
    oversized = make_claim(local, [result("gpu-1")],
                           [opaque(gpu_config(notes="x" * 11000))])
    wrong_kind = make_claim(local, [result("gpu-1")], [opaque(
        {"apiVersion": "gpu.dra.dev/v1alpha1", "kind": "MigDeviceConfig"})])
    not_uuid = Claim("ns", "evil", "../../../etc/passwd")
    bad_namespace = Claim("../..", "evil", new_uid())
    twice = make_claim(local, [result("gpu-2")])
    answers = running.kubelet.prepare([good, missing, replaced, unallocated, elsewhere, unknown,
                                       malformed, oversized, wrong_kind, not_uuid,
                                       bad_namespace, twice, twice])
    expected = {
        missing.uid: "ResourceClaim ns/missing not found",
        replaced.uid: "it was deleted and created again",
        unallocated.uid: "ResourceClaim ns/pending is not allocated",
        elsewhere.uid: "device gpu-1 is in pool node-b, not this node's pool node-a",
        unknown.uid: "device gpu-99 (request gpu) is not published by this node",
        malformed.uid: "status.allocation.devices.config[0].opaque.parameters.sharing."
                       "interval: unknown field",
        oversized.uid: "status.allocation.devices.config[0].opaque.parameters: 110",
        wrong_kind.uid: "a MigDeviceConfig does not apply to gpu device gpu-1",
        not_uuid.uid: "claim uid '../../../etc/passwd' is not a UUID",
        bad_namespace.uid: "claim namespace '../..' is not a DNS label",
        twice.uid: f"claim {twice.uid} appears 2 times in the call",
    }
    assert answers.keys() == {good.uid, *expected}
    assert answers[good.uid].error == "" and answers[good.uid].devices
    for uid, message in expected.items():
        assert message in answers[uid].error, (uid, answers[uid].error)
    assert set(cdi_specs(node.cdi_root)) == {good.uid}
    assert set(os.listdir(node.cdi_root)) == {cdi.spec_file_name(DRIVER, good.uid)}
    assert set(node.records()) == {good.uid}
    assert running.kubelet.get_info().name == DRIVER  # and the plugin lives on
    assert running.kubelet.unprepare([not_uuid])[not_uuid.uid] == \
        "claim uid '../../../etc/passwd' is not a UUID"


def test_a_device_prepared_for_another_claim_is_refused_unless_admin_access(
        node: Node, start: Start) -> None:
    running = start()
    first = make_claim(node.local, [result("gpu-4")])
    second = make_claim(node.local, [result("gpu-4")])
    monitor = make_claim(node.local, [result("gpu-4", admin=True)])
    assert running.kubelet.prepare([first])[first.uid].error == ""
    answers = running.kubelet.prepare([second, monitor])
    assert answers[second.uid].error == (
        f"cannot prepare ResourceClaim ns/{second.name}: device {DRIVER}/{NODE}/gpu-4 is taken "
        f"by ResourceClaim ns/{first.name} ({first.uid})")
    assert answers[monitor.uid].error == ""
    running.kubelet.unprepare([first])
    assert running.kubelet.prepare([second])[second.uid].error == ""


def test_a_share_id_does_not_get_past_a_device_held_whole(node: Node, start: Start) -> None:
    running = start()
    first = make_claim(node.local, [result("gpu-4")])
    shared = make_claim(node.local, [{**result("gpu-4"), "shareID": "a1"}])
    alone = make_claim(node.local, [{**result("gpu-5"), "shareID": "a2"}])
    assert running.kubelet.prepare([first])[first.uid].error == ""
    answers = running.kubelet.prepare([shared, alone])
    assert answers[shared.uid].error == (
        f"cannot prepare ResourceClaim ns/{shared.name}: device {DRIVER}/{NODE}/gpu-4 is taken "
        f"by ResourceClaim ns/{first.name} ({first.uid}) (and 1 more)")
    assert answers[alone.uid].error == (
        f"cannot prepare ResourceClaim ns/{alone.name}: device {DRIVER}/{NODE}/gpu-5 does not "
        "allow multiple allocations: shareID a2 cannot be prepared")
    assert set(cdi_specs(node.cdi_root)) == {first.uid}
    assert set(running.plugin.state.records) == {first.uid}


def test_a_thousand_claims_in_one_call(node: Node, start: Start) -> None:
    running = start()
    claims = [make_claim(node.local, [result(f"gpu-{i % 8}", admin=True)]) for i in range(1000)]
    answers = running.kubelet.prepare(claims)
    assert len(answers) == 1000 and all(a.error == "" for a in answers.values())
    assert len(cdi_specs(node.cdi_root)) == 1000
    assert set(running.kubelet.unprepare(claims).values()) == {""}
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}


def test_time_slicing_is_set_and_reset(node: Node, start: Start) -> None:
    running = start()
    claim = make_claim(node.local, [result("gpu-2"), result("gpu-3", request="other")], [
        opaque(gpu_config(strategy="TimeSlicing"), source="FromClass"),
        opaque(gpu_config(strategy="TimeSlicing", timeSlicingConfig={"interval": "Long"}),
               requests=["gpu"])])
    running.kubelet.prepare([claim])
    uuids = [running.plugin.state.published.index[f"gpu-{i}"].gpu.uuid for i in (2, 3)]
    assert [running.provider.nvml.timeslices[u] for u in uuids] == [3, 0]
    running.kubelet.unprepare([claim])
    assert [running.provider.nvml.timeslices[u] for u in uuids] == [0, 0]


def test_claims_prepare_in_parallel_and_one_claim_never_twice(node: Node,
                                                              start: Start) -> None:
    running = start()
    claims = [make_claim(node.local, [result(f"gpu-{i}")]) for i in range(8)]
    calls = [[c] for c in claims] + [[claims[0]]] * 4
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(running.kubelet.prepare, calls))
    assert all(a[c[0].uid].error == "" for a, c in zip(answers, calls, strict=True))
    repeated = {str(a[claims[0].uid]) for a, c in zip(answers, calls, strict=True)
                if c[0] == claims[0]}
    assert len(repeated) == 1
    assert set(cdi_specs(node.cdi_root)) == {c.uid for c in claims}


@pytest.mark.parametrize(("stub", "pb"), [
    (health_v1_grpc.DRAResourceHealthStub, health_v1),
    (health_v1alpha1_grpc.DRAResourceHealthStub, health_v1alpha1)])
def test_the_health_stream_lists_every_device(start: Start, stub: Any, pb: Any) -> None:
    running = start()
    stream = stub(running.kubelet.dra_channel).NodeWatchResources(
        pb.NodeWatchResourcesRequest(), timeout=10)
    first = next(stream)
    stream.cancel()
    assert [(d.device.pool_name, d.device.device_name, d.health) for d in first.devices] == \
        [(NODE, f"gpu-{i}", pb.HEALTHY) for i in range(8)]


def test_the_probe_serves_only_while_both_sockets_answer(node: Node, start: Start) -> None:
    running = start(health_port=0)  # the port the kernel picks: probe_port
    with grpc.insecure_channel(f"127.0.0.1:{running.plugin.probe_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        node.registration_socket.unlink()
        assert check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_count_claims_errors_and_devices(node: Node, start: Start) -> None:
    running = start()
    good = make_claim(node.local, [result("gpu-0")])
    running.kubelet.prepare([good, Claim("ns", "missing", new_uid())])
    running.kubelet.unprepare([good])
    value = running.plugin.metrics.registry.get_sample_value
    assert value("gpu_dra_claims_total", {"operation": "prepare", "result": "success"}) == 1
    assert value("gpu_dra_claims_total", {"operation": "prepare", "result": "error"}) == 1
    assert value("gpu_dra_claim_errors_total", {"operation": "prepare",
                                                "reason": "not_found"}) == 1
    assert value("gpu_dra_claims_total", {"operation": "unprepare", "result": "success"}) == 1
    assert value("gpu_dra_call_duration_seconds_count", {"operation": "prepare"}) == 1
    assert value("gpu_dra_prepared_claims") == 0
    assert value("gpu_dra_published_devices") == 8
    assert value("gpu_dra_resourceslice_writes_total") == 1


class BlockingClaims(DirClaimSource):
    """Claims that arrive only when the test says so: a call stays in flight."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reading = threading.Event()
        self.release = threading.Event()

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        self.reading.set()
        assert self.release.wait(10)
        return super().get(ref)


def test_stop_deregisters_refuses_new_calls_and_finishes_those_in_flight(
        node: Node, start: Start) -> None:
    source = BlockingClaims(node.local)
    running = start(claims=source)
    claim = make_claim(node.local, [result("gpu-0")])
    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(running.kubelet.prepare, [claim])
        assert source.reading.wait(10)
        stopping = pool.submit(running.plugin.stop, 10.0)
        while node.registration_socket.exists():
            assert not stopping.done()
        with pytest.raises(grpc.RpcError) as refused:
            running.kubelet.prepare([make_claim(node.local, [result("gpu-1")])])
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        source.release.set()
        assert in_flight.result(10)[claim.uid].error == ""
        stopping.result(10)
    running.stopped = True
    running.kubelet.close()
    assert not node.dra_socket.exists() and not node.registration_socket.exists()
    assert node.slices()  # the slices stay: the kubelet wipes them if the plugin stays away


def test_cleanup_on_exit_removes_the_slices(node: Node, start: Start) -> None:
    start(cleanup=True).stop()
    assert node.slices() == []


def test_a_restart_keeps_prepared_claims(node: Node, start: Start) -> None:
    claim = make_claim(node.local, [result("gpu-7")])
    first = start()
    answer = first.kubelet.prepare([claim])
    first.stop()
    second = start()
    held = f"ResourceClaim ns/{claim.name} ({claim.uid})"
    assert second.plugin.state.records.ledger.exclusive == {DeviceRef(DRIVER, NODE, "gpu-7"): held}
    assert second.kubelet.prepare([claim]) == answer
    other = make_claim(node.local, [result("gpu-7")])
    assert f"gpu-7 is taken by {held}" in second.kubelet.prepare([other])[other.uid].error


@pytest.mark.parametrize("unprepared_first", [0, 1], ids=["first-recorded", "last-recorded"])
def test_two_records_holding_one_gpu_are_reported_kept_and_keep_it_held(
        node: Node, start: Start, caplog: pytest.LogCaptureFixture,
        unprepared_first: int) -> None:
    holders = sorted((Claim("ns", f"holder-{i}", new_uid()) for i in range(2)),
                     key=lambda c: c.uid)  # the order the checkpoint lists them in
    gpu_3 = "GPU-68a37c14-cba3-5893-8527-70e1ada18b19"  # dgx-h100's gpu-3
    device = PreparedDevice(("gpu",), NODE, "gpu-3", (), gpu_3)
    node.plugin_dir.mkdir()
    node.prepare_dirs()
    checkpoint.save(node.checkpoint, checkpoint.Checkpoint(
        boot_id=node.boot_id.read_text().strip(),
        claims={c.uid: ClaimRecord(c.uid, c.namespace, c.name, "PrepareCompleted", (device,))
                for c in holders}))
    running = start()
    keys = [f"ResourceClaim ns/{c.name} ({c.uid})" for c in holders]
    reported = [r.message for r in caplog.records if r.levelname == "ERROR" and
                f"{DRIVER}/{NODE}/gpu-3" in r.message]
    assert len(reported) == 1 and all(key in reported[0] for key in keys)
    assert set(node.records()) == {c.uid for c in holders}  # neither is dropped
    newcomer = make_claim(node.local, [result("gpu-3")])
    assert "gpu-3 is taken by" in running.kubelet.prepare([newcomer])[newcomer.uid].error
    first, last = holders[unprepared_first], holders[1 - unprepared_first]
    assert running.kubelet.unprepare([first]) == {first.uid: ""}
    error = running.kubelet.prepare([newcomer])[newcomer.uid].error
    assert error.endswith(f"gpu-3 is taken by {keys[1 - unprepared_first]}")  # still held
    assert running.kubelet.unprepare([last]) == {last.uid: ""}
    assert running.kubelet.prepare([newcomer])[newcomer.uid].error == ""


def test_start_rolls_back_half_done_work_and_removes_orphan_specs(node: Node,
                                                                  start: Start) -> None:
    half = Claim("ns", "half", new_uid())
    spec_file = node.cdi_root / cdi.spec_file_name(DRIVER, half.uid)
    orphan = node.cdi_root / cdi.spec_file_name(DRIVER, new_uid())
    leftover = node.cdi_root / f".{cdi.spec_file_name(DRIVER, new_uid())}.x1y2.tmp"
    other_vendor = node.cdi_root / "nvidia.com-gpu.yaml"
    node.cdi_root.mkdir()
    for path in (spec_file, orphan, leftover, other_vendor):
        path.write_text("{}")
    node.plugin_dir.mkdir()
    node.prepare_dirs()
    gpu_2 = "GPU-6a97cacc-c0f8-54b8-97b2-00b046941b54"  # dgx-h100's gpu-2
    device = PreparedDevice(("gpu",), NODE, "gpu-2", (), gpu_2, timeslice="Short")
    checkpoint.save(node.checkpoint, checkpoint.Checkpoint(
        boot_id=node.boot_id.read_text().strip(),
        claims={half.uid: ClaimRecord(half.uid, half.namespace, half.name, "PrepareStarted",
                                      (device,))}))
    running = start()
    assert node.records() == {}
    assert sorted(os.listdir(node.cdi_root)) == ["nvidia.com-gpu.yaml"]
    assert running.provider.nvml.timeslices == {gpu_2: 0}  # the half-done time slice undone


def test_after_a_reboot_every_preparation_is_void(node: Node, start: Start) -> None:
    claim = make_claim(node.local, [result("gpu-0")])
    first = start()
    first.kubelet.prepare([claim])
    first.stop()
    node.boot_id.write_text(new_uid())
    second = start()
    assert node.records() == {} and cdi_specs(node.cdi_root) == {}
    assert second.kubelet.prepare([claim])[claim.uid].error == ""


def test_a_lost_spec_of_a_prepared_claim_is_written_again(node: Node, start: Start) -> None:
    claim = make_claim(node.local, [result("gpu-0")])
    first = start()
    first.kubelet.prepare([claim])
    spec = cdi_specs(node.cdi_root)[claim.uid]
    first.stop()
    (node.cdi_root / cdi.spec_file_name(DRIVER, claim.uid)).unlink()
    start()
    assert cdi_specs(node.cdi_root)[claim.uid] == spec


def test_a_damaged_checkpoint_stops_the_start_with_its_name(node: Node, start: Start) -> None:
    node.plugin_dir.mkdir()
    node.checkpoint.write_text(json.dumps({"claims": {new_uid(): {"state": "Done"}}}))
    with pytest.raises(CheckpointError, match=str(node.checkpoint)):
        start()


def test_a_call_waiting_for_a_busy_claim_answers_before_its_deadline(
        node: Node, start: Start) -> None:
    source = BlockingClaims(node.local)
    running = start(claims=source)
    claim = make_claim(node.local, [result("gpu-0")])
    request = dra_v1.NodePrepareResourcesRequest(claims=[
        dra_v1.Claim(namespace=claim.namespace, name=claim.name, uid=claim.uid)])
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(running.kubelet.prepare, [claim])
        assert source.reading.wait(10)
        # the kubelet gives 45 s; with 5 s the plugin must answer in time, not time out
        second = running.kubelet.v1.NodePrepareResources(request, timeout=5)
        assert second.claims[claim.uid].error == "another call is working on this claim"
        source.release.set()
        assert first.result(10)[claim.uid].error == ""


def test_a_refused_registration_is_logged_and_the_plugin_keeps_serving(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    running = start()
    stub = reg_v1_grpc.RegistrationStub(running.kubelet.reg_channel)
    stub.NotifyRegistrationStatus(reg_v1.RegistrationStatus(
        plugin_registered=False, error="no handler registered for plugin type: DRAPlugin"),
        timeout=5)
    assert "the kubelet refused the plugin: no handler registered" in caplog.text
    assert running.kubelet.get_info().name == DRIVER
    stub.NotifyRegistrationStatus(reg_v1.RegistrationStatus(plugin_registered=True), timeout=5)
    assert running.plugin.servers.registration.registered.is_set()
