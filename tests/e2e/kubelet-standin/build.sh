#!/usr/bin/env bash
# Build the e2e node-side tools: kubelet-standin (this folder: the kubelet's plugin
# manager and DRA manager from Kubernetes, see main.go) and cdi-resolve (../cdi-resolve:
# the CDI library the container runtimes use).
#
# Output: ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/e2e-tools-<key>/{kubelet-standin,cdi-resolve}
# (older e2e-tools-* folders are removed) where <key> hashes the Go version, this script, the
# shared prelude (../../../scripts/lib/go-build.sh) and both modules' go.mod, go.sum and
# non-test .go files, so a change to any of them builds anew and an unchanged tree reuses
# the cache.
# The last line on stdout is always the folder.
#
#   build.sh            build, or reuse the cache
#   build.sh --print    print the folder; exit 0 if it is complete, 1 otherwise
#
# Cold: about 5 minutes on 2 cores with the control plane's modules already downloaded
# (it needs k8s.io/kubernetes v1.37.2, the same module graph as ../control-plane/kube).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODULES=("${HERE}" "$(cd "${HERE}/../cdi-resolve" && pwd)")
TOOLS=(kubelet-standin cdi-resolve)

# CACHE_ROOT, log, the Go environment, the lock and the staging folder.
GO_BUILD_LOG_PREFIX="[e2e tools build]"
# shellcheck source=../../../scripts/lib/go-build.sh
source "${HERE}/../../../scripts/lib/go-build.sh"

go_build_require_go "install Go >= 1.26"
export GOFLAGS="${GO_BUILD_GOFLAGS}"

key() {
  {
    go env GOVERSION
    sha256sum "${BASH_SOURCE[0]}" "${GO_BUILD_PRELUDE}" | cut -d' ' -f1
    local m f
    for m in "${MODULES[@]}"; do
      while IFS= read -r f; do
        printf '%s %s\n' "${f#"${m%/*}"/}" "$(sha256sum "${f}" | cut -d' ' -f1)"
      done < <(find "${m}" -maxdepth 1 -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) \
                 ! -name '*_test.go' | LC_ALL=C sort)
    done
  } | sha256sum | cut -c1-16
}

DEST="${CACHE_ROOT}/e2e-tools-$(key)"
complete() {
  local t
  for t in "${TOOLS[@]}"; do [[ -x "${DEST}/${t}" ]] || return 1; done
}

go_build_cached "${DEST}" "$@"

go_build_lock e2e-tools
if [[ "${GO_BUILD_LOCKED}" == 1 ]] && complete; then
  log "built by a concurrent run: ${DEST}"; echo "${DEST}"; exit 0
fi

START=${SECONDS}
go_build_stage e2e-tools
for i in "${!TOOLS[@]}"; do
  log "building ${TOOLS[i]} (cold: minutes; Go's build cache makes rebuilds fast)"
  (cd "${MODULES[i]}" && go build -trimpath -ldflags="-s -w" -o "${STAGE}/${TOOLS[i]}" .) >&2
done
mkdir -p "${DEST}"
for t in "${TOOLS[@]}"; do mv -f "${STAGE}/${t}" "${DEST}/${t}"; done
# Builds of other source states: Go's build cache rebuilds them in seconds if needed.
find "${CACHE_ROOT}" -maxdepth 1 -name 'e2e-tools-*' ! -path "${DEST}" -exec rm -rf {} +
log "done in $((SECONDS - START))s: ${DEST}"
echo "${DEST}"
