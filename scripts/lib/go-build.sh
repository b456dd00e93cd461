# shellcheck shell=bash
# shellcheck disable=SC2034  # variables set here are read by the scripts that source it
# The shared prelude of the repository's Go build scripts. Sourced, never run, by
#   tests/e2e/control-plane/build.sh    kube-apiserver, kube-scheduler, ..., etcd
#   tests/e2e/kubelet-standin/build.sh  kubelet-standin, cdi-resolve
#   tests/node/tools/build.sh           kubelet, containerd, runc, CNI plugins, images
#   tests/oracle/build.sh               the upstream allocator oracle
#   deploy/helm/build-helm.sh           the helm CLI
# Each builds pinned Go sources into a folder of one cache outside the clone and prints
# the folder (or the binary) as the last line on stdout; its log goes to stderr. Exit
# codes: 2 usage, 3 not cached and Go is not on PATH (go_build_require_go).
#
# The sourcing script runs `set -euo pipefail` and sets GO_BUILD_LOG_PREFIX (what its log
# lines start with) before it sources this file. Sourcing it
#   - sets CACHE_ROOT=${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}: every build's output folder,
#     lock file (.build-<name>.lock) and staging folders (.stage-<name>.XXXXXX) live there;
#   - exports CGO_ENABLED=0 (static binaries) and GOTOOLCHAIN=${GOTOOLCHAIN:-local} (the Go
#     on PATH, never a toolchain download);
#   - sets GO_BUILD_GOFLAGS=-buildvcs=false, the GOFLAGS the scripts export, replacing the
#     caller's (no VCS stamping: the binaries do not depend on the clone's git state), and
#     GO_BUILD_PRELUDE (this file's path); and defines
#       log MSG...                "<GO_BUILD_LOG_PREFIX> MSG" on stderr
#       go_build_require_go HINT  exit 3 with "Go is not on PATH; HINT" unless it is
#       go_build_lock NAME        one build at a time per cache (CI and a developer's pytest
#                                 may race): creates CACHE_ROOT and holds
#                                 CACHE_ROOT/.build-NAME.lock on fd 9 until the script ends.
#                                 GO_BUILD_LOCKED=1 when it waited with flock (check the
#                                 cache again: a concurrent run may have filled it), 0 where
#                                 flock is missing
#       go_build_stage NAME       STAGE=a new CACHE_ROOT/.stage-NAME.XXXXXX, removed on exit
#                                 (sets the EXIT trap)
#       go_build_publish DEST GLOB  the whole STAGE becomes DEST (renamed: it appears whole),
#                                 and the other CACHE_ROOT/GLOB folders, older builds, go
#       go_build_cached OUT ARG   the scripts' command line, with a `complete` function of
#                                 the caller: ARG --print prints OUT and exits 0 if complete,
#                                 else 1; no ARG prints OUT and exits 0 when complete
#                                 (cached), else returns to build; anything else exits 2
#       go_build_kube_ldflags V   prints the -ldflags of a k8s.io/kubernetes V binary: the
#                                 version stamp of the release build (hack/lib/version.sh),
#                                 so `--version` and /version report V
#
# kubelet-standin/build.sh and tests/node/tools/build.sh hash this file into their cache
# keys: a change here builds their tools anew. The lock and cache names are part of every
# script's interface; existing caches are found by them.

: "${GO_BUILD_LOG_PREFIX:?set GO_BUILD_LOG_PREFIX before sourcing go-build.sh}"
GO_BUILD_PRELUDE="${BASH_SOURCE[0]}"
CACHE_ROOT="${GPU_DRA_CACHE:-${HOME}/.cache/gpu-dra}"
export CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
GO_BUILD_GOFLAGS="-buildvcs=false"

log() { printf '%s %s\n' "${GO_BUILD_LOG_PREFIX}" "$*" >&2; }

go_build_require_go() {
  command -v go >/dev/null || { log "Go is not on PATH; $1"; exit 3; }
}

go_build_lock() {
  mkdir -p "${CACHE_ROOT}"
  exec 9>"${CACHE_ROOT}/.build-$1.lock"
  GO_BUILD_LOCKED=0
  if command -v flock >/dev/null; then
    flock 9
    GO_BUILD_LOCKED=1
  fi
}

go_build_stage() {
  STAGE="$(mktemp -d "${CACHE_ROOT}/.stage-$1.XXXXXX")"
  trap 'rm -rf "${STAGE}"' EXIT
}

go_build_kube_ldflags() {
  local version="$1" ver major rest minor pkg flags="-s -w"
  ver="${version#v}"; major="${ver%%.*}"; rest="${ver#*.}"; minor="${rest%%.*}"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    flags+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=${major}"
    flags+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
    flags+=" -X ${pkg}.gitCommit=module-proxy-${version}"
    flags+=" -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
  done
  printf '%s\n' "${flags}"
}

go_build_cached() {
  case "${2:-}" in
    --print) echo "$1"; if complete; then exit 0; else exit 1; fi ;;
    "") ;;
    *) echo "usage: $0 [--print]" >&2; exit 2 ;;
  esac
  if complete; then
    log "cached: $1"
    echo "$1"
    exit 0
  fi
}

go_build_publish() {
  chmod 755 "${STAGE}"
  rm -rf "$1"
  mv "${STAGE}" "$1"
  find "${CACHE_ROOT}" -maxdepth 1 -name "$2" ! -path "$1" -exec rm -rf {} +
}
