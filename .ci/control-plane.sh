#!/usr/bin/env bash
# Build (or reuse from the cache) the pinned e2e control plane and print the folder that
# KUBEBUILDER_ASSETS must point at, so CI never skips the e2e tests.
#
#   KUBEBUILDER_ASSETS=$(.ci/control-plane.sh)   # stdout is the folder, nothing else
#   source .ci/control-plane.sh                  # or: export it into this shell
#
# The build log goes to stderr; a cold build takes minutes, a cached one well under a
# second. Go's module and build caches stay in Go's default places, outside the clone.
_cp_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if _cp_assets="$(bash "${_cp_repo}/tests/e2e/control-plane/build.sh" | tail -n 1)" \
    && [[ -n "${_cp_assets}" && -x "${_cp_assets}/kube-apiserver" ]]; then
  export KUBEBUILDER_ASSETS="${_cp_assets}"
  echo "control plane: KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS}" >&2
  echo "${KUBEBUILDER_ASSETS}"
  unset _cp_repo _cp_assets
else
  echo "control plane: build failed (see the log above)" >&2
  unset _cp_repo _cp_assets
  # shellcheck disable=SC2317  # reachable: `return` fails when the file is run, not sourced
  return 1 2>/dev/null || exit 1  # `return` when sourced, `exit` when run
fi
