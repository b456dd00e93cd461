"""Hostile and malformed claims sent to a running plugin (issue 12, defects 5-9): each is
refused alone, by its deadline, in one line naming the claim and the problem, and leaves
nothing on the node; the plugin serves the next call."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml

from tests.support.plugin import (
    Claim,
    Daemon,
    Node,
    Start,
    cdi_specs,
    claim_object,
    gpu_config,
    make_claim,
    new_uid,
    opaque,
    result,
)


def claim_file(node: Node, claim: Claim) -> str:
    return str(node.local / "resourceclaims" / claim.namespace / f"{claim.name}.yaml")


def write_raw(node: Node, claim: Claim, text: str) -> None:
    path = node.local / "resourceclaims" / claim.namespace / f"{claim.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def new_claim() -> Claim:
    uid = new_uid()
    return Claim("ns", f"claim-{uid[:8]}", uid)


ALIAS_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
       f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
       f"*{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)])  # 10^9 leaves in 1 KB


@pytest.mark.parametrize(("text", "problem"), [
    (ALIAS_BOMB, "expands to more than"),
    ("a: " + "[" * 5000 + "]" * 5000, "nest"),  # ours or libyaml's own depth limit
    ("a: b\n  c: d: e\n", "not YAML"),
    ("a: !!binary aGVsbG8=\n", "tag:yaml.org,2002:binary is not JSON data"),
    ("a: !!set {x, y}\n", "tag:yaml.org,2002:set is not JSON data"),
], ids=["alias-bomb", "deep", "not-yaml", "binary", "set"])
def test_a_claim_file_the_plugin_cannot_read_safely_is_refused_at_once(
        node: Node, start: Start, text: str, problem: str) -> None:
    running = start()
    claim = new_claim()
    write_raw(node, claim, text)
    began = time.monotonic()
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert time.monotonic() - began < 5  # a bomb is refused before anything expands it
    assert error.startswith(f"ResourceClaim ns/{claim.name}: {claim_file(node, claim)}: ")
    assert problem in error and "\n" not in error
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}
    good = make_claim(node.local, [result("gpu-0")])
    assert running.kubelet.prepare([good])[good.uid].error == ""


def test_a_date_in_opaque_parameters_stays_text(node: Node, start: Start) -> None:
    """YAML would make an unquoted 2026-12-06 a date, which is not JSON data."""
    running = start()
    claim = new_claim()
    config = gpu_config(strategy="TimeSlicing", timeSlicingConfig={"interval": "2026-12-06"})
    text = yaml.safe_dump(claim_object(claim, [result("gpu-0")], [opaque(config)]))
    write_raw(node, claim, text.replace("'2026-12-06'", "2026-12-06"))
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert "sharing.timeSlicingConfig.interval: Input should be 'Default'" in error
    assert "internal error" not in error


def test_binary_opaque_parameters_are_refused_not_an_internal_error(node: Node,
                                                                     start: Start) -> None:
    running = start()
    claim = new_claim()
    obj = claim_object(claim, [result("gpu-0")], [opaque(gpu_config())])
    text = yaml.safe_dump(obj).replace("kind: GpuConfig", "kind: GpuConfig\n"
                                       "            blob: !!binary aGVsbG8=")
    write_raw(node, claim, text)
    error = running.kubelet.prepare([claim])[claim.uid].error
    assert "tag:yaml.org,2002:binary is not JSON data" in error
    assert "internal error" not in error


def test_a_fifo_claim_file_answers_at_once_every_time_and_sigterm_still_stops(
        node: Node) -> None:
    daemon = Daemon(node, node.cli_args("l4-8x"))
    try:
        claim = new_claim()
        path = node.local / "resourceclaims" / claim.namespace / f"{claim.name}.yaml"
        path.parent.mkdir(parents=True)
        os.mkfifo(path)
        for _ in range(2):  # the retry is not "another call is working on this claim"
            began = time.monotonic()
            error = daemon.kubelet.prepare([claim])[claim.uid].error
            assert time.monotonic() - began < 5
            assert error == f"ResourceClaim ns/{claim.name}: {path}: not a regular file"
        good = make_claim(node.local, [result("gpu-0")])
        assert daemon.kubelet.prepare([good])[good.uid].error == ""
    finally:
        began = time.monotonic()
        code = daemon.send(signal.SIGTERM)
    assert code == 0 and time.monotonic() - began < 10


def test_inconsistent_claims_are_refused(node: Node, start: Start) -> None:
    running = start()
    twice = make_claim(node.local, [result("gpu-0"), result("gpu-0", request="other")])
    shared = make_claim(node.local, [{**result("gpu-1"), "shareID": "a"},
                                     {**result("gpu-1", request="other"), "shareID": "b"}])
    beta = new_claim()
    obj = claim_object(beta, [result("gpu-2")])
    obj["apiVersion"] = "resource.k8s.io/v1beta1"
    write_raw(node, beta, yaml.safe_dump(obj))
    answers = running.kubelet.prepare([twice, shared, beta])
    assert "status.allocation.devices.results[1]: device gpu-0 is also results[0]" in \
        answers[twice.uid].error
    assert "is also results" not in answers[shared.uid].error  # distinct shareIDs may share
    assert f"ResourceClaim ns/{beta.name}: apiVersion 'resource.k8s.io/v1beta1', kind " \
           "'ResourceClaim': must be resource.k8s.io/v1 ResourceClaim" == answers[beta.uid].error
    assert set(cdi_specs(node.cdi_root)) <= {shared.uid}
    assert twice.uid not in node.records() and beta.uid not in node.records()


@pytest.mark.parametrize("field", ["uid", "namespace", "name"])
def test_an_identifier_with_a_trailing_newline_never_reaches_a_file(
        node: Node, start: Start, field: str) -> None:
    running = start()
    claim = make_claim(node.local, [result("gpu-0")])
    evil = Claim(**{**claim.__dict__, field: getattr(claim, field) + "\n"})
    error = running.kubelet.prepare([evil])[evil.uid].error
    assert error.startswith(f"claim {field} ")
    assert "is not a" in error
    assert cdi_specs(node.cdi_root) == {} and node.records() == {}
    if field == "uid":  # the only identifier an unprepare turns into a file name
        assert running.kubelet.unprepare([evil])[evil.uid].startswith("claim uid ")
    assert running.kubelet.prepare([claim])[claim.uid].error == ""
