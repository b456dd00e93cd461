"""`gpu-dra demo --cluster` as a user runs it: the real CLI comes up with a kubeconfig, the
example it prints, applied through that kubeconfig, gets its claim allocated by the real
scheduler and prepared through the plugin by the kubelet's code; Ctrl-C exits 0 and
leaves no process and no folder behind, and a kill -9 leaves no process either."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import config as kube_config

from driver.devcluster.controlplane import ALL_BINARIES, AssetsUnavailable, die_with_parent
from driver.devcluster.node import STANDIN_ENV, find_standin
from driver.plugin import cdi
from tests.support.apiserver import RESOURCE_V1, create, get, wait_for
from tests.support.standin import E2eTools

DRIVER = "gpu.dra.dev"
READY_TIMEOUT = 180.0  # a cold start of the control plane on 2 busy cores


class DemoExited(AssertionError):
    """The demo ended before printing the line waited for: fails the wait at once."""


@dataclass
class Demo:
    """A running `gpu-dra demo --cluster` and what it printed so far."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ended: bool = False
    _new: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def wait_line(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        """The first line (printed so far or later) matching ``pattern``."""
        regex = re.compile(pattern)

        def seen() -> re.Match[str] | None:
            while not self._new.empty():
                line = self._new.get()
                if line is None:
                    self.ended = True
                else:
                    self.lines.append(line)
            found = next((m for m in map(regex.search, self.lines) if m), None)
            if found is None and self.ended:
                raise DemoExited(f"the demo exited ({self.proc.poll()}) before a line "
                                 f"matching {pattern!r}:\n{self.output()}")
            return found

        return wait_for(seen, f"a line matching {pattern!r}; output so far:\n"
                        f"{self.output()}", timeout=timeout, fatal=(DemoExited,))

    def output(self) -> str:
        return "\n".join(self.lines)

    def example(self) -> list[dict[str, Any]]:
        """The objects of the printed `kubectl apply -f - <<'EOF'` example (waits until the
        whole example is printed)."""
        self.wait_line(r"^EOF$")
        start = self.lines.index("kubectl apply -f - <<'EOF'") + 1
        end = self.lines.index("EOF", start)
        return [d for d in yaml.safe_load_all("\n".join(self.lines[start:end])) if d]


@pytest.fixture
def run_demo(assets: Path, e2e_tools: E2eTools, tmp_path: Path) -> Iterator[Demo]:
    """The demo found its binaries as a user's setup gives them: KUBEBUILDER_ASSETS and
    GPU_DRA_KUBELET_STANDIN. Killed at teardown if the test left it running."""
    missing = [b for b in ALL_BINARIES if not (assets / b).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in {assets}")
    env = {**os.environ, "KUBEBUILDER_ASSETS": str(assets),
           "GPU_DRA_KUBELET_STANDIN": str(e2e_tools.kubelet_standin)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "driver.cli", "demo", "--cluster",
         "--kubeconfig-out", str(tmp_path / "kubeconfig")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, preexec_fn=die_with_parent)
    demo = Demo(proc)
    threading.Thread(target=demo.read, daemon=True).start()
    try:
        yield demo
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(demo.output())


# --- processes ------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), int(fields[19]))


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def descendants(root: int) -> dict[tuple[int, int], list[str]]:
    """(pid, start time) -> argv of every live process below ``root``."""
    stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit()
             if (s := _stat(int(p.name))) is not None}
    found: dict[tuple[int, int], list[str]] = {}
    parents = {root}
    while parents:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in parents}
        found |= {(pid, stats[pid][1]): _cmdline(pid) for pid in children}
        parents = children
    return found


def components(procs: dict[tuple[int, int], list[str]]) -> set[str]:
    """What the demo runs, by name: the binaries, and the plugin by its command."""
    names = set()
    for argv in procs.values():
        if argv[1:4] == ["-m", "driver.cli", "plugin"]:
            names.add("plugin")
        elif argv:
            names.add(Path(argv[0]).name)
    return names


def still_running(procs: dict[tuple[int, int], list[str]]) -> list[str]:
    """Those of ``procs`` still alive (the same pid with the same start time)."""
    return [" ".join(argv)[:120] for (pid, started), argv in procs.items()
            if (_stat(pid) or (0, -1))[1] == started]


def running_in(folder: Path) -> list[str]:
    """Any process on the machine whose command line names ``folder``."""
    live = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    argvs = [_cmdline(pid) for pid in live if _stat(pid) is not None]
    return [" ".join(argv)[:120] for argv in argvs if any(str(folder) in a for a in argv)]


EXPECTED = {"etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager",
            "kubelet-standin", "plugin"}


# --- the tests ---------------------------------------------------------------------------------


def test_pod_from_the_printed_example_is_prepared_and_ctrl_c_leaves_nothing(
    run_demo: Demo, tmp_path: Path,
) -> None:
    demo = run_demo
    folder = Path(demo.wait_line(r"^gpu-dra demo --cluster: .*, folder (\S+)$")[1])
    node = demo.wait_line(r"Node (\S+) Ready")[1]
    kubeconfig = Path(demo.wait_line(r"^export KUBECONFIG=(\S+)$")[1])
    cdi_root = Path(demo.wait_line(r"^CDI specs appear in (\S+)$")[1])
    assert kubeconfig == tmp_path / "kubeconfig"

    api = kube_config.new_client_from_config(config_file=str(kubeconfig))
    try:
        objects = {o["kind"]: o for o in demo.example()}
        assert set(objects) == {"ResourceClaimTemplate", "Pod"}
        create(api, f"{RESOURCE_V1}/namespaces/default/resourceclaimtemplates",
               objects["ResourceClaimTemplate"])
        pod_path = f"/api/v1/namespaces/default/pods/{objects['Pod']['metadata']['name']}"
        pod = create(api, "/api/v1/namespaces/default/pods", objects["Pod"])

        def claim_name() -> str | None:
            found = get(api, pod_path) or {}
            statuses = found.get("status", {}).get("resourceClaimStatuses") or []
            return statuses[0].get("resourceClaimName") if statuses else None

        name = wait_for(claim_name, "the pod's ResourceClaim")
        claim_path = f"{RESOURCE_V1}/namespaces/default/resourceclaims/{name}"

        def reserved() -> dict[str, Any] | None:
            claim = get(api, claim_path) or {}
            status = claim.get("status", {})
            return claim if status.get("allocation") and status.get("reservedFor") else None

        claim = wait_for(reserved, "the claim to be allocated and reserved", timeout=60)
        results = claim["status"]["allocation"]["devices"]["results"]
        assert {(r["driver"], r["pool"]) for r in results} == {(DRIVER, node)}
        assert {"resource": "pods", "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"]} in claim["status"]["reservedFor"]
        # The scheduler reserves the claim, then binds the pod in a separate write.
        bound = wait_for(lambda: (get(api, pod_path) or {}).get("spec", {}).get("nodeName"),
                         "the pod to be bound")
        assert bound == node

        claim_uid = claim["metadata"]["uid"]
        [device] = [r["device"] for r in results]
        line = demo.wait_line(r"pod default/\S+ prepared: (.*)$", timeout=90)
        assert line[1] == (f"{device} "
                           f"({cdi.qualified_name(DRIVER, cdi.device_name(claim_uid, device))})")
        assert (cdi_root / cdi.spec_file_name(DRIVER, claim_uid)).is_file()
    finally:
        api.close()

    children = descendants(demo.proc.pid)
    assert components(children) >= EXPECTED, children
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(timeout=60) == 0, demo.output()
    demo.wait_line(r"stop .*stopped kubelet-standin, plugin, control plane; folder removed")
    assert still_running(children) == []
    assert running_in(folder) == []
    assert not folder.exists()


def test_kill_9_takes_every_child_with_it(run_demo: Demo) -> None:
    demo = run_demo
    folder = Path(demo.wait_line(r"^gpu-dra demo --cluster: .*, folder (\S+)$")[1])
    demo.wait_line(r"^export KUBECONFIG=")
    children = descendants(demo.proc.pid)
    assert components(children) >= EXPECTED, children
    try:
        demo.proc.kill()
        demo.proc.wait(timeout=10)
        wait_for(lambda: not still_running(children),
                 "the demo's children to die with it", timeout=30)
        assert running_in(folder) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # a kill -9 leaves only the folder


def test_without_binaries_or_go_it_says_what_to_install(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "KUBEBUILDER_ASSETS": str(empty), "GPU_DRA_CACHE": str(empty),
           "PATH": str(empty)}
    env.pop("GPU_DRA_KUBELET_STANDIN", None)
    proc = subprocess.run([sys.executable, "-m", "driver.cli", "demo", "--cluster"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc
    [line] = proc.stderr.splitlines()
    assert line.startswith("gpu-dra demo: Go is not installed")
    assert "install Go" in line and "KUBEBUILDER_ASSETS" in line


def test_the_stand_in_is_found_where_the_user_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    next_to_assets = assets / "kubelet-standin"
    next_to_assets.write_text("#!/bin/sh\n")
    next_to_assets.chmod(0o755)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    monkeypatch.delenv(STANDIN_ENV, raising=False)
    assert find_standin() == next_to_assets

    named = tmp_path / "my-standin"
    named.write_text("#!/bin/sh\n")
    monkeypatch.setenv(STANDIN_ENV, str(named))
    with pytest.raises(AssetsUnavailable, match=f"{STANDIN_ENV}=.*not an executable file"):
        find_standin()
    named.chmod(0o755)
    assert find_standin() == named

    def no_build_cache() -> None:
        raise AssertionError("looked in the build cache (runs Go) though a place the user "
                             "named has the stand-in")

    monkeypatch.setattr("driver.devcluster.node.node_tools_folder", no_build_cache)
    monkeypatch.delenv(STANDIN_ENV)
    assert find_standin() == next_to_assets


def test_a_demo_that_dies_at_startup_fails_the_wait_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "driver.cli", "demo", "--cluster",
         "--profile", str(tmp_path / "no-such-profile.yaml")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    demo = Demo(proc)
    threading.Thread(target=demo.read, daemon=True).start()
    # Without `fatal`, the wait would sit out its timeout and fail with a plain timeout.
    with pytest.raises(DemoExited, match="the demo exited"):
        demo.wait_line(r"^export KUBECONFIG=", timeout=60)
    assert proc.wait(timeout=60) == 2
    assert "no-such-profile.yaml" in demo.output()
