"""README.md's table of `gpu-dra plugin` flags is the parser's: every flag is listed, and
each environment variable it names really sets that flag."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from driver.cli.flags import gpu_list, seconds, seconds_or_off, xids
from driver.cli.main import build_parser
from driver.inventory.exclude import parse_exclusion

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_rows() -> list[tuple[list[str], str]]:
    """(flag spellings, environment variable) of each row of the plugin's flag table."""
    text = README.read_text()
    section = text[text.index("## Running the plugin"):text.index("## Install on a cluster")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`-"):
            flags = re.findall(r"`(-[-\w]+)`", cells[0])
            env = re.findall(r"`([A-Z_]+)(?:=\w+)?`", cells[1])
            rows.append((flags, env[0] if env else ""))
    return rows


def plugin_parser() -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices["plugin"]


def test_every_plugin_flag_is_in_the_readme_and_nothing_else() -> None:
    parser_flags = {s for a in plugin_parser()._actions for s in a.option_strings
                    if s not in ("-h", "--help")}
    readme_flags = {f for flags, _ in readme_rows() for f in flags}
    assert readme_flags == parser_flags


@pytest.mark.parametrize("flags, env", readme_rows())
def test_the_environment_variable_sets_the_flag(flags: list[str], env: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert env, f"{flags[0]}: no environment variable in the README"
    action = next(a for a in plugin_parser()._actions if flags[0] in a.option_strings)
    if action.nargs == 0 and action.const is True:  # an on/off switch
        value, expected = "true", True
    elif action.choices:
        value = next(c for c in action.choices if c != action.default)
        expected = value
    elif action.type in (int, seconds, seconds_or_off) or action.dest == "verbosity":
        value, expected = "3", 3
    elif action.type is xids:
        value, expected = "3", frozenset({3})
    elif action.type is gpu_list:
        value, expected = "3", parse_exclusion("3")
    else:
        value = "/tmp/from-env"
        expected = Path(value) if action.type is Path else value
    monkeypatch.setenv(env, value)
    args = build_parser().parse_args(["plugin"])
    got = getattr(args, action.dest)
    assert (int(got) if expected == 3 else got) == expected
