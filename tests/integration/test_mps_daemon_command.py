"""`gpu-dra mps-daemon`, the command of a claim's daemon pod, against the mock driver root's
stand-in: its liveness probe (`--probe`) answers 0 for a daemon that answers, 1 for one
that hangs (within its timeout) or is absent (and starts none); the daemon's command
exits 1 when a workload tells the daemon `quit` through the pipe (so the pod's
restartPolicy OnFailure starts it again) and 0 when the plugin does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.nvml.mpsstandin import NO_DAEMON, PID_FILE, SOCKET
from driver.plugin import mockroot
from driver.plugin.claims import ClaimRef
from driver.plugin.mps import CLAIM_FILE, ClaimMps, Limits, MpsDevice
from driver.plugin.mpspod import READY, STARTS, STOPPING
from tests.support.apiserver import wait_for
from tests.support.plugin import new_uid, short_tmp


@pytest.fixture
def short() -> Iterator[Path]:
    with short_tmp() as path:
        yield path


@pytest.fixture
def root(short: Path) -> Path:
    mockroot.set_up(short / "root", short / "root", [0], "580.65.06")
    return short / "root"


@pytest.fixture
def claim_dir(short: Path) -> Iterator[Path]:
    """A claim's directory as the plugin leaves it for the pod: claim.json, pipe/, log/;
    its daemon, if any, is killed at the end."""
    directory = short / "mps" / new_uid()
    for sub in ("pipe", "log", "shm"):
        (directory / sub).mkdir(parents=True)
    claim = ClaimMps((MpsDevice("gpu-0", "GPU-0d2f", "GPU-0d2f", True),),
                     Limits(30, ((0, "8G"),)), {"GPU-0d2f": 0},
                     ClaimRef("default", "mps", directory.name))
    (directory / CLAIM_FILE).write_text(json.dumps(claim.to_json()))
    yield directory
    pid_file = directory / "pipe" / PID_FILE
    if pid_file.exists():
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def gpu_dra(*args: str) -> list[str]:
    return [sys.executable, "-m", "driver.cli", *args]


def probe(claim_dir: Path, root: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(gpu_dra("mps-daemon", "--probe", "--claim-dir", str(claim_dir),
                                  "--driver-root", str(root), *more),
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def serve(claim_dir: Path, root: Path) -> subprocess.Popen[bytes]:
    """The pod's container, started as its kubelet would; returns once its daemon was told
    its limits (this start's: it counts one more)."""
    starts = int((claim_dir / STARTS).read_text()) if (claim_dir / STARTS).exists() else 0
    process = subprocess.Popen(gpu_dra("mps-daemon", "--claim-dir", str(claim_dir),
                                       "--driver-root", str(root)),
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                               start_new_session=True)
    wait_for(lambda: process.poll() is not None or ((claim_dir / READY).exists() and
                                                    (claim_dir / STARTS).read_text() ==
                                                    str(starts + 1)),
             "the daemon to be told its limits")
    assert process.poll() is None
    return process


def ask(claim_dir: Path, root: Path, command: str) -> subprocess.CompletedProcess[str]:
    """A workload's (or an admin's) client, through the claim's pipe."""
    return subprocess.run([str(root / "usr/local/nvidia/bin/nvidia-cuda-mps-control")],
                          input=command + "\n", capture_output=True, text=True, timeout=30,
                          check=False, env={"PATH": os.environ["PATH"],
                                            "CUDA_MPS_PIPE_DIRECTORY": str(claim_dir / "pipe")})


def test_the_probe_answers_for_a_live_daemon_and_fails_for_a_hung_or_absent_one(
        root: Path, claim_dir: Path) -> None:
    absent = probe(claim_dir, root)
    assert absent.returncode == 1 and NO_DAEMON in absent.stderr
    assert not (claim_dir / "pipe" / PID_FILE).exists()  # it started no daemon
    assert not (claim_dir / "pipe" / SOCKET).exists()

    container = serve(claim_dir, root)
    assert probe(claim_dir, root).returncode == 0
    pid = int((claim_dir / "pipe" / PID_FILE).read_text())
    os.kill(pid, signal.SIGSTOP)  # alive, but its pipe answers nothing
    try:
        hung = probe(claim_dir, root, "--probe-timeout", "1")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert hung.returncode == 1 and "timed out after 1" in hung.stderr
    assert probe(claim_dir, root).returncode == 0
    assert (claim_dir / STARTS).read_text() == "1"  # the probes started nothing
    container.terminate()
    container.wait(timeout=30)


def test_a_workloads_quit_fails_the_container_and_the_plugins_quit_ends_it(
        root: Path, claim_dir: Path) -> None:
    container = serve(claim_dir, root)
    assert ask(claim_dir, root, "quit").returncode == 0
    assert container.wait(timeout=30) == 1  # restartPolicy OnFailure: started again

    container = serve(claim_dir, root)
    assert ask(claim_dir, root, "get_default_active_thread_percentage").stdout == "30.0\n"
    (claim_dir / STOPPING).touch()  # as the plugin's unprepare does before its `quit`
    assert ask(claim_dir, root, "quit").returncode == 0
    assert container.wait(timeout=30) == 0  # the container stays down
    assert (claim_dir / STARTS).read_text() == "2"
