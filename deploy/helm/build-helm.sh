#!/usr/bin/env bash
# Build the pinned helm CLI from the Go module proxy (checksums verified against the Go
# checksum database), for the chart tests and for installing the chart without a helm
# download.
#
# Output: ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/helm-<HELM_VERSION>/helm. A second run
# with the binary present returns at once. The last line on stdout is always the binary.
#
#   build-helm.sh            build, or reuse the cache
#   build-helm.sh --force    rebuild even if the cache holds it
#   build-helm.sh --print    print the binary's path; exit 0 if it exists, 1 otherwise
set -euo pipefail

HELM_MODULE=helm.sh/helm/v4
HELM_VERSION=v4.3.1

# CACHE_ROOT, log, the Go environment, the lock and the staging folder.
GO_BUILD_LOG_PREFIX="[helm build]"
# shellcheck source=../../scripts/lib/go-build.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../scripts/lib/go-build.sh"

DEST="${CACHE_ROOT}/helm-${HELM_VERSION}"
BIN="${DEST}/helm"

complete() { [[ -x "${BIN}" ]] && "${BIN}" version --short 2>/dev/null | grep -qx "${HELM_VERSION}"; }

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  --print) echo "${BIN}"; if complete; then exit 0; fi; exit 1 ;;
  "") ;;
  *) echo "usage: $0 [--force|--print]" >&2; exit 2 ;;
esac

if [[ "${FORCE}" == 0 ]] && complete; then
  log "cached: ${BIN}"
  echo "${BIN}"
  exit 0
fi

go_build_require_go "install Go >= 1.26"
go_build_lock "helm-${HELM_VERSION}"
if [[ "${GO_BUILD_LOCKED}" == 1 && "${FORCE}" == 0 ]] && complete; then
  log "built by a concurrent run: ${BIN}"; echo "${BIN}"; exit 0
fi

START=${SECONDS}
go_build_stage "helm-${HELM_VERSION}"

# The same version stamp helm's Makefile sets for a release build.
ldflags="-s -w -X ${HELM_MODULE}/internal/version.version=${HELM_VERSION}"
ldflags+=" -X ${HELM_MODULE}/internal/version.gitTreeState=clean"
log "building ${HELM_MODULE}/cmd/helm@${HELM_VERSION} (cold: 4-9 minutes on 2 cores; with Go's caches warm: seconds)"
# GOFLAGS stays the caller's: `go install MODULE@VERSION` builds from the module cache, not
# from a VCS checkout, so GO_BUILD_GOFLAGS (-buildvcs=false) has nothing to do here.
GOBIN="${STAGE}" \
  go install -trimpath -ldflags="${ldflags}" "${HELM_MODULE}/cmd/helm@${HELM_VERSION}" >&2

mkdir -p "${DEST}"
mv -f "${STAGE}/helm" "${BIN}"
complete || { log "the built binary does not report ${HELM_VERSION}"; exit 4; }
log "done in $((SECONDS - START))s: ${BIN}"
echo "${BIN}"
