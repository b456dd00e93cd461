#!/usr/bin/env bash
# Build the e2e control plane (kube-apiserver, kube-scheduler, kube-controller-manager,
# kubectl, etcd) from the Go module proxy, pinned by versions.env.
#
# Output: ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/k8s-<K8S_VERSION>/ in the envtest layout
# (binaries directly in the folder), so KUBEBUILDER_ASSETS can point at it. A second run
# with the cache present returns at once. The last line on stdout is always the folder.
#
#   build.sh            build, or reuse the cache
#   build.sh --force    rebuild even if the cache is complete
#   build.sh --print    print the cache folder and exit 0 if complete, 1 otherwise
#
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the k8s.io staging
# modules with ./staging paths), so kube/ is a build module that requires it and replaces
# every staging module with its published v0.<minor>.<patch>. etcd lives in its own module
# because k8s.io/kubernetes requires a newer etcd, which would otherwise win in MVS.
# kube/go.mod, etcd/go.mod and their go.sum are regenerated from versions.env when the
# versions there change; commit them, they pin every transitive module by hash.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "${HERE}/versions.env"
: "${K8S_VERSION:?versions.env must set K8S_VERSION}" "${ETCD_VERSION:?versions.env must set ETCD_VERSION}"

# CACHE_ROOT, log, the Go environment, the lock and the staging folder.
GO_BUILD_LOG_PREFIX="[control-plane build]"
# shellcheck source=../../../scripts/lib/go-build.sh
source "${HERE}/../../../scripts/lib/go-build.sh"

DEST="${CACHE_ROOT}/k8s-${K8S_VERSION}"
STAMP="${DEST}/.versions"
BINARIES=(etcd kube-apiserver kube-scheduler kube-controller-manager kubectl)
WANT_STAMP="k8s=${K8S_VERSION} etcd=${ETCD_VERSION}"

complete() {
  [[ -f "${STAMP}" && "$(cat "${STAMP}")" == "${WANT_STAMP}" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do [[ -x "${DEST}/${b}" ]] || return 1; done
}

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  --print) complete && { echo "${DEST}"; exit 0; }; echo "${DEST}"; exit 1 ;;
  "") ;;
  *) echo "usage: $0 [--force|--print]" >&2; exit 2 ;;
esac

if [[ "${FORCE}" == 0 ]] && complete; then
  log "cached: ${DEST} (${WANT_STAMP})"
  echo "${DEST}"
  exit 0
fi

go_build_require_go "install Go >= 1.26 or set KUBEBUILDER_ASSETS"
go_build_lock "k8s-${K8S_VERSION}"
if [[ "${GO_BUILD_LOCKED}" == 1 && "${FORCE}" == 0 ]] && complete; then
  log "built by a concurrent run: ${DEST}"; echo "${DEST}"; exit 0
fi

export GOFLAGS="${GO_BUILD_GOFLAGS}"
START=${SECONDS}

# --- (re)pin the build modules when versions.env changed -------------------------------
# The go line of the build modules: the oldest Go the pinned Kubernetes accepts.
GO_LANG_VERSION=1.26.0
mod_pins() {  # mod_pins MODULE VERSION GO.MOD: does GO.MOD require exactly that?
  grep -qE "^[[:space:]]*(require[[:space:]]+)?${1//./\\.}[[:space:]]+${2//./\\.}([[:space:]]*//.*)?\$" "$3" \
    2>/dev/null
}

pin_kube() {
  log "pinning kube/go.mod to k8s.io/kubernetes ${K8S_VERSION}"
  local gomod staging="v0.${K8S_VERSION#v1.}"
  gomod="$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [[ -f "${gomod}" ]] || { log "cannot download k8s.io/kubernetes@${K8S_VERSION}"; exit 4; }
  (
    cd "${HERE}/kube"
    rm -f go.mod go.sum
    go mod init gpu-dra.local/control-plane/kube >/dev/null 2>&1
    go mod edit -go="${GO_LANG_VERSION}"
    go mod edit -require="k8s.io/kubernetes@${K8S_VERSION}"
    # Every staging module k8s.io/kubernetes requires at v0.0.0 -> its published tag.
    awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "${gomod}" | sort -u \
      | while read -r m; do go mod edit -replace="${m}=${m}@${staging}"; done
    # kubelet: built from this module too, by tests/node/tools/build.sh.
    for t in kube-apiserver kube-scheduler kube-controller-manager kubectl kubelet; do
      go mod edit -tool="k8s.io/kubernetes/cmd/${t}"
    done
    go mod tidy
  )
}

pin_etcd() {
  log "pinning etcd/go.mod to go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
  (
    cd "${HERE}/etcd"
    rm -f go.mod go.sum
    go mod init gpu-dra.local/control-plane/etcd >/dev/null 2>&1
    go mod edit -go="${GO_LANG_VERSION}"
    go mod edit -require="go.etcd.io/etcd/server/v3@${ETCD_VERSION}" -tool=go.etcd.io/etcd/server/v3
    go mod tidy
  )
}

mod_pins k8s.io/kubernetes "${K8S_VERSION}" "${HERE}/kube/go.mod" || pin_kube
mod_pins go.etcd.io/etcd/server/v3 "${ETCD_VERSION}" "${HERE}/etcd/go.mod" || pin_etcd

# --- build ------------------------------------------------------------------------------
# go build -v prints one line per compiled package: show a count, pass everything else
# (errors) through unchanged.
progress() {
  awk -v what="$1" '
    /^[^ #]+$/ && $0 !~ /:/ { n++; if (n % 200 == 0) { printf "[control-plane build] %s: %d packages compiled\n", what, n; fflush() } ; next }
    { print; fflush() }' >&2
}

go_build_stage "k8s-${K8S_VERSION}"

# Same version stamp the Kubernetes release build sets, so the apiserver reports
# K8S_VERSION from /version.
kube_ldflags="$(go_build_kube_ldflags "${K8S_VERSION}")"

log "building Kubernetes ${K8S_VERSION} (kube-apiserver, kube-scheduler, kube-controller-manager, kubectl)"
log "cold: about 8 minutes on 2 cores (module downloads included); with Go's build cache warm: seconds"
(
  cd "${HERE}/kube"
  go build -v -trimpath -ldflags="${kube_ldflags}" -o "${STAGE}/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl 2>&1
) | progress kubernetes

log "building etcd ${ETCD_VERSION}"
(
  cd "${HERE}/etcd"
  go build -v -trimpath -o "${STAGE}/etcd" \
    -ldflags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" \
    go.etcd.io/etcd/server/v3 2>&1
) | progress etcd

mkdir -p "${DEST}"
for b in "${BINARIES[@]}"; do mv -f "${STAGE}/${b}" "${DEST}/${b}"; done
echo "${WANT_STAMP}" > "${STAMP}"
log "done in $((SECONDS - START))s: ${DEST}"
echo "${DEST}"
