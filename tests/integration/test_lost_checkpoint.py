"""A start that finds no checkpoint (moved away, the plugin data dir lost) keeps what the node
says is in use (issue 12, defect 1): the claims with CDI specs stay prepared, their MIG
devices live, their devices are refused to other claims, and the kubelet's unprepare still
undoes them; only what nothing claims is swept, and the log says what and why."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from driver.plugin import checkpoint
from driver.plugin.evidence import UNKNOWN
from tests.support.plugin import (
    Node,
    Running,
    Start,
    cdi_problems,
    cdi_specs,
    live_mig,
    make_claim,
    mig_profile,
    result,
    write_claim,
)

GPU0 = "GPU-6493d427-501d-5931-bd3f-97d1981f0fc8"  # dgx-h100 GPU 0
GPU1 = "GPU-df0fc3e6-d2c7-5d85-984d-a4c26364deeb"  # GPU 1
PROFILE_3G, PROFILE_1G = 9, 19  # H100 GPU-instance profiles


def live(node: Node) -> dict[str, list[tuple[int, int, int]]]:
    """The live MIG devices, in placement order."""
    return {gpu: sorted(gis) for gpu, gis in live_mig(node.mig_state).items()}


def move_away(node: Node) -> None:
    """As the plugin's error for a damaged checkpoint once advised."""
    node.checkpoint.rename(node.root / "checkpoint.json.bak")


def lose_data_dir(node: Node) -> None:
    shutil.rmtree(node.plugin_dir)


@pytest.mark.parametrize("lose", [move_away, lose_data_dir], ids=["moved-away", "data-dir"])
def test_claims_on_the_node_survive_a_lost_checkpoint(
        node: Node, start: Start, lose: Callable[[Node], None],
        caplog: pytest.LogCaptureFixture) -> None:
    profile = mig_profile(node.root / "mig.yaml")

    def dynamic() -> Running:
        return start(str(profile), mock_state=node.mig_state, mig_mode="dynamic")

    first = dynamic()
    claims = [make_claim(node.local, [result("gpu-0-mig-3g40gb-4", request="mig")]),
              make_claim(node.local, [result("gpu-0-mig-1g10gb-0", request="mig")]),
              make_claim(node.local, [result("gpu-1-mig-1g10gb-6", request="mig")])]
    answers = first.kubelet.prepare(claims)
    assert all(answers[c.uid].error == "" for c in claims)
    specs_before = cdi_specs(node.cdi_root)
    mig_before = live(node)
    assert mig_before == {
        GPU0: [(PROFILE_3G, 4, 1), (PROFILE_1G, 0, 1)], GPU1: [(PROFILE_1G, 6, 1)]}
    first.stop()
    lose(node)

    with caplog.at_level(logging.INFO, logger="driver.plugin"):
        second = dynamic()
    assert cdi_specs(node.cdi_root) == specs_before  # not one spec deleted
    assert live(node) == mig_before  # not one MIG device destroyed
    loaded = checkpoint.load(node.checkpoint)
    assert loaded is not None
    assert {uid: (r.state, r.namespace, [d.device for d in r.devices])
            for uid, r in loaded.claims.items()} == {
        c.uid: ("PrepareCompleted", UNKNOWN, [answers[c.uid].devices[0]["device"]])
        for c in claims}
    kept = [r.getMessage() for r in caplog.records if "no checkpoint, but a CDI spec" in
            r.getMessage()]
    assert len(kept) == 3 and all("until the kubelet unprepares it" in m for m in kept)

    # the placements in use are not handed out again; a free one is
    taken = make_claim(node.local, [result("gpu-0-mig-3g40gb-4", request="mig")])
    whole = make_claim(node.local, [result("gpu-1")])
    free = make_claim(node.local, [result("gpu-0-mig-1g10gb-2", request="mig")])
    again = second.kubelet.prepare([taken, whole, free])
    for refused in (taken, whole):
        assert f"cannot prepare ResourceClaim {refused.namespace}/{refused.name}: " in \
            again[refused.uid].error
        assert f"ResourceClaim {UNKNOWN}/{UNKNOWN} ({claims[0 if refused is taken else 2].uid})" \
            in again[refused.uid].error
    assert again[free.uid].error == ""
    assert cdi_problems(cdi_specs(node.cdi_root)[free.uid]) == []

    # the kubelet's unprepare still undoes each claim
    assert second.kubelet.unprepare([*claims, free]) == {c.uid: "" for c in [*claims, free]}
    assert live_mig(node.mig_state) == {} and cdi_specs(node.cdi_root) == {}


def test_without_a_checkpoint_only_what_no_spec_claims_is_swept(
        node: Node, start: Start, caplog: pytest.LogCaptureFixture) -> None:
    profile = mig_profile(node.root / "mig.yaml")
    first = start(str(profile), mock_state=node.mig_state, mig_mode="dynamic")
    kept = make_claim(node.local, [result("gpu-0-mig-1g10gb-0", request="mig")])
    stray = make_claim(node.local, [result("gpu-0-mig-1g10gb-1", request="mig")])
    assert all(a.error == "" for a in first.kubelet.prepare([kept, stray]).values())
    first.stop()
    lose_data_dir(node)
    specs = cdi_specs(node.cdi_root)
    (node.cdi_root / Path(next(p for p in node.cdi_root.iterdir()
                               if stray.uid in p.name)).name).unlink()  # its spec is gone
    with caplog.at_level(logging.INFO, logger="driver.plugin"):
        start(str(profile), mock_state=node.mig_state, mig_mode="dynamic")
    assert cdi_specs(node.cdi_root) == {kept.uid: specs[kept.uid]}
    assert live_mig(node.mig_state) == {GPU0: [(PROFILE_1G, 0, 1)]}
    assert any("destroying MIG GPU instance" in r.getMessage() and "no prepared claim holds"
               in r.getMessage() for r in caplog.records)


def test_a_spec_is_removed_before_its_devices_and_they_stay_while_it_cannot_be(
        node: Node, start: Start) -> None:
    """So that a spec on the node always means its devices exist: an unprepare that cannot
    remove the spec keeps the MIG device, and a later one undoes both."""
    running = start(str(mig_profile(node.root / "mig.yaml")), mock_state=node.mig_state,
                    mig_mode="dynamic")
    claim = make_claim(node.local, [result("gpu-0-mig-1g10gb-0", request="mig")])
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
    spec = next(p for p in node.cdi_root.iterdir() if claim.uid in p.name)
    content = spec.read_bytes()
    spec.unlink()
    spec.mkdir()  # unlink() of it fails (EISDIR) as on a read-only CDI dir
    error = running.kubelet.unprepare([claim])[claim.uid]
    assert "cannot remove the CDI spec" in error
    assert live(node) == {GPU0: [(PROFILE_1G, 0, 1)]}
    spec.rmdir()
    spec.write_bytes(content)
    assert running.kubelet.unprepare([claim]) == {claim.uid: ""}
    assert live(node) == {} and cdi_specs(node.cdi_root) == {}


def test_a_claim_prepared_again_fills_in_its_rebuilt_record(node: Node, start: Start) -> None:
    """What a spec cannot say (the claim's name, requests, adminAccess) comes back from the
    allocation when the kubelet prepares the claim again, e.g. after its own restart."""
    first = start("l4-8x")
    admin = make_claim(node.local, [result("gpu-1", request="debug", admin=True)])
    owner = make_claim(node.local, [result("gpu-1", request="train")])
    answers = first.kubelet.prepare([admin, owner])
    assert all(a.error == "" for a in answers.values())
    first.stop()
    move_away(node)
    second = start("l4-8x")
    again = second.kubelet.prepare([admin, owner])
    assert {uid: a.devices for uid, a in again.items()} == \
        {uid: a.devices for uid, a in answers.items()}  # request names included
    loaded = checkpoint.load(node.checkpoint)
    assert loaded is not None
    assert {uid: (r.namespace, r.name, [d.admin_access for d in r.devices])
            for uid, r in loaded.claims.items()} == {
        admin.uid: (admin.namespace, admin.name, [True]),
        owner.uid: (owner.namespace, owner.name, [False])}
    # gpu-1 is held by its owner alone again: unprepared, it is free for a new claim
    assert second.kubelet.unprepare([owner]) == {owner.uid: ""}
    newcomer = make_claim(node.local, [result("gpu-1")])
    assert second.kubelet.prepare([newcomer])[newcomer.uid].error == ""


def test_a_rebuilt_claim_allocated_other_devices_is_refused(node: Node, start: Start) -> None:
    first = start("l4-8x")
    claim = make_claim(node.local, [result("gpu-2")])
    assert first.kubelet.prepare([claim])[claim.uid].error == ""
    first.stop()
    lose_data_dir(node)
    second = start("l4-8x")
    write_claim(node.local, claim, [result("gpu-3")])  # not what the node holds for it
    error = second.kubelet.prepare([claim])[claim.uid].error
    assert error == (f"ResourceClaim {claim.namespace}/{claim.name} is allocated gpu-3, but "
                     "this node holds gpu-2 for it (its record was rebuilt from its CDI "
                     "spec): unprepare it first")
    assert set(cdi_specs(node.cdi_root)) == {claim.uid}
