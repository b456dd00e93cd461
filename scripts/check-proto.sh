#!/usr/bin/env bash
# CI gate: regenerates driver/_proto into a temp dir and fails if the committed code differs.
# Catches edited .proto files without regeneration, hand edits of generated code, and
# generator drift (gen-proto.sh itself refuses unpinned grpcio-tools/mypy-protobuf).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$root/scripts/gen-proto.sh" "$tmp/_proto"
if ! diff -r -x __pycache__ "$tmp/_proto" "$root/driver/_proto"; then
  echo "check-proto: driver/_proto is stale; run scripts/gen-proto.sh and commit the result" >&2
  exit 1
fi
echo "check-proto: driver/_proto matches proto/"
