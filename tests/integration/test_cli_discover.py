"""`gpu-dra discover` as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import driver.nvml

GPU_KEYS = {"index", "minor", "uuid", "productName", "architecture", "cudaComputeCapability",
            "memoryBytes", "pciBusID", "pcieRoot", "numaNode", "migEnabled", "migProfiles",
            "migDevices", "nvlinks"}
PROFILE_KEYS = {"id", "name", "memoryMB", "multiprocessors", "sliceCount", "instanceCount",
                "placements"}


def gpu_dra(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "driver.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_json_has_the_documented_keys() -> None:
    result = gpu_dra("discover", "--mock", "dgx-h100", "--output", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"driverVersion", "cudaDriverVersion", "gpus", "topology"} <= set(data)
    assert len(data["gpus"]) == 8
    for gpu in data["gpus"]:
        assert set(gpu) >= GPU_KEYS
        for profile in gpu["migProfiles"]:
            assert set(profile) >= PROFILE_KEYS
            assert all(set(p) == {"start", "size"} for p in profile["placements"])
    assert len(data["topology"]) == 28
    assert {entry["link"] for entry in data["topology"]} == {"NV18"}


def test_table_shows_gpus_mig_and_topology_matrix() -> None:
    result = gpu_dra("discover", "--mock", "a100-mig")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "GPU0" in out and "GPU1" in out and "Topology" in out
    assert "3g.20gb" in out and "MIG device" in out


def test_yaml_output_parses() -> None:
    result = gpu_dra("discover", "--mock", "l4-8x", "-o", "yaml")
    assert result.returncode == 0, result.stderr
    assert len(yaml.safe_load(result.stdout)["gpus"]) == 8


def test_profile_from_a_path_and_a_bad_profile(tmp_path: Path) -> None:
    shipped = Path(driver.nvml.__file__).parent / "profiles" / "h100-80gb-hbm3.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text(shipped.read_text())
    result = gpu_dra("discover", "--mock", str(mine), "-o", "json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["gpus"]) == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text(shipped.read_text() + "\nbogusField: 1\n")
    result = gpu_dra("discover", "--mock", str(bad))
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "bogusField" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unknown_profile_name_is_a_usage_error() -> None:
    result = gpu_dra("discover", "--mock", "no-such-machine")
    assert result.returncode == 2
    assert "no-such-machine" in result.stderr and "Traceback" not in result.stderr


def test_without_libnvidia_ml_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    result = gpu_dra("discover", env=env)
    if result.returncode == 0:
        pytest.skip("this machine has a working libnvidia-ml")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "libnvidia-ml.so.1" in lines[0] and "--mock" in lines[0]
    assert "Traceback" not in result.stderr


def test_driver_root_without_the_library(tmp_path: Path) -> None:
    result = gpu_dra("discover", "--driver-root", str(tmp_path))
    assert result.returncode == 2
    assert str(tmp_path) in result.stderr and "--mock" in result.stderr
