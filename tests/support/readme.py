"""README.md's sections and code blocks, for tests that run what the README shows."""

from __future__ import annotations

import re
import shlex
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

README = Path(__file__).resolve().parents[2] / "README.md"


def section(heading: str) -> str:
    """The text under `heading` (a whole line, e.g. `### Migrating`) up to the next
    heading of the same or a higher level."""
    text = README.read_text()
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + 1
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text, re.M)
            if m.start() > start]
    return text[start:min(ends, default=len(text))]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def yaml_objects(text: str) -> list[dict[str, Any]]:
    return [doc for block in blocks(text, "yaml") for doc in yaml.safe_load_all(block) if doc]


def commands(text: str) -> list[list[str]]:
    """The sh blocks' commands as argv lists (continuation lines joined, comments dropped)."""
    lines = "\n".join(blocks(text, "sh")).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def helm_values(argv: list[str]) -> dict[str, Any]:
    """A `helm install ... --set a.b=c` command's values as a nested mapping."""
    values: dict[str, Any] = {}
    for flag, setting in pairwise(argv):
        if flag == "--set":
            path, value = setting.split("=", 1)
            *parents, leaf = path.split(".")
            node = values
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
    return values
