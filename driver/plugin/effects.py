"""What preparing a claim does to the node, and what undoes it: MIG devices created (and,
in dynamic MIG mode, MIG mode turned off for a whole GPU), time slices set, the claim's
MPS daemon started (`mps`), the claim's CDI spec written with the device nodes (and MPS
mounts) the container runtime gives the container. A
claim's effects are all or nothing: `apply` undoes what it did when a step fails, and
`teardown` tries every undo step and reports each failure. What an undo leaves (a MIG
device NVML would not destroy) is named in `ApplyFailure.left`, so that the claim's record
keeps it and a retry or the next start undoes it. At start, `sweep_mig`,
`remove_specs_except` and `sweep_mps` remove what no recorded claim explains.

A GPU's time slice is shared by the claims that set it (`records.timeslice_conflicts`
refuses another interval): an undo puts it back to Default only when no other claim holds
it. Setting it and deciding to put it back happen under the GPU's lock, and a claim is
recorded before it sets it, so an undo never puts back what a claim prepared alongside
has just set.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driver.errors import DriverError, PluginError
from driver.plugin import cdi
from driver.plugin.cdi import DeviceNode
from driver.plugin.checkpoint import ClaimRecord, MigInstance, PreparedDevice
from driver.plugin.claims import ClaimError, ClaimRef
from driver.plugin.mig import MigFailure, MigLeftover
from driver.plugin.mps import CONTAINER_PIPE, CONTAINER_SHM, Limits, MpsDevice, MpsFailure, limits
from driver.plugin.node import DeviceTools, Published
from driver.plugin.sharing import SharingFailure
from driver.safeload import LoadError, json_document, read_text

if TYPE_CHECKING:
    from driver.plugin.configschema import MpsConfig

log = logging.getLogger(__name__)

Holders = Callable[[str, str], Mapping[str, str]]
"""(GPU UUID, the claim being undone) -> the time slices other claims hold on the GPU,
interval by claim (`Records.timeslices_held`); read when an undo may put the GPU's back."""


class ApplyFailure(PluginError):
    """A claim's devices could not be prepared (what was done is undone, or the message
    says which undo steps failed too, and `left` holds the devices they left as they are
    on the node); `reason` as the step that failed gave it."""

    def __init__(self, reason: str, message: str,
                 left: tuple[PreparedDevice, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.left = left


def _mps_config(device: PreparedDevice) -> MpsConfig:
    """The mpsConfig a device was prepared with (its recorded config; none: no limits)."""
    from driver.plugin.configschema import MpsConfig  # pydantic: see its module

    sharing = (device.config or {}).get("sharing") or {}
    return MpsConfig.model_validate(sharing.get("mpsConfig") or {})


class Effects:
    def __init__(self, driver: str, cdi_root: Path, published: Published,
                 tools: DeviceTools) -> None:
        self.driver = driver
        self.cdi_root = cdi_root
        self.published = published
        self.tools = tools
        self._mutex = threading.Lock()
        self._gpu_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def _gpu_lock(self, gpu_uuid: str) -> threading.Lock:
        """The lock of a GPU's time slice (GPUs are few: the table only grows with them)."""
        with self._mutex:
            return self._gpu_locks[gpu_uuid]

    # -- a claim -----------------------------------------------------------------------

    def apply(self, ref: ClaimRef, devices: Sequence[PreparedDevice], held: Holders
              ) -> tuple[PreparedDevice, ...]:
        """Act on the claim's devices and write its CDI spec; the devices as done (with
        the ids of the MIG devices created). ApplyFailure if a step fails, after undoing
        the steps before it (a time slice put back only where `held` says no other claim
        holds it)."""
        index, tools = self.published.index, self.tools
        done: list[PreparedDevice] = []
        try:
            created: dict[str, MigInstance] = {}
            for device in devices:
                target = index[device.device]
                if self.published.dynamic_mig and target.kind == "gpu" and \
                        target.gpu.mig_profiles and not device.admin_access:
                    tools.mig.disable(target.gpu)  # its partitions are free (counters)
                if device.created_mig is not None and device.device not in created:
                    assert target.dynamic_profile is not None and target.placement
                    try:
                        made = tools.mig.create(target.gpu, target.dynamic_profile,
                                                target.placement)
                    except MigLeftover as err:  # ours to undo with the rest
                        done.append(replace(device, created_mig=replace(
                            device.created_mig, gi_id=err.gi_id)))
                        raise
                    created[device.device] = replace(device.created_mig, gi_id=made.gi_id,
                                                     ci_id=made.ci_id)
                if device.created_mig is not None:
                    device = replace(device, created_mig=created[device.device])
                if device.timeslice is not None:
                    with self._gpu_lock(device.gpu_uuid):
                        tools.timeslicer.set(device.gpu_uuid, device.timeslice)
                done.append(device)
            mps = self.mps_setup(done)
            if mps is not None:
                tools.mps.start(ref, *mps)
            self.write_spec(ref.uid, done)
        except Exception as err:  # expected: MigFailure, SharingFailure, MpsFailure, OSError,
            # ClaimError
            log.error("preparing ResourceClaim %s failed: %s; rolling back", ref, err,
                      exc_info=not isinstance(err, MigFailure | SharingFailure | MpsFailure |
                                              OSError | ClaimError))
            left, problems = self._undo(ref.uid, done, held)
            message = str(err) if not problems else \
                f"{err}; rollback also failed: {'; '.join(problems)}"
            raise ApplyFailure(err.reason if isinstance(err, DriverError) else "device_error",
                               message, left) from None
        return tuple(done)

    def teardown(self, uid: str, devices: Iterable[PreparedDevice], held: Holders
                 ) -> list[str]:
        """Undo a claim's devices (MIG devices it created, time slices it set that `held`
        says no other claim holds) and remove its spec; every step is tried, and each
        failure is returned."""
        return self._undo(uid, devices, held)[1]

    def _undo(self, uid: str, devices: Iterable[PreparedDevice], held: Holders
              ) -> tuple[tuple[PreparedDevice, ...], list[str]]:
        """`teardown`, and the devices whose undo failed. The spec goes first, and while it
        cannot be removed the devices stay: a spec on the node must mean its devices exist
        (a start without a checkpoint trusts it)."""
        try:
            self.remove_spec(uid)
        except OSError as err:
            return tuple(devices), [f"cannot remove the CDI spec: {err}"]
        left, problems = [], []
        devices = tuple(devices)
        # before the GPUs' other settings; by its directory, which a record rebuilt from
        # the claim's CDI spec does not name
        problems = self.tools.mps.stop(uid)
        left = list(devices) if problems else []
        present = {gpu.uuid for gpu in self.published.inventory.gpus}
        for device in devices:
            if device.gpu_uuid not in present:  # its MIG device and time slice went with it
                log.info("device %s: its GPU %s is gone; nothing on it to undo",
                         device.device, device.gpu_uuid)
                continue
            try:
                if device.created_mig is not None:
                    self.tools.mig.destroy(device.gpu_uuid, device.created_mig.profile_id,
                                           device.created_mig.start)
                if device.timeslice is not None:
                    self._put_back_timeslice(uid, device, held)
            except (MigFailure, SharingFailure) as err:
                if device not in left:
                    left.append(device)
                problems.append(str(err))
        return tuple(left), problems

    def _put_back_timeslice(self, uid: str, device: PreparedDevice, held: Holders) -> None:
        with self._gpu_lock(device.gpu_uuid):
            others = held(device.gpu_uuid, uid)
            if others:
                log.info("device %s: time slice %s of GPU %s kept for %s", device.device,
                         device.timeslice, device.gpu_uuid, ", ".join(sorted(others)))
                return
            self.tools.timeslicer.set(device.gpu_uuid, "Default")

    # -- MPS ---------------------------------------------------------------------------

    def mps_setup(self, devices: Sequence[PreparedDevice]
                  ) -> tuple[tuple[MpsDevice, ...], Limits] | None:
        """The claim's MPS daemon: its devices, in CUDA_VISIBLE_DEVICES order, and its
        limits; None if no device of the claim asks for MPS. ClaimError (bad_config) if
        its MPS devices ask for different limits (a claim has one daemon) or a limit
        cannot be applied."""
        served = [d for d in devices if d.mps is not None]
        if not served:
            return None
        configs = {repr(_mps_config(d)) for d in served}
        if len(configs) > 1:
            raise ClaimError("bad_config", "a claim has one MPS daemon: its devices "
                                           f"{', '.join(d.device for d in served)} must "
                                           "have one mpsConfig")
        mps_devices = []
        for device in dict((d.device, d) for d in served).values():
            target = self.published.index.get(device.device)
            if target is None:
                raise ClaimError("unknown_device", f"device {device.device} is no longer "
                                                   "published by this node")
            cuda = target.static_mig.uuid if target.static_mig is not None else \
                target.gpu.uuid
            # a GPU shared by capacity keeps its compute mode: the claims sharing it each
            # have a daemon, and EXCLUSIVE_PROCESS would let only one of them on it
            mps_devices.append(MpsDevice(device.device, cuda, target.gpu.uuid,
                                         target.placement is None and device.share_id is None))
        try:
            return tuple(mps_devices), limits(_mps_config(served[0]), mps_devices,
                                              "sharing.mpsConfig")
        except ValueError as err:
            raise ClaimError("bad_config", str(err)) from None

    def sweep_mps(self, uids: Collection[str]) -> None:
        """Stop the MPS daemons no prepared claim explains (a directory, or a daemon's pod,
        of a claim whose record is gone), as `remove_specs_except` does for specs."""
        for uid in sorted(self.tools.mps.leftovers() - set(uids)):
            log.warning("stopping the MPS daemon of a claim that is not prepared: %s", uid)
            for problem in self.tools.mps.stop(uid):
                log.error("%s", problem)

    # -- CDI specs ---------------------------------------------------------------------

    def has_spec(self, uid: str) -> bool:
        return (self.cdi_root / cdi.spec_file_name(self.driver, uid)).exists()

    def write_spec(self, uid: str, devices: Sequence[PreparedDevice]) -> None:
        """The claim's CDI spec, one CDI device per device of the claim; ClaimError if a
        device is no longer published or its MIG device nodes are unknown."""
        specs: dict[str, cdi.CdiDevice] = {}
        files = self.tools.files
        for device in devices:
            if device.device not in specs:
                specs[device.device] = cdi.CdiDevice(cdi.device_name(uid, device.device),
                                                     self._nodes(device), *self._mps_edits(
                                                         uid, device))
        if any(d.mps is not None for d in devices):  # the claim's daemon, not the host's
            files = replace(files, mounts=tuple(m for m in files.mounts
                                                if m.container_path != CONTAINER_PIPE))
        spec = cdi.build_spec(self.driver, list(specs.values()), files)
        cdi.write_spec(self.cdi_root, self.driver, uid, cdi.encode_spec(spec, files))

    def _mps_edits(self, uid: str, device: PreparedDevice
                   ) -> tuple[tuple[cdi.Mount, ...], tuple[str, ...]]:
        """An MPS device's container joins the claim's daemon: its pipe directory where
        MPS clients look, named in their environment too, and the /dev/shm they share."""
        if device.mps is None:
            return (), ()
        daemons = self.tools.mps
        return ((cdi.Mount(str(daemons.pipe(uid)), CONTAINER_PIPE, cdi.IPC_MOUNT_OPTIONS),
                 cdi.Mount(str(daemons.shm(uid)), CONTAINER_SHM, cdi.IPC_MOUNT_OPTIONS)),
                (f"CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE}",))

    def remove_spec(self, uid: str) -> None:
        cdi.remove_spec(self.cdi_root, self.driver, uid)

    def claim_specs(self) -> dict[str, Any]:
        """This driver's claim specs on the node, by claim UID, as read (None: unreadable,
        which is logged)."""
        specs: dict[str, Any] = {}
        for uid, path in cdi.claim_specs(self.cdi_root, self.driver).items():
            try:
                specs[uid] = json_document(read_text(path), str(path))
            except LoadError as err:
                log.error("cannot read the CDI spec of claim %s: %s", uid, err)
                specs[uid] = None
        return specs

    def remove_specs_except(self, uids: Collection[str]) -> None:
        """Remove the CDI specs of this driver's claims other than `uids`."""
        for uid, path in cdi.claim_specs(self.cdi_root, self.driver).items():
            if uid not in uids:
                log.info("removing the CDI spec of a claim that is not prepared: %s", path)
                self.remove_spec(uid)

    def _nodes(self, device: PreparedDevice) -> tuple[DeviceNode, ...]:
        target = self.published.index.get(device.device)
        if target is None:
            raise ClaimError("unknown_device", f"device {device.device} is no longer "
                                               "published by this node")
        gpu = target.gpu
        if target.placement is None:
            return self.tools.devices.gpu_nodes(gpu)
        if target.static_mig is not None:
            mig = target.static_mig
            minors = None if mig.gi_cap_minor is None or mig.ci_cap_minor is None else \
                (mig.gi_cap_minor, mig.ci_cap_minor)
        else:
            made = device.created_mig
            assert made is not None and made.gi_id is not None and made.ci_id is not None
            minors = self.tools.host.mig_minors(gpu.minor, made.gi_id, made.ci_id)
        if minors is None:
            raise ClaimError("device_error", f"device {device.device}: the /dev/nvidia-caps "
                                             "minors of its MIG instance are unknown "
                                             "(/proc/driver/nvidia/capabilities)")
        return self.tools.devices.mig_nodes(gpu, minors)

    # -- MIG ---------------------------------------------------------------------------

    def sweep_mig(self, records: Iterable[ClaimRecord]) -> None:
        """Dynamic MIG owns the MIG devices: any the records do not explain is destroyed,
        so the free placements are what the published slices promise."""
        wanted = {(d.gpu_uuid, d.created_mig.profile_id, d.created_mig.start)
                  for r in records for d in r.devices if d.created_mig is not None}
        for gpu in self.published.inventory.gpus:
            if not gpu.mig_profiles:  # MIG mode may have changed since discovery
                continue
            try:
                for live in self.tools.mig.live(gpu):
                    if (gpu.uuid, live.profile_id, live.start) not in wanted:
                        log.warning("destroying MIG GPU instance %d on %s that no prepared "
                                    "claim holds", live.gi_id, gpu.uuid)
                        self.tools.mig.destroy(gpu.uuid, live.profile_id, live.start)
            except MigFailure as err:  # e.g. in use: a claim that needs it fails cleanly
                log.error("%s", err)
