"""`gpu-dra allocate` and `explain` with DeviceTaintRules among the YAML documents: the
devices a rule selects are avoided, and `explain` names each with the taint, since when,
and the rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.cli.main import main

DRIVER = "gpu.dra.dev"
SINCE = "2026-12-07T01:02:03Z"


def claim(name: str, count: int) -> dict[str, Any]:
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": [
                {"name": "gpus", "exactly": {"deviceClassName": DRIVER, "count": count}}]}}}


def taint_rule(name: str, device: str, effect: str = "NoSchedule") -> dict[str, Any]:
    return {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceTaintRule",
            "metadata": {"name": name},
            "spec": {"deviceSelector": {"driver": DRIVER, "pool": "node-1", "device": device},
                     "taint": {"key": "example.com/maintenance", "value": "psu",
                               "effect": effect, "timeAdded": SINCE}}}


def write(path: Path, *docs: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """`gpu-dra ARGS`: exit code, stdout, stderr."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def slices_and_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """The node's slices and a rule tainting gpu-1, in one file (as `kubectl get
    resourceslices,devicetaintrules -o yaml` would give them)."""
    assert main(["slices", "--mock", "a100-pcie-4x", "--node-name", "node-1"]) == 0
    slices = list(yaml.safe_load_all(capsys.readouterr().out))
    return write(tmp_path / "cluster.yaml", *slices, taint_rule("psu-swap", "gpu-1"))


def test_allocate_avoids_the_device_a_rule_taints(
        slices_and_rule: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = write(tmp_path / "claims.yaml", claim("three", 3))
    code, out, err = run(capsys, "allocate", "--slices", slices_and_rule, "--claims", claims)
    assert (code, err) == (0, "")
    results = yaml.safe_load(out)["status"]["allocation"]["devices"]["results"]
    assert [r["device"] for r in results] == ["gpu-0", "gpu-2", "gpu-3"]


def test_explain_names_the_tainted_device_the_taint_since_and_the_rule(
        slices_and_rule: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    claims = write(tmp_path / "claims.yaml", claim("four", 4))
    code, out, err = run(capsys, "explain", "--slices", slices_and_rule, "--claims", claims)
    assert (code, err) == (1, "")
    assert "default/four on node-1: does not fit" in out
    assert "  - request gpus: 4 devices match class gpu.dra.dev; 1 tainted (not tolerated); " \
           "3 free for 4\n" in out
    assert f"  - gpu-1: tainted example.com/maintenance=psu:NoSchedule since {SINCE} " \
           "(DeviceTaintRule psu-swap)\n" in out
    assert "* request gpus: count 3 instead of 4" in out


def test_taint_rules_from_their_own_file_with_this_nodes_mock_gpus(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = write(tmp_path / "rules.yaml", taint_rule("drain", "gpu-0", "NoExecute"),
                  taint_rule("note", "gpu-1", "None"))
    claims = write(tmp_path / "claims.yaml", claim("one", 1))
    code, out, err = run(capsys, "allocate", "--mock", "a100-pcie-4x", "--node-name", "node-1",
                         "--taint-rules", rules, "--claims", claims, "-o", "table")
    assert (code, err) == (0, "")
    assert out.splitlines()[1].split()[-1] == "gpus=gpu-1"


@pytest.mark.parametrize(("rule", "message"), [
    ({"kind": "DeviceClass"}, "rules.yaml: no DeviceTaintRule documents"),
    ({"spec": {"deviceSelector": {"deviceClassName": DRIVER},
               "taint": {"key": "k", "effect": "NoSchedule"}}},
     "DeviceTaintRule drain: spec.deviceSelector.deviceClassName: removed in Kubernetes 1.35"),
])
def test_a_bad_rule_file_exits_2_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], rule: dict[str, Any],
        message: str) -> None:
    rules = write(tmp_path / "rules.yaml", {**taint_rule("drain", "gpu-0"), **rule})
    claims = write(tmp_path / "claims.yaml", claim("one", 1))
    code, out, err = run(capsys, "explain", "--mock", "a100-pcie-4x", "--node-name", "node-1",
                         "--taint-rules", rules, "--claims", claims)
    assert (code, out) == (2, "")
    assert message in err
