"""The plugin daemon on a node, end to end: the real scheduler allocates a pod's GPU claim,
the kubelet's own code (kubelet-standin: plugin manager + DRA manager of v1.37.2)
registers the plugin and prepares the claim, the CDI ids it returns resolve with the CDI
library containerd and CRI-O use into an OCI spec with the right devices, mounts and
environment; deleting the pod unprepares it and leaves no CDI spec, no checkpointed claim
and, with dynamic MIG, no MIG instance behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from driver.devcluster.controlplane import LocalCluster
from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.inventory.discovery import discover
from driver.inventory.model import Gpu, Inventory, MigDevice, MigProfile, Placement
from driver.kube.api import api_request
from driver.nvml.mock import mock_provider
from driver.plugin import cdi, checkpoint
from driver.plugin.devices import Target, device_index
from tests.support.apiserver import (
    RESOURCE_V1,
    SLICES,
    ControlPlane,
    create,
    delete,
    events_for,
    get,
    pod_with_claim,
    wait_for,
)
from tests.support.plugin import live_mig, mig_profile, short_tmp
from tests.support.standin import CdiResolveError, E2eTools, KubeletStandin, cdi_resolve

DRIVER = "gpu.dra.dev"
VENDOR_KIND = cdi.kind(DRIVER)
NVIDIA_MAJOR = 195  # /dev/nvidia<minor> and /dev/nvidiactl (255), fixed by the driver
UVM_MAJOR, CAPS_MAJOR = 510, 511  # dynamic on a real host; any free number will do here
DRIVER_VERSION = "550.163.01"
LIBRARIES = (f"libnvidia-ml.so.{DRIVER_VERSION}", f"libcuda.so.{DRIVER_VERSION}")
LIB_DIR = "usr/lib/x86_64-linux-gnu"
MAX_GPUS = 8
CAP_MINORS_PER_GPU = 135  # the nvidia-caps minors of one GPU: 3 + 135*gpu + ...


# --- a host with the NVIDIA driver's files ----------------------------------------------------


@pytest.fixture(scope="module")
def driver_root() -> Iterator[Path]:
    """A driver root as the plugin and the runtime see it: character device nodes with
    NVIDIA's numbers (a real /dev needs GPUs), the user-space libraries, nvidia-smi and
    nvidia-cdi-hook. The CDI library stats every device node it injects, so the nodes must
    be real character devices: creating them needs CAP_MKNOD (root, as CI runs)."""
    root = Path(tempfile.mkdtemp(prefix="gd-root-", dir="/tmp"))
    dev = root / "dev"
    (dev / "nvidia-caps").mkdir(parents=True)
    nodes = {"nvidiactl": (NVIDIA_MAJOR, 255), "nvidia-uvm": (UVM_MAJOR, 0),
             "nvidia-uvm-tools": (UVM_MAJOR, 1)}
    nodes |= {f"nvidia{minor}": (NVIDIA_MAJOR, minor) for minor in range(MAX_GPUS)}
    nodes |= {f"nvidia-caps/nvidia-cap{minor}": (CAPS_MAJOR, minor)
              for minor in range(1, 3 + CAP_MINORS_PER_GPU * MAX_GPUS)}
    try:
        for name, (major, minor) in nodes.items():
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    except PermissionError:
        shutil.rmtree(root)
        pytest.skip("creating character device nodes needs CAP_MKNOD (run as root, as CI does)")
    for relative in [f"{LIB_DIR}/{lib}" for lib in LIBRARIES] + \
            ["usr/bin/nvidia-smi", "usr/bin/nvidia-cdi-hook"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"")
    (root / "usr/bin/nvidia-cdi-hook").chmod(0o755)
    (root / LIB_DIR / "libnvidia-ml.so.1").symlink_to(f"libnvidia-ml.so.{DRIVER_VERSION}")
    yield root
    shutil.rmtree(root)


# --- one GPU node: fake Node, kubelet stand-in, plugin daemon ----------------------------------


@dataclass(frozen=True)
class GpuNode:
    name: str
    folders: PluginFolders
    standin: KubeletStandin
    plugin: PluginDaemon
    mock: str
    mock_state: Path | None
    args: tuple[str, ...]
    """The plugin's command line (without --pod-uid): another pod of it on this node."""

    def inventory(self) -> Inventory:
        """The node's GPUs as NVML reports them now (a fresh mock over the same state)."""
        return discover(mock_provider(self.mock, self.mock_state))


@pytest.fixture
def gpu_node(
    control_plane: ControlPlane,
    scheduler: LocalCluster,
    controller_manager: LocalCluster,
    device_classes: None,
    fake_node: Callable[..., str],
    kubelet_standin: Callable[..., KubeletStandin],
    driver_root: Path,
) -> Iterator[Callable[..., GpuNode]]:
    """Factory: ``gpu_node(mock, mig_mode="static", dra_api="v1", mock_state=None,
    pod_uid=None)``: a Ready Node, the kubelet stand-in for it, and ``gpu-dra plugin`` on
    the mock machine, registered and with its slices published. The plugin's and
    stand-in's log tails are printed at teardown (pytest shows them when the test fails)."""
    made: list[GpuNode] = []
    dirs = contextlib.ExitStack()

    def make(mock: str, mig_mode: str = "static", dra_api: str = "v1",
             mock_state: Path | None = None, pod_uid: str | None = None) -> GpuNode:
        root = dirs.enter_context(short_tmp())
        node = fake_node()
        standin = kubelet_standin(node, root, dra_api, DRIVER)
        folders = PluginFolders(root)
        args = [*folders.plugin_args(node=node, driver=DRIVER,
                                     kubeconfig=control_plane.kubeconfig,
                                     registry_dir=standin.registry_dir, mock=mock,
                                     mig_mode=mig_mode, mock_state=mock_state),
                "--driver-root", str(driver_root)]
        pod = [] if pod_uid is None else ["--pod-uid", pod_uid]
        plugin = PluginDaemon([*args, *pod], folders.plugin_log)
        gpu = GpuNode(node, folders, standin, plugin, mock, mock_state, tuple(args))
        made.append(gpu)
        standin.wait_registered(DRIVER)
        wait_for(lambda: published(control_plane.api, node), f"{node}'s ResourceSlices")
        return gpu

    yield make
    for gpu in made:
        code = gpu.plugin.stop()
        print(f"--- gpu-dra plugin on {gpu.name} (exit {code}) ---\n{gpu.plugin.tail()}")
        print(f"--- kubelet-standin on {gpu.name} ---\n{gpu.standin.tail()}")
        api_request(control_plane.api, "DELETE", SLICES,
                    query={"fieldSelector": f"spec.nodeName={gpu.name}"}).expect(200, 404)
    dirs.close()


def published(api: Any, node: str) -> list[str]:
    """Names of the devices ``node``'s pool publishes."""
    items = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)["items"]
    return [d["name"] for s in items for d in s["spec"].get("devices", [])]


# --- pods with claims ------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedPod:
    name: str
    uid: str
    claim: dict[str, Any]
    """The ResourceClaim as the API server has it once the pod is prepared."""
    devices: list[str]
    """The allocated device names."""
    cdi_ids: list[str]
    """What the kubelet hands the runtime for the container."""


class Pods:
    """Pods with one GPU claim each, on one GPU node, in the test's namespace."""

    def __init__(self, api: Any, namespace: str, node: GpuNode) -> None:
        self.api, self.namespace, self.node = api, namespace, node
        self.pods = f"/api/v1/namespaces/{namespace}/pods"
        self.templates = f"{RESOURCE_V1}/namespaces/{namespace}/resourceclaimtemplates"

    def run(self, name: str, device_class: str, cel: str | None = None) -> PreparedPod:
        """A pod whose claim comes from a template, pinned to the node by a selector;
        returns once the stand-in has prepared it."""
        exactly: dict[str, Any] = {"deviceClassName": device_class}
        if cel:
            exactly["selectors"] = [{"cel": {"expression": cel}}]
        create(self.api, self.templates, {
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
            "metadata": {"name": name},
            "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}})
        pod = pod_with_claim(name, {"resourceClaimTemplateName": name})
        pod["spec"]["nodeSelector"] = {"kubernetes.io/hostname": self.node.name}
        uid = create(self.api, self.pods, pod)["metadata"]["uid"]
        try:
            status = self.node.standin.wait_pod(uid, "prepared")
        except AssertionError as err:
            seen = [(e.get("reason"), e.get("message"))
                    for e in events_for(self.api, self.namespace, name)]
            raise AssertionError(f"{err}\nevents of pod {name}: {seen}") from None
        [claim_status] = status["claims"]
        claim = get(self.api, f"{RESOURCE_V1}/namespaces/{self.namespace}/resourceclaims/"
                              f"{claim_status['name']}")
        assert claim is not None and claim["metadata"]["uid"] == claim_status["uid"]
        assert {"resource": "pods", "name": name, "uid": uid} in claim["status"]["reservedFor"]
        results = claim["status"]["allocation"]["devices"]["results"]
        assert {(r["driver"], r["pool"]) for r in results} == {(DRIVER, self.node.name)}
        return PreparedPod(name, uid, claim, [r["device"] for r in results],
                           status["containers"]["main"])

    def delete(self, pod: PreparedPod) -> dict[str, Any]:
        """Delete the pod as a user does (graceful); returns the stand-in's final status
        once the claim is unprepared and the pod is gone."""
        delete(self.api, f"{self.pods}/{pod.name}")
        status = self.node.standin.wait_pod(pod.uid, "unprepared")
        wait_for(lambda: get(self.api, f"{self.pods}/{pod.name}") is None,
                 f"pod {pod.name} to be removed")
        return status


@pytest.fixture
def pods_on(control_plane: ControlPlane, namespace: str) -> Callable[[GpuNode], Pods]:
    return lambda node: Pods(control_plane.api, namespace, node)


# --- what a container gets -------------------------------------------------------------------


def resolve(tools: E2eTools, node: GpuNode, pod: PreparedPod) -> dict[str, Any]:
    return cdi_resolve(tools.cdi_resolve, [node.folders.cdi_root], pod.cdi_ids)


def device_nodes(oci: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Container path -> (major, minor) of each device node in the OCI spec."""
    devices = oci.get("linux", {}).get("devices", [])
    assert all(d["type"] == "c" for d in devices), devices
    return {d["path"]: (d["major"], d["minor"]) for d in devices}


def gpu_nodes(oci: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """The per-GPU nodes: /dev/nvidia<N> and /dev/nvidia-caps/*, not the control nodes."""
    control = {"/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"}
    return {p: n for p, n in device_nodes(oci).items() if p not in control}


def assert_mig_nodes(oci: dict[str, Any], gpu: Gpu, mig: MigDevice) -> None:
    """A MIG device is its parent GPU's node plus the capability nodes of its GPU
    instance and compute instance (majors vary by host; minors identify the instance)."""
    assert {path: minor for path, (_, minor) in gpu_nodes(oci).items()} == {
        f"/dev/nvidia{gpu.minor}": gpu.minor,
        f"/dev/nvidia-caps/nvidia-cap{mig.gi_cap_minor}": mig.gi_cap_minor,
        f"/dev/nvidia-caps/nvidia-cap{mig.ci_cap_minor}": mig.ci_cap_minor,
    }


def assert_driver_files(oci: dict[str, Any], driver_root: Path) -> None:
    """The control nodes, libraries, tools, nvidia-cdi-hook's hooks and environment every GPU
    container needs, pointing into the driver root."""
    nodes = device_nodes(oci)
    assert nodes["/dev/nvidiactl"] == (NVIDIA_MAJOR, 255)
    assert nodes["/dev/nvidia-uvm"] == (UVM_MAJOR, 0)
    assert nodes["/dev/nvidia-uvm-tools"] == (UVM_MAJOR, 1)
    allowed = {(r["major"], r["minor"]) for r in oci["linux"]["resources"]["devices"]
               if r["allow"] and r["type"] == "c" and "rw" in r["access"]}
    assert set(nodes.values()) <= allowed, "the device cgroup must allow every injected node"
    mounts = {m["destination"]: m for m in oci.get("mounts", [])}
    for lib in LIBRARIES:
        mount = mounts[f"/{LIB_DIR}/{lib}"]
        assert mount["source"] == str(driver_root / LIB_DIR / lib)
        assert "ro" in mount["options"]
    assert mounts["/usr/bin/nvidia-smi"]["source"] == str(driver_root / "usr/bin/nvidia-smi")
    hooks = {h["args"][1]: h for h in oci["hooks"]["createContainer"]}
    assert {h["path"] for h in hooks.values()} == {str(driver_root / "usr/bin/nvidia-cdi-hook")}
    assert f"/{LIB_DIR}" in hooks["update-ldcache"]["args"]
    assert f"libnvidia-ml.so.{DRIVER_VERSION}::/{LIB_DIR}/libnvidia-ml.so.1" in \
        hooks["create-symlinks"]["args"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in oci["process"]["env"]


def assert_cdi_ids(pod: PreparedPod) -> None:
    """One fully qualified CDI id per allocated device, named after the claim UID."""
    uid = pod.claim["metadata"]["uid"]
    assert sorted(pod.cdi_ids) == sorted(
        cdi.qualified_name(DRIVER, cdi.device_name(uid, d)) for d in pod.devices)


def assert_released(node: GpuNode, tools: E2eTools, pods: list[PreparedPod]) -> None:
    """No CDI spec, no checkpointed claim, and a runtime can no longer inject the ids."""
    for pod in pods:
        uid = pod.claim["metadata"]["uid"]
        assert not (node.folders.cdi_root / cdi.spec_file_name(DRIVER, uid)).exists()
        with pytest.raises(CdiResolveError, match="unresolvable CDI devices"):
            resolve(tools, node, pod)
    saved = checkpoint.load(node.folders.checkpoint)
    assert saved is not None and saved.claims == {}


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dra_api", ["v1", "v1beta1"])
def test_whole_gpu_is_prepared_injected_and_released(
    dra_api: str, gpu_node: Callable[..., GpuNode], pods_on: Callable[[GpuNode], Pods],
    e2e_tools: E2eTools, driver_root: Path,
) -> None:
    node = gpu_node("dgx-h100", dra_api=dra_api)
    pods = pods_on(node)
    pod = pods.run("whole-gpu", DRIVER)

    [device] = pod.devices
    minor = int(device.removeprefix("gpu-"))
    assert_cdi_ids(pod)
    claim_uid = pod.claim["metadata"]["uid"]
    assert (node.folders.cdi_root / cdi.spec_file_name(DRIVER, claim_uid)).exists()
    saved = checkpoint.load(node.folders.checkpoint)
    assert saved is not None and set(saved.claims) == {claim_uid}

    oci = resolve(e2e_tools, node, pod)
    assert gpu_nodes(oci) == {f"/dev/nvidia{minor}": (NVIDIA_MAJOR, minor)}
    assert_driver_files(oci, driver_root)

    # The version the kubelet code negotiated is the one it called.
    # The plugin offers v1 first; a 1.33 kubelet knows only v1beta1 and must get it.
    [registered] = [e for e in node.standin.registrations() if e["event"] == "register"]
    assert registered["advertised"][:2] == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
    assert registered["offered"][0] == f"{dra_api}.DRAPlugin"
    service = f"/k8s.io.kubelet.pkg.apis.dra.{dra_api}.DRAPlugin"
    # The stand-in writes the pod's status, then its call counts.
    prepared = [(f"{service}/NodePrepareResources", "OK", 1)]
    wait_for(lambda: node.standin.grpc_calls() == prepared, "the stand-in's call counts")

    final = pods.delete(pod)
    assert final["containers"]["main"] == pod.cdi_ids
    released = [*prepared, (f"{service}/NodeUnprepareResources", "OK", 1)]
    wait_for(lambda: node.standin.grpc_calls() == released, "the stand-in's call counts")
    assert_released(node, e2e_tools, [pod])


def test_static_mig_device_gets_its_capability_nodes(
    gpu_node: Callable[..., GpuNode], pods_on: Callable[[GpuNode], Pods],
    e2e_tools: E2eTools, driver_root: Path,
) -> None:
    node = gpu_node("a100-mig", mig_mode="static")
    index = device_index(node.inventory(), "static")
    pods = pods_on(node)
    pod = pods.run("static-mig", f"mig.{DRIVER}")

    [device] = pod.devices
    mig = index[device].static_mig
    assert mig is not None, f"{device} is not one of the node's live MIG devices"
    assert_cdi_ids(pod)
    oci = resolve(e2e_tools, node, pod)
    assert_mig_nodes(oci, index[device].gpu, mig)
    assert_driver_files(oci, driver_root)

    pods.delete(pod)
    assert_released(node, e2e_tools, [pod])
    # Static MIG devices belong to the admin: they outlive the claim.
    assert index.keys() == device_index(node.inventory(), "static").keys()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder that outlives the plugin when requested before ``gpu_node``."""
    with short_tmp() as path:
        yield path


def test_dynamic_mig_devices_exist_exactly_while_prepared(
    scratch: Path, gpu_node: Callable[..., GpuNode], pods_on: Callable[[GpuNode], Pods],
    e2e_tools: E2eTools, driver_root: Path,
) -> None:
    machine = mig_profile(scratch / "h100-mig.yaml", base="h100-80gb-hbm3", gpus=(0,))
    state = scratch / "mig-state.json"
    node = gpu_node(str(machine), mig_mode="dynamic", mock_state=state)
    index = device_index(node.inventory(), "dynamic")
    assert live_mig(state) == {}
    pods = pods_on(node)

    def profile_is(name: str) -> str:
        return f'device.attributes["{DRIVER}"].profile == "{name}"'

    small = pods.run("mig-small", f"mig.{DRIVER}", profile_is("1g.10gb"))
    large = pods.run("mig-large", f"mig.{DRIVER}", profile_is("3g.40gb"))
    placed: dict[str, tuple[Target, MigProfile, Placement]] = {}
    for pod in (small, large):
        target = index[pod.devices[0]]
        assert target.dynamic_profile is not None and target.placement is not None
        placed[pod.name] = (target, target.dynamic_profile, target.placement)

    def instances(*pods: PreparedPod) -> dict[str, list[tuple[int, int, int]]]:
        """What the GPU must hold: per prepared claim, one GPU instance at the
        placement the scheduler chose, with one compute instance."""
        held: dict[str, list[tuple[int, int, int]]] = {}
        for pod in pods:
            target, profile, placement = placed[pod.name]
            held.setdefault(target.gpu.uuid, []).append((profile.id, placement.start, 1))
        return {uuid: sorted(gis) for uuid, gis in held.items()}

    def live() -> dict[str, list[tuple[int, int, int]]]:
        return {uuid: sorted(gis) for uuid, gis in live_mig(state).items()}

    assert live() == instances(small, large)
    created = {(mig.profile, mig.placement.start): mig
               for gpu in node.inventory().gpus for mig in gpu.mig_devices}
    for pod in (small, large):
        assert_cdi_ids(pod)
        target, profile, placement = placed[pod.name]
        oci = resolve(e2e_tools, node, pod)
        assert_mig_nodes(oci, target.gpu, created[(profile.name, placement.start)])
        assert_driver_files(oci, driver_root)

    pods.delete(small)
    assert live() == instances(large)
    assert not (node.folders.cdi_root / cdi.spec_file_name(
        DRIVER, small.claim["metadata"]["uid"])).exists()
    pods.delete(large)
    assert live() == {}
    assert_released(node, e2e_tools, [small, large])


def slice_versions(api: Any, node: str) -> dict[str, str]:
    """resourceVersion of each of the node's ResourceSlices: any write changes one."""
    items = api_request(api, "GET", SLICES, query={
        "fieldSelector": f"spec.nodeName={node},spec.driver={DRIVER}"}).expect(200)["items"]
    return {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in items}


def test_a_rolling_update_hands_the_node_over_without_a_gap(
    control_plane: ControlPlane, gpu_node: Callable[..., GpuNode],
    pods_on: Callable[[GpuNode], Pods],
) -> None:
    """maxSurge: the new pod starts beside the old one (sockets per pod UID), the kubelet's
    own plugin manager registers both and uses the newest; the old pod's SIGTERM leaves
    the new one serving and the slices untouched."""
    old_uid, new_uid = str(uuid.uuid4()), str(uuid.uuid4())
    node = gpu_node("dgx-h100", pod_uid=old_uid)
    pods = pods_on(node)
    slices = slice_versions(control_plane.api, node.name)
    early = pods.run("before-surge", DRIVER)
    new = PluginDaemon([*node.args, "--pod-uid", new_uid], node.folders.root / "plugin-new.log")
    try:
        endpoints = {uid: str(node.folders.plugin_dir / f"dra-{uid}.sock")
                     for uid in (old_uid, new_uid)}

        def events(kind: str) -> list[str]:
            return [e["endpoint"] for e in node.standin.registrations()
                    if e["event"] == kind and e["driver"] == DRIVER]

        wait_for(lambda: endpoints[new_uid] in events("register"),
                 "the new plugin pod to register beside the old one")
        assert events("register") == [endpoints[old_uid], endpoints[new_uid]]
        during = pods.run("during-surge", DRIVER)
        assert f"prepared ResourceClaim {pods.namespace}/{during.claim['metadata']['name']}" \
            in new.log.read_text(), "the kubelet calls the newest plugin"

        assert node.plugin.stop() == 0  # the DaemonSet controller ends the old pod
        wait_for(lambda: endpoints[old_uid] in events("deregister"),
                 "the old plugin pod to deregister")
        assert endpoints[new_uid] not in events("deregister")
        assert Path(endpoints[new_uid]).exists()
        late = pods.run("after-surge", DRIVER)
        assert len({*early.devices, *during.devices, *late.devices}) == 3
        assert slice_versions(control_plane.api, node.name) == slices  # no write, no gap

        for pod in (early, during, late):  # early was prepared by the old pod
            pods.delete(pod)
        saved = checkpoint.load(node.folders.checkpoint)
        assert saved is not None and saved.claims == {}
    finally:
        code = new.stop()
        print(f"--- the new gpu-dra plugin pod (exit {code}) ---\n{new.tail()}")
