"""Every flag's environment variable is checked like the flag, in every command that has it:
a bad value exits 2 with one line naming the variable and what it accepts; a good one sets
the flag; the flag on the command line wins."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from driver.cli.flags import EnvParser, gpu_list, seconds, seconds_or_off, xids
from driver.cli.main import build_parser
from driver.inventory.exclude import Exclusion


def commands() -> dict[str, EnvParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def env_flags() -> list[tuple[str, str, argparse.Action]]:
    """(command, variable, action) for every env-backed flag of every command."""
    rows = []
    for name, parser in commands().items():
        actions = {a.dest: a for a in parser._actions}
        for dest, setting in parser.env_settings.items():
            rows.append((name, setting.variable, actions[dest]))
    return rows


def bad_value(action: argparse.Action) -> str | None:
    """A value the flag refuses, or None if it takes any string (a name, a path)."""
    if action.nargs == 0 or action.choices is not None:
        return "Bogus"
    if action.type is int:
        return "eight"
    if action.type in (seconds, seconds_or_off, xids):
        return "-1"
    if action.type is gpu_list:
        return "3,gpu3"
    return None


def accepted(action: argparse.Action) -> list[str]:
    """How the error line must describe what the variable accepts."""
    if action.nargs == 0:
        return ["true", "false"]
    if action.choices is not None:
        return [str(c) for c in action.choices]
    if action.type is seconds:
        return ["seconds above 0"]
    if action.type is seconds_or_off:
        return ["seconds, 0 or more"]
    if action.type is xids:
        return ["comma-separated XIDs"]
    if action.type is gpu_list:
        return ["GPU minors or UUIDs", "'gpu3'"]
    return ["integer"]


def test_the_commands_read_their_variables() -> None:
    variables = {(command, variable) for command, variable, _ in env_flags()}
    assert {("plugin", "MIG_MODE"), ("plugin", "COUNTER_LAYOUT"), ("plugin", "CLEANUP_ON_EXIT"),
            ("slices", "MIG_MODE"), ("discover", "MOCK_PROFILE"), ("allocate", "MIG_MODE"),
            ("explain", "COUNTER_LAYOUT")} <= variables
    assert len(variables) == len(env_flags())


@pytest.mark.parametrize(("command", "variable", "action"),
                         [r for r in env_flags() if bad_value(r[2]) is not None],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_value_exits_2_naming_the_variable(
    command: str, variable: str, action: argparse.Action, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    value = bad_value(action)
    assert value is not None
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([command])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"gpu-dra {command}: environment variable {variable}={value!r}")
    assert all(word in err for word in accepted(action)), err


@pytest.mark.parametrize(("command", "variable", "action"), env_flags(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_good_value_sets_the_flag_and_the_flag_wins(
    command: str, variable: str, action: argparse.Action, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if action.nargs == 0:
        value, expected, flag = "yes", True, None
    elif action.choices is not None:
        choices = list(action.choices)
        value, expected, flag = choices[-1], choices[-1], choices[0]
    elif action.type is int:
        value, expected, flag = "7", 7, "9"
    elif action.type in (seconds, seconds_or_off):
        value, expected, flag = "2.5", 2.5, "9.0"
    elif action.type is xids:
        value, expected, flag = "13, 43", frozenset({13, 43}), "79"
    elif action.type is gpu_list:
        value, expected, flag = "3, 5", Exclusion(frozenset({3, 5})), "7"
    else:
        value, flag = "/from/env", "/from/flag"
        expected = Path(value) if action.type is Path else value
    monkeypatch.setenv(variable, value)
    assert getattr(build_parser().parse_args([command]), action.dest) == expected
    if flag is not None:
        got = getattr(build_parser().parse_args([command, action.option_strings[-1], flag]),
                      action.dest)
        assert got == action.type(flag) if action.type in (xids, gpu_list) \
            else str(got) == flag


@pytest.mark.parametrize("command", ["plugin", "slices"])
def test_an_empty_variable_is_unset(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIG_MODE", "")
    monkeypatch.setenv("HEALTH_PORT", "")
    args = build_parser().parse_args([command])
    assert args.mig_mode == "static"
    if command == "plugin":
        assert args.health_port == 51515
        assert args.counter_layout == "auto"  # the plugin picks by the API server's version
    else:
        assert args.counter_layout == "split"


def test_a_bad_variable_of_another_command_is_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HEALTH_PORT", "eight")  # a plugin flag
    assert build_parser().parse_args(["discover"]).command == "discover"
