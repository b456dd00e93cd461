"""Documents from outside are bounded: no file, however made, stalls or exhausts the
driver, and each refusal is one line naming the file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from driver.safeload import (
    MAX_DEPTH,
    MAX_NODES,
    LoadError,
    json_document,
    read_text,
    yaml_document,
    yaml_documents,
)
from tests.support.inputs import alias_bomb


def test_an_alias_bomb_is_refused_before_it_is_built() -> None:
    text = alias_bomb(9)  # 10^9 values
    assert len(text) < 1024
    with pytest.raises(LoadError, match=rf"^bomb.yaml: expands to more than {MAX_NODES} values"):
        yaml_documents(text, "bomb.yaml")


def test_aliases_within_the_bound_are_read() -> None:
    doc = yaml_document(alias_bomb(3), "small.yaml")
    assert len(doc["l2"]) == 10 and doc["l2"][0][0] == ["x"] * 10


@pytest.mark.parametrize("text", [
    "a:\n" + "".join(f"{'  ' * i}b{i}:\n" for i in range(1, MAX_DEPTH + 5)) + "  " * 200 + "x",
    "[" * 5000 + "]" * 5000,
    "{a: " * 150 + "1" + "}" * 150,
])
def test_deep_yaml_is_one_error(text: str) -> None:
    with pytest.raises(LoadError, match=r"^deep.yaml: ") as err:
        yaml_documents(text, "deep.yaml")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000,
                                  '{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)])
def test_deep_json_is_one_error(text: str) -> None:
    with pytest.raises(LoadError, match=rf"^state.json: nested deeper than {MAX_DEPTH} levels$"):
        json_document(text, "state.json")


@pytest.mark.parametrize(("text", "refused"), [
    ('{"a": ' * (MAX_DEPTH - 1) + "1" + "}" * (MAX_DEPTH - 1), False),
    ('{"a": ' * MAX_DEPTH + "1" + "}" * MAX_DEPTH, True),
    ("[" * MAX_DEPTH + "]" * MAX_DEPTH, False),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), True),
    ('[{"a": [], "b": ' + "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2) + "}, 2]", False),
    ('[1, {"a": [], "b": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}]", True),
])
def test_json_depth_limit_counts_every_value(text: str, refused: bool) -> None:
    """The document is level 1; a scalar or an empty container at MAX_DEPTH is allowed."""
    if refused:
        with pytest.raises(LoadError, match="nested deeper than"):
            json_document(text, "state.json")
    else:
        assert json_document(text, "state.json") is not None


@pytest.mark.parametrize("tag", ["!!binary aGVsbG8=", "!!set {a, b}", "!!omap [{a: 1}]",
                                 "!!pairs [{a: 1}]"])
def test_tags_that_make_other_than_json_data_are_refused(tag: str) -> None:
    with pytest.raises(LoadError, match=r"^c.yaml: line 1, column 4: not YAML: .* is not "
                                        r"JSON data$"):
        yaml_document(f"x: {tag}\n", "c.yaml")


def test_timestamps_stay_strings_as_kubernetes_reads_them() -> None:
    assert yaml_document("created: 2026-12-06T10:00:00Z\nday: 2026-12-06\n", "t.yaml") == {
        "created": "2026-12-06T10:00:00Z", "day": "2026-12-06"}


def test_duplicate_keys_are_refused_only_when_asked() -> None:
    assert yaml_document("a: 1\na: 2\n", "d.yaml") == {"a": 2}
    with pytest.raises(LoadError, match=r"^d.yaml: line 2, column 1: not YAML: duplicate key 'a'"):
        yaml_document("a: 1\na: 2\n", "d.yaml", unique_keys=True)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "claim.yaml"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def read() -> None:
        try:
            read_text(fifo)
        except LoadError as err:
            result.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert [str(e) for e in result] == [f"{fifo}: not a regular file"]


@pytest.mark.parametrize(("make", "problem"), [
    (lambda p: Path("/dev/zero"), "not a regular file"),
    (lambda p: p / "missing.yaml", "No such file or directory"),
    (lambda p: p.mkdir() or p, "not a regular file"),
])
def test_what_is_not_a_readable_regular_file(tmp_path: Path, make, problem: str) -> None:
    path = make(tmp_path / "x")
    with pytest.raises(LoadError, match=rf"^{path}: {problem}$"):
        read_text(path)


def test_binary_and_oversized_files(tmp_path: Path) -> None:
    binary = tmp_path / "profile.yaml"
    binary.write_bytes(b"gpus:\n\xff\xfe\x00")
    with pytest.raises(LoadError, match=r"profile.yaml: not UTF-8 text \(byte 6\)$"):
        read_text(binary)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * 2048)
    with pytest.raises(LoadError, match=r"big.yaml: larger than 1024 bytes$"):
        read_text(big, limit=1024)
    assert read_text(big, limit=2048) == "#" * 2048
