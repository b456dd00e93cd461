"""The driver on a real node: the chart's pod under a real kubelet, containers started by
containerd and runc with the devices our CDI specs name. Every assertion is about what a
user sees: the pod's status and events, the container's /dev, environment and mounts, the
files on the node."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from driver.kube.api import api_client, api_request
from driver.plugin import checkpoint
from tests.support.apiserver import unique, wait_for
from tests.support.chart import CHART
from tests.support.nodepods import (
    CHART_NAMESPACE,
    DRIVER,
    RELEASE,
    ContainerView,
    Driver,
    Workloads,
    kubelet_dra_metrics,
)
from tests.support.realnode import NODE_NAME, RealNode, kill_all, kubelet_cgroups, pids_in_cgroups

GPU_MAJOR = 195
CONTROL = {"/dev/nvidiactl": (195, 255)}
CONTROL_NAMES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
ISLAND = f"{DRIVER}/nvlinkIsland"


def spec_path(node: RealNode, claim_uid: str) -> Path:
    return node.host_path(f"/var/run/cdi/k8s.{DRIVER}-claim_{claim_uid}.json")


def checkpoint_claims(node: RealNode) -> set[str]:
    """Claim UIDs prepared according to the plugin's checkpoint on the node (its journal
    applied), read as the next plugin start would."""
    loaded = checkpoint.load(node.host_path(f"/var/lib/kubelet/plugins/{DRIVER}/checkpoint.json"))
    return set() if loaded is None else set(loaded.claims)


def gpu_minor(device: str) -> int:
    match = re.fullmatch(r"gpu-(\d+)", device)
    assert match, f"{device} is not a whole GPU"
    return int(match.group(1))


def assert_sees_exactly(view: ContainerView, minors: set[int]) -> None:
    assert view.gpus == {f"/dev/nvidia{m}" for m in minors}, view.devices
    for m in minors:
        assert view.devices[f"/dev/nvidia{m}"] == (GPU_MAJOR, m)
    for name in CONTROL_NAMES:
        assert name in view.devices, f"{name} missing: {sorted(view.devices)}"
    assert view.devices["/dev/nvidiactl"] == CONTROL["/dev/nvidiactl"]


# --- the chart's pod ---------------------------------------------------------------------------


def test_chart_pod_registers_with_the_kubelet_and_publishes_the_node(driver: Driver) -> None:
    pod = driver.wait_ready()
    assert pod["spec"]["nodeName"] == NODE_NAME
    # In-cluster credentials only: the pod's own ServiceAccount token, no admin kubeconfig.
    assert pod["spec"]["serviceAccountName"] == RELEASE
    # The kubelet's plugin watcher found the registration socket and called back.
    wait_for(lambda: "the kubelet registered the plugin" in driver.plugin_log(),
             "the plugin's log to say the kubelet registered it")
    kubelet_log = driver.node.log("kubelet").read_text(errors="replace")
    registered = re.findall(rf'"Registered DRA plugin".* driverName="{re.escape(DRIVER)}"'
                            r'.* chosenService="([^"]+)"', kubelet_log)
    assert registered, "the kubelet's log does not show our plugin registering"
    assert registered[-1] == "v1.DRAPlugin", f"the kubelet chose {registered[-1]}"
    assert "Successfully started WatchResources health stream" in kubelet_log
    slices = driver.slices()
    devices = [d["name"] for s in slices for d in s["spec"].get("devices", [])]
    # dgx-h100, dynamic MIG: the 8 whole GPUs and every MIG profile at every placement.
    assert {f"gpu-{i}" for i in range(8)} <= set(devices)
    assert any("mig" in d for d in devices)
    assert {s["spec"]["driver"] for s in slices} == {DRIVER}
    # Written with the pod's own token, under the chart's policy: only its node's slices.
    policies = api_request(driver.node.api, "GET", "/apis/admissionregistration.k8s.io/v1/"
                           "validatingadmissionpolicybindings").expect(200)["items"]
    assert any(p["metadata"]["name"].startswith(RELEASE) for p in policies)


def test_the_kubelet_is_a_node_not_an_admin(real_node: RealNode) -> None:
    """It joined with its own certificate: the Node authorizer and NodeRestriction hold it
    to its own Node and the pods bound to it."""
    kubelet = api_client(real_node.scratch / "kubelet-config" / "kubeconfig")
    try:
        assert api_request(kubelet, "GET", f"/api/v1/nodes/{NODE_NAME}").status == 200
        assert api_request(kubelet, "GET", "/api/v1/namespaces/kube-system/secrets"
                           ).status == 403
        own = {"metadata": {"labels": {"node-restriction.kubernetes.io/pool": "gpu"}}}
        result = api_request(kubelet, "PATCH", f"/api/v1/nodes/{NODE_NAME}", own,
                             content_type="application/strategic-merge-patch+json")
        assert result.status == 403, "NodeRestriction let the kubelet set a restricted label"
    finally:
        kubelet.close()


# --- containers with GPUs ----------------------------------------------------------------------


def test_whole_gpu_gives_its_node_and_the_control_nodes_only(workloads: Workloads) -> None:
    workloads.claim("one")
    workloads.pod("one", ["one"])
    workloads.wait_running("one")
    (device,) = workloads.allocated("one")
    assert_sees_exactly(workloads.view("one"), {gpu_minor(device)})


def test_spec_env_mounts_and_hooks_are_applied(workloads: Workloads, real_node: RealNode
                                                ) -> None:
    workloads.claim("files")
    workloads.pod("files", ["files"])
    workloads.wait_running("files")
    spec = json.loads(spec_path(real_node, workloads.claim_uid("files")).read_text())
    edits = spec["containerEdits"]
    view = workloads.view("files")
    for entry in edits["env"]:
        key, _, value = entry.partition("=")
        assert view.env.get(key) == value, f"{key} not set as the spec says"
    assert len(edits["mounts"]) > 20, "the driver's libraries, firmware and tools"
    for mount in edits["mounts"]:
        assert mount["containerPath"] in view.mounts, f"{mount['containerPath']} not mounted"
    # runc ran each hook (the mock root's stand-in nvidia-cdi-hook) for this container.
    (status,) = (workloads.get_pod("files") or {})["status"]["containerStatuses"]
    container_id = status["containerID"].removeprefix("containerd://")
    hook_log = real_node.host_path(f"/var/lib/kubelet/plugins/{DRIVER}/mock-driver-root"
                                   "/var/log/nvidia-cdi-hook.log")
    calls = [line.split("\t") for line in hook_log.read_text().splitlines()]
    ours = [call[2:] for call in calls if call[0] == container_id]
    expected = [hook["args"][1:] for hook in edits["hooks"]]
    assert {"create-symlinks", "update-ldcache"} <= {args[0] for args in expected}
    assert sorted(ours) == sorted(expected), f"hooks run {ours}, the spec has {expected}"


def test_mig_device_gives_its_capability_nodes(workloads: Workloads, real_node: RealNode
                                               ) -> None:
    workloads.claim("mig", device_class=f"mig.{DRIVER}",
                    cel=f'device.attributes["{DRIVER}"].profile == "1g.10gb"')
    workloads.pod("mig", ["mig"])
    workloads.wait_running("mig", timeout=120)
    spec = json.loads(spec_path(real_node, workloads.claim_uid("mig")).read_text())
    (device,) = spec["devices"]
    caps = {n["path"]: (n.get("major"), n.get("minor"))
            for n in device["containerEdits"]["deviceNodes"] if "nvidia-caps" in n["path"]}
    assert len(caps) == 2, f"a MIG device needs its GI and CI capability nodes: {device}"
    view = workloads.view("mig")
    for path, (major, minor) in caps.items():
        assert path in view.devices, f"{path} missing in the container"
        if major is not None:
            assert view.devices[path] == (major, minor)
    assert len(view.gpus) == 1, "the MIG device's parent GPU node"


def test_two_containers_share_one_claim(workloads: Workloads) -> None:
    workloads.claim("shared")
    workloads.pod("two", ["shared"], containers=("a", "b"))
    workloads.wait_running("two")
    (device,) = workloads.allocated("shared")
    for container in ("a", "b"):
        assert_sees_exactly(workloads.view("two", container), {gpu_minor(device)})


def test_two_nvlink_connected_gpus(workloads: Workloads) -> None:
    workloads.claim("pair", count=2, match_attribute=ISLAND)
    workloads.pod("pair", ["pair"])
    workloads.wait_running("pair")
    devices = workloads.allocated("pair")
    assert len(devices) == 2
    assert_sees_exactly(workloads.view("pair"), {gpu_minor(d) for d in devices})


def test_time_sliced_claim_used_by_two_pods(workloads: Workloads) -> None:
    config = {"apiVersion": f"{DRIVER}/v1alpha1", "kind": "GpuConfig",
              "sharing": {"strategy": "TimeSlicing",
                          "timeSlicingConfig": {"interval": "Short"}}}
    workloads.claim("sliced", config=config)
    workloads.pod("first", ["sliced"])
    workloads.pod("second", ["sliced"])
    workloads.wait_running("first")
    workloads.wait_running("second")
    (device,) = workloads.allocated("sliced")
    for pod in ("first", "second"):
        assert_sees_exactly(workloads.view(pod), {gpu_minor(device)})


def test_pod_deletion_unprepares_and_removes_the_spec(workloads: Workloads,
                                                       real_node: RealNode) -> None:
    workloads.claim("gone")
    workloads.pod("gone", ["gone"])
    workloads.wait_running("gone")
    uid = workloads.claim_uid("gone")
    assert spec_path(real_node, uid).exists()
    assert uid in checkpoint_claims(real_node)
    workloads.delete_pod("gone")
    wait_for(lambda: not spec_path(real_node, uid).exists(), "the claim's CDI spec removed")
    wait_for(lambda: uid not in checkpoint_claims(real_node), "the claim unprepared")


def test_bad_opaque_config_fails_prepare_with_the_drivers_message(
        workloads: Workloads, real_node: RealNode) -> None:
    bad = {"apiVersion": f"{DRIVER}/v1alpha1", "kind": "GpuConfig",
           "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}}}
    workloads.claim("bad", config=bad)
    workloads.pod("bad", ["bad"])
    event = workloads.wait_event("bad", "FailedPrepareDynamicResources", timeout=90)
    assert "interval" in event["message"], event["message"]
    uid = workloads.claim_uid("bad")
    assert workloads.phase("bad") == "Pending"
    assert not spec_path(real_node, uid).exists()
    assert uid not in checkpoint_claims(real_node)


# --- the node's life -----------------------------------------------------------------------------


def test_deleting_the_plugin_pod_leaves_workloads_running(driver: Driver,
                                                          workloads: Workloads) -> None:
    workloads.claim("before")
    workloads.pod("before", ["before"])
    workloads.wait_running("before")
    old = driver.wait_ready()["metadata"]["name"]
    api_request(driver.node.api, "DELETE",
                f"/api/v1/namespaces/{CHART_NAMESPACE}/pods/{old}").expect(200)
    wait_for(lambda: (p := driver.ready_pod()) is not None and p["metadata"]["name"] != old,
             "a new plugin pod Ready", timeout=180)
    assert workloads.phase("before") == "Running"
    workloads.claim("after")
    workloads.pod("after", ["after"])
    workloads.wait_running("after")
    mine, theirs = workloads.allocated("after"), workloads.allocated("before")
    assert set(mine).isdisjoint(theirs)
    assert_sees_exactly(workloads.view("after"), {gpu_minor(d) for d in mine})


def test_helm_upgrade_rolls_the_daemonset_without_a_failed_prepare(
        driver: Driver, workloads: Workloads) -> None:
    old = driver.wait_ready()["metadata"]["name"]
    stop = threading.Event()
    made: list[str] = []

    def keep_creating() -> None:
        while not stop.is_set() and len(made) < 6:
            name = unique("roll")
            workloads.claim(name)
            workloads.pod(name, [name], command="sleep 3600")
            made.append(name)
            stop.wait(2)

    creator = threading.Thread(target=keep_creating)
    creator.start()
    try:
        driver.helm.run("upgrade", RELEASE, str(CHART), *driver.helm_args(
            "--set", "logVerbosity=1"))
        wait_for(lambda: (p := driver.ready_pod()) is not None and p["metadata"]["name"] != old,
                 "the upgraded plugin pod Ready and the old one gone", timeout=240)
    finally:
        stop.set()
        creator.join()
    for name in made:
        workloads.wait_running(name, timeout=120)
    failed = [e for name in made for e in workloads.events(name)
              if e.get("reason") == "FailedPrepareDynamicResources"]
    assert not failed, failed
    pod = driver.ready_pod()
    assert pod is not None
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["LOG_VERBOSITY"] == "1"


def kill_sandbox(pod_uid: str) -> None:
    """SIGKILL the pod's sandbox (its pause process), as a crash would."""
    pids = {pid for root in kubelet_cgroups() for folder in root.rglob(f"pod{pod_uid}")
            for pid in pids_in_cgroups([folder])}
    pauses = [pid for pid in pids if Path(f"/proc/{pid}/comm").read_text().strip() == "pause"]
    assert pauses, f"no sandbox process of pod {pod_uid}"
    kill_all(pauses)


def test_kubelet_restart_keeps_prepared_claims_and_prepares_again_alike(
        workloads: Workloads, real_node: RealNode, driver: Driver) -> None:
    workloads.claim("kept")
    workloads.pod("kept", ["kept"])
    workloads.wait_running("kept")
    uid = workloads.claim_uid("kept")
    spec_before = spec_path(real_node, uid).read_text()
    devices_before = workloads.view("kept").devices
    real_node.restart_kubelet()
    driver.wait_ready()
    assert workloads.phase("kept") == "Running"
    assert spec_path(real_node, uid).read_text() == spec_before
    assert uid in checkpoint_claims(real_node)
    # A restarted kubelet has not prepared anything yet (its checkpoint marks no claim
    # prepared): when the sandbox must be made again it calls NodePrepareResources for the
    # claim the plugin already prepared, which must answer as the first time.
    pod = workloads.get_pod("kept") or {}
    kill_sandbox(pod["metadata"]["uid"])
    prepares = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources"

    def prepared_again() -> dict[str, float]:
        calls = kubelet_dra_metrics(real_node.kubelet_metrics(), DRIVER)
        return {k: c for k, (c, _) in calls.items() if prepares in k and c > 0}

    calls = wait_for(prepared_again, "the restarted kubelet to prepare the claim again")
    assert all('grpc_status_code="OK"' in k for k in calls), calls
    wait_for(lambda: (workloads.get_pod("kept") or {})["status"]["containerStatuses"][0]
             .get("restartCount", 0) >= 1 and workloads.phase("kept") == "Running",
             "the container started again in its new sandbox", timeout=90)
    workloads.wait_running("kept")
    assert workloads.view("kept").devices == devices_before
    assert spec_path(real_node, uid).read_text() == spec_before
    workloads.claim("next")
    workloads.pod("next", ["next"])
    workloads.wait_running("next")
    assert set(workloads.allocated("next")).isdisjoint(workloads.allocated("kept"))
