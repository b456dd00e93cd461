"""The node tier: a real kubelet, containerd and runc on this machine, joined to the real
control plane; the chart's DaemonSet runs the driver's image there (tests/support/realnode.py
says how it is isolated and cleaned up).

Needs root (namespaces, mounts, cgroups: CI runs as root), the control plane
(.ci/control-plane.sh) and the node's binaries and images (.ci/node-tools.sh). Without
them the tier is skipped with one line saying how to get them, except under CI=true,
where a missing part fails the run instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driver.devcluster.controlplane import ALL_BINARIES, find_assets, iter_log_tails
from driver.kube.api import api_request
from tests.support.apiserver import make_namespace, unique, wait_for
from tests.support.chart import CHART, HELM_BUILD, Helm
from tests.support.nodepods import BUSYBOX, RELEASE, Driver, DriverImage, Workloads
from tests.support.progress import sayer
from tests.support.realnode import NODE_BUILD, NodeAssets, RealNode
from tests.support.realnode import find_assets as find_node_assets

HERE = Path(__file__).resolve().parent
IMAGE_BUILD = HERE / "tools" / "driver-image.sh"
_node: RealNode | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.node)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed node test's report carries the kubelet's and containerd's last lines."""
    report = yield
    if report.failed and _node is not None and item.path.is_relative_to(HERE):
        for name in ("kubelet", "containerd"):
            with _node.log(name).open(errors="replace") as f:
                report.sections.append((f"{name} log (last lines)",
                                        "".join(f.readlines()[-40:])))
        if _node.cluster is not None:
            for name, tail in iter_log_tails(_node.cluster, lines=15):
                report.sections.append((f"{name} log (last lines)", tail))
    return report


def _missing(what: str) -> None:
    message = f"node tier skipped: {what}"
    if os.environ.get("CI") == "true":
        pytest.fail(message.replace("skipped", "cannot run"), pytrace=False)
    pytest.skip(message)


def _driver_image(config: pytest.Config) -> DriverImage | None:
    """The image of the working tree's driver: cached by the hash of what the Dockerfile
    copies, else built now (about 2 minutes) where buildah is installed."""
    found = subprocess.run(["bash", str(IMAGE_BUILD), "--print"], capture_output=True,
                           text=True, check=False)
    if found.returncode != 0 and shutil.which("buildah") and shutil.which("mmdebstrap"):
        sayer(config)("node tier: building the driver's image from deploy/Dockerfile "
             "(about 2 minutes; cached by the hash of its inputs)")
        found = subprocess.run(["bash", str(IMAGE_BUILD)], capture_output=True, text=True,
                               check=False)
        if found.returncode != 0:
            pytest.fail(f"building the driver's image failed:\n{found.stderr[-3000:]}",
                        pytrace=False)
    lines = found.stdout.split()
    if found.returncode != 0 or not lines:
        return None
    archive = Path(lines[-1])
    env = dict(line.split("=", 1) for line in
               (archive.parent / "image.env").read_text().split() if "=" in line)
    return DriverImage(archive, env["IMAGE_REPOSITORY"], env["IMAGE_TAG"])


@pytest.fixture(scope="package")
def node_parts(pytestconfig: pytest.Config) -> tuple[NodeAssets, Path, DriverImage]:
    if os.geteuid() != 0:
        _missing("needs root (network and mount namespaces, cgroups); CI runs as root")
    cp = find_assets(ALL_BINARIES)
    if cp is None:
        _missing("no control-plane binaries; run .ci/control-plane.sh")
    assets = find_node_assets()
    if assets is None:
        _missing(f"the node's binaries and images are not built; run {NODE_BUILD} "
                 "(or .ci/node-tools.sh)")
    image = _driver_image(pytestconfig)
    if image is None:
        _missing(f"the driver's image is not built; run {IMAGE_BUILD}")
    assert cp is not None and assets is not None and image is not None
    return assets, cp, image


@pytest.fixture(scope="package")
def real_node(node_parts: tuple[NodeAssets, Path, DriverImage]) -> Iterator[RealNode]:
    global _node
    assets, cp, _ = node_parts
    with RealNode(assets, cp) as node:
        _node = node
        try:
            yield node
        finally:
            _node = None


@pytest.fixture(scope="package")
def helm() -> Helm:
    found = subprocess.run(["bash", str(HELM_BUILD)], capture_output=True, text=True,
                           check=False)
    if found.returncode != 0 or not found.stdout.split():
        _missing(f"helm is not built; run {HELM_BUILD}")
    return Helm(Path(found.stdout.split()[-1]))


@pytest.fixture(scope="package")
def driver(real_node: RealNode, helm: Helm,
           node_parts: tuple[NodeAssets, Path, DriverImage]) -> Iterator[Driver]:
    """helm install of the chart: mock dgx-h100 with its state in the plugin data dir (so
    `gpu-dra mock inject` on the node reaches it), dynamic MIG, the image imported into the
    node's containerd; waits for the plugin pod to be Ready and the slices published."""
    image = node_parts[2]
    real_node.import_image(image.archive)
    values = ["--set", f"image.repository={image.repository}", "--set", f"image.tag={image.tag}",
              "--set", "image.pullPolicy=Never", "--set", "kubeletPlugin.mockProfile=dgx-h100",
              "--set", "kubeletPlugin.mockState=mock-state.json",
              "--set", "migMode=dynamic"]
    d = Driver(real_node, helm, image, values)
    helm.run("install", RELEASE, str(CHART), "--create-namespace", *d.helm_args())
    d.wait_ready()
    wait_for(lambda: d.slices(), "the node's ResourceSlices", timeout=60)
    yield d
    helm.run("uninstall", RELEASE, "--wait", *d.helm_args(values=False))


@pytest.fixture
def workloads(real_node: RealNode, driver: Driver,
              node_parts: tuple[NodeAssets, Path, DriverImage]) -> Iterator[Workloads]:
    """Claims and pods in a fresh namespace, deleted (and their claims unprepared) after."""
    name = make_namespace(real_node.api, unique("node"))
    yield Workloads(real_node.api, name, BUSYBOX)
    api_request(real_node.api, "DELETE", f"/api/v1/namespaces/{name}").expect(200, 202)
    wait_for(lambda: api_request(real_node.api, "GET", f"/api/v1/namespaces/{name}").status
             == 404, f"namespace {name} gone", timeout=120)

