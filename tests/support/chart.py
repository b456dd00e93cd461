"""The Helm chart under test: render it with the pinned helm, and create or delete what
it renders on the e2e API server (no Helm release, no cluster-side Helm state)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from driver.kube.api import api_request

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "gpu-dra-driver"
HELM_BUILD = REPO / "deploy" / "helm" / "build-helm.sh"
KUBE_VERSION = "1.37.0"


class HelmFailed(AssertionError):
    """helm exited non-zero; the message is its stderr."""


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(self, *args: str) -> str:
        result = subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                                check=False, timeout=120)
        if result.returncode != 0:
            raise HelmFailed(result.stderr.strip() or result.stdout.strip())
        return result.stdout

    def template(self, release: str, namespace: str,
                 values: Mapping[str, Any] | None = None,
                 kube_version: str = KUBE_VERSION) -> list[dict[str, Any]]:
        """``helm template`` of the chart: the objects it renders, in Helm's order."""
        args = ["template", release, str(CHART), "--namespace", namespace,
                "--kube-version", kube_version]
        for key, value in (values or {}).items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        return [d for d in yaml.safe_load_all(self.run(*args)) if d]


def only(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = only(objects, kind)
    return found


def collection_path(obj: Mapping[str, Any]) -> str:
    """The REST collection of a built-in object, e.g. /apis/apps/v1/namespaces/x/daemonsets."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    namespace = obj["metadata"].get("namespace")
    if namespace:
        prefix += f"/namespaces/{namespace}"
    lower = kind.lower()
    plural = (lower[:-1] + "ies" if lower.endswith("y")
              else lower + "es" if lower.endswith("s") else lower + "s")
    return f"{prefix}/{plural}"


def object_path(obj: Mapping[str, Any]) -> str:
    return f"{collection_path(obj)}/{obj['metadata']['name']}"


@contextmanager
def created(api: Any, objects: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Create every object with strict field validation (an unknown or duplicate field
    is an error, not a warning); yield what the server stored; delete them afterwards."""
    stored: list[dict[str, Any]] = []
    try:
        for obj in objects:
            result = api_request(api, "POST", collection_path(obj), obj,
                                 query={"fieldValidation": "Strict"})
            assert result.status == 201, (
                f"{obj['kind']} {obj['metadata']['name']}: HTTP {result.status}: "
                f"{result.body.get('message') if isinstance(result.body, dict) else result.body}")
            stored.append(result.body)
        yield stored
    finally:
        for obj in reversed(stored):
            api_request(api, "DELETE", object_path(obj)).expect(200, 202, 404)
