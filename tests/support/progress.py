"""Progress lines past pytest's capture, for fixtures that build for minutes."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def sayer(config: pytest.Config) -> Callable[[str], None]:
    """A function printing one line on the terminal now, captured output or not: a build
    that takes minutes must show it is alive."""
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def say(line: str) -> None:
        if capman is None or reporter is None:
            print(line, flush=True)
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(line)

    return say
