#!/usr/bin/env bash
# Build (or reuse from the cache) the e2e node tools, kubelet-standin and cdi-resolve, and
# run the stand-in's Go tests (registration and prepare/unprepare through the kubelet's
# code against a Go fake plugin). pytest would build the tools on demand too; building
# here makes a Go failure a CI step of its own.
#
#   .ci/e2e-tools.sh      # stdout: the tools folder; the build log goes to stderr
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
folder="$(bash "${repo}/tests/e2e/kubelet-standin/build.sh" | tail -n 1)"
(
  cd "${repo}/tests/e2e/kubelet-standin"
  CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN="${GOTOOLCHAIN:-local}" go test -count=1 ./...
) >&2
echo "e2e tools: ${folder}" >&2
echo "${folder}"
