#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf Python code in driver/_proto from proto/.
#
# Usage: scripts/gen-proto.sh [OUT_DIR]   (default: driver/_proto, which is replaced)
# Interpreter: $PYTHON, else .venv/bin/python, else python. Its grpcio-tools and
# mypy-protobuf must match the pins in pyproject.toml, so the output is reproducible.
#
# Why the rewrite step: every upstream kubelet API file is called api.proto, so they are
# compiled under their upstream import paths (proto/k8s.io/kubelet/pkg/apis/...) to give
# each one a distinct, upstream-identical descriptor file name; Python's descriptor pool
# refuses two files with the same name. protoc then derives the Python module from that
# path (k8s.io.kubelet.pkg.apis.dra.v1.api_pb2), which is not importable, so the generated
# files are moved to driver/_proto/<pkg>/ and their self-references (import lines, aliases,
# the module name given to the builder) are rewritten. Descriptor contents stay untouched.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default_out=$root/driver/_proto
out=${1:-$default_out}
[[ $out == /* ]] || out=$PWD/$out

if [[ -n ${PYTHON:-} ]]; then
  python=$PYTHON
elif [[ -x $root/.venv/bin/python ]]; then
  python=$root/.venv/bin/python
else
  python=python
fi

if [[ $out != "$default_out" && -d $out && -n $(ls -A "$out") ]]; then
  echo "gen-proto: $out exists and is not empty" >&2
  exit 2
fi

# The protoc-gen-mypy plugins are console scripts installed next to the interpreter.
PATH="$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cd "$root/proto"
protos=()
while IFS= read -r f; do protos+=("$f"); done < <(find k8s.io -name '*.proto' | LC_ALL=C sort)
mkdir "$work/gen"
# mypy-protobuf reports every file it writes; show protoc's output only when it fails.
if ! "$python" -m grpc_tools.protoc -I. \
  --python_out="$work/gen" --grpc_python_out="$work/gen" \
  --mypy_out="$work/gen" --mypy_grpc_out="$work/gen" \
  "${protos[@]}" >"$work/protoc.log" 2>&1; then
  cat "$work/protoc.log" >&2
  exit 1
fi

"$python" - "$root" "$work/gen" "$work/out" "${protos[@]}" <<'PY'
"""Checks tool pins, then moves generated modules under driver._proto and fixes self-imports."""
import pathlib
import sys
import tomllib
from importlib import metadata

root, gen, out = (pathlib.Path(p) for p in sys.argv[1:4])
protos = sys.argv[4:]

# Output is only reproducible with the pinned generators.
pins = {}
for req in tomllib.loads((root / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]["test"]:
    name, _, version = req.partition("==")
    pins[name] = version
for tool in ("grpcio-tools", "mypy-protobuf"):
    have = metadata.version(tool)
    if have != pins[tool]:
        sys.exit(f"gen-proto: {tool} {have} installed, pyproject.toml pins {pins[tool]}")

# Upstream import directory (below k8s.io/kubelet/pkg/apis/) -> Python package in driver._proto.
packages = {
    "pluginregistration/v1": "pluginregistration_v1",
    "dra/v1": "dra_v1",
    "dra/v1beta1": "dra_v1beta1",
    "dra-health/v1alpha1": "drahealth_v1alpha1",
    "dra-health/v1": "drahealth_v1",
}
prefix = "k8s.io/kubelet/pkg/apis/"
expected = sorted(f"{prefix}{d}/api.proto" for d in packages)
if sorted(protos) != expected:
    sys.exit(f"gen-proto: proto files {protos} do not match the package table {expected}")


def alias(module: str) -> str:
    """The local name grpc_tools gives an imported _pb2 module."""
    return module.replace("_", "__").replace(".", "_dot_")


out.mkdir()
(out / "__init__.py").write_text("")
for upstream_dir, package in packages.items():
    # protoc's module path: the import path with '-' -> '_' (and '/' -> '.').
    old_path = f"{prefix}{upstream_dir}".replace("-", "_")
    old_mod = old_path.replace("/", ".")
    new_path = f"driver/_proto/{package}"
    new_mod = new_path.replace("/", ".")
    replacements = [
        (alias(f"{old_mod}.api_pb2"), alias(f"{new_mod}.api_pb2")),
        (f"from {old_mod} import api_pb2", f"from {new_mod} import api_pb2"),
        (f"'{old_mod}.api_pb2'", f"'{new_mod}.api_pb2'"),
        (f"{old_path}/api_pb2", f"{new_path}/api_pb2"),
    ]
    src = gen / old_path.replace(".", "/")
    dst = out / package
    dst.mkdir()
    (dst / "__init__.py").write_text("")
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi"):
        text = (src / name).read_text()
        for old, new in replacements:
            text = text.replace(old, new)
        if old_mod + ".api_pb2" in text or f"from {old_mod} " in text:
            sys.exit(f"gen-proto: unrewritten module reference left in {package}/{name}")
        (dst / name).write_text(text)
        (src / name).unlink()

leftover = [str(p.relative_to(gen)) for p in gen.rglob("*") if p.is_file()]
if leftover:
    sys.exit(f"gen-proto: generated files not mapped to a package: {leftover}")
PY

chmod -R u=rwX,go=rX "$work/out"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/out" "$out"
