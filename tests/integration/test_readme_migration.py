"""README.md's migration guide says what the tests run: its `gpu-dra allocate` command
fits each NVIDIA quickstart claim, the attributes and capacities it lists are NVIDIA's
(the parity test's data), the quickstart files it names are the fixtures, and its
device-plugin pod is valid in every supported API version. (Its helm values and pod run on
the real control plane in tests/e2e/test_nvidia_compat_e2e.py.)"""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from driver.cli.main import main
from tests.integration.test_nvidia_parity import (
    GPU_ATTRIBUTES,
    MIG_CAPACITIES,
    STATIC_MIG_ATTRIBUTES,
)
from tests.integration.test_nvidia_quickstart import FIXTURES
from tests.support.readme import commands, section, yaml_objects

GUIDE = section("### Migrating")


def allocate_command() -> list[str]:
    (argv,) = [c for c in commands(GUIDE) if c[:2] == ["gpu-dra", "allocate"]]
    return argv[1:]


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.yaml")))
def test_the_guides_allocate_command_fits_each_quickstart_claim(
        fixture: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = allocate_command()
    argv[argv.index("--claims") + 1] = str(FIXTURES / fixture)
    # gpu-test4 asks for A100 40GB MIG profiles, which a DGX H100 does not have
    profile = "a100-mig" if fixture == "gpu-test4.yaml" else "dgx-h100"
    argv[argv.index("--mock") + 1] = profile
    assert main(argv) == 0, capsys.readouterr()


def test_the_guide_names_the_quickstart_files_ci_runs() -> None:
    named = re.search(r"`gpu-test1` to `gpu-test5` and `gpu-test-mps`", GUIDE)
    assert named is not None
    assert sorted(p.stem for p in FIXTURES.glob("*.yaml")) == [
        "gpu-test-mps", "gpu-test1", "gpu-test2", "gpu-test3", "gpu-test4", "gpu-test5"]


def test_the_guide_lists_nvidias_attributes_and_capacities() -> None:
    listed = set(re.findall(r"`([A-Za-z./]+)`", GUIDE))
    assert set(GPU_ATTRIBUTES) | set(STATIC_MIG_ATTRIBUTES) | MIG_CAPACITIES <= listed
    assert "`memorySlice<i>`" in GUIDE


@pytest.mark.parametrize("version", ["1.34.0", "1.35.0", "1.36.0", "1.37.0"])
def test_the_device_plugin_pod_is_valid_and_asks_for_nvidias_resource(version: str) -> None:
    (pod,) = yaml_objects(GUIDE)
    kubernetes_validate.validate(pod, version, strict=True)
    (container,) = pod["spec"]["containers"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
