"""What a claim's MPS daemon is told: memory limits in MPS's own units, each device's
limit at its index in CUDA_VISIBLE_DEVICES, config mistakes named by field; and which
nodes refuse MPS claims, saying why."""

from __future__ import annotations

from pathlib import Path

import pytest

from driver.nvml.mock import mock_provider
from driver.plugin import mps, mpspod
from driver.plugin.claims import ClaimRef
from driver.plugin.config import ConfigError, parse_parameters
from driver.plugin.configschema import MpsConfig
from driver.plugin.mps import ClaimMps, Limits, MpsDevice, limits, mps_memory

GPU0, GPU1 = "GPU-0d2f0000-0000-0000-0000-000000000000", \
    "GPU-91ab0000-0000-0000-0000-000000000000"
DEVICES = (MpsDevice("gpu-0", GPU0, GPU0, True), MpsDevice("gpu-1", GPU1, GPU1, True))


@pytest.mark.parametrize(("limit", "text"), [
    (1 << 20, "1M"), (512 << 20, "512M"), (2 << 30, "2G"), (1536 << 20, "1536M"),
    (80 * 10**9, "76293M"),  # 80G (decimal) rounded down to whole MiB
    ((1 << 20) + 1, "1M")])
def test_memory_is_written_in_mps_units_rounded_down(limit: int, text: str) -> None:
    assert mps_memory(limit) == text


def test_less_than_a_mib_is_refused() -> None:
    with pytest.raises(ValueError, match="less than MPS's unit, 1Mi"):
        mps_memory((1 << 20) - 1)


def test_the_default_applies_to_every_device_and_a_device_key_overrides_it() -> None:
    config = MpsConfig(defaultActiveThreadPercentage=25, defaultPinnedDeviceMemoryLimit="8Gi",
                       defaultPerDevicePinnedMemoryLimit={"gpu-1": "512Mi"})
    got = limits(config, DEVICES, "mpsConfig")
    assert got == Limits(25, ((0, "8G"), (1, "512M")))
    assert got.commands() == ["set_default_active_thread_percentage 25",
                              "set_default_device_pinned_mem_limit 0 8G",
                              "set_default_device_pinned_mem_limit 1 512M"]


def test_a_device_is_named_by_its_gpu_uuid_and_indexed_in_the_daemons_order() -> None:
    config = MpsConfig(defaultPerDevicePinnedMemoryLimit={GPU0: "1Gi"})
    assert limits(config, DEVICES[::-1], "c") == Limits(None, ((1, "1G"),))


def test_a_mig_device_is_indexed_by_its_own_uuid_and_named_by_its_gpus() -> None:
    mig = MpsDevice("gpu-0-mig-1g10gb-0", "MIG-5c1e0000-0000-0000-0000-000000000000", GPU0,
                    False)
    config = MpsConfig(defaultPerDevicePinnedMemoryLimit={GPU0: "2Gi"})
    assert limits(config, (DEVICES[1], mig), "c").pinned == ((1, "2G"),)


def test_a_device_is_named_by_its_index_in_the_claim_as_nvidias_driver_does() -> None:
    config = MpsConfig(defaultPinnedDeviceMemoryLimit="8Gi",
                       defaultPerDevicePinnedMemoryLimit={"1": "2Gi"})
    assert limits(config, DEVICES, "c").pinned == ((0, "8G"), (1, "2G"))
    with pytest.raises(ValueError, match=r"^c\.defaultPerDevicePinnedMemoryLimit\.2: names "):
        limits(MpsConfig(defaultPerDevicePinnedMemoryLimit={"2": "1Gi"}), DEVICES, "c")


def test_no_limits_tell_the_daemon_nothing() -> None:
    assert limits(MpsConfig(), DEVICES, "c").commands() == []


def test_a_key_naming_no_device_of_the_claim_is_refused() -> None:
    config = MpsConfig(defaultPerDevicePinnedMemoryLimit={"gpu-7": "1Gi"})
    with pytest.raises(ValueError, match=r"^c\.defaultPerDevicePinnedMemoryLimit\.gpu-7: names "
                                         r"no device of this claim \(gpu-0, gpu-1\)$"):
        limits(config, DEVICES, "c")


def test_a_limit_under_a_mib_is_refused_naming_the_field() -> None:
    config = MpsConfig(defaultPinnedDeviceMemoryLimit="1000Ki")
    with pytest.raises(ValueError, match=r"^c\.defaultPinnedDeviceMemoryLimit: 1024000 bytes "):
        limits(config, DEVICES, "c")


@pytest.mark.parametrize(("mps_config", "message"), [
    ({"defaultActiveThreadPercentage": 0}, "defaultActiveThreadPercentage: Input should be "
                                           "greater than or equal to 1"),
    ({"defaultActiveThreadPercentage": "50"}, "defaultActiveThreadPercentage: Input should "
                                              "be a valid integer"),
    ({"defaultPinnedDeviceMemoryLimit": "lots"}, "defaultPinnedDeviceMemoryLimit"),
    ({"defaultPerDevicePinnedMemoryLimit": {"gpu0": "1Gi"}}, "the key must be a device name"),
    ({"threads": 5}, "threads: unknown field")])
def test_config_mistakes_are_named(mps_config: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=r"p\.sharing\.mpsConfig") as err:
        parse_parameters({"apiVersion": "gpu.dra.dev/v1alpha1", "kind": "GpuConfig",
                          "sharing": {"strategy": "MPS", "mpsConfig": mps_config}}, "p")
    assert message in str(err.value)


def test_the_claim_file_round_trips() -> None:
    claim = ClaimMps(DEVICES, Limits(30, ((0, "2G"),)), {GPU0: 0, GPU1: 1},
                     ClaimRef("team-a", "train", UID))
    assert ClaimMps.from_json(claim.to_json(), UID) == claim


def test_a_cluster_without_pod_settings_refuses_mps_saying_why(tmp_path: Path) -> None:
    provider = mock_provider("dgx-h100")
    daemons = mpspod.daemons(tmp_path, provider, tmp_path, mock_root=True, local=False,
                             pods=None, api=None)
    assert daemons.unsupported == mps.NO_POD_SETTINGS
    assert "POD_NAMESPACE and GPU_DRA_IMAGE" in mps.NO_POD_SETTINGS


def test_a_mock_nvml_never_runs_the_hosts_daemon(tmp_path: Path) -> None:
    provider = mock_provider("dgx-h100")
    host = mpspod.daemons(tmp_path, provider, Path("/"), mock_root=False, local=True,
                          pods=None, api=None)
    assert host.unsupported is not None and "serves real GPUs" in host.unsupported
    assert mpspod.daemons(tmp_path, provider, tmp_path, mock_root=True, local=True,
                          pods=None, api=None).unsupported is None


UID = "3b0a9f3e-5b1c-4f7e-9c3a-2d8e6f1a0b4c"


def test_a_claims_daemon_pod_runs_the_driver_image_on_this_node_with_its_directories(
        ) -> None:
    settings = mpspod.PodSettings("gpu.dra.dev", "gpu-dra", "node-a", "gpu-dra:1.2",
                                  Path("/driver-root"), Path("/run/nvidia/driver"))
    claim_dir = Path("/var/lib/kubelet/plugins/gpu.dra.dev/mps") / UID
    claim = ClaimMps(DEVICES, Limits(30, ()), {}, ClaimRef("team-a", "train", UID))
    pod = mpspod.pod_spec(settings, "node-uid-1", claim_dir, claim)
    meta, spec = pod["metadata"], pod["spec"]
    assert (meta["name"], meta["namespace"]) == (f"mps-{UID}", "gpu-dra")
    assert meta["labels"]["gpu.dra.dev/claim-uid"] == UID
    assert meta["annotations"]["gpu.dra.dev/claim"] == "team-a/train"
    # the Node owns it: a ResourceClaim in another namespace could not
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "node-a",
                                        "uid": "node-uid-1"}]
    assert spec["nodeName"] == "node-a" and spec["restartPolicy"] == "OnFailure"
    assert spec["hostPID"] is True
    [container] = spec["containers"]
    assert container["image"] == "gpu-dra:1.2"
    assert container["command"] == ["gpu-dra", "mps-daemon", "--claim-dir", str(claim_dir),
                                    "--driver-root", "/driver-root"]
    assert container["securityContext"] == {"privileged": True}
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert {name: (volumes[name], mounts[name]) for name in volumes} == {
        "claim": (str(claim_dir), str(claim_dir)),  # the plugin's paths are the daemon's
        "driver-root": ("/run/nvidia/driver", "/driver-root"),
        "shm": (str(claim_dir / "shm"), "/dev/shm")}
