"""A rolling update with maxSurge: the old and the new plugin pod on one node at once, as
two real processes on the same directories, each with its pod UID. Both serve on their own
sockets; prepare and unprepare through either never double-book a device, and each sees
what the other did; SIGTERM of the old pod leaves the new pod's sockets and the slices. The
node lock is fair: a busy pod cannot keep the other out. A killed pod's sockets are removed
by the next start."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from driver.nvml.mock import mock_provider
from driver.plugin import cdi, checkpoint
from driver.plugin.checkpoint import Checkpoint, ClaimRecord, MigInstance, PreparedDevice
from driver.plugin.claims import ClaimRef, DirClaimSource
from driver.plugin.mig import MigManager
from driver.plugin.nodelock import LOCK_FILE, WANT_SUFFIX, NodeLock
from tests.support.forkserver import ForkServer
from tests.support.plugin import (
    DRIVER,
    NODE,
    Claim,
    Daemon,
    Node,
    Start,
    cdi_specs,
    live_mig,
    make_claim,
    mig_profile,
    new_uid,
    result,
)

GPU0 = "GPU-38ab404c-3055-5622-b266-e2d6fb39931a"  # h100-80gb-hbm3 GPU 0
PROFILE_2G = 14  # H100 GPU-instance profile id of 2g.20gb


def pod(node: Node, forks: ForkServer, name: str, *extra: str, profile: str = "l4-8x"
        ) -> Daemon:
    return Daemon(node, node.cli_args(profile, *extra), forks, pod_uid=new_uid(),
                  log_name=f"{name}.log")


def prepared(node: Node) -> set[str]:
    loaded = checkpoint.load(node.checkpoint)
    assert loaded is not None
    return {uid for uid, r in loaded.claims.items() if r.state == "PrepareCompleted"}


def test_two_pods_serve_side_by_side_on_sockets_named_after_their_uids(
        node: Node, forks: ForkServer) -> None:
    old = pod(node, forks, "old")
    new = pod(node, forks, "new")
    try:
        for daemon in (old, new):
            uid = daemon.dra_socket.name.removeprefix("dra-").removesuffix(".sock")
            assert daemon.registration_socket.name == f"{DRIVER}-{uid}-reg.sock"
            assert daemon.kubelet.get_info().endpoint == str(daemon.dra_socket)
        assert not node.registration_socket.exists() and not node.dra_socket.exists()
        first = make_claim(node.local, [result("gpu-1")])
        second = make_claim(node.local, [result("gpu-2")])
        assert old.kubelet.prepare([first])[first.uid].error == ""
        assert new.kubelet.prepare([second])[second.uid].error == ""
        assert prepared(node) == {first.uid, second.uid}
    finally:
        old.stop()
        new.stop()


def test_concurrent_prepares_through_both_pods_never_double_book(
        node: Node, forks: ForkServer) -> None:
    args = ("--mig-mode", "dynamic", "--mock-state", str(node.mig_state))
    profile = str(mig_profile(node.root / "mig.yaml", base="h100-80gb-hbm3", gpus=(0,)))
    old = pod(node, forks, "old", *args, profile=profile)
    new = pod(node, forks, "new", *args, profile=profile)
    try:
        # each device asked by two claims, one through each pod; the 1g devices at 0-3
        # overlap the 4g at 0, the 3g at 4 stands alone
        devices = ["gpu-0-mig-1g10gb-0", "gpu-0-mig-1g10gb-3", "gpu-0-mig-4g40gb-0",
                   "gpu-0-mig-3g40gb-4"]
        pairs = [(make_claim(node.local, [result(d)]), make_claim(node.local, [result(d)]))
                 for d in devices]
        calls = [(daemon, claim) for a, b in pairs for daemon, claim in ((old, a), (new, b))]
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda c: c[0].kubelet.prepare([c[1]])[c[1].uid], calls))
        won = {claim.uid for (_, claim), answer in zip(calls, answers, strict=True)
               if answer.error == ""}
        for a, b in pairs:
            assert len(won & {a.uid, b.uid}) <= 1
        assert prepared(node) == won and set(cdi_specs(node.cdi_root)) == won
        assert pairs[3][0].uid in won or pairs[3][1].uid in won  # nothing overlaps it
        placements = {"gpu-0-mig-1g10gb-0": (19, 0), "gpu-0-mig-1g10gb-3": (19, 3),
                      "gpu-0-mig-4g40gb-0": (5, 0), "gpu-0-mig-3g40gb-4": (9, 4)}
        winners = [devices[i] for i, (a, b) in enumerate(pairs) if {a.uid, b.uid} & won]
        assert sorted(live_mig(node.mig_state)[GPU0]) == sorted(
            (*placements[d], 1) for d in winners)
        for daemon, claim in calls:
            if claim.uid in won:  # unprepared through the other pod
                other = new if daemon is old else old
                assert other.kubelet.unprepare([claim]) == {claim.uid: ""}
        assert prepared(node) == set() and live_mig(node.mig_state) == {}
    finally:
        old.stop()
        new.stop()


def test_a_claim_prepared_through_one_pod_is_seen_through_the_other(
        node: Node, forks: ForkServer) -> None:
    old = pod(node, forks, "old")
    new = pod(node, forks, "new")
    try:
        claim = make_claim(node.local, [result("gpu-5")])
        answer = old.kubelet.prepare([claim])
        assert answer[claim.uid].error == ""
        assert new.kubelet.prepare([claim]) == answer  # idempotent, from the checkpoint
        rival = make_claim(node.local, [result("gpu-5")])
        assert f"gpu-5 is taken by ResourceClaim ns/{claim.name} ({claim.uid})" in \
            new.kubelet.prepare([rival])[rival.uid].error
        assert new.kubelet.unprepare([claim]) == {claim.uid: ""}
        assert old.kubelet.prepare([rival])[rival.uid].error == ""  # the old pod saw it go
        assert prepared(node) == {rival.uid} and set(cdi_specs(node.cdi_root)) == {rival.uid}
    finally:
        old.stop()
        new.stop()


def test_sigterm_of_the_old_pod_leaves_the_new_pods_sockets_and_the_slices(
        node: Node, forks: ForkServer) -> None:
    old = pod(node, forks, "old")
    slices = {p.name: (p.stat().st_mtime_ns, p.read_text())
              for p in (node.local / "resourceslices").iterdir()}
    new = pod(node, forks, "new")
    try:
        after = {p.name: (p.stat().st_mtime_ns, p.read_text())
                 for p in (node.local / "resourceslices").iterdir()}
        assert after == slices  # the new pod found nothing to write
        assert old.stop() == 0
        assert not old.registration_socket.exists() and not old.dra_socket.exists()
        assert new.registration_socket.exists() and new.dra_socket.exists()
        assert {p.name: (p.stat().st_mtime_ns, p.read_text())
                for p in (node.local / "resourceslices").iterdir()} == slices
        claim = make_claim(node.local, [result("gpu-0")])
        assert new.kubelet.prepare([claim])[claim.uid].error == ""
    finally:
        new.stop()


def test_a_call_waits_for_the_other_pod_and_answers_busy_at_its_deadline(
        node: Node, start: Start) -> None:
    running = start(pod_uid=new_uid())
    claim = make_claim(node.local, [result("gpu-3")])
    lock = node.plugin_dir / LOCK_FILE
    with open(lock, "a") as held:  # the other pod, in the middle of a call
        fcntl.flock(held, fcntl.LOCK_EX)
        outcome = running.plugin.state.prepare([_ref(claim)], time.monotonic() + 0.5)
    assert outcome[claim.uid].reason == "busy"
    assert str(lock) in (outcome[claim.uid].error or "")
    assert cdi_specs(node.cdi_root) == {} and running.plugin.state.records == {}
    assert running.kubelet.prepare([claim])[claim.uid].error == ""  # once it is free


def test_a_claim_the_other_pod_left_half_done_is_rolled_back_and_prepared(
        node: Node, start: Start) -> None:
    profile = str(mig_profile(node.root / "mig.yaml", base="h100-80gb-hbm3", gpus=(0,)))
    running = start(profile, mock_state=node.mig_state, mig_mode="dynamic", pod_uid=new_uid())
    claim = make_claim(node.local, [result("gpu-0-mig-2g20gb-2")])
    # the other pod died in the middle of preparing it: its record and its MIG device stay
    gpu = running.plugin.state.published.inventory.gpus[0]
    two = next(p for p in gpu.mig_profiles if p.id == PROFILE_2G)
    placement = next(p for p in two.placements if p.start == 2)
    outside = mock_provider(profile, node.mig_state)
    outside.nvml.nvmlInit()
    MigManager(outside).create(gpu, two, placement)
    device = PreparedDevice(("gpu",), NODE, "gpu-0-mig-2g20gb-2", (), GPU0,
                            created_mig=MigInstance(PROFILE_2G, 2, 2))
    with open(node.plugin_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        checkpoint.save(node.checkpoint, Checkpoint(node.boot_id.read_text().strip(), {
            claim.uid: ClaimRecord(claim.uid, claim.namespace, claim.name, "PrepareStarted",
                                   (device,))}))
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    assert prepared(node) == {claim.uid}
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_2G, 2, 1)]}
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert live_mig(node.mig_state) == {} and cdi_specs(node.cdi_root) == {}


def _ref(claim: Claim) -> ClaimRef:
    return ClaimRef(claim.namespace, claim.name, claim.uid)


def test_a_checkpoint_the_other_pod_damaged_fails_the_call_not_the_plugin(
        node: Node, start: Start) -> None:
    running = start(pod_uid=new_uid())
    claim = make_claim(node.local, [result("gpu-4")])
    node.checkpoint.write_text("{not json")  # a new file: this pod must read it again
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert error.startswith(f"checkpoint {node.checkpoint}: line 1: not JSON")
    assert running.kubelet.get_info().name == DRIVER
    assert cdi_specs(node.cdi_root) == {}


OTHER_POD = """
import sys, time
from pathlib import Path
from driver.plugin.nodelock import NodeLock
lock = NodeLock(Path(sys.argv[1]), lambda: None)
print("waiting", flush=True)
with lock.hold(time.monotonic() + 60):
    print("in", flush=True)
"""


def test_a_busy_pod_whose_calls_always_overlap_does_not_keep_the_other_out(
        node: Node) -> None:
    """Pod A's calls overlap without a gap: each holds the lock until the next one is in
    (or, after a patient wait, could not join). Pod B, a second process, must get the lock
    while A still has calls coming, and A goes on afterwards."""
    node.plugin_dir.mkdir(parents=True)
    path = node.plugin_dir / LOCK_FILE
    lock = NodeLock(path, lambda: None)
    relays, after_b = 100, 5

    def call(entered: threading.Event, leave: threading.Event) -> None:
        with lock.hold(time.monotonic() + 60):
            entered.set()
            leave.wait(60)

    def started() -> tuple[threading.Event, threading.Event]:
        entered, leave = threading.Event(), threading.Event()
        threading.Thread(target=call, args=(entered, leave), daemon=True).start()
        return entered, leave

    entered, leave = started()
    assert entered.wait(60)
    other = subprocess.Popen([sys.executable, "-c", OTHER_POD, str(path)],
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout is not None
    assert other.stdout.readline() == "waiting\n"
    got_in = threading.Event()
    threading.Thread(target=lambda: other.stdout.readline() == "in\n" and got_in.set(),
                     daemon=True).start()
    done_when_b_got_in: int | None = None
    for i in range(relays):
        if got_in.is_set() and done_when_b_got_in is None:
            done_when_b_got_in = i
        if done_when_b_got_in is not None and i >= done_when_b_got_in + after_b:
            break
        following, next_leave = started()
        following.wait(2.0)  # joined; or it waits for pod B (no timing is asserted)
        leave.set()
        assert following.wait(60), "pod A's next call never got the lock"
        leave = next_leave
    leave.set()
    assert other.wait(60) == 0
    assert done_when_b_got_in is not None, f"pod B got the lock only after A's {relays} calls"
    assert done_when_b_got_in < relays - after_b


class FetchSeesTheLock:
    """A claim source that records, per fetch, whether the node lock was free then. The
    plugin fetches a batch's claims in parallel: one probe at a time, or two probes would
    see each other's flock."""

    def __init__(self, local: Path, lock: Path) -> None:
        self.source = DirClaimSource(local)
        self.lock = lock
        self.free: list[bool] = []
        self._probing = threading.Lock()

    def get(self, ref: ClaimRef) -> dict[str, Any]:
        with self._probing, open(self.lock, "a") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.free.append(True)
            except BlockingIOError:
                self.free.append(False)
        return self.source.get(ref)


def test_claims_are_fetched_before_the_node_lock_is_taken(node: Node, start: Start) -> None:
    source = FetchSeesTheLock(node.local, node.plugin_dir / LOCK_FILE)
    running = start(claims=source, pod_uid=new_uid())
    claims = [make_claim(node.local, [result(f"gpu-{i}")]) for i in range(3)]
    assert all(a.error == "" for a in running.kubelet.prepare(claims).values())
    assert source.free == [True] * 3
    assert running.kubelet.prepare(claims)[claims[0].uid].error == ""  # from the checkpoint
    assert source.free == [True] * 3


def test_a_call_with_no_claim_left_does_not_take_the_node_lock(node: Node,
                                                                start: Start) -> None:
    running = start(pod_uid=new_uid())
    lock = node.plugin_dir / LOCK_FILE
    lock.unlink()
    Path(f"{lock}{WANT_SUFFIX}").unlink(missing_ok=True)
    bad = Claim("ns", "bad", "not-a-uid")
    twice = make_claim(node.local, [result("gpu-0")])
    answers = running.kubelet.prepare([bad, twice, twice])
    assert answers[bad.uid].error and answers[twice.uid].error
    assert running.kubelet.unprepare([bad])[bad.uid]
    assert not lock.exists() and not Path(f"{lock}{WANT_SUFFIX}").exists()
    assert running.kubelet.prepare([twice])[twice.uid].error == ""
    assert lock.exists()


def test_a_lock_file_that_cannot_be_opened_fails_each_claim_as_internal(
        node: Node, start: Start) -> None:
    running = start(pod_uid=new_uid())
    lock = node.plugin_dir / LOCK_FILE
    lock.unlink()
    lock.mkdir()  # open(O_RDWR) fails: EISDIR
    claims = [make_claim(node.local, [result(f"gpu-{i}")]) for i in range(2)]
    outcomes = running.plugin.state.prepare([_ref(c) for c in claims], time.monotonic() + 30)
    for claim in claims:
        assert outcomes[claim.uid].reason == "internal"
        assert f"cannot open {lock}: " in (outcomes[claim.uid].error or "")
    assert running.kubelet.unprepare(claims)[claims[0].uid].startswith(f"cannot open {lock}")
    lock.rmdir()
    assert running.kubelet.prepare(claims)[claims[1].uid].error == ""


def test_a_checkpoint_that_is_not_text_fails_each_claim_as_internal(
        node: Node, start: Start) -> None:
    running = start(pod_uid=new_uid())
    claim = make_claim(node.local, [result("gpu-4")])
    node.checkpoint.write_bytes(b"\xff\xfe\x00{")  # another process's damage
    outcome = running.plugin.state.prepare([_ref(claim)], time.monotonic() + 30)[claim.uid]
    assert outcome.reason == "internal"
    assert (outcome.error or "").startswith(f"checkpoint {node.checkpoint}: cannot read it")
    assert running.kubelet.prepare([claim])[claim.uid].error.startswith(
        f"checkpoint {node.checkpoint}")
    assert running.kubelet.get_info().name == DRIVER


def test_a_checkpoint_rewritten_to_the_same_size_and_time_is_read_again(
        node: Node, start: Start) -> None:
    """The other pod, holding the node lock, replaced claim X by claim Y on gpu-1; the file
    keeps its inode, size and mtime (an A/B/A those cannot tell)."""
    running = start(pod_uid=new_uid())
    x = make_claim(node.local, [result("gpu-1")])
    y = make_claim(node.local, [result("gpu-1")])
    assert running.kubelet.prepare([x])[x.uid].error == ""
    (node.cdi_root / cdi.spec_file_name(DRIVER, x.uid)).unlink()
    with NodeLock(node.plugin_dir / LOCK_FILE, lambda: None).hold(time.monotonic() + 30):
        before = os.stat(node.checkpoint)  # written whole by the pod as it let the lock go
        text = node.checkpoint.read_text().replace(x.uid, y.uid).replace(x.name, y.name)
        with open(node.checkpoint, "r+") as out:
            out.write(text)
            out.truncate()
        os.utime(node.checkpoint, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(node.checkpoint)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
            (before.st_ino, before.st_size, before.st_mtime_ns)
    assert running.kubelet.prepare([y])[y.uid].error == ""  # prepared, by the other pod
    assert set(running.plugin.state.records) == {y.uid}
    assert set(cdi_specs(node.cdi_root)) == {y.uid}


def test_a_start_removes_the_sockets_a_killed_pod_left(node: Node, forks: ForkServer
                                                        ) -> None:
    live = pod(node, forks, "live")
    killed_uid = new_uid()
    dead = [node.registry / f"{DRIVER}-{killed_uid}-reg.sock",
            node.plugin_dir / f"dra-{killed_uid}.sock"]
    for path in dead:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))  # and the process is gone: nothing listens
    new = pod(node, forks, "new")
    try:
        assert not any(path.exists() for path in dead)
        for daemon in (live, new):
            assert daemon.registration_socket.exists() and daemon.dra_socket.exists()
            assert daemon.kubelet.get_info().name == DRIVER
    finally:
        live.stop()
        new.stop()
