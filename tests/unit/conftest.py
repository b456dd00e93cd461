"""Fixtures shared by the unit tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver.nvml.profile import PROFILES_DIR

Edit = Callable[[dict[str, Any]], object]


@pytest.fixture
def edited_profile(tmp_path: Path) -> Callable[..., Path]:
    """Write a shipped profile, changed by `edit`, to `tmp_path/<file>` and return that path."""

    def make(name: str, edit: Edit, file: str = "edited.yaml") -> Path:
        data = yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())
        data = json.loads(json.dumps(data))  # YAML aliases share objects: unshare them
        edit(data)
        path = tmp_path / file
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make
