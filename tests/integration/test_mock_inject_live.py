"""`gpu-dra mock inject` reaches a mock NVML held by another, running process: the process
waiting on an event set gets the XID, and sees the GPU lost and back, as a plugin started
with `--mock dgx-h100 --mock-state FILE` would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GPU3 = "GPU-68a37c14-cba3-5893-8527-70e1ada18b19"  # dgx-h100, minor 3
ARRIVAL_BOUND_S = 5.0  # generous: the mock watches the file (inotify)

WAITER = """
import json, sys, time
from pathlib import Path
from driver.nvml.events import HealthWatch
from driver.nvml.mock import mock_provider

provider = mock_provider("dgx-h100", Path(sys.argv[1]))
with HealthWatch(provider.nvml) as watch:
    watch.register(sys.argv[2])
    print("ready", flush=True)
    events = watch.wait(20)
    arrived = time.time_ns()
    print(json.dumps({"arrived_ns": arrived, "events": [
        {"minor": e.minor, "kind": e.kind, "xid": e.xid} for e in events]}), flush=True)
    sys.stdin.readline()  # the test injects --lost, then asks
    print(watch.liveness(sys.argv[2]).state, flush=True)
    sys.stdin.readline()  # then --recover
    print(watch.liveness(sys.argv[2]).state, flush=True)
"""


def gpu_dra(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "driver.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)


def test_a_waiting_process_gets_the_injected_xid(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    with subprocess.Popen([sys.executable, "-c", WAITER, str(state), GPU3], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as waiter:
        assert waiter.stdin is not None and waiter.stdout is not None
        try:
            assert waiter.stdout.readline() == "ready\n"
            begin = time.monotonic()
            injected = gpu_dra("mock", "inject", "--mock-state", str(state), "--gpu", "3",
                               "--xid", "79")
            assert (injected.returncode, injected.stderr) == (0, "")
            recorded_ns = state.stat().st_mtime_ns
            seen = json.loads(waiter.stdout.readline())
            assert time.monotonic() - begin < ARRIVAL_BOUND_S
            assert seen["events"] == [{"minor": 3, "kind": "xid", "xid": 79}]
            print(f"inject-to-event: {(seen['arrived_ns'] - recorded_ns) / 1e6:.1f} ms after "
                  f"the file was written, {(time.monotonic() - begin) * 1000:.0f} ms after "
                  "`gpu-dra mock inject` started")

            assert gpu_dra("mock", "inject", "--mock-state", str(state), "--gpu", "3",
                           "--lost").returncode == 0
            waiter.stdin.write("\n")
            waiter.stdin.flush()
            assert waiter.stdout.readline() == "lost\n"
            assert gpu_dra("mock", "inject", "--mock-state", str(state), "--gpu", "3",
                           "--recover").returncode == 0
            waiter.stdin.write("\n")
            waiter.stdin.flush()
            assert waiter.stdout.readline() == "answers\n"
            assert waiter.wait(timeout=30) == 0
        finally:
            waiter.kill()
