"""Every check of an identifier or a formatted value the driver takes from outside, fed the
valid value and the same value with a trailing newline (issue 12, defect 5): a pattern
that ends in `$` accepts `"<uid>\\n"`, which then reaches a spec file name, a CDI id or a
checkpoint key. Each check must accept the first and refuse the second."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from driver.errors import DriverError
from driver.kube.names import is_c_identifier, is_label, is_subdomain, is_uuid
from driver.kube.quantity import parse_quantity
from driver.kube.semver import normalize_semver, parse_semver
from driver.nvml.profile import Gpu
from driver.plugin import cdi, checkpoint
from driver.plugin.claims import ClaimRef
from driver.plugin.config import parse_parameters
from driver.plugin.sockets import POD_UID

UID = "3f2a2b1c-1d2e-4f50-8a9b-0c1d2e3f4a5b"
GPU_UUID = "GPU-3f2a2b1c-1d2e-4f50-8a9b-0c1d2e3f4a5b"


def accepts(check: Callable[[str], object]) -> Callable[[str], bool]:
    """A check that raises (or returns False) on a bad value, as a predicate."""
    def predicate(value: str) -> bool:
        try:
            return check(value) is not False
        except (ValueError, DriverError):
            return False
    return predicate


def claim_ref(field: str) -> Callable[[str], object]:
    base = {"namespace": "default", "name": "claim-a", "uid": UID}
    return lambda value: ClaimRef(**{**base, field: value}).check()


def cdi_spec(kind: str = "gpu.dra.dev/gpu", device: str = "claim-gpu-0") -> list[str]:
    return cdi.spec_problems({"cdiVersion": "0.6.0", "kind": kind, "devices": [
        {"name": device, "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}]})


def claim_spec_file(uid: str, tmp: Path) -> bool:
    tmp.mkdir(exist_ok=True)
    (tmp / cdi.spec_file_name("gpu.dra.dev", uid)).write_text("{}")
    try:
        return uid in cdi.claim_specs(tmp, "gpu.dra.dev")
    finally:
        for path in tmp.iterdir():
            path.unlink()


def checkpoint_key(uid: str) -> object:
    return checkpoint.from_json({"claims": {uid: {"namespace": "ns", "name": "c",
                                                  "state": "PrepareCompleted"}}})


def mps_device_key(key: str) -> object:
    return parse_parameters({
        "apiVersion": "gpu.dra.dev/v1alpha1", "kind": "GpuConfig", "sharing": {
            "strategy": "MPS", "mpsConfig": {"defaultPerDevicePinnedMemoryLimit": {key: "1Gi"}}}},
        "parameters")


def profile_field(field: str) -> Callable[[str], bool]:
    """A mock profile's GPU field: the field's own check passes (the others, unset, fail)."""
    def valid(value: str) -> bool:
        try:
            Gpu.model_validate({field: value})
        except ValidationError as err:
            return all(problem["loc"][0] != field for problem in err.errors())
        return True
    return valid


CHECKS: dict[str, tuple[Callable[[str], bool], str]] = {
    "names.is_label": (is_label, "default"),
    "names.is_subdomain": (is_subdomain, "gpu.dra.dev"),
    "names.is_uuid": (is_uuid, UID),
    "names.is_c_identifier": (is_c_identifier, "memory"),
    "claim uid": (accepts(claim_ref("uid")), UID),
    "claim namespace": (accepts(claim_ref("namespace")), "default"),
    "claim name": (accepts(claim_ref("name")), "claim-a"),
    "cdi kind": (lambda kind: cdi_spec(kind=kind) == [], "gpu.dra.dev/gpu"),
    "cdi device name": (lambda name: cdi_spec(device=name) == [], "claim-gpu-0"),
    "checkpoint key": (accepts(checkpoint_key), UID),
    "mps device key": (accepts(mps_device_key), "gpu-0"),
    "mps gpu uuid key": (accepts(mps_device_key), GPU_UUID),
    "quantity": (accepts(parse_quantity), "40Gi"),
    "semver": (accepts(parse_semver), "580.159.4"),
    "loose semver": (lambda v: accepts(parse_semver)(normalize_semver(v)), "v1.2"),
    "pod uid": (lambda v: POD_UID.fullmatch(v) is not None, UID),
    "profile gpu uuid": (profile_field("uuid"), GPU_UUID),
    "profile pcie root": (profile_field("pcieRoot"), "pci0000:00"),
    "profile bus id": (profile_field("busId"), "00000000:01:00.0"),
}


@pytest.mark.parametrize("name", CHECKS)
def test_a_trailing_newline_is_refused(name: str) -> None:
    check, valid = CHECKS[name]
    assert check(valid), f"{name} refuses its valid example {valid!r}"
    assert not check(valid + "\n"), f"{name} accepts {valid!r} with a trailing newline"


def test_a_spec_file_named_with_a_trailing_newline_is_not_a_claim_spec(tmp_path: Path) -> None:
    assert claim_spec_file(UID, tmp_path / "cdi")
    assert not claim_spec_file(UID + "\n", tmp_path / "cdi")
