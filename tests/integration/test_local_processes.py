"""What `gpu-dra demo --cluster` and the e2e fixtures start stops with them: an
interrupted build takes its compilers along, a signal while a child is being started
waits until the child is recorded (so the stop takes it), and children stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driver.demo.cluster import _Signals
from driver.devcluster.controlplane import (
    ClusterConfig,
    ComponentError,
    LocalCluster,
    stop_signals_held,
)
from driver.devcluster.node import ChildProcess, poll
from tests.support.standin import KubeletStandin

ROOT = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def kill_after() -> Iterator[list[int]]:
    """Pids to SIGKILL at teardown if a failing test left them running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# A demo whose control plane is not built: "binaries" runs this build instead of build.sh.
DEMO_BUILDING = """\
import sys
from pathlib import Path

import driver.demo.cluster as demo
from driver.devcluster.controlplane import run_build_script

demo.ensure_assets = lambda progress: run_build_script(Path(sys.argv[1]), progress)
sys.exit(demo.run_cluster_demo(demo.ClusterDemoOptions()))
"""


def test_sigterm_during_the_build_stops_the_build_and_everything_it_started(
    tmp_path: Path, kill_after: list[int],
) -> None:
    pids = tmp_path / "pids"
    build = script(tmp_path / "build.sh", f"""\
        echo "compiling" >&2        # said before the test may stop the build
        sleep 300 &                 # a compiler the script started
        echo "$$ $!" > {pids}.tmp && mv {pids}.tmp {pids}
        wait
        """)
    proc = subprocess.Popen([sys.executable, "-c", DEMO_BUILDING, str(build)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        started = poll(lambda: pids.is_file() and pids.read_text().split(),
                       "the build to start its compiler", timeout=60)
        kill_after += [int(p) for p in started]
        proc.send_signal(signal.SIGTERM)  # to the demo alone, as `kill` or systemd sends it
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "compiling" in out
    poll(lambda: not any(alive(p) for p in kill_after), "the build's processes to exit",
         timeout=30)


def _signal_once_spawned(monkeypatch: pytest.MonkeyPatch, signum: int) -> list[int]:
    """Every Popen that localcluster makes sends ``signum`` to this thread as soon as the
    child exists: the moment between starting a child and recording it. The pids."""
    spawned: list[int] = []
    real = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        child = real(*args, **kwargs)
        spawned.append(child.pid)
        signal.pthread_kill(threading.get_ident(), signum)
        return child

    monkeypatch.setattr("driver.devcluster.controlplane.subprocess.Popen", popen)
    return spawned


def test_ctrl_c_right_after_a_component_started_still_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_after: list[int],
) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    script(assets / "etcd", "exec sleep 300\n")
    spawned = _signal_once_spawned(monkeypatch, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), LocalCluster(ClusterConfig(
            assets=assets, workdir=tmp_path / "cluster", ready_timeout=60)):
        pass
    kill_after += spawned
    assert len(spawned) == 1
    poll(lambda: not alive(spawned[0]), "the interrupted cluster's etcd to be stopped",
         timeout=30)


def test_a_signal_another_thread_takes_waits_until_the_child_is_recorded(
    tmp_path: Path, kill_after: list[int],
) -> None:
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)
    other.start()
    recorded: list[ChildProcess] = []
    try:
        with pytest.raises(KeyboardInterrupt), _Signals() as signals, stop_signals_held():
            child = ChildProcess("sleeper", ["sleep", "300"], tmp_path / "sleeper.log")
            kill_after.append(child.pid)
            # Python runs the handler in this thread whichever thread the kernel chose.
            signal.pthread_kill(other.ident or 0, signal.SIGTERM)
            poll(lambda: signal.SIGTERM in signal.sigpending(),
                 "the handler to queue the signal back to this thread", timeout=30)
            recorded.append(child)
    finally:
        idle.set()
    assert signals.signum == signal.SIGTERM
    [child] = recorded
    assert child.stop(grace=30) == -signal.SIGTERM


def test_children_stop_on_sigterm_though_started_with_it_held(tmp_path: Path) -> None:
    with stop_signals_held():
        child = ChildProcess("sleeper", ["sleep", "300"], tmp_path / "sleeper.log")
    # A child that inherited the held signals would sit out the grace, then need SIGKILL.
    assert child.stop(grace=60) == -signal.SIGTERM


def test_waiting_for_a_pod_fails_at_once_when_the_stand_in_exits(tmp_path: Path) -> None:
    binary = script(tmp_path / "kubelet-standin", "echo 'no kubeconfig' >&2; exit 3\n")
    standin = KubeletStandin(binary, tmp_path / "kubeconfig", "node-a", tmp_path / "node")
    try:
        # Without `fatal`, the wait would sit out its timeout and fail with a plain timeout.
        with pytest.raises(ComponentError, match=r"exited with code 3(.|\n)*no kubeconfig"):
            standin.wait_pod("0000-uid", "prepared")
    finally:
        standin.stop()
