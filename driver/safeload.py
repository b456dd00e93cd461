"""YAML and JSON from outside the driver (claims, slices, classes, profiles, mock state,
the checkpoint), bounded so that no input can stall or exhaust the process.

A document is refused, with one line naming the file and the problem, when the file is
not a regular file (a FIFO or /dev/zero would block or never end), is larger than
`MAX_BYTES`, is not UTF-8, nests deeper than `MAX_DEPTH`, or expands (aliases counted
each time they are used) to more than `MAX_NODES` values: a 1 KB YAML alias bomb would
otherwise become billions of values once anything walks it. YAML is read as Kubernetes
reads it (sigs.k8s.io/yaml): JSON data only, timestamps stay strings, and tags that make
other types (`!!binary`, `!!set`, `!!omap`, `!!pairs`) are refused.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from driver.errors import DriverError

MAX_BYTES = 16 << 20
MAX_DEPTH = 100
MAX_NODES = 1_000_000


class LoadError(DriverError, ValueError):
    """A document the driver refuses to read: `where` names the file, `at` the line when
    known, `problem` what is wrong."""

    reason = "invalid_input"

    def __init__(self, where: str, problem: str, at: str = "") -> None:
        super().__init__(f"{where}: {at + ': ' if at else ''}{problem}")
        self.where, self.problem, self.at = where, problem, at


def read_text(path: Path, limit: int = MAX_BYTES) -> str:
    """A regular file's text, opened without blocking, at most `limit` bytes, UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise LoadError(str(path), err.strerror or str(err)) from err  # the cause: its errno
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LoadError(str(path), "not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LoadError(str(path), f"larger than {limit} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise LoadError(str(path), f"not UTF-8 text (byte {err.start})") from None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A safe loader (libyaml when built) that makes JSON data only."""


def _timestamp_as_text(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    return str(loader.construct_scalar(node))


def _refuse(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(
        None, None, f"{node.tag} is not JSON data", node.start_mark)


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)
for _tag in ("binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse)


class _UniqueKeyLoader(_Loader):
    """Also refuses a key given twice in one mapping (for files people write by hand)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping


def _check_graph(root: yaml.Node, where: str) -> None:
    """Depth and expanded size of a composed document; aliases are shared nodes, so the
    size is counted over the graph with each node's subtree size computed once."""
    sizes: dict[int, int] = {}

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise LoadError(where, f"nested deeper than {MAX_DEPTH} levels")
        if done:
            sizes[id(node)] = min(MAX_NODES + 1,
                                  1 + sum(sizes[id(c)] for c in children(node)))
            continue
        if id(node) in sizes:
            continue
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children(node) if id(c) not in sizes)
    if sizes[id(root)] > MAX_NODES:
        raise LoadError(where, f"expands to more than {MAX_NODES} values (YAML aliases)")


def yaml_documents(text: str, where: str, unique_keys: bool = False) -> list[Any]:
    """Every document of a YAML stream, each checked before it is built."""
    loader = (_UniqueKeyLoader if unique_keys else _Loader)(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            _check_graph(node, where)
            documents.append(loader.construct_document(node))
        return documents
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LoadError(where, f"not YAML: {err.problem or err.context}", at) from None
    except yaml.YAMLError as err:
        raise LoadError(where, f"not YAML: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise LoadError(where, f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def yaml_document(text: str, where: str, unique_keys: bool = False) -> Any:
    """The one document of a YAML text (None when empty)."""
    documents = yaml_documents(text, where, unique_keys)
    if len(documents) > 1:
        raise LoadError(where, f"{len(documents)} YAML documents, expected one")
    return documents[0] if documents else None


def json_document(text: str | bytes, where: str) -> Any:
    """A JSON document, no deeper than `MAX_DEPTH`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LoadError(where, f"not JSON: {err.msg}", f"line {err.lineno}") from None
    except RecursionError:
        raise LoadError(where, f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise LoadError(where, "not UTF-8 text") from None
    if _deeper_than(data, MAX_DEPTH):
        raise LoadError(where, f"nested deeper than {MAX_DEPTH} levels")
    return data


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether a value lies more than `limit` levels down (the document is level 1): walked
    a level at a time, each level's values gathered by list.extend (a stack of (value,
    depth) pairs fed by a generator took 5x as long, most of a claim's JSON decode)."""
    level = [data]
    for _ in range(limit):
        below: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                below.extend(value.values())
            elif isinstance(value, list):
                below.extend(value)
        if not below:
            return False
        level = below
    return True
