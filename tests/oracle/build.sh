#!/usr/bin/env bash
# Build the upstream allocator oracle (k8s.io/dynamic-resource-allocation v0.37.2, the
# allocator kube-scheduler v1.37.2 runs) and print the binary's path on the last line.
#
# The binary is cached outside the clone, keyed by a hash of the sources and go.sum:
# ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/oracle-<hash>/oracle. A second run returns at once.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HASH="$(cat "${HERE}/go.mod" "${HERE}/go.sum" "${HERE}/main.go" | sha256sum | cut -c1-16)"
DEST="${GPU_DRA_CACHE:-${HOME}/.cache/gpu-dra}/oracle-${HASH}"
if [[ -x "${DEST}/oracle" ]]; then
  echo "${DEST}/oracle"
  exit 0
fi
command -v go >/dev/null || { echo "oracle: Go is not on PATH" >&2; exit 3; }
mkdir -p "${DEST}"
cd "${HERE}"
CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly" GOTOOLCHAIN="${GOTOOLCHAIN:-local}" \
  go build -trimpath -o "${DEST}/oracle.tmp" .
mv "${DEST}/oracle.tmp" "${DEST}/oracle"
echo "${DEST}/oracle"
