"""The standing fault campaign (issue 12): rounds of prepare and unprepare, each under one
fault drawn at random from a fixed seed, until a time budget is spent; after each round the
node's invariants, read from the node itself (checkpoint, CDI specs, the mock's MIG state):

- no device held by two claims: no two records hold one GPU, one static MIG device or
  overlapping MIG placements (adminAccess is exempt);
- no live MIG device that no record explains (dynamic MIG);
- no prepared record without its live MIG devices and its CDI spec (naming its devices);
- every claim the kubelet was told is prepared stays prepared until the test unprepares it,
  and was told its devices under the requests that asked for them;
- no temp file left, no CDI spec without a record;
- a plugin sent SIGTERM exits 0 within 30 s; a second plugin, or a start on a damaged
  checkpoint, refuses (exit 2, one line naming what) and touches nothing.

A round draws the machine (static MIG mode on a non-MIG or a static-MIG profile, dynamic on
a MIG-enabled H100 or DGX H100; the node is drained before it changes), the call (prepare a
batch of claims of whole GPUs and MIG devices, some overlapping each other or what is held;
or unprepare some prepared claims) and the fault:
- sigkill: SIGKILL of the plugin at a random point of the call;
- nvml: an NVML failure at one MIG step (create GI, create CI, destroy CI, destroy GI, MIG
  mode; with create CI, sometimes destroy GI too: the rollback fails) on a GPU of the call;
  the mock reads faults from its profile, so the plugin runs the call restarted with them;
- disk-full, read-only: the plugin data dir or the CDI dir (a small tmpfs each) full or
  read-only from before the call or from a random point of it;
- lost-checkpoint: the plugin killed during the call or stopped after it, and its checkpoint
  moved away or its data dir emptied before the next start;
- damaged-checkpoint: the same, the checkpoint damaged instead: the start must refuse in one
  line and touch nothing; then the file is restored, or given up (removed);
- second-plugin: a second plugin started on the same sockets during the call must refuse.
A plugin killed or stopped is started again, without faults (it recovers at start); after
the check, the kubelet's retries settle what was left unanswered (prepare again, or
unprepare, which must succeed).

FAULT_SEED sets the seed (default SEED) and FAULT_CAMPAIGN_SECONDS the budget (default 60;
docs/benchmarks.md has a longer run). The seed fixes the draws, not where a kill lands: a
failure names its seed, its round and the rounds before it. The disk faults mount a tmpfs;
where this process may not (not root), they are not drawn and the summary says so.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver.plugin import cdi, checkpoint
from driver.plugin.checkpoint import ClaimRecord, PreparedDevice
from driver.plugin.evidence import is_rebuilt
from tests.support.disks import FILLER, can_mount, fill, leftovers, remount, tmpfs
from tests.support.forkserver import ForkServer
from tests.support.plugin import (
    Claim,
    Daemon,
    Node,
    cdi_problems,
    cdi_specs,
    inode,
    live_mig,
    make_claim,
    mig_profile,
    result,
)

SEED = 1206
BUDGET_S = 60.0
SWITCH = 0.15  # the chance that a round changes the machine
MAX_HELD = 8  # prepared claims from which a round unprepares
METHODS = {"prepare": "NodePrepareResources", "unprepare": "NodeUnprepareResources"}
MIG_STEPS = {"create GI": "nvmlDeviceCreateGpuInstanceWithPlacement",
             "create CI": "nvmlGpuInstanceCreateComputeInstance",
             "destroy CI": "nvmlComputeInstanceDestroy",
             "destroy GI": "nvmlGpuInstanceDestroy",
             "MIG mode": "nvmlDeviceSetMigMode"}
NVML_CODES = ("UNKNOWN", "IN_USE", "INSUFFICIENT_RESOURCES", "NO_PERMISSION")
DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[:len(data) // 2],
    "not JSON": lambda data: b"\x00\x13" + data[:7],
    "wrong shape": lambda data: b'{"claims": []}',
    "empty": lambda data: b"",
}


@dataclass(frozen=True)
class Machine:
    """A mock machine and the plugin's MIG mode on it (dynamic: MIG on at first for some)."""

    base: str
    dynamic: bool
    mig_gpus: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{self.base} {'dynamic' if self.dynamic else 'static'}"


MACHINES = (Machine("l4-8x", False), Machine("a100-mig", False),
            Machine("h100-80gb-hbm3", True, (0,)), Machine("dgx-h100", True, (0, 1)))


def footprint(device: PreparedDevice) -> tuple[str, int, int]:
    """What an exclusive device takes: slices [lo, hi) of its GPU, or a static MIG device."""
    if device.created_mig is not None:
        mig = device.created_mig
        return device.gpu_uuid, mig.start, mig.start + mig.size
    if "-mig-" in device.device:
        return device.device, 0, 1
    return device.gpu_uuid, 0, 1 << 16


def answers(future: Any) -> dict[str, Any]:
    """A call's answers by claim UID (`error` "" when done); none when it was cut off."""
    if future.exception(timeout=60) is not None:
        return {}
    return dict(future.result().claims)


def exited(code: int | None) -> str:
    return "it kept running (no refusal)" if code is None else f"it exited {code}, not 2"


def last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


class Campaign:
    """The plugin, the model of what the kubelet was told, the draws and the tallies."""

    def __init__(self, node: Node, forks: ForkServer, seed: int, disk_faults: bool) -> None:
        self.node, self.forks, self.seed = node, forks, seed
        self.rng = random.Random(seed)
        self.disk_faults = disk_faults
        self.machine = MACHINES[0]
        self.daemon: Daemon | None = None
        self.devices: list[str] = []
        self.acked: dict[str, Claim] = {}  # answered prepared
        self.pending: dict[str, Claim] = {}  # prepare asked, not answered prepared
        self.leaving: dict[str, Claim] = {}  # unprepare asked, not answered done
        self.held: dict[str, list[str]] = {}  # the devices of each claim asked for
        self.asked: dict[str, str] = {}  # and what its results asked, for the trail
        self.admin: set[tuple[str, str]] = set()  # (claim UID, device) asked with adminAccess
        self.took: dict[str, deque[float]] = {op: deque([0.05], maxlen=8) for op in METHODS}
        self.faults: Counter[str] = Counter()
        self.details: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.stats: Counter[str] = Counter()
        self.trail: deque[str] = deque(maxlen=6)
        self.valid_specs: set[str] = set()
        self.round = 0

    # -- the plugin --------------------------------------------------------------------

    @property
    def plugin(self) -> Daemon:
        assert self.daemon is not None, "the plugin is not running"
        return self.daemon

    def args(self, faults: dict[int, dict[str, str]] | None = None) -> list[str]:
        m = self.machine
        if not m.dynamic:
            return self.node.cli_args(m.base, "--mig-mode", "static")
        profile = mig_profile(self.node.root / ("faulty.yaml" if faults else "machine.yaml"),
                              m.base, m.mig_gpus, faults)
        return self.node.cli_args(str(profile), "--mig-mode", "dynamic",
                                  "--mock-state", str(self.node.mig_state))

    def start(self, faults: dict[int, dict[str, str]] | None = None) -> None:
        self.daemon = Daemon(self.node, self.args(faults), self.forks)
        self.stats["starts"] += 1

    def stop(self, sig: int) -> None:
        daemon, self.daemon = self.plugin, None
        try:
            code = daemon.stop(sig)
        except TimeoutError as err:  # killed
            raise AssertionError(self.failure(f"{signal.Signals(sig).name}: {err}")) from None
        if code != (0 if sig == signal.SIGTERM else -sig):
            raise AssertionError(self.failure(f"the plugin exited {code} on "
                                              f"{signal.Signals(sig).name}"))

    def close(self) -> None:
        if self.daemon is not None:
            self.stop(signal.SIGKILL)

    def forked(self, log: Path) -> int | None:
        """`gpu-dra plugin` as the plugin runs, forked alone; its exit code, None if it
        still ran 30 s on (it is killed)."""
        log.write_bytes(b"")
        try:
            return self.forks.wait(self.forks.run(self.args(), log), 30)
        except TimeoutError:
            return None

    # -- calls and the kubelet's model ---------------------------------------------------

    def call(self, op: str, claims: list[Claim],
             during: Callable[[Any], None] | None = None) -> dict[str, str]:
        """Make the call, running `during(future)` at a random point of it; note the answers
        (the errors by claim UID, "" when done); a claim answered prepared must be told
        its devices under the requests that asked for them."""
        began = time.monotonic()
        future = self.plugin.kubelet.send(METHODS[op], claims)
        if during is not None:
            time.sleep(self.rng.uniform(0, 1.5 * max(self.took[op])))
            during(future)
        entries = answers(future)
        if during is None and entries:
            self.took[op].append(time.monotonic() - began)
        got = {uid: entry.error for uid, entry in entries.items()}
        wrong = self.misreported(entries) if op == "prepare" else {}
        if wrong:
            raise AssertionError(self.failure(f"claims answered prepared with other devices "
                                              f"or requests than asked: {wrong}"))
        for claim in claims:
            uid, error = claim.uid, got.get(claim.uid)  # None: cut off
            for model in (self.acked, self.pending, self.leaving):
                model.pop(uid, None)
            outcome = "done" if error == "" else "cut off" if error is None else "failed"
            self.stats[f"{op} {outcome}"] += 1
            if op == "prepare":
                (self.acked if error == "" else self.pending)[uid] = claim
            elif error == "":
                del self.held[uid], self.asked[uid]
                self.admin = {(u, d) for u, d in self.admin if u != uid}
            else:
                self.leaving[uid] = claim
        return got

    def misreported(self, entries: dict[str, Any]) -> dict[str, set[tuple[str, tuple[str, ...]]]]:
        """The claims answered prepared with other devices or requests than they asked for:
        what each was told (device, request names)."""
        wrong = {}
        for uid, entry in entries.items():
            told = {(d.device_name, tuple(d.request_names)) for d in entry.devices}
            if entry.error == "" and \
                    told != {(name, (f"r{i}",)) for i, name in enumerate(self.held[uid])}:
                wrong[uid] = told
        return wrong

    def batch(self) -> list[Claim]:
        """1-3 new claims of 1-2 devices each (whole GPUs about a third of the time); a
        tenth of the devices are taken from what is held or asked for already."""
        wholes = [d for d in self.devices if "-mig-" not in d]
        migs = [d for d in self.devices if "-mig-" in d]
        used = [d for uid in self.acked for d in self.held[uid]]
        claims = []
        for _ in range(self.rng.randint(1, 3)):
            names: list[str] = []
            for _ in range(self.rng.randint(1, 2)):
                if used and self.rng.random() < 0.1:
                    name = self.rng.choice(used)
                else:
                    whole = not migs or (bool(wholes) and self.rng.random() < 0.35)
                    name = self.rng.choice(wholes if whole else migs)
                if name not in names:
                    names.append(name)
            admin = ["-mig-" not in name and self.rng.random() < 0.1 for name in names]
            claim = make_claim(self.node.local, [
                result(name, request=f"r{i}", admin=admin[i]) for i, name in enumerate(names)])
            self.held[claim.uid] = names
            self.admin |= {(claim.uid, name) for i, name in enumerate(names) if admin[i]}
            self.asked[claim.uid] = " ".join(f"{name}{' (admin)' if admin[i] else ''}"
                                             for i, name in enumerate(names))
            used += names
            claims.append(claim)
        return claims

    def settle(self) -> None:
        """The kubelet's retries, with no fault: a prepare not answered done is asked again
        (or given up), then every claim given up or leaving is unprepared, which must work."""
        retry = [claim for claim in self.pending.values() if self.rng.random() < 0.7]
        if retry:
            self.call("prepare", retry)
        self.unprepare([*self.pending.values(), *self.leaving.values()], "with no fault")

    def drain(self) -> None:
        """Unprepare every claim (it must work); the node must hold nothing after."""
        self.unprepare([*self.acked.values(), *self.pending.values(), *self.leaving.values()],
                       "to drain the node")
        records, specs, live = self.read()
        if records or specs or live:
            raise AssertionError(self.failure(f"drained, the node still holds records "
                                              f"{sorted(records)}, specs {sorted(specs)}, "
                                              f"MIG devices {live}"))

    def unprepare(self, claims: list[Claim], why: str) -> None:
        """Unprepare the claims; each must be answered done."""
        if claims:
            got = self.call("unprepare", claims)
            failed = {c.uid: got.get(c.uid, "(no answer)") for c in claims
                      if got.get(c.uid) != ""}
            if failed:
                raise AssertionError(self.failure(f"unprepare {why} failed: {failed}"))

    def switch(self, machine: Machine) -> None:
        """Drain the node and stop the plugin, then start it on `machine`."""
        if self.daemon is not None:
            self.drain()
            self.stop(signal.SIGTERM)
        self.node.mig_state.unlink(missing_ok=True)  # the last machine's
        self.machine = machine
        self.start()
        self.devices = sorted(d["name"] for s in self.node.slices()
                              for d in s["spec"].get("devices", []))

    # -- a round -----------------------------------------------------------------------

    def play(self) -> None:
        self.round += 1
        if self.daemon is None or self.rng.random() < SWITCH:
            self.switch(self.rng.choice(MACHINES))
        kinds = ["damaged-checkpoint", "lost-checkpoint", "second-plugin", "sigkill"]
        kinds += ["nvml"] if self.machine.dynamic else []
        kinds += ["disk-full", "read-only"] if self.disk_faults else []
        kind = self.rng.choice(kinds)
        if self.acked and (len(self.acked) >= MAX_HELD or self.rng.random() < 0.4):
            op = "unprepare"
            claims = self.rng.sample(list(self.acked.values()),
                                     self.rng.randint(1, min(3, len(self.acked))))
        else:
            op, claims = "prepare", self.batch()
        self.trail.append(f"round {self.round}: {kind} on {self.machine}, {op} "
                          + ", ".join(f"{c.uid[:8]} [{self.asked[c.uid]}]" for c in claims))
        self.faults[kind] += 1
        getattr(self, kind.replace("-", "_"))(op, claims)
        self.check()
        self.settle()

    def tally(self, kind: str, *details: str) -> None:
        """Count the round's fault by each of its details (what, when, how)."""
        self.details[kind].update(details)
        self.trail[-1] += f" ({', '.join(details)})"

    def sigkill(self, op: str, claims: list[Claim]) -> None:
        self.tally("sigkill", op)
        self.call(op, claims, during=lambda _: self.stop(signal.SIGKILL))
        self.start()

    def nvml(self, op: str, claims: list[Claim]) -> None:
        step = self.rng.choice(sorted(MIG_STEPS))
        faults = {MIG_STEPS[step]: self.rng.choice(NVML_CODES)}
        if step == "create CI" and self.rng.random() < 0.5:
            faults[MIG_STEPS["destroy GI"]] = self.rng.choice(NVML_CODES)
            step += " + destroy GI"
        gpu = self.rng.choice(sorted({int(d.split("-")[1]) for c in claims
                                      for d in self.held[c.uid]}))
        self.tally("nvml", step)
        self.trail[-1] += f" on GPU {gpu}: {faults}"
        self.stop(signal.SIGTERM)
        self.start({gpu: faults})
        self.call(op, claims)
        self.stop(signal.SIGTERM)
        self.start()

    def disk_full(self, op: str, claims: list[Claim]) -> None:
        self.disk("disk-full", op, claims)

    def read_only(self, op: str, claims: list[Claim]) -> None:
        self.disk("read-only", op, claims)

    def disk(self, kind: str, op: str, claims: list[Claim]) -> None:
        where = self.rng.choice(("plugin", "cdi"))
        path = self.node.plugin_dir if where == "plugin" else self.node.cdi_root
        during = self.rng.random() < 0.5
        self.tally(kind, f"{where} dir", f"{'during' if during else 'before'} {op}")

        def fault(future: Any) -> None:
            if kind == "disk-full":
                fill(path)
            else:
                remount(path, "ro", give_up=lambda: future is not None and future.done())

        try:
            if not during:
                fault(None)
            self.call(op, claims, during=fault if during else None)
        finally:
            if kind == "read-only":
                remount(path, "rw")
            (path / FILLER).unlink(missing_ok=True)

    def stop_around(self, op: str, claims: list[Claim]) -> str:
        """The call, and the plugin killed at a random point of it or stopped after."""
        if self.rng.random() < 0.5:
            self.call(op, claims, during=lambda _: self.stop(signal.SIGKILL))
            return f"killed during {op}"
        self.call(op, claims)
        self.stop(signal.SIGTERM)
        return f"stopped after {op}"

    def lost_checkpoint(self, op: str, claims: list[Claim]) -> None:
        how = self.rng.choice(("moved away", "data dir emptied"))
        self.tally("lost-checkpoint", how, self.stop_around(op, claims))
        if how == "moved away":
            with contextlib.suppress(FileNotFoundError):
                shutil.move(self.node.checkpoint, self.node.root / f"lost-{self.round}.json")
        else:
            for path in self.node.plugin_dir.iterdir():
                if path.is_dir():  # the mock driver root
                    shutil.rmtree(path)
                else:
                    path.unlink()
        self.start()

    def damaged_checkpoint(self, op: str, claims: list[Claim]) -> None:
        damage = self.rng.choice(sorted(DAMAGES))
        then = self.rng.choice(("restored", "given up"))
        self.tally("damaged-checkpoint", damage, self.stop_around(op, claims), then)
        path = self.node.checkpoint
        saved = path.read_bytes()
        before = self.on_node()
        damaged = DAMAGES[damage](saved)
        path.write_bytes(damaged)
        log = self.node.root / "refused.log"
        code, line = self.forked(log), last_line(log)
        problems = [] if code == 2 else [exited(code)]
        if not (line.startswith(f"gpu-dra plugin: checkpoint {path}:")
                and "restore the file" in line):
            problems.append(f"its last line is {line!r}")
        if "Traceback" in log.read_text(errors="replace"):
            problems.append("a traceback")
        if self.on_node() != before or path.read_bytes() != damaged:
            problems.append("the node changed")
        if problems:
            raise AssertionError(self.failure("a start on a damaged checkpoint: "
                                              + "; ".join(problems)))
        if then == "restored":
            path.write_bytes(saved)
        else:
            path.unlink()
        self.start()

    def second_plugin(self, op: str, claims: list[Claim]) -> None:
        self.tally("second-plugin", f"during {op}")
        sockets = {p: inode(p) for p in (self.plugin.dra_socket, self.plugin.registration_socket)}
        log = self.node.root / "second.log"
        codes: list[int | None] = []
        self.call(op, claims, during=lambda _: codes.append(self.forked(log)))
        line = last_line(log)
        problems = [] if codes == [2] else [exited(codes[0])]
        if not (line.startswith("gpu-dra plugin: cannot start: the socket ")
                and "is in use" in line):
            problems.append(f"its last line is {line!r}")
        if {p: inode(p) for p in sockets} != sockets:
            problems.append("the first plugin's sockets changed")
        if problems:
            raise AssertionError(self.failure("a second plugin on the same sockets: "
                                              + "; ".join(problems)))

    # -- the invariants ------------------------------------------------------------------

    def read(self) -> tuple[dict[str, ClaimRecord], dict[str, Any],
                            dict[str, list[tuple[int, int, int]]]]:
        """The node: the checkpoint's records, the CDI specs, the live MIG devices."""
        loaded = checkpoint.load(self.node.checkpoint)
        return {} if loaded is None else loaded.claims, *self.on_node()

    def on_node(self) -> tuple[dict[str, Any], dict[str, list[tuple[int, int, int]]]]:
        """What prepared claims leave on the node: CDI specs and live MIG devices."""
        live = live_mig(self.node.mig_state) if self.machine.dynamic else {}
        return cdi_specs(self.node.cdi_root), live

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise AssertionError(self.failure("\n  ".join(problems)))
        self.plugin.kubelet.get_info(timeout=10)

    def problems(self) -> list[str]:
        records, specs, live = self.read()
        problems = []
        taken: list[tuple[tuple[str, int, int], str, str]] = []
        for uid, record in records.items():
            for device in record.devices:
                if device.admin_access or device.share_id is not None:
                    continue
                if is_rebuilt(record) and (uid, device.device) in self.admin:
                    continue  # rebuilt from a spec, which cannot say adminAccess: held whole
                key, lo, hi = footprint(device)
                problems += [f"{device.device} of claim {uid} overlaps {other} of claim {by}"
                             for (key2, lo2, hi2), by, other in taken
                             if key2 == key and lo < hi2 and lo2 < hi and by != uid]
                taken.append(((key, lo, hi), uid, device.device))
        explained = {(d.gpu_uuid, d.created_mig.profile_id, d.created_mig.start)
                     for r in records.values() for d in r.devices if d.created_mig is not None}
        problems += [f"MIG device of profile {profile} at {start} on {gpu}: no record has it"
                     for gpu, instances in live.items() for profile, start, _ in instances
                     if (gpu, profile, start) not in explained]
        for uid, record in records.items():
            if record.state == "PrepareCompleted":
                problems += self.incomplete(record, specs.get(uid), live)
        for uid in self.acked:
            record = records.get(uid)
            if record is None or record.state != "PrepareCompleted" or uid not in specs:
                problems.append(f"claim {uid} was answered prepared; now its record is "
                                f"{record.state if record else 'gone'} and its CDI spec "
                                f"{'there' if uid in specs else 'gone'}")
        problems += [f"CDI spec of claim {uid} with no record" for uid in specs.keys() - records]
        problems += [f"temp file {name} left"
                     for name in leftovers(self.node.plugin_dir, self.node.cdi_root)]
        return problems

    def incomplete(self, record: ClaimRecord, spec: Any,
                   live: dict[str, list[tuple[int, int, int]]]) -> list[str]:
        """What a prepared record lacks: its CDI spec (valid, naming its devices), its
        MIG devices (one compute instance each)."""
        uid = record.uid
        problems = [f"prepared claim {uid}: MIG device {d.device} is not on the GPU"
                    for d in record.devices if d.created_mig is not None and
                    (d.created_mig.profile_id, d.created_mig.start, 1)
                    not in live.get(d.gpu_uuid, [])]
        if spec is None:
            return [*problems, f"prepared claim {uid}: no CDI spec"]
        names = {d.get("name") for d in spec.get("devices", [])}
        if names != {cdi.device_name(uid, d.device) for d in record.devices}:
            problems.append(f"prepared claim {uid}: its CDI spec names {sorted(names)}")
        if uid not in self.valid_specs:
            problems += [f"CDI spec of claim {uid}: {p}" for p in cdi_problems(spec)]
            self.valid_specs.add(uid)
        return problems

    # -- reports -----------------------------------------------------------------------

    def failure(self, what: str) -> str:
        log = self.node.plugin_log.read_text(errors="replace")[-3000:]  # every start's
        return (f"seed {self.seed}, round {self.round} ({self.machine}): {what}\n"
                "the rounds so far:\n  " + "\n  ".join(self.trail)
                + f"\nthe plugin's log, last lines:\n{log}")

    def summary(self, wall: float, no_disk_faults: str | None) -> str:
        lines = [f"fault campaign: seed {self.seed}, {self.round} rounds in {wall:.1f} s, "
                 + ", ".join(f"{n} {what}" for what, n in sorted(self.stats.items()))]
        for kind, count in sorted(self.faults.items()):
            detail = ", ".join(f"{what} {n}" for what, n in sorted(self.details[kind].items()))
            lines.append(f"  {kind} {count}: {detail}")
        if no_disk_faults is not None:
            lines.append(f"  disk faults not drawn: {no_disk_faults}")
        return "\n".join(lines)


def test_fault_campaign(node: Node, forks: ForkServer) -> None:
    seed = int(os.environ.get("FAULT_SEED", SEED))
    budget = float(os.environ.get("FAULT_CAMPAIGN_SECONDS", BUDGET_S))
    no_disk_faults = can_mount()
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        if no_disk_faults is None:
            stack.enter_context(tmpfs(node.plugin_dir, "1m", 0o700))
            stack.enter_context(tmpfs(node.cdi_root, "1m", 0o755))
        campaign = Campaign(node, forks, seed, disk_faults=no_disk_faults is None)
        stack.callback(campaign.close)  # before the unmounts
        while time.monotonic() - began < budget:
            campaign.play()
        campaign.drain()
    print(campaign.summary(time.monotonic() - began, no_disk_faults))
