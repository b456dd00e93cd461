"""Every file a CLI command reads, made badly on purpose (a device, a FIFO, binary data,
an alias bomb, deep nesting, YAML tags that are not JSON data): exit code 2 and one line
naming the file, never a traceback or a stall."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from driver.cli.main import main
from driver.demo.local import EXAMPLE_CLAIMS
from driver.safeload import MAX_DEPTH
from tests.support.inputs import alias_bomb

GOOD_CLAIM = EXAMPLE_CLAIMS / "1-whole-gpu.yaml"

BAD: dict[str, Callable[[Path], Path]] = {
    "dev-zero": lambda d: Path("/dev/zero"),
    "fifo": lambda d: (os.mkfifo(d / "fifo.yaml"), d / "fifo.yaml")[1],
    "binary": lambda d: (d / "bin.yaml", (d / "bin.yaml").write_bytes(b"a: \xff\xfe\n"))[0],
    "alias-bomb": lambda d: (d / "bomb.yaml", (d / "bomb.yaml").write_text(alias_bomb(8)))[0],
    "deep": lambda d: (d / "deep.yaml",
                       (d / "deep.yaml").write_text("[" * (MAX_DEPTH + 10) + "]" *
                                                    (MAX_DEPTH + 10)))[0],
    "binary-tag": lambda d: (d / "tag.yaml", (d / "tag.yaml").write_text(
        "apiVersion: resource.k8s.io/v1\nkind: ResourceClaim\nmetadata: !!binary aGk=\n"))[0],
    "set-tag": lambda d: (d / "set.yaml", (d / "set.yaml").write_text("kind: !!set {a}\n"))[0],
}

COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "allocate --claims": lambda f: ["allocate", "--mock", "l4-8x", "--claims", str(f)],
    "allocate --slices": lambda f: ["allocate", "--slices", str(f), "--claims", str(GOOD_CLAIM)],
    "explain --classes": lambda f: ["explain", "--mock", "l4-8x", "--claims", str(GOOD_CLAIM),
                                    "--classes", str(f)],
    "allocate --allocated": lambda f: ["allocate", "--mock", "l4-8x", "--claims",
                                       str(GOOD_CLAIM), "--allocated", str(f)],
    "discover --mock": lambda f: ["discover", "--mock", str(f)],
    "demo --claims": lambda f: ["demo", "--claims", str(f)],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("bad", BAD)
def test_a_bad_input_file_exits_2_in_one_line(
    command: str, bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = BAD[bad](tmp_path)
    code = main(COMMANDS[command](path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err or path.name in err, err
