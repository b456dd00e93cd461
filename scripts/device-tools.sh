#!/usr/bin/env bash
# Build, here, the programs tests/device/test_container_gpu.py runs on a GPU machine (the
# `device` tool: no Go, no module proxy, maybe no runc) into build/device-tools, and pack
# them as build/device-tools.tar.gz (6 MiB instead of 14: with build/device-wheels the
# carry stays under the tool's 64 MiB); carry the archive, scripts/device-check.sh unpacks
# it. All three are static, so they run whatever the GPU machine's libraries:
#   runc         opencontainers/runc ${RUNC_VERSION} from the Go module proxy, built with cgo
#                (its nsenter is C) linked statically, without the seccomp tag (Debian's runc
#                links libseccomp.so.2, which the GPU machine may lack); cached in
#                ${GPU_DRA_CACHE:-~/.cache/gpu-dra}/runc-<version>
#   cdi-resolve  the upstream CDI library's resolver (tests/e2e/cdi-resolve), CGO off
#   busybox      this machine's busybox (Debian's busybox-static), the containers' shell
# The tests find them in build/device-tools first, then on PATH, so this machine's runs
# (tests/integration/test_mock_driver_root.py) use the same programs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNC_VERSION=${RUNC_VERSION:-v1.5.3}
CACHE=${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/runc-${RUNC_VERSION}
OUT=build/device-tools
mkdir -p "$OUT"
if [ ! -x "$CACHE/runc" ]; then
    GOBIN="$CACHE" CGO_ENABLED=1 GOFLAGS=-buildvcs=false go install -trimpath \
        -tags "netgo osusergo" -ldflags "-s -w -linkmode external -extldflags -static" \
        "github.com/opencontainers/runc@${RUNC_VERSION}"
fi
cp "$CACHE/runc" "$OUT/runc"
(cd tests/e2e/cdi-resolve && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath \
    -ldflags "-s -w" -o "../../../$OUT/cdi-resolve" .)
busybox=$(command -v busybox) || { echo "busybox not found: apt-get install busybox-static" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then
    echo "$busybox is linked dynamically: install busybox-static" >&2
    exit 1
fi
cp "$busybox" "$OUT/busybox"
tar -czf build/device-tools.tar.gz -C build device-tools
"$OUT/runc" --version | head -1
du -sh "$OUT" build/device-tools.tar.gz
