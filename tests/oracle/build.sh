#!/usr/bin/env bash
# Build the upstream allocator oracle (k8s.io/dynamic-resource-allocation v0.37.2, the
# allocator kube-scheduler v1.37.2 runs) and print the binary's path on the last line.
#
# The binary is cached outside the clone, keyed by a hash of the sources and go.sum:
# ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/oracle-<hash>/oracle. A second run returns at once.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# CACHE_ROOT, log and the Go environment.
GO_BUILD_LOG_PREFIX="oracle:"
# shellcheck source=../../scripts/lib/go-build.sh
source "${HERE}/../../scripts/lib/go-build.sh"

HASH="$(cat "${HERE}/go.mod" "${HERE}/go.sum" "${HERE}/main.go" | sha256sum | cut -c1-16)"
DEST="${CACHE_ROOT}/oracle-${HASH}"
if [[ -x "${DEST}/oracle" ]]; then
  echo "${DEST}/oracle"
  exit 0
fi
go_build_require_go "install Go >= 1.26"
export GOFLAGS="${GO_BUILD_GOFLAGS} -mod=readonly"
mkdir -p "${DEST}"
cd "${HERE}"
go build -trimpath -o "${DEST}/oracle.tmp" .
mv "${DEST}/oracle.tmp" "${DEST}/oracle"
echo "${DEST}/oracle"
