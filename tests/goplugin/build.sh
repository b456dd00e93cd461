#!/usr/bin/env bash
# Build the Go kubelet plugin (this folder, see README.md) and print the binary's path on
# the last line of stdout.
#
# Output: ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/goplugin-<key>/goplugin, where <key> hashes
# the Go version, this script, go.mod, go.sum and the non-test .go files; an unchanged tree
# reuses it at once, older goplugin-* folders are removed. Cold: about a minute on 2 cores
# with the e2e tools' modules already downloaded.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# CACHE_ROOT, log, the Go environment, the lock and the staging folder.
GO_BUILD_LOG_PREFIX="[goplugin build]"
# shellcheck source=../../scripts/lib/go-build.sh
source "${HERE}/../../scripts/lib/go-build.sh"

go_build_require_go "install Go >= 1.26"
export GOFLAGS="${GO_BUILD_GOFLAGS} -mod=readonly"

key() {
  {
    go env GOVERSION
    cd "${HERE}"
    sha256sum build.sh go.mod go.sum
    find . -maxdepth 1 -name '*.go' ! -name '*_test.go' | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -c1-16
}

DEST="${CACHE_ROOT}/goplugin-$(key)"
complete() { [[ -x "${DEST}/goplugin" ]]; }

go_build_cached "${DEST}/goplugin" "$@"

go_build_lock goplugin
if [[ "${GO_BUILD_LOCKED}" == 1 ]] && complete; then
  log "built by a concurrent run: ${DEST}"; echo "${DEST}/goplugin"; exit 0
fi
START=${SECONDS}
go_build_stage goplugin
(cd "${HERE}" && go build -trimpath -ldflags="-s -w" -o "${STAGE}/goplugin" .) >&2
go_build_publish "${DEST}" 'goplugin-*'
log "done in $((SECONDS - START))s: ${DEST}"
echo "${DEST}/goplugin"
