"""The claims README.md's "Asking for GPUs" shows are valid API objects and get what
their text promises on a mock DGX H100 (dynamic MIG), allocated by `gpu-dra allocate`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from driver.cli.main import main
from driver.inventory.discovery import discover
from driver.nvml.mock import mock_provider
from driver.plugin.config import parse_parameters
from driver.plugin.configschema import GpuConfig
from driver.resourceslice.build import SliceOptions, build_slices

README = Path(__file__).resolve().parents[2] / "README.md"
DRIVER = "gpu.dra.dev"


def readme_objects() -> list[dict[str, Any]]:
    text = README.read_text()
    section = text[text.index("## Asking for GPUs"):text.index("### A claim stays Pending")]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def as_claim(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["spec"] if obj["kind"] == "ResourceClaimTemplate" else obj["spec"]
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": obj["metadata"]["name"], "namespace": "default"},
            "spec": spec}


def test_the_readme_shows_every_kind_of_claim_the_issue_lists() -> None:
    names = {o["metadata"]["name"] for o in readme_objects() if o["kind"] != "Pod"}
    assert names == {"one-gpu", "nvlink-pair", "numa-pair", "mig-1g", "shared-gpu", "gpu-20gi"}


@pytest.mark.parametrize("version", ["1.34.0", "1.35.0", "1.36.0", "1.37.0"])
def test_readme_objects_pass_the_strict_api_schemas(version: str) -> None:
    for obj in readme_objects():
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_pod_names_the_template_it_shows() -> None:
    objects = readme_objects()
    pod = next(o for o in objects if o["kind"] == "Pod")
    templates = {o["metadata"]["name"] for o in objects if o["kind"] == "ResourceClaimTemplate"}
    used = {c["resourceClaimTemplateName"] for c in pod["spec"]["resourceClaims"]}
    assert used <= templates
    claimed = {c["name"] for c in pod["spec"]["containers"][0]["resources"]["claims"]}
    assert claimed == {c["name"] for c in pod["spec"]["resourceClaims"]}


def test_each_claim_gets_what_its_text_promises(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    objects = {o["metadata"]["name"]: o for o in readme_objects() if o["kind"] != "Pod"}
    allocated: dict[str, list[str]] = {}
    for name, obj in objects.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(as_claim(obj)))
        mode = ["--gpu-sharing", "consumable"] if name == "gpu-20gi" else \
            ["--mig-mode", "dynamic"]  # the shared-by-memory example asks for capacities
        code = main(["allocate", "--mock", "dgx-h100", *mode,
                     "--node-name", "node-1", "--claims", str(path), "-o", "json"])
        out = capsys.readouterr().out
        assert code == 0, f"{name} does not fit alone on dgx-h100"
        results = yaml.safe_load(out)["status"]["allocation"]["devices"]["results"]
        allocated[name] = [r["device"] for r in results]

    inventory = discover(mock_provider("dgx-h100"))
    devices = {d["name"]: d["attributes"]
               for s in build_slices(inventory, SliceOptions(DRIVER, "node-1", "dynamic"), 1)
               for d in s["spec"].get("devices", [])}

    def values(claim: str, attribute: str) -> set[Any]:
        return {next(iter(devices[d][attribute].values())) for d in allocated[claim]}

    assert all(values(c, "type") == {"gpu"} for c in ("one-gpu", "nvlink-pair", "numa-pair",
                                                      "shared-gpu", "gpu-20gi"))
    assert len(allocated["nvlink-pair"]) == 2 and len(values("nvlink-pair", "nvlinkIsland")) == 1
    assert len(allocated["numa-pair"]) == 2
    assert len(values("numa-pair", "resource.kubernetes.io/numaNode")) == 1
    assert values("mig-1g", "type") == {"mig"} and values("mig-1g", "profile") == {"1g.10gb"}


def test_the_shared_gpu_config_is_what_the_plugin_accepts() -> None:
    shared = next(o for o in readme_objects() if o["metadata"]["name"] == "shared-gpu")
    opaque = shared["spec"]["devices"]["config"][0]["opaque"]
    assert opaque["driver"] == DRIVER
    config = parse_parameters(opaque["parameters"], "config[0].opaque.parameters")
    assert isinstance(config, GpuConfig)
    assert config.sharing is not None and config.sharing.timeslice == "Long"
