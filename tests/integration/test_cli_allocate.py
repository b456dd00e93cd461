"""`gpu-dra allocate` and `gpu-dra explain` from files to printed claims and exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.cli.allocation import FAILURE_ANNOTATION
from driver.cli.main import main


def claim(name: str, count: int, island: bool = True, cls: str = "gpu.dra.dev"
          ) -> dict[str, Any]:
    devices: dict[str, Any] = {"requests": [
        {"name": "gpus", "exactly": {"deviceClassName": cls, "count": count}}]}
    if island:
        devices["constraints"] = [{"matchAttribute": "gpu.dra.dev/nvlinkIsland"}]
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"devices": devices}}


def write(path: Path, *docs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def allocate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["allocate", "--node-name", "node-1", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_claims_are_allocated_in_order_each_seeing_the_ones_before(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = write(tmp_path / "claims.yaml", claim("a", 2), claim("b", 2))
    code, out, err = allocate(capsys, "--mock", "a100-pcie-4x", "--claims", str(claims))
    assert (code, err) == (0, "")
    printed = list(yaml.safe_load_all(out))
    devices = [[r["device"] for r in c["status"]["allocation"]["devices"]["results"]]
               for c in printed]
    assert devices == [["gpu-0", "gpu-1"], ["gpu-2", "gpu-3"]]
    assert printed[0]["status"]["allocation"]["nodeSelector"]["nodeSelectorTerms"][0][
        "matchFields"][0]["values"] == ["node-1"]


def test_a_claim_that_does_not_fit_exits_1_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = write(tmp_path / "claims.yaml", claim("a", 2), claim("big", 3))
    code, out, _ = allocate(capsys, "--mock", "a100-pcie-4x", "--claims", str(claims))
    assert code == 1
    first, second = yaml.safe_load_all(out)
    assert "allocation" in first["status"]
    assert "status" not in second
    assert "does not fit" in second["metadata"]["annotations"][FAILURE_ANNOTATION]


def test_table_output_and_a_directory_of_slices(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["slices", "--mock", "dgx-h100", "--node-name", "node-9",
                 "--mig-mode", "dynamic"]) == 0
    slices_dir = tmp_path / "slices"
    slices_dir.mkdir()
    (slices_dir / "node-9.yaml").write_text(capsys.readouterr().out)
    claims = write(tmp_path / "c.yaml", claim("mig", 1, island=False, cls="mig.gpu.dra.dev"))
    code, out, _ = allocate(capsys, "--slices", str(slices_dir), "--claims", str(claims),
                            "--output", "table", "--mode", "topology")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["CLAIM", "NODE", "STATUS", "DEVICES", "/", "REASON"]
    assert row.split()[:3] == ["default/mig", "node-9", "allocated"]
    assert "-mig-" in row


def test_typed_api_lists_whose_items_carry_no_kind_are_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `kubectl get --raw` (or a client's list call) returns: ResourceSliceList and
    ResourceClaimList whose items have no kind of their own."""
    assert main(["slices", "--mock", "a100-pcie-4x", "--node-name", "node-1"]) == 0
    items = [{k: v for k, v in s.items() if k not in ("kind", "apiVersion")}
             for s in yaml.safe_load_all(capsys.readouterr().out)]
    slices = write(tmp_path / "slices.yaml", {"apiVersion": "resource.k8s.io/v1",
                                              "kind": "ResourceSliceList", "items": items})
    bare = {k: v for k, v in claim("a", 2).items() if k not in ("kind", "apiVersion")}
    claims = write(tmp_path / "claims.yaml", {"apiVersion": "resource.k8s.io/v1",
                                              "kind": "ResourceClaimList", "items": [bare]})
    code, out, err = allocate(capsys, "--slices", str(slices), "--claims", str(claims))
    assert (code, err) == (0, "")
    assert yaml.safe_load(out)["status"]["allocation"]["devices"]["results"][0]["pool"] == \
        "node-1"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["spec"]["devices"]["requests"][0]["exactly"].update(deviceClassName="tpu"),
     "ResourceClaim default/a: spec.devices.requests[0].exactly.deviceClassName: no "
     "DeviceClass tpu"),
    (lambda c: c["spec"]["devices"]["requests"][0]["exactly"].update(
        selectors=[{"cel": {"expression": "device.attributes[ == 1"}}]),
     "ResourceClaim default/a: spec.devices.requests[0].exactly.selectors[0].cel.expression: "
     "CEL compile error"),
    (lambda c: c["spec"]["devices"]["requests"][0]["exactly"].update(count=40),
     "ResourceClaim default/a: spec.devices.requests[0].exactly.count: claim default/a, "
     "request gpus: adding 40 devices exceeds the claim limit of 32"),
    (lambda c: c["spec"]["devices"]["requests"][0]["exactly"].update(selectors=[{"cel": {
        "expression": 'device.attributes["gpu.dra.dev"].all(a, device.attributes["gpu.dra.dev"]'
                      '.all(b, device.attributes["gpu.dra.dev"].all(c, device.attributes['
                      '"gpu.dra.dev"].all(d, a == b))))'}}]),
     "too expensive"),
])
def test_bad_input_exits_2_naming_claim_and_field_and_prints_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: Any, message: str) -> None:
    bad = claim("a", 1, island=False)
    edit(bad)
    claims = write(tmp_path / "claims.yaml", claim("ok", 1, island=False), bad)
    code, out, err = allocate(capsys, "--mock", "l4-8x", "--claims", str(claims))
    assert code == 2
    assert out == ""
    assert err.startswith("gpu-dra allocate: ")
    assert message in err


def test_explain_names_the_constraint_the_allocation_and_the_nearest_fit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = write(tmp_path / "claims.yaml", claim("train-a", 2),
                   claim("big", 3))
    code = main(["explain", "--mock", "a100-pcie-4x", "--node-name", "node-1",
                 "--claims", str(claims)])
    out = capsys.readouterr().out
    assert code == 1
    assert "default/train-a on node-1: fits" in out
    assert "default/big on node-1: does not fit" in out
    assert "request gpus: 4 devices match class gpu.dra.dev; 2 allocated (gpu-0 to " \
           "default/train-a, gpu-1 to default/train-a); 2 free for 3" in out
    assert "matchAttribute gpu.dra.dev/nvlinkIsland needs 3 devices with one value for gpus; " \
           "free devices leave at most 2 in one value (1: 2); value 0 has 2 allocated to " \
           "default/train-a" in out
    assert "* request gpus: count 2 instead of 3" in out


def test_explain_points_at_the_claim_to_release(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    allocated = write(tmp_path / "allocated.yaml", {
        **claim("old", 2), "status": {"allocation": {"devices": {"results": [
            {"request": "gpus", "driver": "gpu.dra.dev", "pool": "node-1", "device": d}
            for d in ("gpu-0", "gpu-2")]}}}})
    claims = write(tmp_path / "claims.yaml", claim("pair", 2))
    code = main(["explain", "--mock", "a100-pcie-4x", "--node-name", "node-1",
                 "--claims", str(claims), "--allocated", str(allocated)])
    out = capsys.readouterr().out
    assert code == 1
    assert "* after default/old is released" in out


@pytest.mark.parametrize("args, message", [
    (["--mock", "a100-pcie-4x", "--claim", "ns/a"], "--claim NAMESPACE/NAME reads the claim "
     "from a cluster: give --kubeconfig"),
    (["--mock", "a100-pcie-4x"], "--claims PATH (or --kubeconfig FILE --claim NAMESPACE/NAME)"),
    (["--kubeconfig", "kc", "--mock", "a100-pcie-4x", "--claim", "ns/a"],
     "--kubeconfig reads them from the cluster: drop --mock"),
    (["--kubeconfig", "kc"], "--kubeconfig needs --claim NAMESPACE/NAME"),
    (["--kubeconfig", "kc", "--claim", "just-a-name"], "--claim just-a-name: expected "
     "NAMESPACE/NAME"),
    (["--kubeconfig", "/nonexistent/kubeconfig", "--claim", "ns/a"],
     "--kubeconfig /nonexistent/kubeconfig: "),
])
def test_cluster_source_flags_are_checked_naming_the_flag(
        capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["explain", *args]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert message in out.err


def test_a_claim_using_the_whole_scheduler_cel_environment_is_allocated(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Selectors with the Kubernetes lists, regex, IP/CIDR, URL, sets and ext.Lists
    functions and two-variable comprehensions, as kube-scheduler accepts them."""
    a = 'device.attributes["gpu.dra.dev"]'
    r = 'device.attributes["resource.kubernetes.io"]'
    expressions = [
        f"[{a}.nvlinkLinks, {a}.nvlinkBandwidthGBps].max() == 600",
        f"[{a}.nvlinkIsland, {a}.nvlinkIslandSize].isSorted()",
        f"[{a}.nvlinkLinks, {a}.nvlinkBandwidthGBps].sum() > 600",
        f"{a}.productName.find('A[0-9]+') == 'A100'",
        f"{r}.pciBusID.findAll('[0-9a-f]+', 1) == ['0000']",
        f"sets.contains([0, 1], [{r}.numaNode]) && lists.range(2).reverse() == [1, 0]",
        f"[{a}.nvlinkIsland].all(i, v, v == 0 && i == 0)",
        "cidr('10.0.0.0/8').containsIP('10.1.2.3')",
        "url('https://nvidia.com/x').getHost() == 'nvidia.com'",
        f"{a}.cudaComputeCapability.isGreaterThan(semver('7.5.0'))",
    ]
    spec = claim("cel", 2, island=False)
    spec["spec"]["devices"]["requests"][0]["exactly"]["selectors"] = [
        {"cel": {"expression": e}} for e in expressions]
    claims = write(tmp_path / "claims.yaml", spec)
    code, out, err = allocate(capsys, "--mock", "a100-pcie-4x", "--claims", str(claims))
    assert (code, err) == (0, "")
    (printed,) = yaml.safe_load_all(out)
    assert [r["device"] for r in printed["status"]["allocation"]["devices"]["results"]] == [
        "gpu-0", "gpu-1"]


def loaded_by(args: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``gpu-dra ARGS`` run to its end, and the modules it imported (-X importtime)."""
    done = subprocess.run([sys.executable, "-m", "driver.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
                          check=False)
    loaded = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$", done.stderr,
                            re.MULTILINE))
    assert "driver.allocator.explain" in loaded, "stderr lists the imports"
    return done, loaded


def test_explain_loads_neither_the_plugin_health_monitor_nor_prometheus(tmp_path: Path) -> None:
    """`gpu-dra explain` starts without the plugin's modules (0.06 s of its start)."""
    claims = write(tmp_path / "claims.yaml", claim("a", 2))
    done, loaded = loaded_by(["explain", "--mock", "a100-pcie-4x", "--node-name", "node-1",
                              "--claims", str(claims)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert {m for m in loaded if m.startswith(("driver.plugin", "prometheus_client"))} == set()


def test_explain_from_a_cluster_loads_neither_nvml_nor_the_slice_builder(tmp_path: Path) -> None:
    """`gpu-dra explain --kubeconfig` reads slices, it builds none and asks no GPU: pynvml
    and the slice builder stay out of its start (0.05 s by -X importtime)."""
    kubeconfig = write(tmp_path / "kubeconfig", {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]})
    done, loaded = loaded_by(["explain", "--kubeconfig", str(kubeconfig), "--claim", "ns/a"])
    assert "--kubeconfig" in done.stderr, done.stderr[-2000:]
    assert {m for m in loaded if m.startswith(("pynvml", "driver.resourceslice"))} == set()
