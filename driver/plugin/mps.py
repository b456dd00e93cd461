"""MPS per claim (GpuConfig/MigDeviceConfig sharing MPS): a control daemon of the claim's
own, with the limits of its config, that every container of the claim joins.

A claim's MPS lives in one directory, `<plugin data dir>/mps/<claim UID>/`: `pipe/` (the
daemon's control socket and pid file; containers get it at /tmp/nvidia-mps), `shm/`,
`log/`, and `claim.json`, written before anything changes on the node: the daemon's devices and
limits (a daemon that died is started again with them, by a later process too) and the
compute mode each GPU had (put back when the claim goes). Everything needed to undo the
claim is in the directory, so a claim half-prepared by a process killed midway is undone
by the next start as a finished one is.

The daemon is the driver root's `nvidia-cuda-mps-control -d`, run as the plugin runs
`nvidia-smi` (`sharing.tool_environment`: the root's libnvidia-ml.so.1 preloaded, a
container's environment) plus CUDA_MPS_PIPE_DIRECTORY, CUDA_MPS_LOG_DIRECTORY and
CUDA_VISIBLE_DEVICES (the claim's GPU and MIG UUIDs). `-d` makes it fork into its own
session and the process we start exits, so the daemon is no child of the plugin: a plugin
killed or restarted leaves it running, and the next start adopts it (its pid file names a
live control daemon whose socket answers `get_server_list`). Limits go through the control
client (`set_default_active_thread_percentage`, `set_default_device_pinned_mem_limit` per
device index in CUDA_VISIBLE_DEVICES order); memory in MPS's units (M, G: MiB, GiB, as
NVIDIA's driver writes them), rounded down to a whole MiB. Whole GPUs are put in
EXCLUSIVE_PROCESS compute mode, so only the daemon's server opens a context on them; MIG
devices keep theirs (NVML sets compute mode per GPU, and NVIDIA's driver sets it only for
whole GPUs too).

MPS clients and their server share memory in /dev/shm, and a container has a /dev/shm of
its own: as in NVIDIA's driver, the claim's `shm/` is /dev/shm both in the claim's
containers (CDI mount) and for the daemon and its servers, which run in a mount namespace
of their own (so the plugin needs CAP_SYS_ADMIN, as a privileged pod has: without it the
claim fails). Nothing of the host's /dev/shm is shared with a container.

That is local mode. In a cluster the daemon runs in a pod of its own (`mpspod.MpsPods`,
a subclass: the same directory, claim.json, compute modes and control client).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pynvml

from driver.atomicfile import write_atomically
from driver.errors import PluginError
from driver.kube.names import is_uuid
from driver.plugin.claims import ClaimRef
from driver.plugin.config import memory_bytes
from driver.plugin.driverfiles import BINARY_SEARCH
from driver.plugin.modes import PRIVATE_DIR, SHARED_DIR, make_dir
from driver.plugin.sharing import tool_environment
from driver.safeload import LoadError, json_document, read_text

if TYPE_CHECKING:
    from driver.plugin.configschema import MpsConfig

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
PID_FILE = f"{CONTROL}.pid"  # written by the daemon in its pipe directory
CONTAINER_PIPE = "/tmp/nvidia-mps"  # where MPS clients look by default
CONTAINER_SHM = "/dev/shm"
SHM_MODE = 0o1777  # as /dev/shm: every user of the claim's containers shares it
CLAIM_FILE = "claim.json"
START_TIMEOUT = 10.0  # NVIDIA's driver waits up to about 15 s for its daemon's pod
CLIENT_TIMEOUT = 5.0
QUIT_TIMEOUT = 5.0  # then the daemon is killed
MIB, GIB = 1 << 20, 1 << 30
EXCLUSIVE_PROCESS = pynvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
# Runs the daemon in a mount namespace of its own whose /dev/shm is the claim's `shm/`
# (unshare CLONE_NEWNS, / made private, shm bound on /dev/shm), then execs it.
_IN_NAMESPACE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
shm, control, *args = sys.argv[1:]
if libc.unshare(0x20000) or libc.mount(b"none", b"/", None, 0x44000, None) or \\
        libc.mount(shm.encode(), b"/dev/shm", None, 0x1000, None):
    sys.exit(f"{control}: /dev/shm of its own: {os.strerror(ctypes.get_errno())}")
os.execv(control, [control, *args])
"""


class MpsFailure(PluginError):
    """The claim's daemon could not be started, told its limits or stopped."""


def mps_memory(limit: int) -> str:
    """Bytes as MPS's pinned memory limit: whole GiB as `<n>G`, else whole MiB as `<n>M`
    (rounded down: the claim gets no more than it asked); ValueError under 1 MiB."""
    if limit < MIB:
        raise ValueError(f"{limit} bytes is less than MPS's unit, 1Mi")
    return f"{limit // GIB}G" if limit % GIB == 0 else f"{limit // MIB}M"


@dataclass(frozen=True)
class MpsDevice:
    """One device of the claim as MPS sees it: its name, the UUID CUDA knows it by (the
    GPU's, or the MIG device's), and its GPU's UUID (which a config may name).
    `whole_gpu`: a whole GPU the claim alone uses, put in EXCLUSIVE_PROCESS for its
    lifetime (not a MIG device, nor a GPU shared by capacity with other claims' daemons)."""

    device: str
    cuda_uuid: str
    gpu_uuid: str
    whole_gpu: bool


@dataclass(frozen=True)
class Limits:
    """What the daemon is told: the active thread percentage, and the pinned memory limit
    of each device by its index in CUDA_VISIBLE_DEVICES."""

    thread_percentage: int | None
    pinned: tuple[tuple[int, str], ...]

    def commands(self) -> list[str]:
        out = [] if self.thread_percentage is None else \
            [f"set_default_active_thread_percentage {self.thread_percentage}"]
        return out + [f"set_default_device_pinned_mem_limit {i} {v}" for i, v in self.pinned]


def limits(config: MpsConfig, devices: Sequence[MpsDevice], where: str) -> Limits:
    """The limits of `config` for the claim's devices, in their order; ValueError naming
    the field (`where`) for a limit under 1 MiB or a per-device key that names no device
    of the claim."""
    per_device = dict(config.defaultPerDevicePinnedMemoryLimit or {})
    pinned = []
    for index, device in enumerate(devices):
        key = next((k for k in (device.device, device.gpu_uuid, str(index))
                    if k in per_device), None)
        field = f"defaultPerDevicePinnedMemoryLimit.{key}" if key else \
            "defaultPinnedDeviceMemoryLimit"
        quantity = per_device.pop(key) if key else config.defaultPinnedDeviceMemoryLimit
        if quantity is None:
            continue
        try:
            pinned.append((index, mps_memory(memory_bytes(quantity))))
        except ValueError as err:
            raise ValueError(f"{where}.{field}: {err}") from None
    for key in per_device:  # a device key matching two devices is used for both
        if not any(key in (d.device, d.gpu_uuid, str(i)) for i, d in enumerate(devices)):
            raise ValueError(f"{where}.defaultPerDevicePinnedMemoryLimit.{key}: names no "
                             f"device of this claim ({', '.join(d.device for d in devices)})")
    return Limits(config.defaultActiveThreadPercentage, tuple(pinned))


@dataclass(frozen=True)
class ClaimMps:
    """What `claim.json` holds: the daemon's devices and limits, and the compute mode each
    whole GPU had before (GPU UUID -> NVML compute mode)."""

    devices: tuple[MpsDevice, ...]
    limits: Limits
    compute_modes: dict[str, int]
    claim: ClaimRef  # a daemon's pod names its claim (an older file: namespace, name "")

    def to_json(self) -> dict[str, Any]:
        return {"devices": [asdict(d) for d in self.devices],
                "threadPercentage": self.limits.thread_percentage,
                "pinned": [list(p) for p in self.limits.pinned],
                "computeModes": self.compute_modes,
                "namespace": self.claim.namespace, "name": self.claim.name}

    @staticmethod
    def from_json(doc: dict[str, Any], uid: str) -> ClaimMps:
        return ClaimMps(tuple(MpsDevice(**d) for d in doc["devices"]),
                        Limits(doc["threadPercentage"],
                               tuple((int(i), str(v)) for i, v in doc["pinned"])),
                        {str(k): int(v) for k, v in doc["computeModes"].items()},
                        ClaimRef(str(doc.get("namespace", "")), str(doc.get("name", "")), uid))

    @staticmethod
    def load(directory: Path) -> ClaimMps:
        """The claim.json of a claim's directory (named by the claim's UID)."""
        return ClaimMps.from_json(json_document(read_text(directory / CLAIM_FILE),
                                                CLAIM_FILE), directory.name)


class MpsDaemons:
    """The MPS daemons of this node's claims, one per claim, under `root`.

    `control` is the driver root's nvidia-cuda-mps-control and `nvml_library` its
    libnvidia-ml.so.1 (None: not there, and an MPS claim fails saying so); `nvml` sets
    compute modes (pynvml, or the mock). `unsupported`: why this node refuses MPS claims,
    if it does."""

    def __init__(self, root: Path, control: Path | None, nvml_library: Path | None,
                 nvml: Any, unsupported: str | None = None) -> None:
        self.root = root
        self.control = control
        self.nvml_library = nvml_library
        self.nvml = nvml
        self.unsupported = unsupported

    def directory(self, uid: str) -> Path:
        return self.root / uid

    def pipe(self, uid: str) -> Path:
        return self.directory(uid) / "pipe"

    def shm(self, uid: str) -> Path:
        return self.directory(uid) / "shm"

    # -- a claim -----------------------------------------------------------------------

    def start(self, ref: ClaimRef, devices: Sequence[MpsDevice], limits: Limits) -> int:
        """Set the compute modes, start the daemon and tell it the limits; its pid.
        MpsFailure after undoing all of it (`stop`)."""
        uid = ref.uid
        try:
            self._check_tools()
            make_dir(self.root, PRIVATE_DIR)
            for sub in ("pipe", "log"):
                make_dir(self.directory(uid) / sub, SHARED_DIR)
            make_dir(self.shm(uid), SHM_MODE)
            modes = {d.gpu_uuid: self._compute_mode(d.gpu_uuid)
                     for d in devices if d.whole_gpu}
            claim = ClaimMps(tuple(devices), limits, modes, ref)
            write_atomically(self.directory(uid) / CLAIM_FILE,
                             json.dumps(claim.to_json()).encode(), durable=True)
            for gpu_uuid in modes:
                self._set_compute_mode(gpu_uuid, EXCLUSIVE_PROCESS)
            return self._run(uid, claim)
        except (MpsFailure, OSError, pynvml.NVMLError) as err:
            problems = self.stop(uid)
            more = f"; undoing it also failed: {'; '.join(problems)}" if problems else ""
            raise MpsFailure(f"MPS of claim {uid}: {err}{more}") from None

    def ensure(self, uid: str) -> tuple[int, bool]:
        """The claim's daemon pid, started again with its limits if it is not running
        (one alive that does not answer is killed first); and whether it was. MpsFailure
        if it cannot be, with no daemon left running that was not told its limits."""
        if (pid := self.running(uid)) is not None:
            self.hold_exclusive(uid)
            return pid, False
        self._kill_daemon(uid)
        try:
            claim = ClaimMps.load(self.directory(uid))
            self._check_tools()
            for gpu_uuid in claim.compute_modes:  # a GPU reset puts the default back
                self._set_compute_mode(gpu_uuid, EXCLUSIVE_PROCESS)
            return self._run(uid, claim), True
        except (MpsFailure, LoadError, KeyError, TypeError, ValueError, OSError,
                pynvml.NVMLError) as err:
            self._kill_daemon(uid)
            raise MpsFailure(f"MPS of claim {uid}: cannot start its daemon again: "
                             f"{err}") from None

    def hold_exclusive(self, uid: str) -> None:
        """Put the claim's whole GPUs back in EXCLUSIVE_PROCESS where they are not (a GPU
        reset sets Default, with or without a daemon restart); MpsFailure if that fails.

        The plugin is the one writer of a claim's compute modes, in both modes (in a
        cluster the daemon's pod could set them at each start, as NVIDIA's does, but a
        pod's container started again while the claim is being unprepared would then set
        EXCLUSIVE_PROCESS after the plugin put the old mode back, leaving a GPU no claim
        holds exclusive). The price: a GPU reset is undone at the next check (every
        MPS_CHECK_INTERVAL seconds), not at once."""
        try:
            claim = ClaimMps.load(self.directory(uid))
            for gpu_uuid in claim.compute_modes:
                if (mode := self._compute_mode(gpu_uuid)) != EXCLUSIVE_PROCESS:
                    log.warning("GPU %s of MPS claim %s was in compute mode %d (a GPU "
                                "reset?); setting EXCLUSIVE_PROCESS again", gpu_uuid, uid,
                                mode)
                    self._set_compute_mode(gpu_uuid, EXCLUSIVE_PROCESS)
        except (LoadError, OSError, KeyError, TypeError, ValueError,
                pynvml.NVMLError) as err:
            raise MpsFailure(f"MPS of claim {uid}: cannot keep its GPUs in "
                             f"EXCLUSIVE_PROCESS: {err}") from None

    def running(self, uid: str) -> int | None:
        """The pid of the claim's control daemon if its pid file names a live one whose
        control socket answers."""
        pid = self._pid(uid)
        if pid is None or not _alive(pid, self.pipe(uid)):
            return None
        try:
            self.ask(uid, "get_server_list")
        except MpsFailure:
            return None
        return pid

    def _kill_daemon(self, uid: str) -> None:
        pid, pipe = self._pid(uid), self.pipe(uid)
        if pid is not None and _alive(pid, pipe):
            log.warning("killing MPS daemon %d of claim %s: it does not answer, or was not "
                        "told its limits", pid, uid)
            _kill(pid)
            _wait_gone(pid, pipe, QUIT_TIMEOUT)

    def stop(self, uid: str) -> list[str]:
        """Stop the claim's daemon (`quit`, killed if it does not exit in time), put back
        the compute modes and remove the directory; what failed, if anything. A claim
        whose daemon is gone, or that never had one, is stopped all the same."""
        directory = self.directory(uid)
        problems = self._stop_daemon(uid)
        if not directory.is_dir():
            return problems
        try:
            claim = ClaimMps.load(directory)
        except FileNotFoundError:
            claim = None  # killed before it changed anything
        except (LoadError, OSError, KeyError, TypeError, ValueError) as err:
            return [*problems, f"cannot read {directory / CLAIM_FILE}: {err}"]
        for gpu_uuid, mode in (claim.compute_modes if claim else {}).items():
            try:
                self._set_compute_mode(gpu_uuid, mode)
            except pynvml.NVMLError as err:
                problems.append(f"cannot put back the compute mode of {gpu_uuid}: {err}")
        if not problems:
            shutil.rmtree(directory, ignore_errors=True)
            if directory.exists():
                problems.append(f"cannot remove {directory}")
        return problems

    def leftovers(self) -> set[str]:
        """The claims (UIDs) this node has MPS state of: their directories."""
        return {d.name for d in self.root.iterdir() if is_uuid(d.name)} \
            if self.root.is_dir() else set()

    def _stop_daemon(self, uid: str) -> list[str]:
        """`quit` the claim's daemon, killed if it does not exit in time; what failed."""
        problems: list[str] = []
        pid, pipe = self._pid(uid), self.pipe(uid)
        if pid is not None and _alive(pid, pipe):
            try:
                self.ask(uid, "quit")
            except MpsFailure as err:
                log.warning("%s; killing the daemon", err)
            if not _wait_gone(pid, pipe, QUIT_TIMEOUT):
                log.warning("MPS daemon %d of claim %s did not quit; killing it", pid, uid)
                _kill(pid)
                if not _wait_gone(pid, pipe, QUIT_TIMEOUT):
                    problems.append(f"MPS daemon {pid} of claim {uid} does not exit")
        return problems

    def ask(self, uid: str, command: str, timeout: float = CLIENT_TIMEOUT) -> str:
        """Commands (one a line) through the control client; its answers. MpsFailure if
        the client fails (a command refused, no daemon: the client starts none) or does
        not answer within `timeout` seconds (it is killed)."""
        self._check_tools()
        assert self.control is not None
        try:
            done = subprocess.run([str(self.control)], input=command + "\n",
                                  capture_output=True, text=True, check=False,
                                  env=self.environment(uid, ()), timeout=timeout)
        except (OSError, ValueError, subprocess.TimeoutExpired) as err:
            raise MpsFailure(f"{CONTROL} {command!r}: {err}") from None
        answer = done.stdout.strip()
        if done.returncode != 0 or "error" in answer.lower() or "invalid" in answer.lower():
            raise MpsFailure(f"{CONTROL} {command!r} exited {done.returncode}: "
                             f"{answer or done.stderr.strip()}")
        return answer

    # -- helpers -----------------------------------------------------------------------

    def _check_tools(self) -> None:
        if self.control is None or self.nvml_library is None:
            missing = CONTROL if self.control is None else "libnvidia-ml.so.1"
            raise MpsFailure(f"MPS needs {missing}, which is not under the driver root")

    def environment(self, uid: str, visible: Sequence[str]) -> dict[str, str]:
        """The environment of the claim's daemon (`visible`: its CUDA_VISIBLE_DEVICES)
        and of its control client."""
        assert self.nvml_library is not None
        env = {**tool_environment(self.nvml_library),
               "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe(uid)),
               "CUDA_MPS_LOG_DIRECTORY": str(self.directory(uid) / "log")}
        if visible:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
        return env

    def _run(self, uid: str, claim: ClaimMps) -> int:
        """Start the daemon (it forks into its own session; what we start exits), wait
        until it answers, and tell it the limits."""
        assert self.control is not None
        (self.pipe(uid) / PID_FILE).unlink(missing_ok=True)  # a dead daemon's
        env = self.environment(uid, [d.cuda_uuid for d in claim.devices])
        output = self.directory(uid) / "log" / "start.log"
        with open(output, "wb") as out:
            try:
                done = subprocess.run([sys.executable, "-c", _IN_NAMESPACE,
                                       str(self.shm(uid)), str(self.control),
                                       "-d"], env=env,
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                      start_new_session=True, timeout=START_TIMEOUT,
                                      check=False)
            except (OSError, ValueError, subprocess.TimeoutExpired) as err:
                raise MpsFailure(f"{CONTROL} -d: {err}") from None
        if done.returncode != 0:
            said = [line for line in output.read_text(errors="replace").splitlines()
                    if line.strip()]
            raise MpsFailure(f"{CONTROL} -d exited {done.returncode}: "
                             f"{said[-1] if said else 'no output'}")
        deadline = time.monotonic() + START_TIMEOUT
        while (pid := self.running(uid)) is None:
            if time.monotonic() > deadline:
                raise MpsFailure(f"{CONTROL} -d did not answer within {START_TIMEOUT:g} s")
            time.sleep(0.02)
        if claim.limits.commands():  # one client for all: each costs a process start
            self.ask(uid, "\n".join(claim.limits.commands()))
        log.info("MPS daemon %d of claim %s serves %s (%s)", pid, uid,
                 ",".join(d.cuda_uuid for d in claim.devices),
                 "; ".join(claim.limits.commands()) or "no limits")
        return pid

    def _pid(self, uid: str) -> int | None:
        try:
            return int((self.pipe(uid) / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _compute_mode(self, gpu_uuid: str) -> int:
        handle = self.nvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
        return int(self.nvml.nvmlDeviceGetComputeMode(handle))

    def _set_compute_mode(self, gpu_uuid: str, mode: int) -> None:
        handle = self.nvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
        self.nvml.nvmlDeviceSetComputeMode(handle, mode)


def _alive(pid: int, pipe: Path) -> bool:
    """A running (not zombie) process has this pid and was started for this pipe
    directory: the claim's daemon (a pid reused by another program is not ours to stop)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and \
        f"CUDA_MPS_PIPE_DIRECTORY={pipe}".encode() in environ


def _wait_gone(pid: int, pipe: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, pipe):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill(pid: int) -> None:
    """The daemon and the servers it started: its session's process group."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


NO_POD_SETTINGS = ("MPS in a cluster runs each claim's daemon in a pod of its own, which "
                   "needs the plugin's namespace and image (env POD_NAMESPACE and "
                   "GPU_DRA_IMAGE, which the chart sets)")


def control_in(driver_root: Path) -> Path | None:
    """The driver root's nvidia-cuda-mps-control, where driver files are searched."""
    return next((driver_root / d / CONTROL for d in BINARY_SEARCH
                 if (driver_root / d / CONTROL).is_file()), None)

