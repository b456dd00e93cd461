"""Socket names for rolling updates, as the upstream kubeletplugin helper names them
(`RollingUpdate(uid)`): per pod UID, the registration socket shortened by hashing where its
path would pass the 108-byte AF_UNIX limit; without a UID, the usual names."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from driver.cli import UsageError, build_parser, cmd_plugin
from driver.plugin.daemon import PluginOptions, rolling_update_socket_name

UID = "0b7c6a2e-1f4d-4d8e-9a51-3c2f6e8d9b10"


def options(pod_uid: str | None, registry: str = "/var/lib/kubelet/plugins_registry"
            ) -> PluginOptions:
    return PluginOptions(driver="gpu.dra.dev", node="n", registry_dir=Path(registry),
                         plugin_dir=Path("/var/lib/kubelet/plugins/gpu.dra.dev"),
                         cdi_root=Path("/var/run/cdi"), pod_uid=pod_uid)


def test_without_a_pod_uid_the_names_are_the_usual_ones() -> None:
    plain = options(None)
    assert plain.registration_socket == Path(
        "/var/lib/kubelet/plugins_registry/gpu.dra.dev-reg.sock")
    assert plain.dra_socket == Path("/var/lib/kubelet/plugins/gpu.dra.dev/dra.sock")


def test_with_a_pod_uid_both_sockets_carry_it() -> None:
    rolling = options(UID)
    assert rolling.registration_socket == Path(
        f"/var/lib/kubelet/plugins_registry/gpu.dra.dev-{UID}-reg.sock")
    assert rolling.dra_socket == Path(f"/var/lib/kubelet/plugins/gpu.dra.dev/dra-{UID}.sock")
    assert rolling.lock_path == Path("/var/lib/kubelet/plugins/gpu.dra.dev/serialize.lock")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("driver", ["gpu.dra.dev", "gpus.with-a-long-name.example.com"])
def test_a_long_registry_path_gets_the_hashed_names_in_upstream_order(driver: str) -> None:
    uid_hash = b64(hashlib.sha256(UID.encode()).digest()[:8])
    pair_hash = b64(hashlib.sha256(f"{driver}\0{UID}".encode()).digest()[:16])
    candidates = [f"{driver}-{UID}-reg.sock", f"{driver}-{uid_hash}-reg.sock",
                  f"dra-{pair_hash}-reg.sock"]
    for i, name in enumerate(candidates):
        # the longest directory where this name fits and none before it does
        directory = Path("/" + "d" * (108 - len(name) - 2))
        if any(len(str(directory / c)) <= 108 for c in candidates[:i]):
            continue
        assert rolling_update_socket_name(directory, driver, UID) == name
    assert rolling_update_socket_name(Path("/" + "d" * 200), driver, UID) == candidates[2]
    assert rolling_update_socket_name(Path("/r"), driver, UID) == candidates[0]


def test_the_flag_and_its_env_and_a_bad_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_UID", UID)
    assert build_parser().parse_args(["plugin"]).pod_uid == UID
    monkeypatch.setenv("POD_UID", "")
    assert build_parser().parse_args(["plugin"]).pod_uid is None
    args = build_parser().parse_args(["plugin", "--mock", "l4-8x", "--pod-uid", "../x"])
    with pytest.raises(UsageError, match=r"--pod-uid \(env POD_UID\): '\.\./x' is not a pod"):
        cmd_plugin(args)
