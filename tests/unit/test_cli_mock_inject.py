"""`gpu-dra mock inject`: the command line that checks outside the project use to break and
heal the GPUs of a running `gpu-dra plugin --mock ... --mock-state FILE`."""

from __future__ import annotations

import json
from pathlib import Path

import pynvml
import pytest

from driver.cli.main import main
from driver.nvml.events import EventKind, HealthWatch, Liveness, NvmlEvent, RecoveryAction
from driver.nvml.mock import MockNvml, load_profile

GPU3 = "GPU-68a37c14-cba3-5893-8527-70e1ada18b19"  # dgx-h100, minor 3


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state.json"
    MockNvml(load_profile("dgx-h100"), path)  # what `gpu-dra plugin --mock dgx-h100` makes
    return path


def inject(state: Path, *fault: str, gpu: str = "3") -> int:
    return main(["mock", "inject", "--mock-state", str(state), "--gpu", gpu, *fault])


def test_every_fault_is_recorded_and_seen_by_the_running_mock(
        state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    running = MockNvml(load_profile("dgx-h100"), state)
    with HealthWatch(running) as watch:
        watch.register(GPU3)
        assert inject(state, "--xid", "79") == 0
        assert capsys.readouterr().out == f"gpu-3 ({GPU3}): XID 79 recorded\n"
        assert inject(state, "--ecc-dbe") == 0
        assert watch.wait(1) == [NvmlEvent(3, GPU3, EventKind.XID, xid=79),
                                 NvmlEvent(3, GPU3, EventKind.DOUBLE_BIT_ECC)]
        assert watch.recovery_action(GPU3) == RecoveryAction.NODE_REBOOT
        assert inject(state, "--lost") == 0
        assert watch.liveness(GPU3).state is Liveness.LOST
        assert inject(state, "--recover") == 0
        assert watch.liveness(GPU3).state is Liveness.OK
        assert watch.recovery_action(GPU3) == RecoveryAction.NONE
        assert inject(state, "--remove") == 0
        running.nvmlInit()
        assert running.nvmlDeviceGetCount() == 7
        assert inject(state, "--add") == 0
        assert running.nvmlDeviceGetCount() == 8 and watch.liveness(GPU3).state is Liveness.OK
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("args", "problem"), [
    (["--gpu", "9", "--lost"], "machine: no GPU with minor 9 (minors: 0, 1, 2, 3, 4, 5, 6, 7)"),
    (["--gpu", "-1", "--lost"], "argument --gpu: expected a GPU minor number, got '-1'"),
    (["--gpu", "3"], "one of the arguments --xid --ecc-dbe --lost --recover --remove --add "
                     "is required"),
    (["--gpu", "3", "--lost", "--remove"], "argument --remove: not allowed with argument --lost"),
    (["--gpu", "3", "--xid", "79", "--xid", "48"], "argument --xid: give one fault only"),
    (["--gpu", "3", "--xid", "0"], "argument --xid: expected a positive integer, got '0'"),
    (["--gpu", "3", "--xid", "-5"], "argument --xid: expected a positive integer, got '-5'"),
    (["--gpu", "3", "--xid", "x"], "argument --xid: expected a positive integer, got 'x'"),
    (["--lost"], "the following arguments are required: --gpu"),
])
def test_a_bad_gpu_or_fault_exits_2_with_one_line(
        state: Path, capsys: pytest.CaptureFixture[str], args: list[str], problem: str) -> None:
    before = state.read_text()
    code = _run(["mock", "inject", "--mock-state", str(state), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("gpu-dra mock inject: ")
    assert problem in err
    assert state.read_text() == before


@pytest.mark.parametrize(("content", "problem"), [
    (None, "no such mock state file"),
    ("{", "line 1: not JSON"),
    ('{"version": 1, "gpus": {}}', "machine: not recorded"),
    ('{"version": 9, "gpus": {}}', "version"),
])
def test_a_bad_or_missing_file_exits_2_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 content: str | None, problem: str) -> None:
    path = tmp_path / "state.json"
    if content is not None:
        path.write_text(content)
    assert inject(path, "--lost") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpu-dra mock inject: {path}: ") and err.count("\n") == 1
    assert problem in err


def test_the_fault_outlives_the_plugin(state: Path) -> None:
    assert inject(state, "--lost") == 0
    restarted = MockNvml(load_profile("dgx-h100"), state)
    restarted.nvmlInit()
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        restarted.nvmlDeviceGetHandleByIndex(3)
    assert json.loads(state.read_text())["health"]["gpus"][GPU3]["lost"] is True


def _run(argv: list[str]) -> int:
    """main(argv), with argparse's exit turned into its code."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
