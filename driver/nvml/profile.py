"""Machine profiles for the mock NVML backend: the schema, its cross-field rules, and loading.

A profile is a YAML file describing one machine: the GPUs with their model, identity, PCIe
and NUMA placement, NVLinks, live MIG instances and injected NVML failures. GPU models are
defined once, in `profiles/_models.yaml` (shared by every profile, a user's included) or in
the profile's own `models:`. Loading checks the shape (pydantic, unknown fields refused) and
the cross-field rules (links to GPUs that exist, MIG placements that do not overlap, unique
identities), and every problem becomes a ProfileError naming the file and the field:
`dgx-h100.yaml: gpus[3].nvlinks[0].peer: no GPU with index 9`.

MIG facts follow allocator-nvml-mig.md part C: placements count memory slices (8 per GPU),
GPU-instance ids follow the heap layout of those slices, and memorySizeMB is the MiB that
nvmlDeviceGetGpuInstanceProfileInfo reports.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pynvml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from driver.errors import NvmlLayerError
from driver.safeload import LoadError, read_text, yaml_document

PROFILES_DIR = Path(__file__).with_name("profiles")
MODELS_FILE = "_models.yaml"

MEMORY_SLICES = 8
# The GPU-instance profile indexes the modeled drivers know: R580 answers INVALID_ARGUMENT
# from NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX (0x11) on (real H200 discovery trace).
GI_PROFILE_INDEXES = range(pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE_GFX)

_BUS_ID = re.compile(r"([0-9a-f]{4}|[0-9a-f]{8}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])", re.I)
_GPU_UUID = r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_PCIE_ROOT = r"^pci[0-9a-f]{4}:[0-9a-f]{2}$"


class ProfileError(NvmlLayerError, ValueError):
    """A profile (or mock state file) that cannot describe a machine; names file and field."""

    def __init__(self, file: str, problems: Sequence[tuple[str, str]]) -> None:
        self.file = file
        self.problems = list(problems)
        super().__init__("; ".join(f"{file}: {where}: {what}" if where else f"{file}: {what}"
                                   for where, what in self.problems))


class FieldError(NvmlLayerError, ValueError):
    """Raised in a validator to point below the model it validates (`nvlinks[0].peer`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def normalize_bus_id(bus_id: str) -> str:
    """A PCI address as NVML spells it (`00000000:18:00.0`), from either NVML's or sysfs' form."""
    match = _BUS_ID.fullmatch(bus_id)
    if match is None:
        raise ValueError(f"{bus_id!r} is not a PCI address like 00000000:18:00.0")
    domain, bus, device, function = match.groups()
    return f"{int(domain, 16):08X}:{bus.upper()}:{device.upper()}.{function}"


def _bus_id_field(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("quote it, e.g. \"00000000:18:00.0\": YAML reads an unquoted bus id "
                         "as a number")
    return normalize_bus_id(value)


BusId = Annotated[str, BeforeValidator(_bus_id_field)]
M = TypeVar("M", bound=BaseModel)


def _nvml_constant(prefix: str, name: str) -> int:
    value = getattr(pynvml, prefix + name, None)
    if not isinstance(value, int):
        raise ValueError(f"{name!r} is not an NVML value ({prefix}{name} does not exist)")
    return value


# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Placements(_Strict):
    """Where a GPU-instance profile may sit: each start (memory slice) with one size."""

    starts: list[int] = Field(min_length=1)
    size: Literal[1, 2, 4, 8]

    @model_validator(mode="after")
    def _fit(self) -> Placements:
        for i, start in enumerate(self.starts):
            if start < 0 or start % self.size or start + self.size > MEMORY_SLICES:
                raise FieldError(f"starts[{i}]", f"{start}:{self.size} is not an aligned block "
                                 f"of the {MEMORY_SLICES} memory slices")
        ordered = sorted(self.starts)
        for a, b in itertools.pairwise(ordered):
            if b - a < self.size:
                raise FieldError("starts", f"placements {a}:{self.size} and {b}:{self.size} "
                                 "overlap")
        return self


class GiProfile(_Strict):
    """One GPU-instance profile, with the fields of nvmlGpuInstanceProfileInfo_v2_t."""

    id: int = Field(ge=0)
    name: str = Field(pattern=r"^MIG \d+g\.\d+gb")
    sliceCount: int = Field(ge=1, le=7)
    instanceCount: int = Field(ge=1)
    multiprocessorCount: int = Field(ge=1)
    copyEngineCount: int = Field(ge=0)
    decoderCount: int = Field(ge=0)
    encoderCount: int = Field(ge=0)
    jpegCount: int = Field(ge=0)
    ofaCount: int = Field(ge=0)
    memorySizeMB: int = Field(ge=1)
    placements: Placements

    @model_validator(mode="after")
    def _enough_placements(self) -> GiProfile:
        if self.instanceCount > len(self.placements.starts):
            raise FieldError("instanceCount", f"{self.instanceCount} instances but only "
                             f"{len(self.placements.starts)} placements")
        return self


class MigSpec(_Strict):
    """A model's MIG capability: profiles keyed by NVML_GPU_INSTANCE_PROFILE_* index."""

    maxDevices: int = Field(ge=1)
    profiles: dict[int, GiProfile] = Field(min_length=1)

    @model_validator(mode="after")
    def _indexes_and_ids(self) -> MigSpec:
        seen: dict[int, int] = {}
        for index, profile in self.profiles.items():
            if index not in GI_PROFILE_INDEXES:
                raise FieldError(f"profiles[{index}]", "not an NVML_GPU_INSTANCE_PROFILE_* index "
                                 f"(0..{GI_PROFILE_INDEXES[-1]})")
            if profile.id in seen:
                raise FieldError(f"profiles[{index}].id", f"id {profile.id} is also "
                                 f"profiles[{seen[profile.id]}]'s")
            seen[profile.id] = index
        return self


class NvLinkSpec(_Strict):
    """A model's NVLink ports; `version` names the nvmlNvlinkVersion_t NVML reports."""

    version: str
    links: int = Field(ge=1, le=pynvml.NVML_NVLINK_MAX_LINKS)

    @field_validator("version")
    @classmethod
    def _known(cls, version: str) -> str:
        _nvml_constant("NVML_NVLINK_VERSION_", version.replace(".", "_"))
        return version

    @property
    def enum(self) -> int:
        """The enum value, not the generation: A100 reports 3.1 (5), H100 4.0 (6)."""
        return _nvml_constant("NVML_NVLINK_VERSION_", self.version.replace(".", "_"))


class Memory(_Strict):
    """nvmlDeviceGetMemoryInfo at idle, in bytes (`used` includes the driver's reservation)."""

    total: int = Field(ge=1)
    used: int = Field(ge=0)

    @model_validator(mode="after")
    def _fits(self) -> Memory:
        if self.used > self.total:
            raise FieldError("used", f"{self.used} is more than total {self.total}")
        return self


class GpuModel(_Strict):
    """What every GPU of one product reports; brand and architecture name pynvml constants."""

    name: str
    brand: str
    architecture: str
    cudaComputeCapability: tuple[int, int]
    memory: Memory
    pciDeviceId: int
    pciSubSystemId: int
    nvlink: NvLinkSpec | None = None
    mig: MigSpec | None = None

    @field_validator("brand")
    @classmethod
    def _brand(cls, brand: str) -> str:
        _nvml_constant("NVML_BRAND_", brand)
        return brand

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, architecture: str) -> str:
        _nvml_constant("NVML_DEVICE_ARCH_", architecture)
        return architecture

    @property
    def brand_value(self) -> int:
        return _nvml_constant("NVML_BRAND_", self.brand)

    @property
    def architecture_value(self) -> int:
        return _nvml_constant("NVML_DEVICE_ARCH_", self.architecture)


class NvLink(_Strict):
    """`count` links of a GPU to one peer GPU (by index) or one NVSwitch (by index)."""

    peer: int | None = None
    switch: int | None = None
    count: int = Field(ge=1)

    @model_validator(mode="after")
    def _one_end(self) -> NvLink:
        if (self.peer is None) == (self.switch is None):
            raise FieldError("peer", "give exactly one of peer (a GPU index) or switch")
        return self


class ComputeInstanceSpec(_Strict):
    """A live compute instance; start and id are chosen as NVML would when left out."""

    profileId: int
    start: int | None = None
    id: int | None = None


class GpuInstanceSpec(_Strict):
    """A live GPU instance; start is chosen as NVML would when left out."""

    profileId: int
    start: int | None = None
    computeInstances: list[ComputeInstanceSpec] = []


class GpuMig(_Strict):
    """A GPU's MIG mode (current = pending) and the instances live on it."""

    enabled: bool
    gpuInstances: list[GpuInstanceSpec] = []


class Gpu(_Strict):
    """One GPU, in NVML index order.

    `faults` maps a pynvml function name to the NVML_ERROR_* (without the prefix) that this
    GPU answers it with; an alias such as nvmlDeviceGetPciInfo_v3 fails with its function.
    """

    model: str
    uuid: str = Field(pattern=_GPU_UUID)
    minor: int = Field(ge=0, le=254)
    busId: BusId
    pcieRoot: str = Field(pattern=_PCIE_ROOT)
    numaNode: int | None = Field(ge=0)
    pcieSwitch: str | None = None
    nvlinks: list[NvLink] = []
    mig: GpuMig | None = None
    faults: dict[str, str] = {}

    @field_validator("faults")
    @classmethod
    def _faults(cls, faults: dict[str, str]) -> dict[str, str]:
        for function, code in faults.items():
            if not (function.startswith("nvml") and callable(getattr(pynvml, function, None))):
                raise FieldError(function, "not a pynvml function")
            try:
                _nvml_constant("NVML_ERROR_", code)
            except ValueError as err:
                raise FieldError(function, str(err)) from None
        return faults

    def fault(self, function: str) -> int | None:
        """The NVML_ERROR_* this GPU answers `function` with, if one is injected."""
        code = self.faults.get(function)
        return None if code is None else _nvml_constant("NVML_ERROR_", code)

    @property
    def mig_enabled(self) -> bool:
        return self.mig is not None and self.mig.enabled


class NvSwitch(_Strict):
    """An NVSwitch chip as NVML reports it at the far end of a GPU's links."""

    busId: BusId
    pciDeviceId: int


class Profile(_Strict):
    """One machine. `gpus` are in NVML index order; links and switches refer to indexes."""

    description: str
    driverVersion: str
    cudaDriverVersion: int
    models: dict[str, GpuModel] = {}
    nvswitches: list[NvSwitch] = []
    pcieSwitches: dict[str, Literal["SINGLE", "MULTIPLE"]] = {}
    gpus: list[Gpu] = Field(min_length=1)

    _resolved: dict[str, GpuModel] = PrivateAttr(default_factory=dict)

    def model_of(self, index: int) -> GpuModel:
        return self._resolved[self.gpus[index].model]

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Profile:
        library: Mapping[str, GpuModel] = (info.context or {}).get("library", {})
        self._resolved.update(library)
        self._resolved.update(self.models)
        for check in (self._models_exist, self._identities, self._links, self._switches,
                      self._mig):
            check()
        return self

    def _models_exist(self) -> None:
        for i, gpu in enumerate(self.gpus):
            if gpu.model not in self._resolved:
                raise FieldError(f"gpus[{i}].model", f"unknown model {gpu.model!r} (known: "
                                 f"{', '.join(sorted(self._resolved))})")

    def _identities(self) -> None:
        owners: dict[tuple[str, object], str] = {}
        for i, switch in enumerate(self.nvswitches):
            _claim(owners, ("busId", switch.busId), f"nvswitches[{i}].busId")
        for i, gpu in enumerate(self.gpus):
            for name in ("uuid", "minor", "busId"):
                _claim(owners, (name, getattr(gpu, name)), f"gpus[{i}].{name}")

    def _links(self) -> None:
        counts: dict[tuple[int, int], int] = {}
        for i, gpu in enumerate(self.gpus):
            spec = self.model_of(i).nvlink
            if gpu.nvlinks and spec is None:
                raise FieldError(f"gpus[{i}].nvlinks", f"model {gpu.model!r} has no NVLink")
            for j, link in enumerate(gpu.nvlinks):
                at = f"gpus[{i}].nvlinks[{j}]"
                if link.peer is not None:
                    if not 0 <= link.peer < len(self.gpus):
                        raise FieldError(f"{at}.peer", f"no GPU with index {link.peer}")
                    if link.peer == i:
                        raise FieldError(f"{at}.peer", "a GPU cannot link to itself")
                    counts[(i, link.peer)] = counts.get((i, link.peer), 0) + link.count
                elif link.switch is not None and not 0 <= link.switch < len(self.nvswitches):
                    raise FieldError(f"{at}.switch", f"no NVSwitch with index {link.switch}")
            total = sum(link.count for link in gpu.nvlinks)
            if spec is not None and total > spec.links:
                raise FieldError(f"gpus[{i}].nvlinks", f"{total} links but a {gpu.model} has "
                                 f"{spec.links}")
        for (a, b), n in counts.items():
            back = counts.get((b, a), 0)
            if back != n:
                raise FieldError(f"gpus[{a}].nvlinks", f"{n} links to GPU {b}, but GPU {b} has "
                                 f"{back} back")

    def _switches(self) -> None:
        first: dict[str, int] = {}
        for i, gpu in enumerate(self.gpus):
            if gpu.pcieSwitch is None:
                continue
            at = f"gpus[{i}].pcieSwitch"
            if gpu.pcieSwitch not in self.pcieSwitches:
                raise FieldError(at, f"{gpu.pcieSwitch!r} is not in pcieSwitches")
            other = self.gpus[first.setdefault(gpu.pcieSwitch, i)]
            if (other.pcieRoot, other.numaNode) != (gpu.pcieRoot, gpu.numaNode):
                raise FieldError(at, f"GPUs behind {gpu.pcieSwitch!r} must share pcieRoot and "
                                 "numaNode")

    def _mig(self) -> None:
        for i, gpu in enumerate(self.gpus):
            if gpu.mig is None:
                continue
            spec = self.model_of(i).mig
            if spec is None:
                raise FieldError(f"gpus[{i}].mig", f"model {gpu.model!r} has no MIG")
            if gpu.mig.gpuInstances and not gpu.mig.enabled:
                raise FieldError(f"gpus[{i}].mig.gpuInstances", "MIG is not enabled")
            from driver.nvml.miglayout import MigError, MigLayout  # the rules build on this schema

            try:
                MigLayout(spec, gpu.mig.enabled).restore(gpu.mig.gpuInstances)
            except MigError as err:
                raise FieldError(f"gpus[{i}].mig.{err.where}", err.message) from None


def _claim(owners: dict[tuple[str, object], str], key: tuple[str, object], path: str) -> None:
    if key in owners:
        raise FieldError(path, f"{key[1]} is also {owners[key]}")
    owners[key] = path


class ModelLibrary(_Strict):
    """The shape of `_models.yaml`."""

    models: dict[str, GpuModel]


class GpuCondition(_Strict):
    """The lasting faults of one mock GPU, as `gpu-dra mock inject` left them.

    `recoveryAction` is the nvmlDeviceGpuRecoveryAction_t value NVML reports in the field
    NVML_FI_DEV_GET_GPU_RECOVERY_ACTION; the row-remap flags are what
    nvmlDeviceGetRemappedRows answers as isPending and failureOccurred.
    """

    lost: bool = False
    removed: bool = False
    resetRequired: bool = False
    recoveryAction: int = Field(default=0, ge=0)
    rowRemapPending: bool = False
    rowRemapFailure: bool = False


class FaultEvent(_Strict):
    """One injected NVML event, delivered once to each event set registered when it came.

    `lost` is not an NVML event type: an event set wait answers it as GPU_IS_LOST.
    """

    seq: int = Field(ge=1)
    gpu: str
    kind: Literal["xid", "ecc-dbe", "lost"]
    xid: int | None = Field(default=None, ge=1)


class HealthState(_Strict):
    """The mock GPUs' injected faults: the recent events (numbered by `seq`, the last one
    given) and the lasting conditions, by GPU UUID."""

    seq: int = Field(default=0, ge=0)
    events: list[FaultEvent] = []
    gpus: dict[str, GpuCondition] = {}


ComputeMode = Literal[0, 2, 3]  # the NVML compute modes that may be set (not 1: removed)


class MigState(_Strict):
    """The mock's persisted state, by GPU UUID: MIG instances and MIG modes (what a real GPU
    keeps across restarts; a GPU missing from `migEnabled` has its profile's mode), the
    machine's GPUs with their minor numbers (so `gpu-dra mock inject` can address them
    without the profile), the injected faults, and the compute modes set (NVML's
    values: 0 DEFAULT, 2 PROHIBITED, 3 EXCLUSIVE_PROCESS; a GPU missing has DEFAULT, as the
    H200 capture's; kept, as a real GPU keeps it until a reboot or reset, and left out of
    the file while none is set, so older drivers still read it). Version 1 files (MIG
    only) are read as they are; every write is version 2."""

    version: Literal[1, 2]
    gpus: dict[str, list[GpuInstanceSpec]]
    migEnabled: dict[str, bool] = {}
    machine: dict[str, int] = {}
    health: HealthState = HealthState()
    computeMode: dict[str, ComputeMode] = {}


def read_yaml(path: Path, file: str) -> Any:
    """Parse a YAML file (bounded, keys unique); a problem names the file and the line."""
    try:
        return yaml_document(read_text(path), file, unique_keys=True)
    except LoadError as err:
        raise ProfileError(file, [(err.at, err.problem)]) from None


def validate(model: type[M], data: Any, file: str, context: dict[str, Any] | None = None) -> M:
    """Validate data into `model`; every problem becomes a ProfileError entry with its path."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise ProfileError(file, [_problem(e) for e in err.errors()]) from None


def _problem(error: Any) -> tuple[str, str]:
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        return (f"{path}.{cause.path}" if path else cause.path), cause.message
    if isinstance(cause, ValueError):
        return path, str(cause)
    return path, error["msg"]


@functools.cache
def model_library() -> dict[str, GpuModel]:
    """The shipped GPU models every profile may name."""
    path = PROFILES_DIR / MODELS_FILE
    return validate(ModelLibrary, read_yaml(path, MODELS_FILE), MODELS_FILE).models


def parse_profile(path: Path, file: str) -> Profile:
    """Read and validate a profile file; `file` is how errors name it."""
    return validate(Profile, read_yaml(path, file), file, {"library": model_library()})
