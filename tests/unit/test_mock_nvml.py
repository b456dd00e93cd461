"""The mock answers the pynvml calls the driver makes as NVML would, on every shipped machine,
and its MIG is alive: instances are created and destroyed by NVML's rules and outlive the
process that made them when a state file is given."""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from driver.nvml import Provider
from driver.nvml.mock import MockHost, MockNvml, list_profiles, load_profile, mock_provider
from driver.nvml.profile import GI_PROFILE_INDEXES, ProfileError

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def started(name_or_path: str | Path, state_path: Path | None = None) -> MockNvml:
    nvml = MockNvml(load_profile(str(name_or_path)), state_path)
    nvml.nvmlInit()
    return nvml


def code_of(call: Callable[..., Any], *args: Any) -> int:
    """The NVML error code call(*args) raises (fails the test if it succeeds)."""
    with pytest.raises(pynvml.NVMLError) as err:
        call(*args)
    return err.value.value


@pytest.fixture
def lab(edited_profile: Callable[..., Path]) -> Path:
    """a100-mig with GPU 0's MIG on but empty: a bench for creating instances."""
    return edited_profile("a100-mig", lambda d: d["gpus"][0]["mig"].update(gpuInstances=[]))


def placement(start: int, size: int) -> pynvml.c_nvmlGpuInstancePlacement_t:
    return pynvml.c_nvmlGpuInstancePlacement_t(start, size)


def live_gis(nvml: MockNvml, device: Any) -> set[tuple[int, int, int]]:
    """(GI id, profile id, start) of every live GPU instance, read back through NVML."""
    found = set()
    for profile_id in (19, 20, 15, 14, 9, 5, 0):
        array = (pynvml.c_nvmlGpuInstance_t * 8)()
        count = ctypes.c_uint(8)
        nvml.nvmlDeviceGetGpuInstances(device, profile_id, array, ctypes.byref(count))
        for gi in array[:count.value]:
            info = nvml.nvmlGpuInstanceGetInfo(gi)
            assert info.profileId == profile_id
            found.add((info.id, info.profileId, info.placement.start))
    return found


# --------------------------------------------------------------------------- life cycle


def test_calls_outside_init_shutdown_are_uninitialized() -> None:
    nvml = MockNvml(load_profile("l4-8x"))
    assert code_of(nvml.nvmlDeviceGetCount) == pynvml.NVML_ERROR_UNINITIALIZED
    assert code_of(nvml.nvmlShutdown) == pynvml.NVML_ERROR_UNINITIALIZED
    nvml.nvmlInit()
    nvml.nvmlInit()
    nvml.nvmlShutdown()
    assert nvml.nvmlDeviceGetCount() == 8, "init is reference counted"
    nvml.nvmlShutdown()
    assert code_of(nvml.nvmlDeviceGetCount) == pynvml.NVML_ERROR_UNINITIALIZED


def test_mock_provider_wires_nvml_and_host() -> None:
    provider = mock_provider("dgx-h100")
    assert isinstance(provider, Provider) and provider.name == "mock:dgx-h100"
    assert isinstance(provider.nvml, MockNvml) and isinstance(provider.host, MockHost)
    assert provider.host.nvml is provider.nvml


def test_handles_are_pynvml_types_and_bad_ones_are_refused() -> None:
    nvml = started("dgx-h100")
    device = nvml.nvmlDeviceGetHandleByIndex(7)
    assert isinstance(device, pynvml.c_nvmlDevice_t)
    for index in (8, -1, "0"):
        assert code_of(nvml.nvmlDeviceGetHandleByIndex, index) == \
            pynvml.NVML_ERROR_INVALID_ARGUMENT
    for junk in (None, 7, "GPU-0", ctypes.c_uint(1)):
        assert code_of(nvml.nvmlDeviceGetName, junk) == pynvml.NVML_ERROR_INVALID_ARGUMENT


# --------------------------------------------------------------------------- one GPU


def test_identity_of_a_dgx_h100_gpu() -> None:
    nvml = started("dgx-h100")
    handle = nvml.nvmlDeviceGetHandleByIndex(3)
    assert nvml.nvmlDeviceGetIndex(handle) == 3
    assert nvml.nvmlDeviceGetMinorNumber(handle) == 3
    assert nvml.nvmlDeviceGetName(handle) == "NVIDIA H100 80GB HBM3"
    assert nvml.nvmlDeviceGetUUID(handle) == "GPU-68a37c14-cba3-5893-8527-70e1ada18b19"
    assert nvml.nvmlDeviceGetBrand(handle) == pynvml.NVML_BRAND_NVIDIA
    assert nvml.nvmlDeviceGetArchitecture(handle) == pynvml.NVML_DEVICE_ARCH_HOPPER
    assert nvml.nvmlDeviceGetCudaComputeCapability(handle) == (9, 0)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    assert isinstance(memory, pynvml.c_nvmlMemory_t)
    assert memory.total == 81559 * MIB and memory.free + memory.used == memory.total
    v2 = nvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    assert (v2.total, v2.reserved, v2.used) == (memory.total, memory.used, 0)
    pci = nvml.nvmlDeviceGetPciInfo(handle)
    assert isinstance(pci, pynvml.nvmlPciInfo_t)
    assert (pci.busId, pci.busIdLegacy, pci.domain, pci.bus, pci.device) == \
        ("00000000:5D:00.0", "0000:5D:00.0", 0, 0x5D, 0)
    assert (pci.pciDeviceId, pci.pciSubSystemId) == (0x233010DE, 0x16C110DE)
    assert nvml.nvmlDeviceGetMigMode(handle) == [0, 0]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(handle) == 0
    assert code_of(nvml.nvmlDeviceGetNumaNodeId, handle) == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert nvml.nvmlSystemGetDriverVersion() == "535.129.03"
    assert nvml.nvmlSystemGetCudaDriverVersion() == 12020


def test_handle_by_uuid_finds_gpus_and_mig_devices() -> None:
    nvml = started("a100-mig")
    gpu1 = nvml.nvmlDeviceGetHandleByUUID("GPU-70e3794e-f4cb-546f-aa37-72f210f1150d")
    assert nvml.nvmlDeviceGetIndex(gpu1) == 1
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(nvml.nvmlDeviceGetHandleByIndex(0), 2)
    again = nvml.nvmlDeviceGetHandleByUUID(nvml.nvmlDeviceGetUUID(mig))
    assert nvml.nvmlDeviceGetGpuInstanceId(again) == nvml.nvmlDeviceGetGpuInstanceId(mig)
    assert code_of(nvml.nvmlDeviceGetHandleByUUID, "GPU-nope") == pynvml.NVML_ERROR_NOT_FOUND


def test_gpu_instance_profiles_by_index() -> None:
    nvml = started("dgx-h100")
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    supported = {}
    for index in GI_PROFILE_INDEXES:
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
        except pynvml.NVMLError_NotSupported:
            continue
        assert isinstance(info, pynvml.c_nvmlGpuInstanceProfileInfo_v2_t)
        supported[index] = (info.id, info.name, info.memorySizeMB, info.isP2pSupported)
    assert supported == {0: (19, "MIG 1g.10gb", 9984, 0), 1: (14, "MIG 2g.20gb", 20096, 0),
                         2: (9, "MIG 3g.40gb", 40448, 0), 3: (5, "MIG 4g.40gb", 40448, 0),
                         4: (0, "MIG 7g.80gb", 81152, 0), 7: (20, "MIG 1g.10gb+me", 9984, 0),
                         9: (15, "MIG 1g.20gb", 20096, 0)}
    v1 = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, 0, 1)
    assert isinstance(v1, pynvml.c_nvmlGpuInstanceProfileInfo_t) and v1.id == 19
    assert code_of(nvml.nvmlDeviceGetGpuInstanceProfileInfo, handle, 0, 3) == \
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    assert code_of(nvml.nvmlDeviceGetGpuInstanceProfileInfo, handle, 16) == \
        pynvml.NVML_ERROR_NOT_SUPPORTED
    assert code_of(nvml.nvmlDeviceGetGpuInstanceProfileInfo, handle, 17) == \
        pynvml.NVML_ERROR_INVALID_ARGUMENT, "R580 does not know 3_SLICE_GFX (the H200 trace)"


def test_a_gpu_without_mig_answers_not_supported_or_zero() -> None:
    nvml = started("l4-8x")
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    not_supported = pynvml.NVML_ERROR_NOT_SUPPORTED
    assert code_of(nvml.nvmlDeviceGetMigMode, handle) == not_supported
    assert code_of(nvml.nvmlDeviceSetMigMode, handle, pynvml.NVML_DEVICE_MIG_ENABLE) == \
        not_supported
    for index in range(pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        assert code_of(nvml.nvmlDeviceGetGpuInstanceProfileInfo, handle, index) == not_supported
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(handle) == 0
    assert code_of(nvml.nvmlDeviceGetGpuInstanceRemainingCapacity, handle, 19) == not_supported
    assert code_of(nvml.nvmlDeviceCreateGpuInstance, handle, 19) == not_supported
    count = ctypes.c_uint(0)
    assert code_of(nvml.nvmlDeviceGetGpuInstancePossiblePlacements, handle, 19, None,
                   ctypes.byref(count)) == not_supported


# --------------------------------------------------------------------------- NVLink


def remote_bus_ids(nvml: MockNvml, handle: Any, links: int) -> list[str]:
    return [nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId for link in range(links)]


def test_nvswitch_boards_link_every_port_to_a_switch() -> None:
    for name, links, version, switches in (("dgx-h100", 18, pynvml.NVML_NVLINK_VERSION_4_0, 4),
                                           ("dgx-a100", 12, pynvml.NVML_NVLINK_VERSION_3_1, 6)):
        nvml = started(name)
        for index in range(8):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for link in range(links):
                assert nvml.nvmlDeviceGetNvLinkState(handle, link) == pynvml.NVML_FEATURE_ENABLED
                assert nvml.nvmlDeviceGetNvLinkVersion(handle, link) == version
                assert nvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link) == \
                    pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH
            assert code_of(nvml.nvmlDeviceGetNvLinkState, handle, links) == \
                pynvml.NVML_ERROR_INVALID_ARGUMENT
            remote = remote_bus_ids(nvml, handle, links)
            assert len(set(remote)) == switches
            assert not set(remote) & {nvml.nvmlDeviceGetPciInfo(
                nvml.nvmlDeviceGetHandleByIndex(i)).busId for i in range(8)}
            (field,) = nvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT])
            assert (field.nvmlReturn, field.valueType, field.value.uiVal) == \
                (pynvml.NVML_SUCCESS, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, links)


def test_bridges_and_rings_link_to_peer_gpus() -> None:
    nvml = started("a100-pcie-4x")
    bus = [nvml.nvmlDeviceGetPciInfo(nvml.nvmlDeviceGetHandleByIndex(i)).busId for i in range(4)]
    for index, peer in ((0, 1), (1, 0), (2, 3), (3, 2)):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        assert remote_bus_ids(nvml, handle, 12) == [bus[peer]] * 12
        assert nvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, 0) == \
            pynvml.NVML_NVLINK_DEVICE_TYPE_GPU
    mesh = started("mesh-4x")
    handle = mesh.nvmlDeviceGetHandleByIndex(0)
    assert mesh.nvmlDeviceGetNvLinkVersion(handle, 0) == pynvml.NVML_NVLINK_VERSION_2_0
    ring = {mesh.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId for link in range(6)}
    assert ring == {"00000000:07:00.0", "00000000:86:00.0"}, "GPUs 1 and 3, not 2"
    assert code_of(mesh.nvmlDeviceGetNvLinkState, handle, 6) == pynvml.NVML_ERROR_INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["l4-8x", "h100-80gb-hbm3", "a100-mig"])
def test_gpus_without_nvlink_peers_answer_not_supported(name: str) -> None:
    nvml = started(name)
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        assert code_of(nvml.nvmlDeviceGetNvLinkState, handle, link) == \
            pynvml.NVML_ERROR_NOT_SUPPORTED
    (field,) = nvml.nvmlDeviceGetFieldValues(handle, [(pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT, 0)])
    assert field.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_ports_without_a_wire_are_disabled(edited_profile: Callable[..., Path]) -> None:
    def one_bridge(data: dict[str, Any]) -> None:
        for gpu in data["gpus"][:2]:
            gpu["nvlinks"][0]["count"] = 4

    nvml = started(edited_profile("a100-pcie-4x", one_bridge))
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    states = [nvml.nvmlDeviceGetNvLinkState(handle, link) for link in range(12)]
    assert states == [pynvml.NVML_FEATURE_ENABLED] * 4 + [pynvml.NVML_FEATURE_DISABLED] * 8
    assert code_of(nvml.nvmlDeviceGetNvLinkRemotePciInfo, handle, 4) == \
        pynvml.NVML_ERROR_NOT_SUPPORTED
    assert code_of(nvml.nvmlDeviceGetNvLinkState, handle, 12) == pynvml.NVML_ERROR_INVALID_ARGUMENT


# --------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("name", list_profiles())
def test_pcie_distance_is_symmetric_and_sys_exactly_across_numa_nodes(name: str) -> None:
    nvml = started(name)
    profile = nvml.profile
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(len(profile.gpus))]
    for i, j in itertools.permutations(range(len(handles)), 2):
        level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
        assert level == nvml.nvmlDeviceGetTopologyCommonAncestor(handles[j], handles[i])
        across = profile.gpus[i].numaNode != profile.gpus[j].numaNode
        assert (level == pynvml.NVML_TOPOLOGY_SYSTEM) == across
    assert code_of(nvml.nvmlDeviceGetTopologyCommonAncestor, handles[0], handles[0]) == \
        pynvml.NVML_ERROR_NOT_SUPPORTED


def test_pcie_levels_of_the_l4_server_and_dgx_a100() -> None:
    l4 = started("l4-8x")
    h = [l4.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    assert [l4.nvmlDeviceGetTopologyCommonAncestor(h[0], h[i]) for i in range(1, 8)] == [
        pynvml.NVML_TOPOLOGY_SINGLE] + [pynvml.NVML_TOPOLOGY_NODE] * 2 + \
        [pynvml.NVML_TOPOLOGY_SYSTEM] * 4
    assert [l4.nvmlDeviceGetIndex(g)
            for g in l4.nvmlDeviceGetTopologyNearestGpus(h[2], pynvml.NVML_TOPOLOGY_NODE)] == [0, 1]
    dgx = started("dgx-a100")
    assert dgx.nvmlDeviceGetTopologyCommonAncestor(
        dgx.nvmlDeviceGetHandleByIndex(6), dgx.nvmlDeviceGetHandleByIndex(7)) == \
        pynvml.NVML_TOPOLOGY_MULTIPLE
    single = started("h200-141gb")
    assert code_of(single.nvmlDeviceGetTopologyNearestGpus, single.nvmlDeviceGetHandleByIndex(0),
                   pynvml.NVML_TOPOLOGY_SYSTEM) == pynvml.NVML_ERROR_INVALID_ARGUMENT


def test_p2p_follows_nvlink_then_pcie() -> None:
    ok, cns = pynvml.NVML_P2P_STATUS_OK, pynvml.NVML_P2P_STATUS_CHIPSET_NOT_SUPPORTED
    ns = pynvml.NVML_P2P_STATUS_NOT_SUPPORTED
    read, nvlink, atomics = 0, pynvml.NVML_P2P_CAPS_INDEX_NVLINK, pynvml.NVML_P2P_CAPS_INDEX_ATOMICS
    mesh = started("mesh-4x")
    m = [mesh.nvmlDeviceGetHandleByIndex(i) for i in range(4)]
    assert [mesh.nvmlDeviceGetP2PStatus(m[0], m[i], nvlink) for i in (1, 2, 3)] == [ok, ns, ok]
    assert mesh.nvmlDeviceGetP2PStatus(m[1], m[2], atomics) == ok, "NVLink across the sockets"
    assert mesh.nvmlDeviceGetP2PStatus(m[0], m[2], read) == cns
    l4 = started("l4-8x")
    h = [l4.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    assert [l4.nvmlDeviceGetP2PStatus(h[0], h[1], cap) for cap in (read, nvlink, atomics)] == \
        [ok, ns, ns]
    assert l4.nvmlDeviceGetP2PStatus(h[0], h[4], pynvml.NVML_P2P_CAPS_INDEX_PCI) == cns
    dgx = started("dgx-h100")
    d = [dgx.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    assert {dgx.nvmlDeviceGetP2PStatus(d[i], d[j], nvlink)
            for i, j in itertools.combinations(range(8), 2)} == {ok}
    assert code_of(dgx.nvmlDeviceGetP2PStatus, d[0], d[1], pynvml.NVML_P2P_CAPS_INDEX_UNKNOWN) == \
        pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert dgx.nvmlDeviceGetP2PStatus(d[0], d[0], nvlink) == ns, "a GPU with itself"


# --------------------------------------------------------------------------- placements


def test_possible_placements_fill_a_caller_buffer_in_every_form() -> None:
    nvml = started("h200-141gb")
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    get = nvml.nvmlDeviceGetGpuInstancePossiblePlacements
    buffer = (pynvml.c_nvmlGpuInstancePlacement_t * 16)()
    count = ctypes.c_uint(16)
    assert get(handle, 15, buffer, ctypes.byref(count)) == pynvml.NVML_SUCCESS
    assert [(p.start, p.size) for p in buffer[:count.value]] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    count = ctypes.c_uint(16)
    get(handle, 9, ctypes.byref(buffer), count)
    assert [(p.start, p.size) for p in buffer[:count.value]] == [(0, 4), (4, 4)]
    first = ctypes.cast(buffer, ctypes.POINTER(pynvml.c_nvmlGpuInstancePlacement_t))
    count = ctypes.c_uint(16)
    get(handle, 0, first, ctypes.pointer(count))
    assert (count.value, buffer[0].start, buffer[0].size) == (1, 0, 8)
    count = ctypes.c_uint(0)
    get(handle, 19, buffer, ctypes.byref(count))
    assert count.value == 7, "the count passed in is ignored, as on a real H200"
    count = ctypes.c_uint(0)
    get(handle, 19, None, ctypes.byref(count))
    assert count.value == 7, "no buffer: just the count"
    small = (pynvml.c_nvmlGpuInstancePlacement_t * 3)()
    count = ctypes.c_uint(3)
    assert code_of(get, handle, 19, small, ctypes.byref(count)) == \
        pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    assert count.value == 7
    assert code_of(get, handle, 42, buffer, ctypes.byref(count)) == \
        pynvml.NVML_ERROR_INVALID_ARGUMENT


# --------------------------------------------------------------------------- MIG life


def test_every_legal_placement_creates_the_gpu_instance_id_of_the_heap_layout(lab: Path) -> None:
    nvml = started(lab)
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    heap = {8: 0, 4: 1, 2: 3, 1: 7}
    for index in (0, 1, 2, 3, 4, 7, 9):
        info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(device, index)
        buffer = (pynvml.c_nvmlGpuInstancePlacement_t * 8)()
        count = ctypes.c_uint(8)
        nvml.nvmlDeviceGetGpuInstancePossiblePlacements(device, info.id, buffer,
                                                        ctypes.byref(count))
        assert count.value == info.instanceCount or info.id == 20
        for p in buffer[:count.value]:
            gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, info.id, p)
            assert isinstance(gi, pynvml.c_nvmlGpuInstance_t)
            got = nvml.nvmlGpuInstanceGetInfo(gi)
            assert (got.id, got.profileId, got.placement.start, got.placement.size) == \
                (heap[p.size] + p.start // p.size, info.id, p.start, p.size)
            again = nvml.nvmlDeviceGetGpuInstanceById(device, got.id)
            assert nvml.nvmlGpuInstanceGetInfo(again).placement.start == p.start
            nvml.nvmlGpuInstanceDestroy(gi)
    assert live_gis(nvml, device) == set()


def test_refusals_follow_nvml(lab: Path) -> None:
    nvml = started(lab)
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    create = nvml.nvmlDeviceCreateGpuInstanceWithPlacement
    create(device, 9, placement(4, 4))
    assert code_of(create, device, 14, placement(4, 2)) == pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
    assert code_of(create, device, 0, placement(0, 8)) == pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
    assert code_of(create, device, 14, placement(1, 2)) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code_of(create, device, 9, placement(2, 4)) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code_of(create, device, 42, placement(0, 1)) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code_of(create, device, 19, placement(0, 4)) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    create(device, 20, placement(0, 1))
    assert code_of(create, device, 20, placement(1, 1)) == \
        pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES, "one 1g+me per GPU"
    whole = nvml.nvmlDeviceGetHandleByIndex(1)
    assert code_of(create, whole, 19, placement(0, 1)) == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert code_of(nvml.nvmlDeviceGetGpuInstanceById, whole, 0) == pynvml.NVML_ERROR_NOT_FOUND
    assert code_of(nvml.nvmlDeviceGetGpuInstanceById, device, 1) == pynvml.NVML_ERROR_NOT_FOUND
    assert live_gis(nvml, device) == {(2, 9, 4), (7, 20, 0)}


def test_without_a_placement_nvml_fills_from_the_top(lab: Path) -> None:
    nvml = started(lab)
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    ids = [nvml.nvmlGpuInstanceGetInfo(nvml.nvmlDeviceCreateGpuInstance(device, 9)).id
           for _ in range(2)]
    assert ids == [2, 1]
    assert code_of(nvml.nvmlDeviceCreateGpuInstance, device, 19) == \
        pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES


def test_remaining_capacity_counts_free_placements(lab: Path) -> None:
    nvml = started(lab)
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    profiles = (19, 20, 15, 14, 9, 5, 0)

    def remaining() -> list[int]:
        return [nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(device, p) for p in profiles]

    assert remaining() == [7, 1, 4, 3, 2, 1, 1]
    nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 9, placement(4, 4))
    assert remaining() == [4, 1, 2, 2, 1, 1, 0]
    nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 14, placement(2, 2))
    assert remaining() == [2, 1, 1, 1, 0, 0, 0]
    assert code_of(nvml.nvmlDeviceGetGpuInstanceRemainingCapacity, device, 42) == \
        pynvml.NVML_ERROR_INVALID_ARGUMENT


def test_compute_instances_and_destroying_a_gpu_instance_in_use(lab: Path) -> None:
    nvml = started(lab)
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    gi = nvml.nvmlDeviceCreateGpuInstance(device, 0)
    profiles = {}
    for index in range(pynvml.NVML_COMPUTE_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo(
                gi, index, pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
        except pynvml.NVMLError_NotSupported:
            continue
        profiles[index] = (info.name, info.sliceCount, info.instanceCount,
                           info.sharedCopyEngineCount)
    assert profiles == {0: ("MIG 1c.7g.40gb", 1, 7, 7), 1: ("MIG 2c.7g.40gb", 2, 3, 7),
                        2: ("MIG 3c.7g.40gb", 3, 2, 7), 3: ("MIG 4c.7g.40gb", 4, 1, 7),
                        4: ("MIG 7g.40gb", 7, 1, 7)}
    assert code_of(nvml.nvmlGpuInstanceGetComputeInstanceProfileInfo, gi, 0, 1) == \
        pynvml.NVML_ERROR_INVALID_ARGUMENT
    ci = nvml.nvmlGpuInstanceCreateComputeInstance(gi, 4)
    info = nvml.nvmlComputeInstanceGetInfo(ci)
    assert isinstance(info, pynvml.c_nvmlComputeInstanceInfo_t)
    assert (info.id, info.profileId, info.placement.start, info.placement.size) == (0, 4, 0, 7)
    assert nvml.nvmlGpuInstanceGetInfo(info.gpuInstance).id == 0
    assert nvml.nvmlDeviceGetIndex(info.device) == 0
    assert code_of(nvml.nvmlGpuInstanceCreateComputeInstance, gi, 0) == \
        pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
    assert code_of(nvml.nvmlGpuInstanceDestroy, gi) == pynvml.NVML_ERROR_IN_USE
    nvml.nvmlComputeInstanceDestroy(ci)
    assert code_of(nvml.nvmlComputeInstanceGetInfo, ci) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    halves = [nvml.nvmlGpuInstanceCreateComputeInstance(gi, 2) for _ in range(2)]
    infos = [nvml.nvmlComputeInstanceGetInfo(c) for c in halves]
    assert [(info.id, info.placement.start) for info in infos] == [(0, 0), (1, 4)]
    for c in halves:
        nvml.nvmlComputeInstanceDestroy(c)
    nvml.nvmlGpuInstanceDestroy(gi)
    assert code_of(nvml.nvmlGpuInstanceGetInfo, gi) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    small = nvml.nvmlDeviceCreateGpuInstance(device, 9)
    assert code_of(nvml.nvmlGpuInstanceCreateComputeInstance, small, 3) == \
        pynvml.NVML_ERROR_NOT_SUPPORTED, "a 4-slice CI does not fit a 3g GPU instance"


def test_mig_devices_of_the_a100_mig_machine() -> None:
    nvml = started("a100-mig")
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetMigMode(device) == [1, 1]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(device) == 7
    seen = []
    for index in range(7):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(device, index)
        except pynvml.NVMLError_NotFound:
            continue
        assert nvml.nvmlDeviceIsMigDeviceHandle(mig).value == 1
        parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig)
        assert nvml.nvmlDeviceGetUUID(parent) == nvml.nvmlDeviceGetUUID(device)
        gi_id = nvml.nvmlDeviceGetGpuInstanceId(mig)
        ci_id = nvml.nvmlDeviceGetComputeInstanceId(mig)
        gi = nvml.nvmlDeviceGetGpuInstanceById(device, gi_id)
        ci = nvml.nvmlComputeInstanceGetInfo(nvml.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id))
        profile = nvml.nvmlGpuInstanceGetInfo(gi).profileId
        memory = nvml.nvmlDeviceGetMemoryInfo(mig).total // MIB
        seen.append((gi_id, ci_id, profile, ci.profileId, memory))
        assert nvml.nvmlDeviceGetUUID(mig).startswith("MIG-")
        assert code_of(nvml.nvmlDeviceGetName, mig) == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert seen == [(2, 0, 9, 2, 20096), (3, 0, 14, 1, 9984), (9, 0, 19, 0, 4864),
                    (10, 0, 19, 0, 4864)]
    assert code_of(nvml.nvmlDeviceGetMigDeviceHandleByIndex, device, 7) == \
        pynvml.NVML_ERROR_NOT_FOUND
    assert code_of(nvml.nvmlDeviceGetMigDeviceHandleByIndex, device, -1) == \
        pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert nvml.nvmlDeviceIsMigDeviceHandle(device).value == 0
    for call in (nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle,
                 nvml.nvmlDeviceGetGpuInstanceId, nvml.nvmlDeviceGetComputeInstanceId):
        assert code_of(call, device) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    whole = nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(whole) == 0
    gis = (pynvml.c_nvmlGpuInstance_t * 7)()
    count = ctypes.c_uint(7)
    nvml.nvmlDeviceGetGpuInstances(device, 19, gis, ctypes.byref(count))
    assert [nvml.nvmlGpuInstanceGetInfo(g).id for g in gis[:count.value]] == [9, 10]
    cis = (pynvml.c_nvmlComputeInstance_t * 7)()
    nvml.nvmlGpuInstanceGetComputeInstances(gis[0], 0, cis, ctypes.byref(count))
    assert count.value == 1 and nvml.nvmlComputeInstanceGetInfo(cis[0]).id == 0


def test_mig_uuids_are_the_same_for_the_same_instances(lab: Path) -> None:
    def make() -> list[str]:
        nvml = started(lab)
        device = nvml.nvmlDeviceGetHandleByIndex(0)
        for start in (0, 4):
            gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 9, placement(start, 4))
            nvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)
        return [nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(device, i))
                for i in range(2)]

    first = make()
    assert first == make() and len(set(first)) == 2


def test_wrong_kinds_of_handle_are_refused() -> None:
    nvml = started("a100-mig")
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    gi = nvml.nvmlDeviceGetGpuInstanceById(device, 2)
    assert code_of(nvml.nvmlDeviceGetName, gi) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code_of(nvml.nvmlGpuInstanceGetInfo, device) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code_of(nvml.nvmlComputeInstanceGetInfo, gi) == pynvml.NVML_ERROR_INVALID_ARGUMENT


# --------------------------------------------------------------------------- random sequences

PROFILE_IDS = (19, 20, 15, 14, 9, 5, 0)
OPS = st.lists(st.one_of(
    st.tuples(st.just("create"), st.sampled_from(PROFILE_IDS), st.none() | st.integers(0, 7)),
    st.tuples(st.just("destroy"), st.integers(0, 14), st.none()),
    st.tuples(st.just("destroy_ci"), st.integers(0, 14), st.none())), max_size=30)
A100_MIG = load_profile("a100-mig")


class Model:
    """A brute-force MIG: intervals of memory slices, checked pair by pair."""

    def __init__(self, nvml: MockNvml, device: Any) -> None:
        self.table: dict[int, tuple[list[int], int, int]] = {}
        for index in GI_PROFILE_INDEXES:
            try:
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(device, index)
            except pynvml.NVMLError_NotSupported:
                continue
            count = ctypes.c_uint(0)
            nvml.nvmlDeviceGetGpuInstancePossiblePlacements(device, info.id, None,
                                                            ctypes.byref(count))
            buffer = (pynvml.c_nvmlGpuInstancePlacement_t * count.value)()
            nvml.nvmlDeviceGetGpuInstancePossiblePlacements(device, info.id, buffer,
                                                            ctypes.byref(count))
            self.table[info.id] = ([p.start for p in buffer], buffer[0].size, info.instanceCount)
        # GI id -> (profile, start, size, has a CI): the a100-mig profile's instances
        self.gis = {3: (14, 0, 2, True), 9: (19, 2, 1, True), 10: (19, 3, 1, True),
                    2: (9, 4, 4, True)}

    @staticmethod
    def overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
        return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]

    def free(self, start: int, size: int) -> bool:
        return not any(self.overlap((start, size), (s, z)) for _, s, z, _ in self.gis.values())

    def room(self, profile: int) -> int:
        return self.table[profile][2] - sum(p == profile for p, *_ in self.gis.values())

    def create(self, profile: int, start: int | None) -> int | None:
        """The NVML error code expected, or None after recording the new instance."""
        starts, size, _ = self.table[profile]
        if start is not None and start not in starts:
            return pynvml.NVML_ERROR_INVALID_ARGUMENT
        candidates = [s for s in starts if self.free(s, size)]
        chosen = start if start is not None else (candidates[-1] if candidates else None)
        if chosen is None or chosen not in candidates or self.room(profile) <= 0:
            return pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
        self.gis[{8: 0, 4: 1, 2: 3, 1: 7}[size] + chosen // size] = (profile, chosen, size, False)
        return None

    def remaining(self, profile: int) -> int:
        starts, size, _ = self.table[profile]
        free = [s for s in starts if self.free(s, size)]
        best = max(len(subset) for n in range(len(free) + 1)
                   for subset in itertools.combinations(free, n)
                   if not any(self.overlap((a, size), (b, size))
                              for a, b in itertools.combinations(subset, 2)))
        return min(best, max(self.room(profile), 0))


@given(OPS)
@settings(max_examples=200, deadline=None)
def test_random_create_destroy_sequences_match_a_brute_force_model(
        ops: list[tuple[str, int, int | None]]) -> None:
    nvml = MockNvml(A100_MIG)
    nvml.nvmlInit()
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    model = Model(nvml, device)
    for op, number, start in ops:
        if op == "create":
            expected = model.create(number, start)
            try:
                if start is None:
                    nvml.nvmlDeviceCreateGpuInstance(device, number)
                else:
                    size = model.table[number][1]
                    nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, number,
                                                                  placement(start, size))
                got = None
            except pynvml.NVMLError as err:
                got = err.value
            assert got == expected, (op, number, start)
            continue
        if number not in model.gis:
            assert code_of(nvml.nvmlDeviceGetGpuInstanceById, device, number) == \
                pynvml.NVML_ERROR_NOT_FOUND
            continue
        gi = nvml.nvmlDeviceGetGpuInstanceById(device, number)
        profile, at, size, has_ci = model.gis[number]
        if op == "destroy_ci":
            if has_ci:
                nvml.nvmlComputeInstanceDestroy(nvml.nvmlGpuInstanceGetComputeInstanceById(gi, 0))
                model.gis[number] = (profile, at, size, False)
            else:
                assert code_of(nvml.nvmlGpuInstanceGetComputeInstanceById, gi, 0) == \
                    pynvml.NVML_ERROR_NOT_FOUND
        elif has_ci:
            assert code_of(nvml.nvmlGpuInstanceDestroy, gi) == pynvml.NVML_ERROR_IN_USE
        else:
            nvml.nvmlGpuInstanceDestroy(gi)
            del model.gis[number]
    live = live_gis(nvml, device)
    assert live == {(gi, p, s) for gi, (p, s, _, _) in model.gis.items()}
    spans = [(s, model.table[p][1]) for _, p, s in live]
    assert not any(Model.overlap(a, b) for a, b in itertools.combinations(spans, 2))
    for profile in PROFILE_IDS:
        assert nvml.nvmlDeviceGetGpuInstanceRemainingCapacity(device, profile) == \
            model.remaining(profile)


# --------------------------------------------------------------------------- persistence


def test_state_file_is_the_hardware_shared_by_two_mocks(lab: Path, tmp_path: Path) -> None:
    state = tmp_path / "mig.json"
    first, second = started(lab, state), started(lab, state)
    d1, d2 = first.nvmlDeviceGetHandleByIndex(0), second.nvmlDeviceGetHandleByIndex(0)
    gi = first.nvmlDeviceCreateGpuInstanceWithPlacement(d1, 14, placement(2, 2))
    first.nvmlGpuInstanceCreateComputeInstance(gi, 1)
    assert live_gis(second, d2) == {(4, 14, 2)}
    mig = second.nvmlDeviceGetMigDeviceHandleByIndex(d2, 0)
    assert second.nvmlDeviceGetUUID(mig) == first.nvmlDeviceGetUUID(
        first.nvmlDeviceGetMigDeviceHandleByIndex(d1, 0))
    assert code_of(second.nvmlDeviceCreateGpuInstanceWithPlacement, d2, 19, placement(3, 1)) == \
        pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
    other = second.nvmlDeviceGetGpuInstanceById(d2, 4)
    second.nvmlComputeInstanceDestroy(second.nvmlGpuInstanceGetComputeInstanceById(other, 0))
    second.nvmlGpuInstanceDestroy(other)
    assert live_gis(first, d1) == set()
    assert {p.name for p in tmp_path.iterdir()} == {"edited.yaml", "mig.json", "mig.json.lock"}, \
        "no temporary file left behind"


def test_mig_mode_switches_live_and_persists(tmp_path: Path) -> None:
    state = tmp_path / "mig.json"
    nvml = started("h100-80gb-hbm3", state)
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    off, on = pynvml.NVML_DEVICE_MIG_DISABLE, pynvml.NVML_DEVICE_MIG_ENABLE
    assert nvml.nvmlDeviceGetMigMode(device) == [off, off]
    assert code_of(nvml.nvmlDeviceCreateGpuInstanceWithPlacement, device, 19,
                   placement(0, 1)) == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(device) == 0
    assert code_of(nvml.nvmlDeviceSetMigMode, device, 2) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert nvml.nvmlDeviceSetMigMode(device, on) == pynvml.NVML_SUCCESS  # activation status
    assert nvml.nvmlDeviceGetMigMode(device) == [on, on]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(device) == 7
    gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 19, placement(0, 1))
    other = started("h100-80gb-hbm3", state)  # another process, or a restart
    other_device = other.nvmlDeviceGetHandleByIndex(0)
    assert other.nvmlDeviceGetMigMode(other_device) == [on, on]
    assert live_gis(other, other_device) == {(7, 19, 0)}
    assert code_of(other.nvmlDeviceSetMigMode, other_device, off) == pynvml.NVML_ERROR_IN_USE
    assert nvml.nvmlDeviceGetMigMode(device) == [on, on], "a refused switch changes nothing"
    nvml.nvmlGpuInstanceDestroy(gi)
    assert other.nvmlDeviceSetMigMode(other_device, off) == pynvml.NVML_SUCCESS
    assert nvml.nvmlDeviceGetMigMode(device) == [off, off]
    assert started("h100-80gb-hbm3", state).nvmlDeviceGetMigMode(device) == [off, off]


def test_a_state_path_without_a_file_starts_from_the_profile(tmp_path: Path) -> None:
    state = tmp_path / "mig.json"
    nvml = started("a100-mig", state)
    assert len(live_gis(nvml, nvml.nvmlDeviceGetHandleByIndex(0))) == 4
    saved = json.loads(state.read_text())  # the machine, for `gpu-dra mock inject`
    profile = load_profile("a100-mig")
    assert saved["machine"] == {gpu.uuid: gpu.minor for gpu in profile.gpus}
    assert saved["migEnabled"] == {}, "the modes stay the profile's"
    assert len(live_gis(started("a100-mig", state),
                        nvml.nvmlDeviceGetHandleByIndex(0))) == 4, "the same instances"


def run(*code: str, args: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    script = "\n".join(("import os, signal, sys, pynvml",
                        "from pathlib import Path",
                        "from driver.nvml.mock import MockNvml, load_profile",
                        "nvml = MockNvml(load_profile(sys.argv[1]), Path(sys.argv[2]))",
                        "nvml.nvmlInit()",
                        "device = nvml.nvmlDeviceGetHandleByIndex(0)", *code))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True)


def test_instances_outlive_a_process_killed_with_sigkill(lab: Path, tmp_path: Path) -> None:
    state = tmp_path / "mig.json"
    child = run("place = pynvml.c_nvmlGpuInstancePlacement_t(4, 4)",
                "gi = nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 9, place)",
                "nvml.nvmlGpuInstanceCreateComputeInstance(gi, 2)",
                "os.kill(os.getpid(), signal.SIGKILL)", args=(str(lab), str(state)))
    assert child.wait(timeout=60) == -9
    restarted = started(lab, state)
    device = restarted.nvmlDeviceGetHandleByIndex(0)
    assert live_gis(restarted, device) == {(2, 9, 4)}
    mig = restarted.nvmlDeviceGetMigDeviceHandleByIndex(device, 0)
    assert (restarted.nvmlDeviceGetGpuInstanceId(mig),
            restarted.nvmlDeviceGetComputeInstanceId(mig)) == (2, 0)
    assert MockHost(restarted).mig_minors(0, 2, 0) == (21, 22)


def test_concurrent_processes_lose_no_instance(lab: Path, tmp_path: Path) -> None:
    state = tmp_path / "mig.json"
    children = [run("place = pynvml.c_nvmlGpuInstancePlacement_t(int(sys.argv[3]), 1)",
                    "nvml.nvmlDeviceCreateGpuInstanceWithPlacement(device, 19, place)",
                    args=(str(lab), str(state), str(start))) for start in range(7)]
    assert [child.wait(timeout=60) for child in children] == [0] * 7
    nvml = started(lab, state)
    assert live_gis(nvml, nvml.nvmlDeviceGetHandleByIndex(0)) == {
        (7 + start, 19, start) for start in range(7)}


@pytest.mark.parametrize(("content", "where"), [
    ("{not json", "line 1"),
    ('{"version": 3, "gpus": {}}', "version"),
    ('{"version": 2, "gpus": {}, "machine": {"GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271": 5}}',
     "machine.GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271"),
    ('{"version": 2, "gpus": {}, "health": {"gpus": {"GPU-00000000-0000-0000-0000-000000000000":'
     ' {"lost": true}}}}', "health.gpus.GPU-00000000-0000-0000-0000-000000000000"),
    ('{"version": 2, "gpus": {}, "health": {"events": [{"seq": 1, "gpu": "x", "kind": "fire"}]}}',
     "health.events[0].kind"),
    ('{"version": 1, "gpus": {"GPU-00000000-0000-0000-0000-000000000000": []}}',
     "gpus.GPU-00000000-0000-0000-0000-000000000000"),
    ('{"version": 1, "gpus": {"GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271": ['
     '{"profileId": 9, "start": 0}, {"profileId": 14, "start": 2}]}}',
     "gpus.GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271.gpuInstances[1].start"),
    ('{"version": 1, "gpus": {"GPU-70e3794e-f4cb-546f-aa37-72f210f1150d": ['
     '{"profileId": 9, "start": 0}]}}', "gpus.GPU-70e3794e-f4cb-546f-aa37-72f210f1150d"),
    ('{"version": 1, "gpus": {}, "migEnabled": {"GPU-00000000-0000-0000-0000-000000000000": '
     'true}}', "migEnabled.GPU-00000000-0000-0000-0000-000000000000"),
    ('{"version": 1, "gpus": {"GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271": ['
     '{"profileId": 9, "start": 0}]}, "migEnabled": '
     '{"GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271": false}}',
     "gpus.GPU-0d3bc11a-100e-5b77-adb5-2fbf5587b271"),
])
def test_a_bad_state_file_is_refused_naming_it(tmp_path: Path, content: str, where: str) -> None:
    state = tmp_path / "mig.json"
    state.write_text(content)
    with pytest.raises(ProfileError) as err:
        MockNvml(load_profile("a100-mig"), state)
    assert f"{state}: {where}" in str(err.value)


# --------------------------------------------------------------------------- host, faults


def test_host_view_of_a_mock_machine() -> None:
    host = mock_provider("dgx-h100").host
    assert host.pcie_root("00000000:9A:00.0") == "pci0000:97"
    assert host.numa_node("0000:9a:00.0") == 1, "sysfs spelling too"
    assert host.pcie_root("00000000:01:00.0") is None and host.numa_node("junk") is None
    h200 = mock_provider("h200-141gb").host
    assert (h200.pcie_root("00000000:00:06.0"), h200.numa_node("00000000:00:06.0")) == \
        ("pci0000:00", None)


def test_mig_minors_exist_only_for_live_instances() -> None:
    host = mock_provider("a100-mig").host
    assert host.mig_minors(0, 9, 0) == (3 + 9 * 9, 4 + 9 * 9)
    assert host.mig_minors(0, 2, 0) == (21, 22)
    assert host.mig_minors(0, 9, 1) is None and host.mig_minors(0, 1, 0) is None
    assert host.mig_minors(1, 0, 0) is None and host.mig_minors(5, 2, 0) is None


def test_an_injected_fault_hits_only_its_gpu_and_call(edited_profile: Callable[..., Path]) -> None:
    from driver.inventory.discovery import discover

    path = edited_profile("dgx-h100", lambda d: d["gpus"][2].update(
        faults={"nvmlDeviceGetMemoryInfo": "GPU_IS_LOST", "nvmlDeviceGetNvLinkState": "UNKNOWN"}))
    nvml = started(path)
    lost = nvml.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetMemoryInfo(lost)
    assert code_of(nvml.nvmlDeviceGetNvLinkState, lost, 0) == pynvml.NVML_ERROR_UNKNOWN
    assert nvml.nvmlDeviceGetName(lost) == "NVIDIA H100 80GB HBM3"
    assert nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(1)).total > 0
    inventory = discover(mock_provider(str(path)))
    assert [g.index for g in inventory.gpus if not g.healthy] == [2]
    assert "nvmlDeviceGetMemoryInfo" in (inventory.gpus[2].health_error or "")


def test_a_gpu_that_cannot_be_opened(edited_profile: Callable[..., Path]) -> None:
    path = edited_profile("l4-8x", lambda d: d["gpus"][6].update(
        faults={"nvmlDeviceGetHandleByIndex": "GPU_IS_LOST"}))
    nvml = started(path)
    assert code_of(nvml.nvmlDeviceGetHandleByIndex, 6) == pynvml.NVML_ERROR_GPU_IS_LOST
    assert nvml.nvmlDeviceGetHandleByIndex(7) is not None



def test_mig_queries_with_mig_off_answer_as_a_real_h200() -> None:
    """Read on a real H200 with MIG off (driver 580): empty answers, not refusals."""
    nvml = started("h200-141gb")
    device = nvml.nvmlDeviceGetHandleByIndex(0)
    array = (pynvml.c_nvmlGpuInstance_t * 8)()
    count = ctypes.c_uint(8)
    assert nvml.nvmlDeviceGetGpuInstances(device, 19, array, ctypes.byref(count)) == \
        pynvml.NVML_SUCCESS
    assert count.value == 0
    assert code_of(nvml.nvmlDeviceGetGpuInstanceById, device, 0) == pynvml.NVML_ERROR_NOT_FOUND
    assert code_of(nvml.nvmlDeviceGetMigDeviceHandleByIndex, device, 0) == \
        pynvml.NVML_ERROR_NOT_FOUND
    for call in (nvml.nvmlDeviceGetGpuInstanceId, nvml.nvmlDeviceGetComputeInstanceId):
        assert code_of(call, device) == pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code_of(nvml.nvmlDeviceGetGpuInstanceRemainingCapacity, device, 42) == \
        pynvml.NVML_ERROR_INVALID_ARGUMENT
    assert code_of(nvml.nvmlDeviceGetHandleByUUID, "GPU-00000000-0000-0000-0000-000000000000") \
        == pynvml.NVML_ERROR_NOT_FOUND
    (field,) = nvml.nvmlDeviceGetFieldValues(device, [pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT])
    assert (field.nvmlReturn, field.valueType, field.value.uiVal) == \
        (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, 0)
    for call in (nvml.nvmlDeviceGetNvLinkVersion, nvml.nvmlDeviceGetNvLinkRemoteDeviceType,
                 nvml.nvmlDeviceGetNvLinkRemotePciInfo):
        assert code_of(call, device, 0) == pynvml.NVML_ERROR_NOT_SUPPORTED
    v2 = nvml.nvmlDeviceGetMemoryInfo(device, pynvml.nvmlMemory_v2)
    assert (v2.version, v2.total, v2.reserved, v2.free, v2.used) == \
        (pynvml.nvmlMemory_v2, 150754820096, 644939776, 150109880320, 0)
