"""Mock NVML: the pynvml functions the driver calls, answered from a machine profile.

Same names, argument order and return types as pynvml (its ctypes structs, filled), and
failures raised as `pynvml.NVMLError(code)` with NVML's codes, so discovery and MIG
management run unchanged on a laptop. Handles are pynvml's own pointer types whose
address encodes what they point at; they are never dereferenced.

MIG is alive: MIG mode is switched (at once, as on Hopper with no process on the GPU), GPU
and compute instances are created and destroyed by NVML's rules (profile.MigLayout). With a
state path, the modes and instances are "the hardware": kept in a JSON file shared by
processes, so a driver killed with SIGKILL finds on restart what it made.

GPUs fail on demand (`inject`, `gpu-dra mock inject`; what each fault means is in
`faults`): events reach the event sets (nvmlEventSetCreate, nvmlDeviceRegisterEvents,
nvmlEventSetWait_v2, GPU-level: no GI/CI ids) that were registered when they came, a
waiting set woken by a change of the state file (inotify) or of the in-memory state; a
lost GPU answers GPU_IS_LOST, one needing a reset RESET_REQUIRED, a removed one is not
enumerated and its old handles are INVALID_ARGUMENT; remapped rows and the
recovery-action field follow the faults.

Compute modes (nvmlDeviceGet/SetComputeMode) are kept with the MIG state (`compute_mode`
reads one from a state file without NVML, for tests): DEFAULT until set, as the capture's
GPU; EXCLUSIVE_THREAD, removed from NVML, and unknown modes are INVALID_ARGUMENT; a MIG
device handle is NOT_SUPPORTED, like the mock's other GPU-only calls.

Answers beyond the capture were read on a real H200 (driver 580, MIG off): a GPU-instance
lookup or MIG device index that finds nothing is NOT_FOUND, listing GPU instances with MIG
off succeeds with none, an unknown profile id is INVALID_ARGUMENT, a GPU paired with itself
has no common ancestor (NOT_SUPPORTED) and P2P status NOT_SUPPORTED, and the placements call
ignores the count passed in. Where neither says, the mock chooses: other queries on a MIG
device handle answer NOT_SUPPORTED; P2P over PCIe is OK within a NUMA node and
CHIPSET_NOT_SUPPORTED across; a port the model has but the profile does not wire is
FEATURE_DISABLED; nvmlDeviceGetNumaNodeId (the GPU memory's own node, only on coherent
platforms) is NOT_SUPPORTED as on x86.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import os
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast, get_args

import pynvml

from driver.atomicfile import write_atomically
from driver.nvml import Provider
from driver.nvml.events import NO_INSTANCE
from driver.nvml.faults import Fault, apply_fault
from driver.nvml.miglayout import ComputeInstance, GpuInstance, MigError, MigLayout
from driver.nvml.profile import (
    GI_PROFILE_INDEXES,
    PROFILES_DIR,
    ComputeMode,
    FieldError,
    GpuCondition,
    GpuInstanceSpec,
    HealthState,
    MigState,
    Profile,
    ProfileError,
    normalize_bus_id,
    parse_profile,
    validate,
)
from driver.safeload import LoadError, json_document, read_text

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=ctypes.Structure)

_DEVICE, _MIG, _GI, _CI = 1, 2, 3, 4
_POINTER_TYPES = {_DEVICE: pynvml.c_nvmlDevice_t, _MIG: pynvml.c_nvmlDevice_t,
                  _GI: pynvml.c_nvmlGpuInstance_t, _CI: pynvml.c_nvmlComputeInstance_t}
_MIB = 1 << 20
_MIG_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "gpu.dra.dev/mock-nvml/mig")
_CALL: ContextVar[str] = ContextVar("mock_nvml_call", default="")
_HEALTHY = GpuCondition()
# What a real H200 (driver 580) answers nvmlDeviceGetSupportedEventTypes; every mock GPU does.
SUPPORTED_EVENTS = 0xFF9F
EVENT_POLL_S = 0.02  # how often a waiting event set looks at the state file without inotify
COMPUTE_MODES: tuple[ComputeMode, ...] = get_args(ComputeMode)
_IN_CLOSE_WRITE, _IN_MOVED_TO = 0x8, 0x80  # inotify: a file written and closed, renamed in


def list_profiles() -> list[str]:
    """Names of the shipped machine profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml") if not p.name.startswith("_"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a profile file of your own by path."""
    if name_or_path in list_profiles():
        return parse_profile(PROFILES_DIR / f"{name_or_path}.yaml", f"{name_or_path}.yaml")
    path = Path(name_or_path)
    if not path.is_file():
        raise ProfileError(name_or_path, [("", "neither a shipped profile "
                                               f"({', '.join(list_profiles())}) nor a file")])
    return parse_profile(path, name_or_path)


def mock_provider(name_or_path: str, state_path: Path | None = None) -> Provider:
    """A Provider over a mock machine; `state_path` keeps its MIG instances across processes."""
    nvml = MockNvml(load_profile(name_or_path), state_path)
    return Provider(name=f"mock:{Path(name_or_path).stem}", nvml=nvml, host=MockHost(nvml))


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@contextlib.contextmanager
def _as_nvml_errors() -> Iterator[None]:
    try:
        yield
    except MigError as err:
        raise _error(err.code) from err


def _api(fn: Callable[Concatenate[MockNvml, P], R]) -> Callable[Concatenate[MockNvml, P], R]:
    """An NVML entry point: refused before nvmlInit; its name selects injected faults."""

    def call(self: MockNvml, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._inits == 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        token = _CALL.set(fn.__name__)
        try:
            return fn(self, *args, **kwargs)
        finally:
            _CALL.reset(token)

    functools.update_wrapper(call, fn)
    return cast("Callable[Concatenate[MockNvml, P], R]", call)


def _target(ref: Any) -> Any:
    """What a by-reference argument points at: byref(x) and pointer(x) give x."""
    if hasattr(ref, "_obj"):  # ctypes.byref()
        return ref._obj
    if isinstance(ref, ctypes._Pointer):
        return ref.contents
    return ref


def _fill(items: list[Any], buffer: Any, count_ref: Any) -> None:
    """Write items into a caller's array and their number into its count, as NVML does.

    NVML ignores the count passed in and trusts the buffer to be big enough; a ctypes
    array too small for the items answers INSUFFICIENT_SIZE (with the needed count) here,
    where the real library would write past its end. No buffer (None) just sets the count.
    """
    count = _target(count_ref)
    if not isinstance(count, ctypes.c_uint):
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
    # A pointer to the first element is indexed as is; byref(array) gives the array.
    array = buffer if isinstance(buffer, ctypes._Pointer) else _target(buffer)
    if array is not None:
        if isinstance(array, ctypes.Array) and len(array) < len(items):
            count.value = len(items)
            raise _error(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for i, item in enumerate(items):
            array[i] = item
    count.value = len(items)


def _struct(cls: type[S], **fields: Any) -> S:
    """A pynvml struct filled field by field (some of their __init__s take no arguments)."""
    struct = cls()
    for name, value in fields.items():
        setattr(struct, name, value)
    return struct


def _pci_info(bus_id: str, device_id: int, subsystem_id: int) -> pynvml.nvmlPciInfo_t:
    domain, bus, device_function = bus_id.split(":")
    return pynvml.nvmlPciInfo_t(
        busIdLegacy=f"{int(domain, 16):04X}:{bus}:{device_function}".encode(),
        domain=int(domain, 16), bus=int(bus, 16), device=int(device_function.split(".")[0], 16),
        pciDeviceId=device_id, pciSubSystemId=subsystem_id, busId=bus_id.encode())


@dataclass(frozen=True)
class _Ref:
    """What a handle points at: a kind, a GPU index, and for MIG objects the GI/CI ids."""

    kind: int
    gpu: int
    gi: int = 0
    ci: int = 0

    def handle(self) -> Any:
        address = self.kind << 32 | self.gpu << 16 | self.gi << 8 | self.ci
        return ctypes.cast(ctypes.c_void_p(address), _POINTER_TYPES[self.kind])

    @classmethod
    def of(cls, handle: Any) -> _Ref:
        if not isinstance(handle, ctypes._Pointer):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        address = ctypes.cast(handle, ctypes.c_void_p).value or 0
        return cls(address >> 32, address >> 16 & 0xFFFF, address >> 8 & 0xFF, address & 0xFF)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """The state file's writer lock (an flock on `<state>.lock`), across processes."""
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _parse_state(text: str | bytes, file: str) -> MigState:
    try:
        data = json_document(text, file)
    except LoadError as err:
        raise ProfileError(file, [(err.at, err.problem)]) from None
    return validate(MigState, data, file)


def _write_state(path: Path, state: MigState) -> None:
    data = state.model_copy(update={"version": 2}).model_dump(exclude_none=True)
    if not data["computeMode"]:
        del data["computeMode"]  # a file older drivers (strict about fields) still read
    write_atomically(path, json.dumps(data, indent=1).encode(), durable=True)


def compute_mode(state_path: Path, uuid_: str) -> int:
    """The compute mode of the GPU `uuid_` as a mock state file records it (what a claim
    left it in), read without NVML; a ProfileError for a missing or bad file."""
    try:
        text = read_text(state_path)
    except LoadError as err:
        raise ProfileError(str(state_path), [(err.at, err.problem)]) from None
    return _parse_state(text, str(state_path)).computeMode.get(
        uuid_, pynvml.NVML_COMPUTEMODE_DEFAULT)


def inject(state_path: Path, minor: int, fault: Fault) -> str:
    """Record `fault` on the GPU with `minor` in a mock state file, under its writer lock, for
    every process whose mock uses the file; returns the GPU's UUID. A missing or bad file,
    or a minor its machine lacks, is a ProfileError naming the file and the problem."""
    file = str(state_path)
    if not state_path.is_file():  # checked first: the lock file would appear beside it
        raise ProfileError(file, [("", "no such mock state file; it is made by "
                                       "`gpu-dra plugin --mock PROFILE --mock-state FILE`")])
    with _locked(state_path):
        try:
            text = read_text(state_path)
        except LoadError as err:
            raise ProfileError(file, [(err.at, err.problem)]) from None
        state = _parse_state(text, file)
        if not state.machine:
            raise ProfileError(file, [("machine", "not recorded (a file of an older driver): "
                                                  "start the plugin with it once")])
        uuid_ = next((u for u, m in state.machine.items() if m == minor), None)
        if uuid_ is None:
            minors = ", ".join(str(m) for m in sorted(state.machine.values()))
            raise ProfileError(file, [("machine", f"no GPU with minor {minor} (minors: "
                                                  f"{minors})")])
        _write_state(state_path, state.model_copy(
            update={"health": apply_fault(state.health, uuid_, fault)}))
    return uuid_


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library where it has inotify (Linux); None elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # noqa: B018 (AttributeError where there is none)
    except (OSError, AttributeError):
        return None
    return libc


def _inotify(folder: Path) -> int | None:
    """An inotify instance watching `folder` for files written or renamed into it (the
    state file is replaced by a rename); None where there is none (not Linux, or the
    user's instances are used up)."""
    libc = _libc()
    if libc is None:
        return None
    fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(folder), _IN_CLOSE_WRITE | _IN_MOVED_TO) < 0:
        os.close(fd)
        return None
    return fd


class _StateStore:
    """The MIG mode, live MIG instances and injected faults of every GPU: in memory, or in a
    JSON file shared by processes.

    Writers hold an flock on `<state>.lock`, reload, change, and replace the file
    atomically (temp file, fsync, rename); readers reload only when the file changed. A
    file is made at start when there is none, so that `gpu-dra mock inject` finds the
    machine's GPUs in it.
    """

    def __init__(self, profile: Profile, path: Path | None) -> None:
        self._profile = profile
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._machine = {gpu.uuid: gpu.minor for gpu in profile.gpus}
        self._health = HealthState()
        self._compute: dict[str, ComputeMode] = {}
        self._changed = threading.Condition()  # without a file: notified by change_health
        self._generation = 0
        # Reentrant: a reader inside a change (the caller's own NVML calls) must not
        # deadlock, and no reader may rebuild the layouts under a change in flight
        # (its objects, and so the GI/CI handles given out, would be replaced).
        self._mutex = threading.RLock()
        self._layouts = self._build({i: gpu.mig.gpuInstances for i, gpu in enumerate(profile.gpus)
                                     if gpu.mig is not None}, {})
        if path is not None:
            self._reload()  # a bad state file fails here, not in the middle of discovery
            if self._stamp is None:
                with self._mutex, _locked(path):
                    self._reload()
                    if self._stamp is None:
                        self._save(profile_modes=True)

    def _build(self, specs: dict[int, list[GpuInstanceSpec]],
               modes: dict[int, bool]) -> list[MigLayout | None]:
        """Layouts holding `specs` in `modes` (by GPU index; a GPU left out has its profile's
        mode); a FieldError names what cannot exist."""
        layouts: list[MigLayout | None] = []
        for i, gpu in enumerate(self._profile.gpus):
            spec = self._profile.model_of(i).mig
            if modes.get(i) and spec is None:
                raise FieldError(f"migEnabled.{gpu.uuid}", f"model {gpu.model!r} has no MIG")
            enabled = modes.get(i, gpu.mig_enabled)
            layout = MigLayout(spec, enabled) if spec is not None else None
            wanted = specs.get(i, [])
            if wanted and (layout is None or not enabled):
                raise FieldError(f"gpus.{gpu.uuid}", "MIG is not enabled on this GPU")
            if layout is not None:
                try:
                    layout.restore(wanted)
                except MigError as err:
                    raise FieldError(f"gpus.{gpu.uuid}.{err.where}", err.message) from None
            layouts.append(layout)
        return layouts

    def layouts(self) -> list[MigLayout | None]:
        with self._mutex:
            self._refresh()
            return self._layouts

    def health(self) -> HealthState:
        with self._mutex:
            self._refresh()
            return self._health

    def compute_modes(self) -> dict[str, ComputeMode]:
        """The compute modes set, by GPU UUID (DEFAULT for a GPU missing)."""
        with self._mutex:
            self._refresh()
            return self._compute

    def _refresh(self) -> None:
        if self._path is not None:
            self._reload()

    def _reload(self) -> None:
        """Read the file if it changed; a file without a `machine` (version 1) counts as
        unsaved, so the next writer records it."""
        assert self._path is not None
        try:
            st = os.stat(self._path)  # unchanged, as nearly always: one syscall
            if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
                return
            with self._path.open("rb") as f:
                st = os.fstat(f.fileno())
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp == self._stamp:
                    return
                text = f.read()
        except FileNotFoundError:
            return  # nothing saved yet: the profile's instances stand
        file = str(self._path)
        state = _parse_state(text, file)
        index = {gpu.uuid: i for i, gpu in enumerate(self._profile.gpus)}
        try:
            for section, uuids in (("gpus", state.gpus), ("migEnabled", state.migEnabled),
                                   ("machine", state.machine),
                                   ("health.gpus", state.health.gpus),
                                   ("computeMode", state.computeMode)):
                unknown = sorted(set(uuids) - set(index))
                if unknown:
                    raise FieldError(f"{section}.{unknown[0]}", "no such GPU in the profile")
            for uuid_, minor in state.machine.items():
                if minor != self._machine[uuid_]:
                    raise FieldError(f"machine.{uuid_}", f"minor {minor}, but the profile's "
                                     f"GPU has minor {self._machine[uuid_]}")
            self._layouts = self._build({index[u]: specs for u, specs in state.gpus.items()},
                                        {index[u]: on for u, on in state.migEnabled.items()})
        except FieldError as err:
            raise ProfileError(file, [(err.path, err.message)]) from None
        self._health = state.health
        self._compute = dict(state.computeMode)
        self._stamp = stamp if state.machine else None

    @contextlib.contextmanager
    def change(self, gpu: int) -> Iterator[MigLayout]:
        """One GPU's layout to change, serialized across threads and processes; saved unless
        the change raised. The GPU must have MIG (callers check first)."""
        with self._mutex:
            if self._path is None:
                yield self._mig(gpu)
                return
            with _locked(self._path):
                self._reload()
                yield self._mig(gpu)
                self._save()

    def change_health(self, gpu: int, fault: Fault) -> None:
        """Apply `fault` to one GPU, serialized like `change`."""
        uuid_ = self._profile.gpus[gpu].uuid

        def apply() -> None:
            self._health = apply_fault(self._health, uuid_, fault)
        self._update(apply)

    def set_compute_mode(self, gpu: int, mode: ComputeMode) -> None:
        """Set one GPU's compute mode, serialized like `change`."""
        uuid_ = self._profile.gpus[gpu].uuid

        def apply() -> None:
            self._compute = {u: m for u, m in self._compute.items() if u != uuid_}
            if mode != pynvml.NVML_COMPUTEMODE_DEFAULT:
                self._compute[uuid_] = mode
        self._update(apply)

    def _update(self, apply: Callable[[], None]) -> None:
        """Apply a change to the latest state and save it (with a file) or notify the
        in-memory waiters (without)."""
        with self._mutex:
            if self._path is None:
                apply()
                with self._changed:
                    self._generation += 1
                    self._changed.notify_all()
                return
            with _locked(self._path):
                self._reload()
                apply()
                self._save()

    @property
    def path(self) -> Path | None:
        return self._path

    def generation(self) -> int:
        """How many in-memory health changes there were (without a file)."""
        with self._changed:
            return self._generation

    def wait_changed(self, seen: int, timeout: float) -> int:
        """Wait up to `timeout` for an in-memory health change after `seen`; the count now."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != seen, timeout)
            return self._generation

    def _mig(self, gpu: int) -> MigLayout:
        layout = self._layouts[gpu]
        assert layout is not None
        return layout

    def _save(self, profile_modes: bool = False) -> None:
        """Write the state; `profile_modes`: leave the MIG modes to the profile (a new file)."""
        assert self._path is not None
        live = [(gpu.uuid, layout) for gpu, layout in zip(self._profile.gpus, self._layouts,
                                                          strict=True) if layout is not None]
        _write_state(self._path, MigState(
            version=2, gpus={uuid_: layout.specs() for uuid_, layout in live},
            migEnabled={} if profile_modes else {u: layout.enabled for u, layout in live},
            machine=self._machine, health=self._health,
            computeMode=self._compute))
        st = os.stat(self._path)
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)


class _Changes:
    """Waits for the mock's state to change, so an idle waiting event set costs nothing
    (polling the file 50 times a second cost an idle plugin most of 1% of a core): an
    inotify watch of the state file's folder, a condition the in-memory state notifies, or,
    without inotify, a sleep of `EVENT_POLL_S`. One per event set, made before its first
    look and kept until the set is freed (closing an inotify instance takes the kernel
    10-30 ms: never once per wait). A wait may return early (another file of the folder,
    a change before the last look): callers look again. One waiter per set at a time, as
    the monitor waits (a second one may sleep through a change until its timeout)."""

    def __init__(self, store: _StateStore) -> None:
        self._store = store
        self._seen = store.generation()
        self._fd = _inotify(store.path.parent) if store.path is not None else None

    def wait(self, timeout: float) -> None:
        if self._store.path is None:
            self._seen = self._store.wait_changed(self._seen, timeout)
        elif self._fd is None:
            time.sleep(min(EVENT_POLL_S, timeout))
        elif select.select([self._fd], [], [], timeout)[0]:
            os.read(self._fd, 65536)  # the events themselves do not matter

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class _EventSet:
    """An event set: the last event it looked at, per GPU index the event types registered
    and the event number at registration (older events are not for it), and its watch of
    the state once it has waited."""

    cursor: int
    registered: dict[int, tuple[int, int]] = field(default_factory=dict)
    changes: _Changes | None = None


class MockNvml:
    """The pynvml module's surface for one mock machine (see the module docstring)."""

    def __init__(self, profile: Profile, state_path: Path | None = None) -> None:
        self.profile = profile
        self._store = _StateStore(profile, state_path)
        self._inits = 0
        self._by_bus = {gpu.busId: i for i, gpu in enumerate(profile.gpus)}
        self.timeslices: dict[str, int] = {}  # GPU UUID -> compute time slice, as last set
        self._sets: dict[int, _EventSet] = {}
        self._last_set = 0
        self._sets_lock = threading.Lock()

    # -- handles -------------------------------------------------------------------------

    def _ref(self, handle: Any, *kinds: int) -> _Ref:
        ref = _Ref.of(handle)
        if ref.kind not in kinds or ref.gpu >= len(self.profile.gpus):
            if ref.kind == _MIG and _DEVICE in kinds:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if ref.kind != _DEVICE:
            self._live(ref)  # a handle to a destroyed instance is no longer valid
        self._fault(ref.gpu)
        return ref

    def _fault(self, gpu: int) -> None:
        """Raise what the GPU answers now: its injected condition, then the profile's fault."""
        condition = self._condition(gpu)
        if condition.removed:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # a handle to no device
        if condition.lost:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if condition.resetRequired:
            raise _error(pynvml.NVML_ERROR_RESET_REQUIRED)
        code = self.profile.gpus[gpu].fault(_CALL.get())
        if code is not None:
            raise _error(code)

    def _condition(self, gpu: int) -> GpuCondition:
        return self._store.health().gpus.get(self.profile.gpus[gpu].uuid, _HEALTHY)

    def _present(self) -> list[int]:
        """The GPUs NVML enumerates, by index in the profile: all but the removed ones."""
        gone = {u for u, c in self._store.health().gpus.items() if c.removed}
        return [i for i, gpu in enumerate(self.profile.gpus) if gpu.uuid not in gone]

    def inject(self, minor: int, fault: Fault) -> None:
        """`gpu-dra mock inject` on this mock (into its state file if it has one)."""
        gpu = next((i for i, g in enumerate(self.profile.gpus) if g.minor == minor), None)
        if gpu is None:
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        self._store.change_health(gpu, fault)

    def _layout(self, gpu: int) -> MigLayout:
        layout = self._store.layouts()[gpu]
        if layout is None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return layout

    def _live(self, ref: _Ref) -> tuple[GpuInstance, ComputeInstance | None]:
        layout = self._store.layouts()[ref.gpu]
        gi = layout.gis.get(ref.gi) if layout is not None else None
        ci = gi.cis.get(ref.ci) if gi is not None else None
        if gi is None or (ref.kind in (_MIG, _CI) and ci is None):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gi, ci

    def _gi(self, handle: Any) -> tuple[_Ref, GpuInstance]:
        ref = self._ref(handle, _GI)
        return ref, self._live(ref)[0]

    def _ci(self, handle: Any) -> tuple[_Ref, GpuInstance, ComputeInstance]:
        ref = self._ref(handle, _CI)
        gi, ci = self._live(ref)
        assert ci is not None
        return ref, gi, ci

    def _mig_uuid(self, ref: _Ref) -> str:
        parent = self.profile.gpus[ref.gpu].uuid
        return f"MIG-{uuid.uuid5(_MIG_UUID_NAMESPACE, f'{parent}/{ref.gi}/{ref.ci}')}"

    # -- system --------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._inits += 1

    def nvmlShutdown(self) -> None:
        if self._inits == 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        self._inits -= 1

    @_api
    def nvmlSystemGetDriverVersion(self) -> str:
        return self.profile.driverVersion

    @_api
    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.profile.cudaDriverVersion

    @_api
    def nvmlSystemGetNVMLVersion(self) -> str:
        return f"{self.profile.cudaDriverVersion // 1000}.{self.profile.driverVersion}"

    @_api
    def nvmlDeviceGetCount(self) -> int:
        return len(self._present())

    @_api
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        present = self._present()
        if not (isinstance(index, int) and 0 <= index < len(present)):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._fault(present[index])
        return _Ref(_DEVICE, present[index]).handle()

    @_api
    def nvmlDeviceGetHandleByUUID(self, uuid_: str) -> Any:
        """A GPU by its GPU- UUID or a MIG device by its MIG- UUID."""
        for i in self._present():
            gpu = self.profile.gpus[i]
            if gpu.uuid == uuid_:
                self._fault(i)
                return _Ref(_DEVICE, i).handle()
            layout = self._store.layouts()[i]
            for gi, ci in layout.mig_devices() if layout is not None else ():
                ref = _Ref(_MIG, i, gi.id, ci.id)
                if self._mig_uuid(ref) == uuid_:
                    self._fault(i)
                    return ref.handle()
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def set_timeslice(self, uuid_: str, interval: int) -> None:
        """Records `nvidia-smi compute-policy -i <uuid> --set-timeslice <0..3>`, the one GPU
        setting the driver changes without an NVML call (NVML has none for it)."""
        if uuid_ not in {gpu.uuid for gpu in self.profile.gpus} or interval not in range(4):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self.timeslices[uuid_] = interval

    # -- one GPU -------------------------------------------------------------------------

    @_api
    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._present().index(self._ref(handle, _DEVICE).gpu)

    @_api
    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        return self.profile.gpus[self._ref(handle, _DEVICE).gpu].minor

    @_api
    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        ref = self._ref(handle, _DEVICE, _MIG)
        return self.profile.gpus[ref.gpu].uuid if ref.kind == _DEVICE else self._mig_uuid(ref)

    @_api
    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self.profile.model_of(self._ref(handle, _DEVICE).gpu).name

    @_api
    def nvmlDeviceGetBrand(self, handle: Any) -> int:
        return self.profile.model_of(self._ref(handle, _DEVICE).gpu).brand_value

    @_api
    def nvmlDeviceGetArchitecture(self, handle: Any) -> int:
        return self.profile.model_of(self._ref(handle, _DEVICE).gpu).architecture_value

    @_api
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        return self.profile.model_of(self._ref(handle, _DEVICE).gpu).cudaComputeCapability

    @_api
    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        """The GPU's memory, or a MIG device's (its GPU instance's memory, all free)."""
        ref = self._ref(handle, _DEVICE, _MIG)
        if ref.kind == _MIG:
            total = self._live(ref)[0].profile.memorySizeMB * _MIB
            used = 0
        else:
            memory = self.profile.model_of(ref.gpu).memory
            total, used = memory.total, memory.used
        if not version:
            return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)
        return pynvml.c_nvmlMemory_v2_t(version=version, total=total, reserved=used,
                                        free=total - used, used=0)

    @_api
    def nvmlDeviceGetPciInfo(self, handle: Any) -> pynvml.nvmlPciInfo_t:
        return self._gpu_pci(self._ref(handle, _DEVICE).gpu)

    nvmlDeviceGetPciInfo_v3 = nvmlDeviceGetPciInfo

    def _gpu_pci(self, gpu: int) -> pynvml.nvmlPciInfo_t:
        model = self.profile.model_of(gpu)
        return _pci_info(self.profile.gpus[gpu].busId, model.pciDeviceId, model.pciSubSystemId)

    @_api
    def nvmlDeviceGetNumaNodeId(self, handle: Any) -> int:
        self._ref(handle, _DEVICE)
        raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    @_api
    def nvmlDeviceGetComputeMode(self, handle: Any) -> int:
        uuid_ = self.profile.gpus[self._ref(handle, _DEVICE).gpu].uuid
        return self._store.compute_modes().get(uuid_, pynvml.NVML_COMPUTEMODE_DEFAULT)

    @_api
    def nvmlDeviceSetComputeMode(self, handle: Any, mode: int) -> None:
        gpu = self._ref(handle, _DEVICE).gpu
        if mode not in COMPUTE_MODES:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._store.set_compute_mode(gpu, mode)

    # -- MIG: the GPU side -----------------------------------------------------------------

    @_api
    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        gpu = self._ref(handle, _DEVICE).gpu
        mode = int(self._layout(gpu).enabled)
        return [mode, mode]

    @_api
    def nvmlDeviceSetMigMode(self, handle: Any, mode: int) -> int:
        """Switches at once and answers the activation status NVML_SUCCESS, as Hopper does
        when no process uses the GPU; off while GPU instances live is IN_USE."""
        gpu = self._ref(handle, _DEVICE).gpu
        self._layout(gpu)
        if mode not in (pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        with self._store.change(gpu) as layout, _as_nvml_errors():
            layout.set_enabled(mode == pynvml.NVML_DEVICE_MIG_ENABLE)
        return pynvml.NVML_SUCCESS

    @_api
    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, profile: int,
                                            version: int = 2) -> Any:
        gpu = self._ref(handle, _DEVICE).gpu
        if version not in (1, 2):
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)  # what pynvml itself raises
        layout = self._layout(gpu)
        if profile not in GI_PROFILE_INDEXES:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        info = layout.spec.profiles.get(profile)
        if info is None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        fields = info.model_dump(exclude={"name", "placements"})
        if version == 1:
            return _struct(pynvml.c_nvmlGpuInstanceProfileInfo_t, isP2pSupported=0, **fields)
        # The driver hands the struct back with `version` zeroed, as the capture shows.
        return _struct(pynvml.c_nvmlGpuInstanceProfileInfo_v2_t, version=0, isP2pSupported=0,
                       name=info.name.encode(), **fields)

    nvmlDeviceGetGpuInstanceProfileInfoV = nvmlDeviceGetGpuInstanceProfileInfo

    @_api
    def nvmlDeviceGetGpuInstancePossiblePlacements(self, handle: Any, profileId: int,
                                                   placementsRef: Any, countRef: Any) -> int:
        layout = self._layout(self._ref(handle, _DEVICE).gpu)
        with _as_nvml_errors():
            placements = layout.placements(profileId)
        _fill([pynvml.c_nvmlGpuInstancePlacement_t(p.start, p.size) for p in placements],
              placementsRef, countRef)
        return pynvml.NVML_SUCCESS

    @_api
    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, handle: Any, profileId: int) -> int:
        layout = self._layout(self._ref(handle, _DEVICE).gpu)
        with _as_nvml_errors():
            return layout.remaining(profileId)

    @_api
    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        """7 on these parts with MIG on; 0 with MIG off or on a GPU without MIG."""
        layout = self._store.layouts()[self._ref(handle, _DEVICE).gpu]
        return layout.spec.maxDevices if layout is not None and layout.enabled else 0

    @_api
    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any:
        gpu = self._ref(handle, _DEVICE).gpu
        if not (isinstance(index, int) and index >= 0):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        layout = self._store.layouts()[gpu]
        devices = list(layout.mig_devices()) if layout is not None else []
        if index >= len(devices):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        gi, ci = devices[index]
        return _Ref(_MIG, gpu, gi.id, ci.id).handle()

    @_api
    def nvmlDeviceIsMigDeviceHandle(self, handle: Any) -> ctypes.c_uint:
        return ctypes.c_uint(int(self._ref(handle, _DEVICE, _MIG).kind == _MIG))

    @_api
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> Any:
        ref = _Ref.of(handle)
        if ref.kind != _MIG:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Ref(_DEVICE, self._ref(handle, _MIG).gpu).handle()

    @_api
    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        return self._mig_ref(handle).gi

    @_api
    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        return self._mig_ref(handle).ci

    def _mig_ref(self, handle: Any) -> _Ref:
        if _Ref.of(handle).kind != _MIG:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._ref(handle, _MIG)

    @_api
    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gpuInstanceId: int) -> Any:
        gpu = self._ref(handle, _DEVICE).gpu
        with _as_nvml_errors():
            gi = self._layout(gpu).gi(gpuInstanceId)
        return _Ref(_GI, gpu, gi.id).handle()

    @_api
    def nvmlDeviceGetGpuInstances(self, handle: Any, profileId: int, gpuInstancesRef: Any,
                                  countRef: Any) -> int:
        gpu = self._ref(handle, _DEVICE).gpu
        layout = self._layout(gpu)
        with _as_nvml_errors():
            layout.profile(profileId)
        found = [_Ref(_GI, gpu, gi.id).handle() for _, gi in sorted(layout.gis.items())
                 if gi.profile.id == profileId]
        _fill(found, gpuInstancesRef, countRef)
        return pynvml.NVML_SUCCESS

    @_api
    def nvmlDeviceCreateGpuInstance(self, handle: Any, profileId: int) -> Any:
        return self._create_gi(handle, profileId, None, None)

    @_api
    def nvmlDeviceCreateGpuInstanceWithPlacement(self, handle: Any, profileId: int,
                                                 placement: Any) -> Any:
        target = _target(placement)
        if not isinstance(target, pynvml.c_nvmlGpuInstancePlacement_t):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._create_gi(handle, profileId, target.start, target.size)

    def _create_gi(self, handle: Any, profile_id: int, start: int | None,
                   size: int | None) -> Any:
        gpu = self._ref(handle, _DEVICE).gpu
        self._layout(gpu)
        with self._store.change(gpu) as layout, _as_nvml_errors():
            if not layout.enabled:
                raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            gi = layout.create_gi(profile_id, start, size)
        return _Ref(_GI, gpu, gi.id).handle()

    # -- MIG: GPU and compute instances ----------------------------------------------------

    @_api
    def nvmlGpuInstanceGetInfo(self, gpuInstance: Any) -> pynvml.c_nvmlGpuInstanceInfo_t:
        ref, gi = self._gi(gpuInstance)
        return pynvml.c_nvmlGpuInstanceInfo_t(
            device=_Ref(_DEVICE, ref.gpu).handle(), id=gi.id, profileId=gi.profile.id,
            placement=pynvml.c_nvmlGpuInstancePlacement_t(gi.placement.start, gi.placement.size))

    @_api
    def nvmlGpuInstanceDestroy(self, gpuInstance: Any) -> int:
        ref, gi = self._gi(gpuInstance)
        with self._store.change(ref.gpu) as layout, _as_nvml_errors():
            layout.destroy_gi(gi.id)
        return pynvml.NVML_SUCCESS

    @_api
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(self, gpuInstance: Any, profile: int,
                                                     engProfile: int, version: int = 2) -> Any:
        _, gi = self._gi(gpuInstance)
        if version not in (1, 2):
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)  # what pynvml itself raises
        if engProfile != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        with _as_nvml_errors():
            placements = MigLayout.ci_placements(gi, profile)
        slices, whole = placements[0].size, gi.profile
        fields = {
            "id": profile, "sliceCount": slices, "instanceCount": len(placements),
            "multiprocessorCount": whole.multiprocessorCount * slices // whole.sliceCount,
            "sharedCopyEngineCount": whole.copyEngineCount,
            "sharedDecoderCount": whole.decoderCount, "sharedEncoderCount": whole.encoderCount,
            "sharedJpegCount": whole.jpegCount, "sharedOfaCount": whole.ofaCount}
        if version == 1:
            return _struct(pynvml.c_nvmlComputeInstanceProfileInfo_t, **fields)
        name = whole.name if slices == whole.sliceCount else \
            f"MIG {slices}c.{whole.name.removeprefix('MIG ')}"
        # `version` zeroed like the GPU-instance profile info the capture shows.
        return _struct(pynvml.c_nvmlComputeInstanceProfileInfo_v2_t, version=0,
                       name=name.encode(), **fields)

    nvmlGpuInstanceGetComputeInstanceProfileInfoV = nvmlGpuInstanceGetComputeInstanceProfileInfo

    @_api
    def nvmlGpuInstanceCreateComputeInstance(self, gpuInstance: Any, profileId: int) -> Any:
        ref, gi = self._gi(gpuInstance)
        with self._store.change(ref.gpu) as layout, _as_nvml_errors():
            ci = layout.create_ci(gi.id, profileId)
        return _Ref(_CI, ref.gpu, gi.id, ci.id).handle()

    @_api
    def nvmlGpuInstanceGetComputeInstanceById(self, gpuInstance: Any,
                                              computeInstanceId: int) -> Any:
        ref, gi = self._gi(gpuInstance)
        with _as_nvml_errors():
            ci = gi.ci(computeInstanceId)
        return _Ref(_CI, ref.gpu, gi.id, ci.id).handle()

    @_api
    def nvmlGpuInstanceGetComputeInstances(self, gpuInstance: Any, profileId: int,
                                           computeInstancesRef: Any, countRef: Any) -> int:
        ref, gi = self._gi(gpuInstance)
        with _as_nvml_errors():
            MigLayout.ci_slices(gi, profileId)
        found = [_Ref(_CI, ref.gpu, gi.id, ci.id).handle() for _, ci in sorted(gi.cis.items())
                 if ci.profile_id == profileId]
        _fill(found, computeInstancesRef, countRef)
        return pynvml.NVML_SUCCESS

    @_api
    def nvmlComputeInstanceGetInfo(self, computeInstance: Any) -> Any:
        ref, gi, ci = self._ci(computeInstance)
        return pynvml.c_nvmlComputeInstanceInfo_t(
            device=_Ref(_DEVICE, ref.gpu).handle(), gpuInstance=_Ref(_GI, ref.gpu, gi.id).handle(),
            id=ci.id, profileId=ci.profile_id,
            placement=pynvml.c_nvmlComputeInstancePlacement_t(ci.placement.start,
                                                              ci.placement.size))

    nvmlComputeInstanceGetInfo_v2 = nvmlComputeInstanceGetInfo

    @_api
    def nvmlComputeInstanceDestroy(self, computeInstance: Any) -> int:
        ref, gi, ci = self._ci(computeInstance)
        with self._store.change(ref.gpu) as layout, _as_nvml_errors():
            layout.destroy_ci(gi.id, ci.id)
        return pynvml.NVML_SUCCESS

    # -- NVLink --------------------------------------------------------------------------

    def _wired(self, gpu: int, link: int) -> tuple[str, int] | None:
        """('gpu'|'switch', index) at the far end of a link; None if the port is unwired.

        A GPU with no wired link answers NOT_SUPPORTED for every link (as captured on an
        H200 without peers); a link beyond the model's ports is INVALID_ARGUMENT.
        """
        spec = self.profile.model_of(gpu).nvlink
        links = self.profile.gpus[gpu].nvlinks
        if spec is None or not links:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not (isinstance(link, int) and 0 <= link < spec.links):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for group in links:
            if link < group.count:
                if group.peer is not None:
                    return "gpu", group.peer
                assert group.switch is not None
                return "switch", group.switch
            link -= group.count
        return None

    def _wired_or_fail(self, handle: Any, link: int) -> tuple[str, int]:
        end = self._wired(self._ref(handle, _DEVICE).gpu, link)
        if end is None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return end

    @_api
    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int:
        end = self._wired(self._ref(handle, _DEVICE).gpu, link)
        return pynvml.NVML_FEATURE_DISABLED if end is None else pynvml.NVML_FEATURE_ENABLED

    @_api
    def nvmlDeviceGetNvLinkVersion(self, handle: Any, link: int) -> int:
        gpu = self._ref(handle, _DEVICE).gpu
        self._wired(gpu, link)
        spec = self.profile.model_of(gpu).nvlink
        assert spec is not None
        return spec.enum

    @_api
    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: Any, link: int) -> int:
        kind, _ = self._wired_or_fail(handle, link)
        return pynvml.NVML_NVLINK_DEVICE_TYPE_GPU if kind == "gpu" else \
            pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH

    @_api
    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: Any, link: int) -> pynvml.nvmlPciInfo_t:
        kind, index = self._wired_or_fail(handle, link)
        if kind == "gpu":
            return self._gpu_pci(index)
        switch = self.profile.nvswitches[index]
        return _pci_info(switch.busId, switch.pciDeviceId, 0)

    @_api
    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: list[Any]) -> Any:
        """Only NVML_FI_DEV_NVLINK_LINK_COUNT answers; other fields carry NOT_SUPPORTED."""
        gpu = self._ref(handle, _DEVICE).gpu
        spec = self.profile.model_of(gpu).nvlink
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        now = time.time_ns() // 1000
        for value, field_id in zip(values, fieldIds, strict=True):
            # pynvml takes a field id or a (field id, scope id) pair
            value.fieldId, value.scopeId = field_id if isinstance(field_id, tuple) else \
                (field_id, 0)
            value.timestamp = now
            value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            if value.fieldId == pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT:
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                if spec is not None and self.profile.gpus[gpu].nvlinks:
                    value.value.uiVal = spec.links
                    value.nvmlReturn = pynvml.NVML_SUCCESS
            elif value.fieldId == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION:
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = self._condition(gpu).recoveryAction
                value.nvmlReturn = pynvml.NVML_SUCCESS
        return values

    # -- health: events and remapped rows --------------------------------------------------

    @_api
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        self._ref(handle, _DEVICE)
        return SUPPORTED_EVENTS

    @_api
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        """(correctable, uncorrectable, isPending, failureOccurred) rows; the uncorrectable
        count is 1 while a remap is pending or failed (the mock keeps no history)."""
        condition = self._condition(self._ref(handle, _DEVICE).gpu)
        pending, failure = int(condition.rowRemapPending), int(condition.rowRemapFailure)
        return 0, pending | failure, pending, failure

    @_api
    def nvmlEventSetCreate(self) -> Any:
        with self._sets_lock:
            self._last_set += 1
            self._sets[self._last_set] = _EventSet(self._store.health().seq)
            return ctypes.cast(ctypes.c_void_p(self._last_set), pynvml.c_nvmlEventSet_t)

    def _set(self, event_set: Any) -> _EventSet:
        if not isinstance(event_set, pynvml.c_nvmlEventSet_t):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        found = self._sets.get(ctypes.cast(event_set, ctypes.c_void_p).value or 0)
        if found is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return found

    @_api
    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        """Events of the parent GPU only (a MIG handle is NOT_SUPPORTED, as in NVML); a type
        the GPU does not support is NOT_SUPPORTED."""
        gpu = self._ref(handle, _DEVICE).gpu
        if eventTypes & ~SUPPORTED_EVENTS:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        seq = self._store.health().seq
        with self._sets_lock:
            event_set = self._set(eventSet)
            mask, _ = event_set.registered.get(gpu, (0, seq))
            event_set.registered[gpu] = (mask | eventTypes, seq)

    @_api
    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> Any:
        """The next event for this set, looking again whenever the state changes; TIMEOUT
        when none comes in `timeoutms`; GPU_IS_LOST once for a registered GPU that was lost."""
        deadline = time.monotonic() + timeoutms / 1000
        changes = self._changes(eventSet) if timeoutms > 0 else None
        while True:
            event = self._next_event(eventSet)
            if event is not None:
                return event
            left = deadline - time.monotonic()
            if left <= 0 or changes is None:
                raise _error(pynvml.NVML_ERROR_TIMEOUT)
            changes.wait(left)

    nvmlEventSetWait = nvmlEventSetWait_v2

    def _changes(self, eventSet: Any) -> _Changes:
        with self._sets_lock:
            event_set = self._set(eventSet)
            if event_set.changes is None:
                event_set.changes = _Changes(self._store)
            return event_set.changes

    def _next_event(self, eventSet: Any) -> Any:
        health = self._store.health()
        with self._sets_lock:
            event_set = self._set(eventSet)
            if health.seq <= event_set.cursor:
                return None  # nothing new: the common case of a waiting set
            index = {gpu.uuid: i for i, gpu in enumerate(self.profile.gpus)}
            for event in health.events:
                if event.seq <= event_set.cursor:
                    continue
                event_set.cursor = event.seq
                mask, since = event_set.registered.get(index[event.gpu], (0, event.seq))
                if event.seq <= since:
                    continue  # registered after it came
                if event.kind == "lost":
                    raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
                kind = pynvml.nvmlEventTypeXidCriticalError if event.kind == "xid" else \
                    pynvml.nvmlEventTypeDoubleBitEccError
                if mask & kind:
                    return pynvml.c_nvmlEventData_t(
                        device=_Ref(_DEVICE, index[event.gpu]).handle(), eventType=kind,
                        eventData=event.xid or 0, gpuInstanceId=NO_INSTANCE,
                        computeInstanceId=NO_INSTANCE)
        return None

    @_api
    def nvmlEventSetFree(self, eventSet: Any) -> None:
        with self._sets_lock:
            changes = self._set(eventSet).changes
            del self._sets[ctypes.cast(eventSet, ctypes.c_void_p).value or 0]
        if changes is not None:
            changes.close()

    # -- pairs ---------------------------------------------------------------------------

    def _pair(self, a: Any, b: Any) -> tuple[int, int]:
        return self._ref(a, _DEVICE).gpu, self._ref(b, _DEVICE).gpu

    def _level(self, i: int, j: int) -> int:
        """PCIe distance: SYS across NUMA nodes, then a shared switch, host bridge, or NODE."""
        a, b = self.profile.gpus[i], self.profile.gpus[j]
        if a.numaNode != b.numaNode:
            return pynvml.NVML_TOPOLOGY_SYSTEM
        if a.pcieSwitch is not None and a.pcieSwitch == b.pcieSwitch:
            return getattr(pynvml, f"NVML_TOPOLOGY_{self.profile.pcieSwitches[a.pcieSwitch]}")
        if a.pcieRoot == b.pcieRoot:
            return pynvml.NVML_TOPOLOGY_HOSTBRIDGE
        return pynvml.NVML_TOPOLOGY_NODE

    def _nvlinked(self, i: int, j: int) -> bool:
        a, b = self.profile.gpus[i].nvlinks, self.profile.gpus[j].nvlinks
        return any(link.peer == j for link in a) or bool(
            {link.switch for link in a if link.switch is not None}
            & {link.switch for link in b if link.switch is not None})

    @_api
    def nvmlDeviceGetTopologyCommonAncestor(self, device1: Any, device2: Any) -> int:
        i, j = self._pair(device1, device2)
        if i == j:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._level(i, j)

    @_api
    def nvmlDeviceGetTopologyNearestGpus(self, device: Any, level: int) -> list[Any]:
        """GPUs at exactly `level`; a single-GPU machine answers INVALID_ARGUMENT (captured)."""
        gpu = self._ref(device, _DEVICE).gpu
        levels = {pynvml.NVML_TOPOLOGY_INTERNAL, pynvml.NVML_TOPOLOGY_SINGLE,
                  pynvml.NVML_TOPOLOGY_MULTIPLE, pynvml.NVML_TOPOLOGY_HOSTBRIDGE,
                  pynvml.NVML_TOPOLOGY_NODE, pynvml.NVML_TOPOLOGY_SYSTEM}
        if len(self.profile.gpus) < 2 or level not in levels:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return [_Ref(_DEVICE, j).handle() for j in self._present()
                if j != gpu and self._level(gpu, j) == level]

    @_api
    def nvmlDeviceGetP2PStatus(self, device1: Any, device2: Any, p2pIndex: int) -> int:
        """NVLink P2P wherever NVLink joins the pair; over PCIe only within a NUMA node."""
        i, j = self._pair(device1, device2)
        # pynvml defines NVML_P2P_CAPS_INDEX_READ as the tuple (0,), so READ is spelled 0.
        if p2pIndex not in (0, pynvml.NVML_P2P_CAPS_INDEX_WRITE, pynvml.NVML_P2P_CAPS_INDEX_NVLINK,
                            pynvml.NVML_P2P_CAPS_INDEX_ATOMICS, pynvml.NVML_P2P_CAPS_INDEX_PCI):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if i == j:
            return pynvml.NVML_P2P_STATUS_NOT_SUPPORTED
        nvlinked, local = self._nvlinked(i, j), self._level(i, j) < pynvml.NVML_TOPOLOGY_SYSTEM
        if p2pIndex == pynvml.NVML_P2P_CAPS_INDEX_NVLINK:
            return pynvml.NVML_P2P_STATUS_OK if nvlinked else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED
        if p2pIndex == pynvml.NVML_P2P_CAPS_INDEX_PCI or not nvlinked:
            if not local:
                return pynvml.NVML_P2P_STATUS_CHIPSET_NOT_SUPPORTED
            if p2pIndex == pynvml.NVML_P2P_CAPS_INDEX_ATOMICS:
                return pynvml.NVML_P2P_STATUS_NOT_SUPPORTED  # no atomics over PCIe
        return pynvml.NVML_P2P_STATUS_OK


@dataclass(frozen=True)
class MockHost:
    """HostView of a mock machine: sysfs facts from the profile, MIG cap minors by formula."""

    nvml: MockNvml

    def _gpu(self, bus_id: str) -> int | None:
        try:
            return self.nvml._by_bus.get(normalize_bus_id(bus_id))
        except ValueError:
            return None

    def pcie_root(self, bus_id: str) -> str | None:
        gpu = self._gpu(bus_id)
        return None if gpu is None else self.nvml.profile.gpus[gpu].pcieRoot

    def numa_node(self, bus_id: str) -> int | None:
        gpu = self._gpu(bus_id)
        return None if gpu is None else self.nvml.profile.gpus[gpu].numaNode

    def mig_minors(self, gpu_minor: int, gi_id: int, ci_id: int) -> tuple[int, int] | None:
        """/dev/nvidia-caps minors of a live GI and CI: 3 + 135*gpu + 9*gi (+ 1 + ci)."""
        gpus = self.nvml.profile.gpus
        gpu = next((i for i, g in enumerate(gpus) if g.minor == gpu_minor), None)
        layout = None if gpu is None else self.nvml._store.layouts()[gpu]
        gi = None if layout is None else layout.gis.get(gi_id)
        if gi is None or ci_id not in gi.cis:
            return None
        base = 3 + 135 * gpu_minor + 9 * gi_id
        return base, base + 1 + ci_id
