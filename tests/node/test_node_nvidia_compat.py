"""The NVIDIA-compatible install on a real kubelet and containerd: the release upgraded as
README.md's migration guide says (its `helm install` command's `--set driverName=...`; the
image is the tier's own) over the session's mock dgx-h100, and back to the session's values
after this module. There a pod written for the device plugin, `resources.limits:
{nvidia.com/gpu: 1}`, gets a claim from kube-scheduler and one GPU prepared by our plugin
through the real kubelet; and NVIDIA's quickstart specs run as written, except that each
container's image is the tier's busybox and its command prints what the container saw
(their `ubuntu:22.04` / CUDA sample images and `nvidia-smi` are not on this node)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.kube.api import api_request
from driver.plugin import cdi
from tests.node.test_node_consumable import upgrade
from tests.node.test_real_node import assert_sees_exactly, gpu_minor
from tests.support.apiserver import DEVICE_CLASSES, create, get, make_namespace, wait_for
from tests.support.chart import object_path
from tests.support.nodepods import BUSYBOX, REPORT, Driver, Workloads
from tests.support.plugin import DRIVER
from tests.support.readme import commands, section, yaml_objects
from tests.support.realnode import RealNode

GUIDE = section("### Migrating")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-quickstart"
NVIDIA = "gpu.nvidia.com"


def guide_values() -> list[str]:
    """The migration guide's `helm install` --set flags, less the image (the tier's own)."""
    (install,) = [c for c in commands(GUIDE) if c[:2] == ["helm", "install"]]
    return [arg for flag, setting in pairwise(install) if flag == "--set"
            and not setting.startswith("image.") for arg in (flag, setting)]


def drivers(driver: Driver) -> set[str]:
    return {s["spec"]["driver"] for s in driver.slices()}


def kubectl_apply(api: Any, obj: dict[str, Any]) -> None:
    """`kubectl apply --server-side`: compact JSON, as kubectl sends it. (The Python
    client's `json.dumps` spacing would be stored as the opaque configs' raw bytes, which
    the API server compares byte for byte with their compact re-encoding on every later
    write of the claim's status: each is refused as changing status.allocation.)"""
    api_request(api, "PATCH", object_path(obj), json.dumps(obj, separators=(",", ":")),
                content_type="application/apply-patch+yaml",
                query={"fieldManager": "kubectl", "fieldValidation": "Strict"}).expect(201)


def class_names(driver: Driver) -> set[str]:
    classes = api_request(driver.node.api, "GET", DEVICE_CLASSES).expect(200)["items"]
    return {c["metadata"]["name"] for c in classes}


def as_busybox(pod_spec: dict[str, Any]) -> None:
    """Each container runs the tier's busybox and prints what it saw (nodepods.REPORT)."""
    for container in pod_spec["containers"]:
        container.update(image=BUSYBOX, imagePullPolicy="Never", command=["sh", "-c", REPORT])
        container.pop("args", None)
    pod_spec["terminationGracePeriodSeconds"] = 1


def claim_of(workloads: Workloads, pod: str) -> str:
    """The name of the claim kube-scheduler (extended resource) or the claim controller
    (template) made for the pod."""
    status = (workloads.get_pod(pod) or {}).get("status", {})
    if "extendedResourceClaimStatus" in status:
        return str(status["extendedResourceClaimStatus"]["resourceClaimName"])
    (entry,) = status["resourceClaimStatuses"]
    return str(entry["resourceClaimName"])


def spec_file(real_node: RealNode, workloads: Workloads, claim: str) -> Path:
    uid = workloads.claim_uid(claim)
    return real_node.host_path(f"/var/run/cdi/{cdi.spec_file_name(NVIDIA, uid)}")


def published_uuids(nvidia: Driver) -> dict[str, str]:
    """The UUID of each device gpu.nvidia.com's slices publish with one (not the dynamic
    MIG devices, not made yet), by name."""
    return {d["name"]: d["attributes"]["uuid"]["string"] for s in nvidia.slices()
            if s["spec"]["driver"] == NVIDIA for d in s["spec"].get("devices", [])
            if "uuid" in d["attributes"]}


def assert_status_names_its_gpus(nvidia: Driver, workloads: Workloads, claim: str) -> None:
    """The claim's status.devices (KEP-4817), written by the plugin, name each allocated
    GPU by the UUID its ResourceSlice publishes."""
    published = published_uuids(nvidia)
    allocated = workloads.allocated(claim)

    def written() -> dict[str, str] | None:
        stored = get(workloads.api, f"{workloads.claims}/{claim}") or {}
        entries = [e for e in stored.get("status", {}).get("devices") or []
                   if e["driver"] == NVIDIA]
        return {e["device"]: e["data"]["uuid"] for e in entries} if entries else None

    found = wait_for(written, f"{claim}'s status.devices", timeout=30)
    assert found == {d: published[d] for d in allocated}


def assert_has_spec_env(real_node: RealNode, workloads: Workloads, pod: str,
                        container: str) -> None:
    """The container's environment holds every variable of its claim's CDI spec."""
    spec = json.loads(spec_file(real_node, workloads, claim_of(workloads, pod)).read_text())
    env = workloads.view(pod, container).env
    for entry in spec["containerEdits"]["env"]:
        key, _, value = entry.partition("=")
        assert env.get(key) == value, f"{pod}/{container}: {key} not set as the spec says"


def assert_runs_with_one_gpu(nvidia: Driver, workloads: Workloads, pod: str,
                             container: str) -> tuple[str, str]:
    """The pod runs; its claim got one whole GPU, which the container sees with the CDI
    spec's environment and the claim's status.devices names. Returns (claim, device)."""
    workloads.wait_running(pod)
    claim = claim_of(workloads, pod)
    (device,) = workloads.allocated(claim)
    assert_sees_exactly(workloads.view(pod, container), {gpu_minor(device)})
    assert_has_spec_env(nvidia.node, workloads, pod, container)
    assert_status_names_its_gpus(nvidia, workloads, claim)
    return claim, device


@pytest.fixture(scope="module")
def nvidia(driver: Driver) -> Iterator[Driver]:
    """The release under NVIDIA's driver name, its slices published (gpu.dra.dev's stay
    until the kubelet wipes a driver gone, 30 s later: no class selects them now); the
    session's values back after the module, with only gpu.dra.dev's slices and classes."""
    upgrade(driver, *guide_values())
    wait_for(lambda: NVIDIA in drivers(driver), "gpu.nvidia.com's slices", timeout=60)
    yield driver
    upgrade(driver)
    wait_for(lambda: drivers(driver) == {DRIVER}, f"only {DRIVER}'s slices again", timeout=90)
    wait_for(lambda: NVIDIA not in class_names(driver), "NVIDIA's DeviceClasses gone",
             timeout=30)


@pytest.fixture
def quickstart(real_node: RealNode, nvidia: Driver, request: pytest.FixtureRequest
               ) -> Iterator[Workloads]:
    """The quickstart file (the test's parameter) created in its own namespace, busybox in
    place of its images; the namespace deleted after (its claims unprepared)."""
    objects = [o for o in yaml.safe_load_all((FIXTURES / f"{request.param}.yaml").read_text())
               if o]
    (namespace,) = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    make_namespace(real_node.api, namespace)
    for obj in objects:
        if obj["kind"] == "Pod":
            as_busybox(obj["spec"])
        if obj["kind"] != "Namespace":
            kubectl_apply(real_node.api, obj)
    yield Workloads(real_node.api, namespace, BUSYBOX)
    api_request(real_node.api, "DELETE", f"/api/v1/namespaces/{namespace}").expect(200, 202)
    wait_for(lambda: api_request(real_node.api, "GET", f"/api/v1/namespaces/{namespace}")
             .status == 404, f"namespace {namespace} gone", timeout=120)


def test_nvidias_device_classes_replace_ours(nvidia: Driver) -> None:
    classes = api_request(nvidia.node.api, "GET", DEVICE_CLASSES).expect(200)["items"]
    assert {c["metadata"]["name"]: c["spec"].get("extendedResourceName") for c in classes} \
        == {NVIDIA: "nvidia.com/gpu", "mig.nvidia.com": f"{NVIDIA}/mig"}


def test_a_device_plugin_pod_runs_with_one_gpu(nvidia: Driver, workloads: Workloads,
                                               real_node: RealNode) -> None:
    """The guide's pod: kube-scheduler makes its claim, the kubelet prepares it with our
    plugin and unprepares it when the pod goes."""
    (pod,) = yaml_objects(GUIDE)
    as_busybox(pod["spec"])
    create(workloads.api, workloads.pods, pod)
    name = pod["metadata"]["name"]
    claim, _ = assert_runs_with_one_gpu(nvidia, workloads, name, "cuda")
    spec = spec_file(real_node, workloads, claim)
    workloads.delete_pod(name)
    wait_for(lambda: not spec.exists(), "the claim's CDI spec removed", timeout=30)


@pytest.mark.parametrize("quickstart", ["gpu-test1"], indirect=True)
def test_quickstart_template_gives_each_pod_its_own_gpu(quickstart: Workloads,
                                                        nvidia: Driver) -> None:
    devices = {assert_runs_with_one_gpu(nvidia, quickstart, pod, "ctr")[1]
               for pod in ("pod1", "pod2")}
    assert len(devices) == 2


@pytest.mark.parametrize("quickstart", ["gpu-test5"], indirect=True)
def test_quickstart_time_slicing_and_mps_configs_apply(quickstart: Workloads,
                                                       nvidia: Driver) -> None:
    """NVIDIA's GpuConfigs: the time-sliced GPU's interval set to Long, the MPS GPU's
    containers given the claim's daemon pipe."""
    quickstart.wait_running("pod0")
    claim = claim_of(quickstart, "pod0")
    stored = get(quickstart.api, f"{quickstart.claims}/{claim}") or {}
    results = {r["request"]: r["device"] for r in stored["status"]["allocation"]["devices"]
               ["results"]}
    views = {c: quickstart.view("pod0", c)
             for c in ("ts-ctr0", "ts-ctr1", "mps-ctr0", "mps-ctr1")}
    for container, view in views.items():
        assert_sees_exactly(view, {gpu_minor(results[container.split("-")[0] + "-gpu"])})
    for container in ("mps-ctr0", "mps-ctr1"):
        assert views[container].env.get("CUDA_MPS_PIPE_DIRECTORY") == "/tmp/nvidia-mps"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in views["ts-ctr0"].env
    uuid = published_uuids(nvidia)[results["ts-gpu"]]
    assert f"time slice of {uuid} set to Long" in nvidia.plugin_log()
    assert_status_names_its_gpus(nvidia, quickstart, claim)
