"""A rolling update whose new version publishes other ResourceSlices: the old and the new
plugin pod run side by side on one node, both publishing its pool. Without a rule the two
undo each other's writes for the whole overlap (243-344 PUTs in 5 s, docs/benchmarks.md);
with it the pod whose slices were overwritten leaves them alone while the other pod's
socket accepts connections, and the pod that stays restores its own."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from driver.devcluster.controlplane import ComponentError
from driver.devcluster.node import PluginDaemon, PluginFolders
from driver.inventory.discovery import discover
from driver.inventory.model import Inventory
from driver.nvml.mock import mock_provider
from driver.plugin.sockets import other_plugin_alive, rolling_update_socket_name
from driver.resourceslice.publish import ApiPublisher, PublishTiming
from tests.support.apiserver import ControlPlane, api_writes, wait_for
from tests.support.plugin import new_uid, short_tmp
from tests.support.publisher import DRIVER, consistent, pool, publisher_for, resyncing, writes

OLD_DRIVER_VERSION = "535.129.3"  # dgx-h100's, as published
NEW_DRIVER_VERSION = "580.95.5"  # 580.95.05 as a semantic version


def slice_writes(api: Any) -> int:
    """ResourceSlice writes the API server has served, by anyone."""
    return sum(n for verb, n in api_writes(api).items() if verb.endswith(" resourceslices"))


def versions(slices: list[dict[str, Any]]) -> set[str]:
    """The driverVersion every device of the pool says: whose content it is."""
    return {d["attributes"]["driverVersion"]["version"]
            for s in slices for d in s["spec"].get("devices", [])}


@contextlib.contextmanager
def listening(path: Path) -> Iterator[None]:
    """A plugin pod's registration socket: it accepts connections until the pod stops."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


@dataclass
class Pod:
    """One plugin pod's publishing: its publisher, the calls it made, its socket."""

    publisher: ApiPublisher
    calls: list[tuple[str, str]]
    socket: Path
    running: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start(self, inventory: Inventory) -> None:
        """As the daemon does: publish, then open the socket; the resync loop runs."""
        self.publisher.publish(inventory)
        self.running.enter_context(listening(self.socket))
        self.running.enter_context(resyncing(self.publisher))

    def stop(self) -> None:
        """The pod ends: its loop stops and its socket goes; its slices stay."""
        self.running.close()

    def checks(self, more: int) -> None:
        """Wait until the resync loop has looked at the pool ``more`` more times."""
        target = self.publisher.syncs + more
        wait_for(lambda: self.publisher.syncs >= target, f"{more} more resyncs", timeout=30)


def test_another_pod_counts_while_one_of_its_sockets_accepts() -> None:
    """The daemon's ``others_alive``: the other pod's registration or DRA socket, not ours,
    not a dead pod's, not another driver's."""
    with short_tmp() as root:
        registry, plugin_dir = root / "registry", root / "plugin"
        registry.mkdir()
        plugin_dir.mkdir()
        own = (registry / f"{DRIVER}-a-reg.sock", plugin_dir / "dra-a.sock")
        alive = functools.partial(other_plugin_alive, registry, plugin_dir, DRIVER, own)
        with contextlib.ExitStack() as sockets:
            for path in (*own, registry / "other.dev-b-reg.sock"):
                sockets.enter_context(listening(path))
            # A pod killed without its stop: the socket file stays, nobody listens.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
                dead.bind(str(registry / f"{DRIVER}-c-reg.sock"))
            assert not alive()
            with listening(plugin_dir / "dra-b.sock"):  # the other pod, serving
                assert alive()
            with listening(registry / f"{DRIVER}-b-reg.sock"):
                assert alive()
            assert not alive()


@pytest.mark.parametrize(("old_yields", "survivor", "overlap_writes", "total_writes"), [
    (True, "new", 1, 1),  # the upgrade: the new pod's publish is the only write
    (True, "old", 1, 2),  # the new pod fails and goes: the old pod restores its slices
    # From a release without the rule: the old pod restores at once, once; the new pod
    # leaves it be while the old one runs, then restores its own.
    (False, "new", 2, 3),
], ids=["upgrade", "new-pod-fails", "from-a-release-without-the-rule"])
def test_two_versions_side_by_side_write_a_bounded_number_of_times(
        control_plane: ControlPlane, fake_node: Any, caplog: pytest.LogCaptureFixture,
        old_yields: bool, survivor: str, overlap_writes: int, total_writes: int) -> None:
    api = control_plane.api
    node = fake_node()
    old_inventory = discover(mock_provider("dgx-h100"))
    # The new version's slices differ (a new driverVersion stands in for a new attribute).
    new_inventory = replace(old_inventory, driver_version="580.95.05")
    with short_tmp() as root, contextlib.ExitStack() as stack:
        registry, plugin_dir = root / "registry", root / "plugin"
        registry.mkdir()

        def pod(yields: bool) -> Pod:
            sock = registry / rolling_update_socket_name(registry, DRIVER, new_uid())
            alive = functools.partial(other_plugin_alive, registry, plugin_dir, DRIVER,
                                      (sock,))
            publisher, calls = stack.enter_context(publisher_for(
                control_plane, node, timing=PublishTiming(resync_period=1, yield_poll=1),
                others_alive=alive if yields else None))
            made = Pod(publisher, calls, sock)
            stack.callback(made.stop)  # before publisher_for deletes the pool
            return made

        old, new = pod(old_yields), pod(yields=True)
        caplog.set_level(logging.INFO, logger="driver.resourceslice.publish")

        old.start(old_inventory)
        old.checks(2)
        before = slice_writes(api)
        old.calls.clear()
        new.start(new_inventory)
        yielder = old if old_yields else new
        wait_for(lambda: yielder.publisher.yielding, "one pod to yield to the other")
        old.checks(3)  # three seconds side by side, each pod checking every second
        new.checks(3)
        overlap = pool(api, node)
        assert consistent(overlap)
        assert slice_writes(api) - before == overlap_writes  # a one-slice pool
        assert len(writes(old.calls)) == overlap_writes - 1
        assert versions(overlap) == {NEW_DRIVER_VERSION if old_yields else OLD_DRIVER_VERSION}
        assert sum("leaving them to it while it runs" in r.getMessage()
                   for r in caplog.records) == 1

        (new if survivor == "old" else old).stop()
        stays = old if survivor == "old" else new
        stays.checks(2)
        want = OLD_DRIVER_VERSION if survivor == "old" else NEW_DRIVER_VERSION
        final = wait_for(lambda: (p := pool(api, node)) and versions(p) == {want} and p,
                         f"the {survivor} pod's slices to stand")
        assert consistent(final)
        assert slice_writes(api) - before == total_writes
        assert any("no longer leaving them" in r.getMessage() for r in caplog.records) == \
            (total_writes > overlap_writes)



def test_the_plugin_pods_of_two_versions_share_a_node_without_write_ping_pong(
        control_plane: ControlPlane, fake_node: Any) -> None:
    """The daemon end to end: two ``gpu-dra plugin`` pods, the new one publishing other
    slices (dynamic MIG here, as a new version with a new default would), its sockets
    opened after its publish; the old pod yields to it and stops: one publish in all."""
    api = control_plane.api
    node = fake_node()
    with short_tmp() as root:
        (root / "driver").mkdir()
        folders = PluginFolders(root)
        pods: list[PluginDaemon] = []

        def start(mig_mode: str) -> PluginDaemon:
            args = folders.plugin_args(node=node, driver=DRIVER,
                                       kubeconfig=control_plane.kubeconfig,
                                       registry_dir=root / "registry", mock="dgx-h100",
                                       mig_mode=mig_mode)
            pod = PluginDaemon([*args, "--driver-root", str(root / "driver"),
                                "--pod-uid", new_uid()], root / f"{mig_mode}.log")
            pods.append(pod)
            return pod

        def slices(count: int, pod: PluginDaemon) -> list[dict[str, Any]] | None:
            pod.check_alive()
            found = pool(api, node)
            return found if len(found) == count and consistent(found) else None

        try:
            old = start("static")
            wait_for(lambda: slices(1, old), "the old pod's slice", fatal=(ComponentError,))
            before = slice_writes(api)
            new = start("dynamic")  # 5 slices: the one updated in place, 4 created
            wait_for(lambda: slices(5, new), "the new pod's slices", fatal=(ComponentError,))
            wait_for(lambda: "leaving them to it while it runs" in old.log.read_text(),
                     "the old pod to leave the pool to the new one", fatal=(ComponentError,))
            assert old.stop() == 0  # the DaemonSet controller ends the old pod
            new.check_alive()
            assert slices(5, new) is not None
            assert slice_writes(api) - before == 5, "only the new pod's publish wrote"
        finally:
            for pod in pods:
                code = pod.stop()
                print(f"--- {pod.log.name} (exit {code}) ---\n{pod.tail()}")
