"""Opaque config as a claim author writes it: strict, errors that name the field, and the
precedence the upstream drivers use (class, then claim; later wins)."""

from __future__ import annotations

from typing import Any

import pytest

from driver.plugin.config import (
    ConfigError,
    config_for,
    memory_bytes,
    parse_allocation_configs,
    parse_parameters,
)
from driver.plugin.configschema import GpuConfig, MigDeviceConfig

WHERE = "status.allocation.devices.config[0].opaque.parameters"


def gpu(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "gpu.dra.dev/v1alpha1", "kind": "GpuConfig", **fields}


def mig(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "gpu.dra.dev/v1alpha1", "kind": "MigDeviceConfig", **fields}


def error(parameters: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_parameters(parameters, WHERE)
    return str(caught.value)


def test_time_slicing_with_and_without_an_interval() -> None:
    config = parse_parameters(gpu(sharing={"strategy": "TimeSlicing",
                                           "timeSlicingConfig": {"interval": "Long"}}), WHERE)
    assert isinstance(config, GpuConfig) and config.sharing is not None
    assert config.sharing.timeslice == "Long"
    plain = parse_parameters(gpu(sharing={"strategy": "TimeSlicing"}), WHERE)
    assert isinstance(plain, GpuConfig) and plain.sharing is not None
    assert plain.sharing.timeslice == "Default"


def test_mps_settings_are_accepted() -> None:
    config = parse_parameters(gpu(sharing={"strategy": "MPS", "mpsConfig": {
        "defaultActiveThreadPercentage": 50, "defaultPinnedDeviceMemoryLimit": "10Gi",
        "defaultPerDevicePinnedMemoryLimit": {"gpu-0": "4Gi"}}}), WHERE)
    assert isinstance(config, GpuConfig) and config.sharing is not None
    assert config.sharing.timeslice is None
    assert isinstance(parse_parameters(mig(sharing={"strategy": "MPS"}), WHERE), MigDeviceConfig)


NVIDIA = "resource.nvidia.com/v1beta1"


def test_nvidias_group_decodes_to_the_same_configs() -> None:
    config = parse_parameters(gpu(apiVersion=NVIDIA, sharing={
        "strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50,
                                         "defaultPinnedDeviceMemoryLimit": "10Gi",
                                         "defaultPerDevicePinnedMemoryLimit": {"0": "4Gi"}}}),
        WHERE)
    assert isinstance(config, GpuConfig) and config.sharing is not None
    assert config.sharing.mpsConfig is not None
    assert config.sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit == {"0": "4Gi"}
    timesliced = parse_parameters(gpu(apiVersion=NVIDIA, sharing={
        "strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}), WHERE)
    assert isinstance(timesliced, GpuConfig) and timesliced.sharing is not None
    assert timesliced.sharing.timeslice == "Long"
    assert isinstance(parse_parameters(mig(apiVersion=NVIDIA, sharing={"strategy": "MPS"}),
                                       WHERE), MigDeviceConfig)


@pytest.mark.parametrize(("parameters", "expected"), [
    (gpu(apiVersion=NVIDIA, sharing={"strategy": "TimeSlicing", "timeSlicing": {}}),
     f"{WHERE}.sharing.timeSlicing: unknown field"),
    (mig(apiVersion=NVIDIA, sharing={"strategy": "MPS", "timeSlicingConfig": {}}),
     f"{WHERE}.sharing.timeSlicingConfig: unknown field"),
    (gpu(sharing={"strategy": "TimeSlicing", "timeSlicingConfig": {"intervall": "Long"}}),
     f"{WHERE}.sharing.timeSlicingConfig.intervall: unknown field"),
    (gpu(sharng={}), f"{WHERE}.sharng: unknown field"),
    (gpu(sharing={"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}}),
     f"{WHERE}.sharing.timeSlicingConfig.interval: Input should be 'Default', 'Short', "
     "'Medium' or 'Long'"),
    (gpu(sharing={"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": "50"}}),
     f"{WHERE}.sharing.mpsConfig.defaultActiveThreadPercentage: Input should be a valid "
     "integer"),
    (gpu(sharing={"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 101}}),
     f"{WHERE}.sharing.mpsConfig.defaultActiveThreadPercentage: Input should be less than "
     "or equal to 100"),
    (gpu(sharing={"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "lots"}}),
     f"{WHERE}.sharing.mpsConfig.defaultPinnedDeviceMemoryLimit: 'lots' is not a quantity"),
    (gpu(sharing={"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "1500m"}}),
     f"{WHERE}.sharing.mpsConfig.defaultPinnedDeviceMemoryLimit: '1500m' is not a whole "
     "number of bytes"),
    (gpu(sharing={"strategy": "MPS", "mpsConfig": {
        "defaultPerDevicePinnedMemoryLimit": {"../x": "1Gi"}}}),
     f"{WHERE}.sharing.mpsConfig.defaultPerDevicePinnedMemoryLimit.../x: the key must be"),
    (gpu(sharing={"strategy": "MPS", "timeSlicingConfig": {"interval": "Short"}}),
     f"{WHERE}.sharing.timeSlicingConfig: only allowed with strategy TimeSlicing"),
    (gpu(sharing={"strategy": "TimeSlicing", "mpsConfig": {}}),
     f"{WHERE}.sharing.mpsConfig: only allowed with strategy MPS"),
    (gpu(sharing={"strategy": "Exclusive"}),
     f"{WHERE}.sharing.strategy: Input should be 'TimeSlicing' or 'MPS'"),
    (gpu(sharing="TimeSlicing"), f"{WHERE}.sharing: Input should be a valid dictionary"),
    (mig(sharing={"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}}),
     f"{WHERE}.sharing.timeSlicingConfig: unknown field"),
    ({**gpu(), "apiVersion": "gpu.dra.dev/v1"},
     f"{WHERE}.apiVersion: must be gpu.dra.dev/v1alpha1 or resource.nvidia.com/v1beta1, "
     "not 'gpu.dra.dev/v1'"),
    ({"kind": "GpuConfig"}, f"{WHERE}.apiVersion: must be gpu.dra.dev/v1alpha1 or "
                            "resource.nvidia.com/v1beta1, not None"),
    ({**gpu(), "kind": "VfioDeviceConfig"},
     f"{WHERE}.kind: must be GpuConfig or MigDeviceConfig, not 'VfioDeviceConfig'"),
    (["GpuConfig"], f"{WHERE}: must be an object, not list"),
])
def test_bad_parameters_are_refused_naming_the_field(parameters: Any, expected: str) -> None:
    assert expected in error(parameters)


def test_every_problem_is_reported() -> None:
    message = error(gpu(a=1, b=2))
    assert f"{WHERE}.a: unknown field" in message and f"{WHERE}.b: unknown field" in message


def test_oversized_parameters_are_refused_before_decoding() -> None:
    message = error(gpu(padding="x" * 11000))
    assert message.startswith(f"{WHERE}: ") and "at most 10240" in message


def test_memory_quantities() -> None:
    assert memory_bytes("1Gi") == 2**30
    assert memory_bytes("512M") == 512 * 10**6
    with pytest.raises(ValueError, match="more than 0"):
        memory_bytes("0")


def entry(parameters: Any, source: str = "FromClaim", requests: list[str] | None = None,
          driver: str = "gpu.dra.dev") -> dict[str, Any]:
    return {"source": source, "requests": requests or [],
            "opaque": {"driver": driver, "parameters": parameters}}


def ts(interval: str) -> dict[str, Any]:
    return gpu(sharing={"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}})


def winner(entries: list[dict[str, Any]], request: str) -> str | None:
    chosen = config_for(parse_allocation_configs(entries, "gpu.dra.dev"), request)
    if chosen is None:
        return None
    assert isinstance(chosen.config, GpuConfig) and chosen.config.sharing is not None
    return chosen.config.sharing.timeslice


def test_claim_configs_override_class_configs_whatever_their_order() -> None:
    entries = [entry(ts("Short")), entry(ts("Long"), source="FromClass")]
    assert winner(entries, "gpu") == "Short"


def test_among_configs_of_one_source_the_later_wins() -> None:
    assert winner([entry(ts("Short")), entry(ts("Medium"))], "gpu") == "Medium"


def test_a_config_applies_only_to_the_requests_it_names() -> None:
    entries = [entry(ts("Short")), entry(ts("Long"), requests=["big"])]
    assert winner(entries, "gpu") == "Short"
    assert winner(entries, "big") == "Long"
    assert winner(entries, "big/h100") == "Long"  # a subrequest of a named request
    assert winner([entry(ts("Long"), requests=["big/a100"])], "big/h100") is None


def test_other_drivers_configs_are_not_read() -> None:
    entries = [entry({"anything": ["at", "all"]}, driver="net.example.com"), entry(ts("Short"))]
    assert winner(entries, "gpu") == "Short"


def test_a_malformed_entry_of_ours_names_its_index() -> None:
    with pytest.raises(ConfigError, match=r"config\[1\]\.source: must be FromClass or FromClaim"):
        parse_allocation_configs([entry(ts("Short")), entry(ts("Long"), source="FromPod")],
                                 "gpu.dra.dev")
    with pytest.raises(ConfigError, match=r"config\[0\]\.opaque\.parameters\.sharing"):
        parse_allocation_configs([entry(gpu(sharing=1))], "gpu.dra.dev")
