"""The shipped machine profiles describe the machines the issue names; bad ones are refused
with the file and the field named."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynvml
import pytest
import yaml

from driver.nvml.mock import list_profiles, load_profile
from driver.nvml.profile import PROFILES_DIR, Profile, ProfileError

SHIPPED = ["a100-mig", "a100-pcie-4x", "dgx-a100", "dgx-h100", "h100-80gb-hbm3", "h200-141gb",
           "l4-8x", "mesh-4x"]


def peers(profile: Profile, index: int) -> Counter[int]:
    """NVLinks of one GPU by peer GPU index."""
    counter: Counter[int] = Counter()
    for link in profile.gpus[index].nvlinks:
        if link.peer is not None:
            counter[link.peer] += link.count
    return counter


def switch_links(profile: Profile, index: int) -> dict[str, int]:
    return {profile.nvswitches[link.switch].busId: link.count
            for link in profile.gpus[index].nvlinks if link.switch is not None}


def test_the_eight_machines_are_shipped() -> None:
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_with_unique_identities(name: str) -> None:
    profile = load_profile(name)
    for key in ("uuid", "minor", "busId"):
        values = [getattr(gpu, key) for gpu in profile.gpus]
        assert len(set(values)) == len(values), key
    for i, gpu in enumerate(profile.gpus):
        model = profile.model_of(i)
        total = sum(link.count for link in gpu.nvlinks)
        assert total == (model.nvlink.links if gpu.nvlinks and model.nvlink else 0)
        assert gpu.busId == gpu.busId.upper() and gpu.busId.startswith("00000000:")


def test_dgx_h100_is_eight_h100s_on_four_nvswitches_over_two_sockets() -> None:
    profile = load_profile("dgx-h100")
    assert len(profile.gpus) == 8
    assert [g.busId[9:11] for g in profile.gpus] == ["18", "2A", "3A", "5D", "9A", "AB", "BA",
                                                       "DB"]
    assert [g.numaNode for g in profile.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({g.pcieRoot for g in profile.gpus}) == 8, "each GPU on its own root complex"
    for i, gpu in enumerate(profile.gpus):
        model = profile.model_of(i)
        assert model.name == "NVIDIA H100 80GB HBM3"
        assert model.nvlink is not None and model.nvlink.links == 18
        assert model.nvlink.enum == pynvml.NVML_NVLINK_VERSION_4_0 == 6
        assert sorted(switch_links(profile, i).values()) == [4, 4, 5, 5]
        assert len(switch_links(profile, i)) == 4
        assert model.mig is not None and not gpu.mig_enabled


def test_dgx_a100_has_two_links_to_each_of_six_nvswitches() -> None:
    profile = load_profile("dgx-a100")
    assert len(profile.gpus) == 8 and len(profile.nvswitches) == 6
    assert [g.numaNode for g in profile.gpus] == [3, 3, 1, 1, 7, 7, 5, 5]
    for i in range(8):
        model = profile.model_of(i)
        assert model.name == "NVIDIA A100-SXM4-80GB"
        assert model.nvlink is not None
        assert model.nvlink.enum == pynvml.NVML_NVLINK_VERSION_3_1 == 5, "as A100 is observed"
        assert set(switch_links(profile, i).values()) == {2}
        assert len(switch_links(profile, i)) == 6


def test_a100_pcie_bridges_pair_0_1_and_2_3_across_two_numa_nodes() -> None:
    profile = load_profile("a100-pcie-4x")
    assert [peers(profile, i) for i in range(4)] == [{1: 12}, {0: 12}, {3: 12}, {2: 12}]
    assert [g.numaNode for g in profile.gpus] == [0, 0, 1, 1]
    assert [g.minor for g in profile.gpus] != [0, 1, 2, 3], "minors are not NVML indexes"
    assert {profile.model_of(i).name for i in range(4)} == {"NVIDIA A100-PCIE-40GB"}


def test_l4_has_no_nvlink_and_no_mig() -> None:
    profile = load_profile("l4-8x")
    assert len(profile.gpus) == 8
    for i, gpu in enumerate(profile.gpus):
        model = profile.model_of(i)
        assert model.name == "NVIDIA L4" and model.architecture == "ADA"
        assert model.nvlink is None and model.mig is None and not gpu.nvlinks


def test_a100_mig_has_live_instances_on_gpu0_and_a_whole_gpu1() -> None:
    profile = load_profile("a100-mig")
    mig, whole = profile.gpus
    assert mig.mig is not None and mig.mig_enabled and not whole.mig_enabled
    assert [(gi.profileId, gi.start) for gi in mig.mig.gpuInstances] == [
        (14, 0), (19, 2), (19, 3), (9, 4)]  # 2g.10gb, 1g.5gb x2, 3g.20gb
    assert all(len(gi.computeInstances) == 1 for gi in mig.mig.gpuInstances)


def test_single_gpu_profiles_have_mig_off_and_no_nvlink_peers() -> None:
    for name in ("h200-141gb", "h100-80gb-hbm3"):
        (gpu,) = load_profile(name).gpus
        assert not gpu.mig_enabled and not gpu.nvlinks
    assert load_profile("h200-141gb").gpus[0].numaNode is None, "the VM has no NUMA node"


def test_mesh_4x_is_a_ring_without_diagonals() -> None:
    profile = load_profile("mesh-4x")
    assert [set(peers(profile, i)) for i in range(4)] == [{1, 3}, {0, 2}, {1, 3}, {0, 2}]
    assert profile.model_of(0).name == "Tesla V100-SXM2-32GB"


def test_h200_model_matches_the_mig_geometry_of_the_capture() -> None:
    model = load_profile("h200-141gb").model_of(0)
    assert model.mig is not None
    assert {p.id: (p.placements.starts, p.placements.size) for p in model.mig.profiles.values()} \
        == {19: ([0, 1, 2, 3, 4, 5, 6], 1), 20: ([0, 1, 2, 3, 4, 5, 6], 1),
            15: ([0, 2, 4, 6], 2), 14: ([0, 2, 4], 2), 9: ([0, 4], 4), 5: ([0], 4), 0: ([0], 8)}


# --------------------------------------------------------------------------- bad profiles


def refused(path: Path) -> ProfileError:
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    return err.value


def assert_names(err: ProfileError, file: str, where: str, *words: str) -> None:
    message = str(err)
    assert f"{file}: {where}: " in message, message
    for word in words:
        assert word in message, message


def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("description: x\ngpus:\n  - model: [l4\n    uuid: x\n")
    err = refused(path)
    assert str(path) in str(err) and "line 4" in str(err)


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text((PROFILES_DIR / "h200-141gb.yaml").read_text() + "driverVersion: '1'\n")
    err = refused(path)
    assert "duplicate key 'driverVersion'" in str(err) and "line" in str(err)


def test_unquoted_bus_id_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "unquoted.yaml"
    path.write_text((PROFILES_DIR / "h200-141gb.yaml").read_text()
                    .replace('"00000000:00:06.0"', "00000000:00:06.0"))
    assert_names(refused(path), str(path), "gpus[0].busId", "quote it")


Case = tuple[str, Callable[[dict[str, Any]], object], str, tuple[str, ...]]

CASES: list[Case] = [
    ("h100-80gb-hbm3", lambda d: d["gpus"][0].update(colour="green"),
     "gpus[0].colour", ("Extra inputs are not permitted",)),
    ("h100-80gb-hbm3", lambda d: d.update(bogusField=1), "bogusField", ("not permitted",)),
    ("h100-80gb-hbm3", lambda d: d["gpus"][0].pop("uuid"), "gpus[0].uuid", ("Field required",)),
    ("h100-80gb-hbm3", lambda d: d.pop("driverVersion"), "driverVersion", ("Field required",)),
    ("dgx-h100", lambda d: d["gpus"][3]["nvlinks"].__setitem__(0, {"peer": 9, "count": 4}),
     "gpus[3].nvlinks[0].peer", ("no GPU with index 9",)),
    ("dgx-h100", lambda d: d["gpus"][3]["nvlinks"].__setitem__(0, {"switch": 4, "count": 4}),
     "gpus[3].nvlinks[0].switch", ("no NVSwitch with index 4",)),
    ("dgx-h100", lambda d: d["gpus"][2]["nvlinks"][0].update(peer=1),
     "gpus[2].nvlinks[0].peer", ("exactly one of peer",)),
    ("dgx-h100", lambda d: d["gpus"][0]["nvlinks"].append({"switch": 0, "count": 1}),
     "gpus[0].nvlinks", ("19 links", "has 18")),
    ("a100-pcie-4x", lambda d: d["gpus"][1]["nvlinks"][0].update(count=4),
     "gpus[0].nvlinks", ("12 links to GPU 1", "4 back")),
    ("a100-pcie-4x", lambda d: d["gpus"][2]["nvlinks"][0].update(peer=2),
     "gpus[2].nvlinks[0].peer", ("cannot link to itself",)),
    ("l4-8x", lambda d: d["gpus"][5].update(nvlinks=[{"peer": 4, "count": 1}]),
     "gpus[5].nvlinks", ("has no NVLink",)),
    ("l4-8x", lambda d: d["gpus"][5].update(uuid=d["gpus"][1]["uuid"]),
     "gpus[5].uuid", ("is also gpus[1].uuid",)),
    ("l4-8x", lambda d: d["gpus"][5].update(minor=0), "gpus[5].minor", ("also gpus[0].minor",)),
    ("l4-8x", lambda d: d["gpus"][5].update(busId="0000:18:00.0"),
     "gpus[5].busId", ("00000000:18:00.0 is also gpus[0].busId",)),
    ("l4-8x", lambda d: d["gpus"][5].update(model="l5"), "gpus[5].model", ("unknown model 'l5'",)),
    ("l4-8x", lambda d: d["gpus"][5].update(pcieSwitch="sw9"),
     "gpus[5].pcieSwitch", ("'sw9' is not in pcieSwitches",)),
    ("l4-8x", lambda d: d["gpus"][5].update(numaNode=0),
     "gpus[5].pcieSwitch", ("must share pcieRoot and numaNode",)),
    ("l4-8x", lambda d: d["gpus"][5].update(mig={"enabled": True}),
     "gpus[5].mig", ("has no MIG",)),
    ("l4-8x", lambda d: d["gpus"][0].update(faults={"nvmlDeviceGetNothing": "GPU_IS_LOST"}),
     "gpus[0].faults.nvmlDeviceGetNothing", ("not a pynvml function",)),
    ("l4-8x", lambda d: d["gpus"][0].update(faults={"nvmlDeviceGetUUID": "ON_FIRE"}),
     "gpus[0].faults.nvmlDeviceGetUUID", ("NVML_ERROR_ON_FIRE",)),
    ("a100-mig", lambda d: d["gpus"][0]["mig"]["gpuInstances"][1].update(start=0),
     "gpus[0].mig.gpuInstances[1].start", ("overlaps GPU instance 3", "MIG 2g.10gb at 0:2")),
    ("a100-mig", lambda d: d["gpus"][0]["mig"]["gpuInstances"][3].update(start=2),
     "gpus[0].mig.gpuInstances[3].start", ("2:4 is not a placement of MIG 3g.20gb",)),
    ("a100-mig", lambda d: d["gpus"][0]["mig"]["gpuInstances"][0].update(profileId=7),
     "gpus[0].mig.gpuInstances[0].profileId", ("no GPU-instance profile with id 7",)),
    ("a100-mig", lambda d: d["gpus"][0]["mig"]["gpuInstances"][3]["computeInstances"]
     .append({"profileId": 0}),
     "gpus[0].mig.gpuInstances[3].computeInstances[1].profileId", ("no room",)),
    ("a100-mig", lambda d: d["gpus"][0]["mig"]["gpuInstances"][3]["computeInstances"]
     .__setitem__(0, {"profileId": 3}),
     "gpus[0].mig.gpuInstances[3].computeInstances[0].profileId", ("does not fit",)),
    ("a100-mig", lambda d: d["gpus"][0]["mig"].update(enabled=False),
     "gpus[0].mig.gpuInstances", ("MIG is not enabled",)),
]


@pytest.mark.parametrize(("name", "edit", "where", "words"), CASES,
                         ids=[case[2] for case in CASES])
def test_bad_profile_is_refused_naming_file_and_field(
        edited_profile: Callable[..., Path], name: str, edit: Callable[[dict[str, Any]], object],
        where: str, words: tuple[str, ...]) -> None:
    path = edited_profile(name, edit, file=f"{name}.yaml")
    assert_names(refused(path), str(path), where, *words)


def test_link_to_a_missing_gpu_reads_like_the_issue(edited_profile: Callable[..., Path]) -> None:
    path = edited_profile("dgx-h100", lambda d: d["gpus"][3]["nvlinks"][0].update(
        switch=None, peer=9), file="dgx-h100.yaml")
    assert "dgx-h100.yaml: gpus[3].nvlinks[0].peer: no GPU with index 9" in str(refused(path))


def test_overlapping_placements_in_a_models_mig_table(edited_profile: Callable[..., Path]) -> None:
    library = yaml.safe_load((PROFILES_DIR / "_models.yaml").read_text())["models"]
    mine = library["a100-pcie-40gb"]
    mine["mig"]["profiles"][1]["placements"] = {"starts": [0, 2, 2], "size": 2}

    def edit(data: dict[str, Any]) -> None:
        data["models"] = {"my-a100": mine}
        data["gpus"][0]["model"] = "my-a100"

    path = edited_profile("a100-mig", edit)
    assert_names(refused(path), str(path), "models.my-a100.mig.profiles[1].placements.starts",
                 "placements 2:2 and 2:2 overlap")


def test_a_misaligned_placement_in_a_models_mig_table(edited_profile: Callable[..., Path]) -> None:
    library = yaml.safe_load((PROFILES_DIR / "_models.yaml").read_text())["models"]
    mine = library["a100-pcie-40gb"]
    mine["mig"]["profiles"][2]["placements"] = {"starts": [0, 2], "size": 4}
    path = edited_profile("l4-8x", lambda d: d.update(models={"my-a100": mine}))
    assert_names(refused(path), str(path),
                 "models.my-a100.mig.profiles[2].placements.starts[1]", "not an aligned block")


def test_unknown_profile_name_is_refused_naming_it() -> None:
    with pytest.raises(ProfileError) as err:
        load_profile("no-such-machine")
    assert "no-such-machine" in str(err.value) and "dgx-h100" in str(err.value)
