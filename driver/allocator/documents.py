"""Kubernetes objects from YAML/JSON files, as `kubectl get -o yaml` or the API writes them:
one or many documents per file, typed lists unrolled, or a directory of such files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from driver.allocator.input import InputError
from driver.safeload import LoadError, read_text, yaml_documents


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every YAML/JSON document of a file, or of a directory's *.yaml/*.yml/*.json files."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    elif path.exists():
        files = [path]
    else:
        raise InputError(f"{path}: no such file or directory")
    documents: list[dict[str, Any]] = []
    for file in files:
        try:
            loaded: Iterable[Any] = yaml_documents(read_text(file), str(file))
        except LoadError as err:
            raise InputError(str(err)) from None
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise InputError(f"{file}: a document is not a mapping")
            kind = str(doc.get("kind", ""))
            if kind.endswith("List") or ("items" in doc and not kind):
                documents += [with_kind(d, kind.removesuffix("List"), doc.get("apiVersion"))
                              for d in doc.get("items") or [] if isinstance(d, dict)]
            else:
                documents.append(doc)
    return documents


def with_kind(item: dict[str, Any], kind: str, api_version: Any) -> dict[str, Any]:
    """An item of a typed list (the API's `ResourceSliceList`) carries no kind of its own;
    `kubectl get -o yaml` adds it, a raw API list does not."""
    if "kind" in item or not kind:
        return item
    return {"apiVersion": api_version, "kind": kind, **item}
