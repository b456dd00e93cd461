"""The Helm chart (deploy/helm/gpu-dra-driver): it lints, renders with default and
non-default values, every rendered object passes the strict schemas of Kubernetes
1.34-1.37, refuses bad values with the field named, and what it renders is created on
the real API server.

The ServiceMonitor is a prometheus-operator CRD: no Kubernetes schema knows it, and the
e2e API server has no such CRD (a stand-in CRD would accept anything and prove nothing),
so it is checked for shape here and left out of the schema and create checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from driver.allocator.cel import compile_selector, device_input
from driver.cli.main import build_parser
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.resourceslice.build import SliceOptions, build_slices
from tests.support.apiserver import ControlPlane, unique
from tests.support.chart import CHART, Helm, HelmFailed, created, one, only

SCHEMA_VERSIONS = ("1.34.0", "1.35.0", "1.36.0", "1.37.0")
NOT_BUILT_IN = {"ServiceMonitor"}
CUSTOM = {
    "driverName": "gpu.example.com",
    "migMode": "dynamic",
    "logFormat": "json",
    "logVerbosity": 2,
    "image": {"repository": "registry.example.com/gpu-dra-driver", "tag": "1.2.3"},
    "metrics": {"port": 9400, "serviceMonitor": {"enabled": True, "labels": {"team": "gpu"}}},
    "kubeletPlugin": {"driverRoot": "/run/nvidia/driver"},
    "excludeGpus": [3, "GPU-6493d427-501d-5931-bd3f-97d1981f0fc8"],
}
DEVICE_PLUGIN = "nvidia.com/gpu.deploy.device-plugin"
DRA_DRIVER = "nvidia.com/gpu.deploy.dra-driver"


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def plugin_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return container


def plugin_env(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The chart's env for the plugin (downward-API fields as sample values), set in
    this process; the CLI reads its defaults from it when its parser is built."""
    samples = {"spec.nodeName": "gpu-node-7",
               "metadata.uid": "0b7c6a2e-1f4d-4d8e-9a51-3c2f6e8d9b10",
               "metadata.namespace": "gpu-dra"}
    env = {e["name"]: e.get("value") or samples[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in plugin_container(helm.template("gpu", "gpu-dra", CUSTOM))["env"]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def plugin_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plugin", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_plugin_reads_the_env_the_chart_sets(helm: Helm, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    env = plugin_env(helm, monkeypatch)
    args = build_parser().parse_args(["plugin"])
    assert (args.node_name, args.driver_name, args.mig_mode) == \
        ("gpu-node-7", "gpu.example.com", "dynamic")
    assert args.kubelet_registry_dir == Path("/var/lib/kubelet/plugins_registry")
    assert args.plugin_data_dir == Path("/var/lib/kubelet/plugins/gpu.example.com")
    assert args.cdi_root == Path("/var/run/cdi")
    assert (args.driver_root, args.host_driver_root) == \
        (Path("/driver-root"), Path("/run/nvidia/driver"))
    assert (args.health_port, args.metrics_port) == (51515, 9400)
    assert (args.log_format, args.verbosity) == ("json", 2)
    assert args.exclude_gpus.entries == ("3", "GPU-6493d427-501d-5931-bd3f-97d1981f0fc8")
    # a claim's MPS daemon runs in a pod of the plugin's namespace, with the chart's image
    assert (args.pod_namespace, args.image) == \
        ("gpu-dra", "registry.example.com/gpu-dra-driver:1.2.3")
    # Every variable the chart sets is one the plugin documents (NVIDIA_VISIBLE_DEVICES
    # is for an nvidia container runtime).
    documented = plugin_help(capsys)
    missing = [n for n in env if n != "NVIDIA_VISIBLE_DEVICES" and f"env {n}" not in documented]
    assert missing == []


def test_plugin_reads_pod_uid_for_rolling_updates(
    helm: Helm, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = plugin_env(helm, monkeypatch)
    assert "env POD_UID" in plugin_help(capsys)
    assert build_parser().parse_args(["plugin"]).pod_uid == env["POD_UID"]


def test_mock_profile_lets_the_plugin_lay_out_a_mock_driver_root(
        helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    """No driver root: the plugin lays out its mock one in the data dir, a hostPath at the
    same path, so the runtime finds what the CDI specs name."""
    container = plugin_container(helm.template("gpu", "gpu-dra", {
        "kubeletPlugin": {"mockProfile": "dgx-h100"}}))
    env = env_of(container)
    assert env["MOCK_PROFILE"] == "dgx-h100"
    assert "DRIVER_ROOT" not in env and "HOST_DRIVER_ROOT" not in env
    for name in ("MOCK_PROFILE", "PLUGIN_DATA_DIR"):
        monkeypatch.setenv(name, env[name])
    args = build_parser().parse_args(["plugin"])
    assert (args.mock, args.driver_root) == ("dgx-h100", None)


def test_lints_strict(helm: Helm) -> None:
    helm.run("lint", "--strict", str(CHART))
    helm.run("lint", "--strict", str(CHART), "--set", "migMode=dynamic",
             "--set", "metrics.serviceMonitor.enabled=true")


def test_default_render(helm: Helm) -> None:
    objects = helm.template("gpu", "gpu-dra")
    assert sorted(o["kind"] for o in objects) == sorted([
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
        "DaemonSet", "DeviceClass", "DeviceClass", "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding", "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding"])

    classes = {c["metadata"]["name"]: c["spec"] for c in only(objects, "DeviceClass")}
    selects = 'device.driver == "gpu.dra.dev" && device.attributes["gpu.dra.dev"].type == "{}"'
    assert classes == {
        "gpu.dra.dev": {"selectors": [{"cel": {"expression": selects.format("gpu")}}],
                        "extendedResourceName": "gpu.dra.dev/gpu"},
        "mig.gpu.dra.dev": {"selectors": [{"cel": {"expression": selects.format("mig")}}],
                            "extendedResourceName": "gpu.dra.dev/mig"},
    }

    daemonset = one(objects, "DaemonSet")
    assert daemonset["metadata"]["namespace"] == "gpu-dra"
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    container = plugin_container(objects)
    env = env_of(container)
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["DRIVER_NAME"] == "gpu.dra.dev" and env["MIG_MODE"] == "static"
    assert env["PLUGIN_DATA_DIR"] == "/var/lib/kubelet/plugins/gpu.dra.dev"
    assert env["KUBELET_REGISTRY_DIR"] == "/var/lib/kubelet/plugins_registry"
    assert env["DRIVER_ROOT"] == "/driver-root" and env["HOST_DRIVER_ROOT"] == "/"
    assert env["HEALTH_PORT"] == "51515" and env["METRICS_PORT"] == "8080"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 51515}

    # Sockets, checkpoint and CDI specs are on the host at the same paths the plugin uses.
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for name in ("plugins-registry", "plugin-data", "cdi"):
        assert mounts[name]["mountPath"] == host[name]
    assert host["plugin-data"] == env["PLUGIN_DATA_DIR"] and host["cdi"] == env["CDI_ROOT"]
    assert host["driver-root"] == "/" and mounts["driver-root"]["readOnly"] is True

    affinity = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for t in affinity["nodeSelectorTerms"] for e in t["matchExpressions"]}
    assert "feature.node.kubernetes.io/pci-10de.present" in keys
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["tolerations"]

    user = "system:serviceaccount:gpu-dra:gpu-gpu-dra-driver"
    policies = only(objects, "ValidatingAdmissionPolicy")
    assert all(user in p["spec"]["matchConditions"][0]["expression"] for p in policies)
    assert sorted(b["spec"]["policyName"] for b in only(
        objects, "ValidatingAdmissionPolicyBinding")) == sorted(
        p["metadata"]["name"] for p in policies)
    # the plugin creates its MPS daemons' pods in its own namespace, nothing more
    role = one(objects, "Role")
    assert role["metadata"]["namespace"] == "gpu-dra"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["create", "get", "list", "watch", "delete"]}]


def test_custom_values_render(helm: Helm) -> None:
    objects = helm.template("gpu", "monitoring-and-gpus", CUSTOM)
    classes = {c["metadata"]["name"]: c["spec"] for c in only(objects, "DeviceClass")}
    assert set(classes) == {"gpu.example.com", "mig.gpu.example.com"}
    assert classes["gpu.example.com"]["extendedResourceName"] == "gpu.example.com/gpu"
    assert 'device.attributes["gpu.example.com"].type == "mig"' in \
        classes["mig.gpu.example.com"]["selectors"][0]["cel"]["expression"]

    container = plugin_container(objects)
    env = env_of(container)
    assert container["image"] == "registry.example.com/gpu-dra-driver:1.2.3"
    assert (env["DRIVER_NAME"], env["MIG_MODE"], env["LOG_FORMAT"], env["LOG_VERBOSITY"]) == \
        ("gpu.example.com", "dynamic", "json", "2")
    assert env["PLUGIN_DATA_DIR"] == "/var/lib/kubelet/plugins/gpu.example.com"
    assert env["HOST_DRIVER_ROOT"] == "/run/nvidia/driver"
    assert env["METRICS_PORT"] == "9400"

    service, monitor = one(objects, "Service"), one(objects, "ServiceMonitor")
    assert service["spec"]["ports"][0]["port"] == 9400
    assert service["spec"]["selector"].items() <= \
        one(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["team"] == "gpu"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                             "interval": "30s"}]


NVIDIA_COMPATIBLE = {"driverName": "gpu.nvidia.com"}
# NVIDIA's DeviceClass selectors, from NVIDIA/k8s-dra-driver-gpu at commit
# 22407113785e78c7763b4637689a201eb39c6199,
# deployments/helm/dra-driver-nvidia-gpu/templates/deviceclass-gpu.yaml and deviceclass-mig.yaml
NVIDIA_SELECTORS = {
    "gpu.nvidia.com": "device.driver == 'gpu.nvidia.com' && "
                      "device.attributes['gpu.nvidia.com'].type == 'gpu'",
    "mig.nvidia.com": "device.driver == 'gpu.nvidia.com' && "
                      "device.attributes['gpu.nvidia.com'].type == 'mig'",
}


def test_nvidia_compatible_classes_are_nvidias(helm: Helm) -> None:
    objects = helm.template("gpu", "gpu-dra", NVIDIA_COMPATIBLE)
    classes = {c["metadata"]["name"]: c["spec"] for c in only(objects, "DeviceClass")}
    assert set(classes) == set(NVIDIA_SELECTORS)
    assert classes["gpu.nvidia.com"]["extendedResourceName"] == "nvidia.com/gpu"
    # the same meaning: each class selects exactly the devices NVIDIA's selects
    devices = [device_input("gpu.nvidia.com", d["attributes"], d.get("capacity", {}), False)
               for mode in ("static", "dynamic")
               for s in build_slices(discover(mock_provider("a100-mig")), SliceOptions(
                   driver="gpu.nvidia.com", node="n", mig_mode=mode), generation=1)
               for d in s["spec"].get("devices", [])] + [
        device_input("gpu.dra.dev", {"type": {"string": "gpu"}}, {}, False)]
    for name, spec in classes.items():
        ours = compile_selector(spec["selectors"][0]["cel"]["expression"])
        theirs = compile_selector(NVIDIA_SELECTORS[name])
        picked = [ours.matches(d) for d in devices]
        assert picked == [theirs.matches(d) for d in devices] and any(picked), name


def test_options_switch_parts_off(helm: Helm) -> None:
    objects = helm.template("gpu", "gpu-dra", {
        "metrics": {"enabled": False, "serviceMonitor": {"enabled": True}},
        "deviceClasses": {"mig": {"enabled": False}, "gpu": {"extendedResourceName": ""}},
        "resourceSlicePolicy": {"enabled": False},
        "counterLayout": "combined",
    })
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Service", "ServiceMonitor", "ValidatingAdmissionPolicy"}
    (gpu_class,) = only(objects, "DeviceClass")
    assert "extendedResourceName" not in gpu_class["spec"]
    env = env_of(plugin_container(objects))
    assert env["METRICS_PORT"] == "0" and env["COUNTER_LAYOUT"] == "combined"
    assert [p["name"] for p in plugin_container(objects)["ports"]] == ["health"]


@pytest.mark.parametrize("values", [{}, CUSTOM, NVIDIA_COMPATIBLE],
                         ids=["default", "custom", "nvidia"])
def test_rendered_objects_pass_strict_schemas(helm: Helm, values: dict[str, Any]) -> None:
    objects = [o for o in helm.template("gpu", "gpu-dra", values)
               if o["kind"] not in NOT_BUILT_IN]
    assert len(objects) >= 8
    for version in SCHEMA_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize(("values", "field"), [
    ({"migMode": "sometimes"}, "migMode"),
    ({"driverName": "GPU_Driver"}, "driverName"),
    ({"driverName": "a" * 64}, "driverName"),
    ({"kubeletPlugin": {"registryDir": "relative/dir"}}, "registryDir"),
    ({"metrics": {"port": 70000}}, "port"),
    ({"kubeletPlugin": {"healthprobePort": 1}}, "healthprobePort"),
])
def test_bad_values_are_refused_naming_the_field(helm: Helm, values: dict[str, Any],
                                                 field: str) -> None:
    with pytest.raises(HelmFailed, match=field):
        helm.template("gpu", "gpu-dra", values)


def test_refuses_kubernetes_before_1_34(helm: Helm) -> None:
    with pytest.raises(HelmFailed, match="kubeVersion"):
        helm.template("gpu", "gpu-dra", kube_version="1.33.0")


@pytest.mark.parametrize("values", [{}, CUSTOM], ids=["default", "custom"])
def test_rendered_objects_are_created_on_the_api_server(
    helm: Helm, control_plane: ControlPlane, namespace: str, values: dict[str, Any]
) -> None:
    # DeviceClasses, ClusterRoles and the policy are cluster-wide: a unique driver and
    # release name keep this test clear of others sharing the session's cluster.
    driver = f"{unique('gpu')}.example.com"
    objects = [o for o in helm.template(unique("rel"), namespace,
                                        {**values, "driverName": driver})
               if o["kind"] not in NOT_BUILT_IN]
    with created(control_plane.api, objects) as stored:
        assert [o["kind"] for o in stored] == [o["kind"] for o in objects]
        classes = {c["metadata"]["name"]: c["spec"] for c in only(stored, "DeviceClass")}
        assert classes[driver]["extendedResourceName"] == f"{driver}/gpu", \
            "the API server kept extendedResourceName (DRAExtendedResource)"
        daemonset = one(stored, "DaemonSet")
        assert daemonset["spec"]["updateStrategy"]["rollingUpdate"] == {
            "maxSurge": 1, "maxUnavailable": 0}


def node_terms(objects: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [t["matchExpressions"] for t in required["nodeSelectorTerms"]]


def schedulable(terms: list[list[dict[str, Any]]], labels: dict[str, str]) -> bool:
    """Whether a node with `labels` matches the terms (In / NotIn, as the scheduler does)."""
    def holds(e: dict[str, Any]) -> bool:
        inside = labels.get(e["key"]) in e["values"]
        return inside if e["operator"] == "In" else not inside
    return any(all(holds(e) for e in term) for term in terms)


def test_default_affinity_skips_nodes_of_the_device_plugin_alone(helm: Helm) -> None:
    terms = node_terms(helm.template("gpu", "gpu-dra"))
    gpu = {"nvidia.com/gpu.present": "true"}
    assert schedulable(terms, gpu)
    assert not schedulable(terms, {**gpu, DRA_DRIVER: "false"})
    assert schedulable(terms, {**gpu, DRA_DRIVER: "true"})
    # the GPU operator labels every GPU node so, with its device plugin on or off
    assert schedulable(terms, {**gpu, DEVICE_PLUGIN: "true"})
    assert not schedulable(terms, {DRA_DRIVER: "true"})  # no GPU
    env = env_of(plugin_container(helm.template("gpu", "gpu-dra")))
    assert "EXCLUDE_GPUS" not in env


def test_skip_device_plugin_nodes_can_be_turned_off_and_applies_to_own_affinity(
        helm: Helm) -> None:
    off = node_terms(helm.template("gpu", "gpu-dra", {
        "kubeletPlugin": {"skipDevicePluginNodes": False}}))
    assert schedulable(off, {"nvidia.com/gpu.present": "true", DRA_DRIVER: "false"})
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}
    terms = node_terms(helm.template("gpu", "gpu-dra", {"kubeletPlugin": {"affinity": own}}))
    assert schedulable(terms, {"pool": "gpu"})
    assert not schedulable(terms, {"pool": "gpu", DRA_DRIVER: "false"})


def test_exclude_gpus_reaches_the_plugin_and_bad_entries_are_refused(helm: Helm) -> None:
    env = env_of(plugin_container(helm.template("gpu", "gpu-dra", CUSTOM)))
    assert env["EXCLUDE_GPUS"] == "3,GPU-6493d427-501d-5931-bd3f-97d1981f0fc8"
    with pytest.raises(HelmFailed, match="excludeGpus"):
        helm.template("gpu", "gpu-dra", {"excludeGpus": ["gpu-3"]})
