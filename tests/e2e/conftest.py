"""Session fixtures for e2e tests: a real control plane (etcd, kube-apiserver, and on
request kube-scheduler and kube-controller-manager) built from pinned upstream sources.

Binaries: ``$KUBEBUILDER_ASSETS``, else the build cache, else built now when Go is
installed (about 8 minutes once; progress is shown), else every e2e test is skipped with
one line saying how to get them. ``.ci/run`` always provides them, so CI never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from driver.devcluster.controlplane import (
    ALL_BINARIES,
    CONTROL_PLANE_SRC,
    CORE_BINARIES,
    AssetsUnavailable,
    ClusterConfig,
    FakeNodeKeeper,
    LocalCluster,
    build_assets,
    find_assets,
    iter_log_tails,
)
from driver.devcluster.node import NODE_TOOLS_BUILD
from driver.kube.api import api_request
from tests.support.apiserver import DEVICE_CLASSES, ControlPlane, make_namespace, unique
from tests.support.chart import HELM_BUILD, Helm
from tests.support.progress import sayer
from tests.support.standin import (
    E2eTools,
    KubeletStandin,
    ToolsUnavailable,
    build_tools,
    find_tools,
)

HERE = Path(__file__).resolve().parent
BUILD_HINT = f"run {CONTROL_PLANE_SRC / 'build.sh'} (needs Go >= 1.26)"
HOW_TO_GET = (
    f"e2e skipped: no control-plane binaries; {BUILD_HINT} or set KUBEBUILDER_ASSETS to a "
    "folder with " + ", ".join(ALL_BINARIES)
)

_cluster: LocalCluster | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the control-plane log tails to a failed e2e test's report."""
    report = yield
    if report.failed and _cluster is not None and item.path.is_relative_to(HERE):
        for name, tail in iter_log_tails(_cluster, lines=25):
            report.sections.append((f"{name} log (last lines)", tail))
    return report


@pytest.fixture(scope="session")
def assets(pytestconfig: pytest.Config) -> Path:
    """The folder with the control-plane binaries (envtest layout)."""
    found = find_assets(ALL_BINARIES)
    if found is not None:
        return found
    can_build = (
        shutil.which("go") is not None
        and (CONTROL_PLANE_SRC / "build.sh").is_file()
        and os.environ.get("GPU_DRA_NO_BUILD") != "1"
    )
    if can_build:
        say = sayer(pytestconfig)
        say("e2e: control-plane binaries not found; building them with Go "
            "(about 8 minutes cold on 2 cores, cached afterwards)")
        try:
            return build_assets(say)
        except AssetsUnavailable as err:
            pytest.fail(f"e2e: building the control plane failed: {err}", pytrace=False)
    # envtest's downloads have etcd and kube-apiserver only: API-server tests still run.
    core = find_assets(CORE_BINARIES)
    if core is not None:
        return core
    pytest.skip(HOW_TO_GET)


@pytest.fixture(scope="session")
def control_plane(assets: Path) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver with the DRA gates of 1.37, torn down at session end.

    ``GPU_DRA_KEEP_CLUSTER=1`` keeps its folder (kubeconfig, certificates, component logs)
    in the system temp dir for a look afterwards."""
    global _cluster
    keep = os.environ.get("GPU_DRA_KEEP_CLUSTER") == "1"  # keep certs, kubeconfig and logs
    with LocalCluster(ClusterConfig(assets=assets, keep_workdir=keep)) as cluster:
        _cluster = cluster
        api = cluster.api_client()
        try:
            yield ControlPlane(cluster=cluster, kubeconfig=cluster.kubeconfig, api=api)
        finally:
            _cluster = None
            api.close()


def _need(assets: Path, binary: str) -> None:
    if not (assets / binary).is_file():
        pytest.skip(f"{binary} not in {assets} (envtest downloads lack it); {BUILD_HINT}")


@pytest.fixture(scope="session")
def scheduler(control_plane: ControlPlane, assets: Path) -> LocalCluster:
    """kube-scheduler running against the session cluster."""
    _need(assets, "kube-scheduler")
    control_plane.cluster.start_scheduler()
    return control_plane.cluster


@pytest.fixture(scope="session")
def controller_manager(control_plane: ControlPlane, assets: Path) -> LocalCluster:
    """kube-controller-manager with the ResourceClaim controller (and no node lifecycle)."""
    _need(assets, "kube-controller-manager")
    control_plane.cluster.start_controller_manager()
    return control_plane.cluster


@pytest.fixture(scope="session")
def node_keeper(control_plane: ControlPlane) -> Iterator[FakeNodeKeeper]:
    api = control_plane.cluster.api_client()
    with FakeNodeKeeper(api) as keeper:
        yield keeper
    api.close()


@pytest.fixture(scope="module")
def node_name(node_keeper: FakeNodeKeeper) -> Iterator[str]:
    """A Ready Node for a module's benchmarks: the plugin's slices and MPS daemon Pods are
    owned by it."""
    name = unique("bench-node")
    node_keeper.add(name)
    yield name
    node_keeper.remove(name)


@pytest.fixture
def fake_node(node_keeper: FakeNodeKeeper) -> Iterator[Callable[..., str]]:
    """Factory: ``fake_node(capacity=None, labels=None) -> node name``; a Ready Node kept
    fresh for the run and deleted after the test."""
    made: list[str] = []

    def make(
        name: str | None = None,
        capacity: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> str:
        node = name or unique("fake-node")
        node_keeper.add(node, capacity=capacity, labels=labels)
        made.append(node)
        return node

    yield make
    for node in made:
        node_keeper.remove(node)


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted after the test."""
    name = make_namespace(control_plane.api, unique("e2e"))
    yield name
    api_request(control_plane.api, "DELETE", f"/api/v1/namespaces/{name}").expect(200, 202, 404)


@pytest.fixture(scope="session")
def e2e_tools(pytestconfig: pytest.Config) -> E2eTools:
    """kubelet-standin and cdi-resolve: from the cache when the sources are unchanged,
    else built now when Go is installed (about 5 minutes cold), else the tests skip."""
    found = find_tools()
    if found is not None:
        return found
    if shutil.which("go") is None or os.environ.get("GPU_DRA_NO_BUILD") == "1":
        pytest.skip(f"e2e skipped: kubelet-standin and cdi-resolve are not built; run "
                    f"{NODE_TOOLS_BUILD} (needs Go >= 1.26)")
    say = sayer(pytestconfig)
    say("e2e: building kubelet-standin and cdi-resolve with Go (about 5 minutes cold on "
        "2 cores, cached afterwards)")
    try:
        return build_tools(say)
    except ToolsUnavailable as err:
        pytest.fail(f"e2e: building the node tools failed: {err}", pytrace=False)


@pytest.fixture
def kubelet_standin(
    control_plane: ControlPlane, e2e_tools: E2eTools
) -> Iterator[Callable[..., KubeletStandin]]:
    """Factory: ``kubelet_standin(node, root, dra_api="v1", driver="")`` starts the kubelet
    stand-in for ``node`` with its folders under ``root`` (keep it short: socket paths) and
    waits until it watches pods and plugins; stopped after the test."""
    started: list[KubeletStandin] = []

    def start(node: str, root: Path, dra_api: str = "v1", driver: str = "") -> KubeletStandin:
        standin = KubeletStandin(e2e_tools.kubelet_standin, control_plane.kubeconfig, node,
                                 root, dra_api, driver)
        started.append(standin)
        standin.wait_running()
        return standin

    yield start
    for standin in started:
        standin.stop()


@pytest.fixture(scope="module")
def device_classes(control_plane: ControlPlane) -> Iterator[None]:
    """The two DeviceClasses the driver ships (deploy/helm), whole GPUs and MIG devices;
    those this fixture created (another module may have installed them) are deleted after
    the module."""
    driver = "gpu.dra.dev"
    created = []
    for name, kind in ((driver, "gpu"), (f"mig.{driver}", "mig")):
        expression = (f'device.driver == "{driver}" && '
                      f'device.attributes["{driver}"].type == "{kind}"')
        result = api_request(control_plane.api, "POST", DEVICE_CLASSES, {
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {"selectors": [{"cel": {"expression": expression}}]},
        })
        result.expect(201, 409)
        if result.status == 201:
            created.append(name)
    yield
    for name in created:
        api_request(control_plane.api, "DELETE", f"{DEVICE_CLASSES}/{name}").expect(200, 404)


@pytest.fixture(scope="session")
def helm(pytestconfig: pytest.Config) -> Helm:
    """The pinned helm CLI (deploy/helm/build-helm.sh): cached, else built now when Go is
    installed, else the chart tests skip."""
    found = subprocess.run(["bash", str(HELM_BUILD), "--print"], capture_output=True,
                           text=True, check=False)
    if found.returncode == 0:
        return Helm(Path(found.stdout.split()[-1]))
    if shutil.which("go") is None or os.environ.get("GPU_DRA_NO_BUILD") == "1":
        pytest.skip(f"helm is not built; run {HELM_BUILD} (needs Go >= 1.26)")
    sayer(pytestconfig)("e2e: building the pinned helm with Go (cached afterwards)")
    built = subprocess.run(["bash", str(HELM_BUILD)], capture_output=True, text=True,
                           check=False)
    if built.returncode != 0 or not built.stdout.split():
        pytest.fail(f"e2e: building helm failed:\n{built.stderr[-3000:]}", pytrace=False)
    return Helm(Path(built.stdout.split()[-1]))
