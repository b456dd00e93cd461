"""The mock driver root's `nvidia-cuda-mps-control` behaves as an admin sees the real one:
`-d` starts a daemon that outlives its caller's process group, commands piped to the
client get their replies and are answered back by `get_*`, control.log records them,
`quit` leaves no process, socket or pid file, and with no daemon the client fails."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.nvml.mpsstandin import NO_DAEMON, PID_FILE, SOCKET
from driver.plugin import mockroot
from driver.plugin.driverfiles import BINARY_SEARCH

LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} Control (\d+)\] (.*)")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    mockroot.set_up(tmp_path / "root", tmp_path / "root", [0, 1], "580.65.06")
    return tmp_path / "root"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment a claim's daemon gets; its daemon, if any, is stopped at the end."""
    env = {"PATH": os.environ["PATH"], "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"),
           "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
           "CUDA_VISIBLE_DEVICES": "GPU-0d2f,GPU-91ab"}
    yield env
    pid_file = tmp_path / "pipe" / PID_FILE
    if pid_file.exists():
        os.kill(int(pid_file.read_text()), signal.SIGTERM)


def control(root: Path, env: dict[str, str], stdin: str = "", *args: str
            ) -> subprocess.CompletedProcess[str]:
    binary = root / "usr/local/nvidia/bin/nvidia-cuda-mps-control"
    return subprocess.run([str(binary), *args], input=stdin, env=env, capture_output=True,
                          text=True, timeout=30, check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for an admin (ps shows <defunct>): the test runner may be its reaper.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def log_texts(env: dict[str, str]) -> list[str]:
    lines = (Path(env["CUDA_MPS_LOG_DIRECTORY"]) / "control.log").read_text().splitlines()
    matched = [LOG_LINE.fullmatch(line) for line in lines]
    assert all(matched), lines
    return [m.group(2) for m in matched if m]


def test_the_binaries_are_where_driver_file_discovery_looks(root: Path) -> None:
    for name in ("nvidia-cuda-mps-control", "nvidia-cuda-mps-server"):
        found = [root / d / name for d in BINARY_SEARCH if (root / d / name).is_file()]
        assert len(found) == 1 and os.access(found[0], os.X_OK)
    server = subprocess.run([str(root / "usr/local/nvidia/bin/nvidia-cuda-mps-server")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert server.returncode == 1 and "nvidia-cuda-mps-control" in server.stderr


def test_an_admins_session_with_the_daemon(root: Path, env: dict[str, str]) -> None:
    pipes = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
    started = control(root, env, "", "-d")
    assert started.returncode == 0, started.stderr
    pid = int((pipes / PID_FILE).read_text())
    assert alive(pid) and (pipes / SOCKET).is_socket()

    def ask(command: str) -> subprocess.CompletedProcess[str]:
        return control(root, env, f"{command}\n")

    assert ask("get_default_active_thread_percentage").stdout == "100.0\n"
    told = ask("set_default_active_thread_percentage 25")
    assert (told.returncode, told.stdout) == (0, "25.0\n")
    assert ask("set_default_device_pinned_mem_limit 1 2G").returncode == 0
    both = control(root, env, "get_default_active_thread_percentage\n"
                   "get_default_device_pinned_mem_limit 1\nget_server_list\n")
    assert (both.returncode, both.stdout) == (0, "25.0\n2G\n")
    # Device 2 is not among the two CUDA_VISIBLE_DEVICES; a limit needs a unit.
    for wrong in ("set_default_device_pinned_mem_limit 2 2G",
                  "set_default_device_pinned_mem_limit 0 2", "no_such_command"):
        refused = ask(wrong)
        assert refused.returncode == 1 and refused.stdout.strip(), wrong
    assert ask("get_default_device_pinned_mem_limit 0").stdout == ""

    texts = log_texts(env)
    assert texts[0] == f"Starting control daemon using socket {pipes / SOCKET}"
    assert "CUDA_VISIBLE_DEVICES=GPU-0d2f,GPU-91ab" in texts
    i = texts.index("Cmd:set_default_active_thread_percentage 25")
    assert texts[i + 1] == "25.0"
    assert "Cmd:set_default_device_pinned_mem_limit 1 2G" in texts

    second = control(root, env, "", "-d")
    assert second.returncode == 1 and "already running" in second.stderr
    assert int((pipes / PID_FILE).read_text()) == pid

    bye = ask("quit")
    assert bye.returncode == 0
    assert not (pipes / SOCKET).exists() and not (pipes / PID_FILE).exists()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert log_texts(env)[-2:] == ["Cmd:quit", "Exit"]
    gone = ask("get_server_list")
    assert gone.returncode == 1 and NO_DAEMON in gone.stderr


def test_the_daemon_outlives_its_callers_process_group(root: Path, env: dict[str, str]
                                                        ) -> None:
    """As a plugin SIGKILLed with its children: the daemon started through a shell in a
    process group of its own keeps answering."""
    binary = root / "usr/local/nvidia/bin/nvidia-cuda-mps-control"
    caller = subprocess.Popen(["sh", "-c", f"'{binary}' -d && exec sleep 60"], env=env,
                              start_new_session=True)
    pid_file = Path(env["CUDA_MPS_PIPE_DIRECTORY"]) / PID_FILE
    deadline = time.monotonic() + 20
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(caller.pid, signal.SIGKILL)
    caller.wait(timeout=10)
    pid = int(pid_file.read_text())
    assert alive(pid)
    assert control(root, env, "set_default_active_thread_percentage 50\n").stdout == "50.0\n"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid) and not pid_file.exists()
    assert not (pid_file.parent / SOCKET).exists()


def test_a_daemon_killed_with_sigkill_is_replaced(root: Path, env: dict[str, str]) -> None:
    """Its socket file stays behind, answering nobody: a new -d takes the directory."""
    assert control(root, env, "", "-d").returncode == 0
    pid_file = Path(env["CUDA_MPS_PIPE_DIRECTORY"]) / PID_FILE
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert control(root, env, "get_server_list\n").returncode == 1
    assert control(root, env, "", "-d").returncode == 0
    assert control(root, env, "get_default_active_thread_percentage\n").stdout == "100.0\n"


def test_the_client_fails_cleanly_with_no_daemon(root: Path, env: dict[str, str]) -> None:
    answer = control(root, env, "get_server_list\n")
    assert answer.returncode == 1
    assert answer.stderr.strip() == NO_DAEMON and answer.stdout == ""
