#!/usr/bin/env bash
# Download, here, the pinned runtime dependencies as CPython 3.12 manylinux wheels into
# build/device-wheels, for a GPU machine that has no package index (the `device` tool:
# carry build/device-wheels). scripts/device-check.sh installs them there. cryptography:
# tests/support/plugin.py imports driver.devcluster (the devcluster extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
deps=$("$PY" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = ("pytest", "jsonschema", "referencing", "setuptools", "Cython", "mypy", "cryptography")
print(" ".join(project["dependencies"] + [d for d in project["optional-dependencies"]["test"]
                                         if d.split("==")[0] in wanted]))
PY
)
# $deps unquoted on purpose: one argument per requirement (pins like grpcio==1.85.3, no globs)
# shellcheck disable=SC2086
"$PY" -m pip download -q -d build/device-wheels --only-binary=:all: --implementation cp \
    --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 $deps
du -sh build/device-wheels
