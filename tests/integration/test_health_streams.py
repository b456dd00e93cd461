"""Health streams never take the threads of prepare and unprepare: the kubelet dials one DRA
socket for both, so the streams open at once are capped (the next refused with
RESOURCE_EXHAUSTED) and PREPARE_WORKERS prepares still run side by side, the probe's call
too; a cancelled stream frees its slot and thread at once, not after the next resend."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as Pending
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
from driver.plugin.claims import ClaimRef, DirClaimSource
from driver.plugin.servers import HEALTH_STREAMS, PREPARE_WORKERS
from tests.support.plugin import Node, Running, Start, make_claim, result

FIRST_REPORT = 5.0  # a stream that has sent no report by then waits for a server thread


class SideBySide(DirClaimSource):
    """Claims that arrive only once `parties` calls read one at the same time: the calls
    ran side by side, each on its own server thread."""

    def __init__(self, root: Path, parties: int) -> None:
        super().__init__(root)
        self.barrier = threading.Barrier(parties, timeout=10)

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        self.barrier.wait()
        return super().get(ref)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(64) as executor:
        yield executor


def open_streams(running: Running, count: int, pool: ThreadPoolExecutor
                 ) -> tuple[list[Any], list[str]]:
    """`count` NodeWatchResources calls, v1 and v1alpha1 in turn, and what each got within
    FIRST_REPORT: "open" (a report), "pending" (nothing yet) or the status it ended with."""
    stubs = [(health_v1_grpc.DRAResourceHealthStub(running.kubelet.dra_channel), health_v1),
             (health_v1alpha1_grpc.DRAResourceHealthStub(running.kubelet.dra_channel),
              health_v1alpha1)]
    calls = [stub.NodeWatchResources(pb.NodeWatchResourcesRequest(), timeout=60)
             for stub, pb in (stubs[i % 2] for i in range(count))]
    firsts = [pool.submit(next, call) for call in calls]
    deadline = time.monotonic() + FIRST_REPORT
    outcomes = []
    for first in firsts:
        try:
            first.result(max(0.0, deadline - time.monotonic()))
            outcomes.append("open")
        except Pending:
            outcomes.append("pending")
        except grpc.RpcError as err:
            outcomes.append(err.code().name)
    return calls, outcomes


def test_streams_past_the_cap_are_refused_and_every_prepare_worker_stays_free(
        node: Node, start: Start, pool: ThreadPoolExecutor) -> None:
    source = SideBySide(node.local, PREPARE_WORKERS)
    running = start(claims=source, health_port=0)
    calls, outcomes = open_streams(running, 2 * PREPARE_WORKERS, pool)
    try:
        claims = [make_claim(node.local, [result(f"gpu-{i % 8}")])
                  for i in range(PREPARE_WORKERS)]
        started = time.monotonic()
        answers = list(pool.map(lambda c: running.kubelet.v1.NodePrepareResources(
            dra_v1.NodePrepareResourcesRequest(claims=[dra_v1.Claim(
                namespace=c.namespace, name=c.name, uid=c.uid)]), timeout=15), claims))
        assert time.monotonic() - started < 10 and not source.barrier.broken
        assert all(c.uid in a.claims for c, a in zip(claims, answers, strict=True))
        with grpc.insecure_channel(f"127.0.0.1:{running.plugin.probe_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert sorted(outcomes) == sorted(["open"] * HEALTH_STREAMS + ["RESOURCE_EXHAUSTED"] * (
            2 * PREPARE_WORKERS - HEALTH_STREAMS))
    finally:
        for call in calls:
            call.cancel()


def test_a_cancelled_stream_frees_its_slot_at_once_and_stop_ends_the_open_ones(
        start: Start, pool: ThreadPoolExecutor) -> None:
    running = start()
    first, outcomes = open_streams(running, HEALTH_STREAMS, pool)
    assert outcomes == ["open"] * HEALTH_STREAMS
    for call in first:
        call.cancel()
    cancelled = time.monotonic()
    again: list[Any] = []
    while len(again) < HEALTH_STREAMS and time.monotonic() - cancelled < 1.0:
        calls, outcomes = open_streams(running, 1, pool)
        if outcomes == ["open"]:
            again += calls
    assert len(again) == HEALTH_STREAMS, "cancelled streams still hold their slots after 1 s"
    assert open_streams(running, 1, pool)[1] == ["RESOURCE_EXHAUSTED"]
    stopping = time.monotonic()
    running.plugin.stop(30.0)
    assert time.monotonic() - stopping < 5  # the open streams do not hold it for its grace
    for call in again:
        with contextlib.suppress(grpc.RpcError):
            for _ in call:  # the stream ends
                pass
    running.stopped = True
    running.kubelet.close()
