#!/usr/bin/env bash
# Build deploy/Dockerfile where no image registry is reachable (only a Debian mirror and
# PyPI): the base image python:3.11-slim-bookworm is stood in for by Debian bookworm root
# file systems made by mmdebstrap with the same Python 3.11, trimmed as Debian's slim
# images are (no recommended packages, manual pages, documentation, translations or apt
# caches): one with only the interpreter for the image (PYTHON_IMAGE), one that adds its
# headers, venv and pip for the build stage (BUILD_IMAGE). The Dockerfile is built
# unchanged by buildah, then the image's demo is run.
# Needs root, buildah and mmdebstrap (apt-get install buildah mmdebstrap uidmap).
# With a registry, use `docker build -f deploy/Dockerfile .` instead.
#
#   deploy/build-image-nodocker.sh [TAG]      # default localhost/gpu-dra-driver:dev
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/gpu-dra-driver:dev}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 3; }
done
work=$(mktemp -d)
# The stand-in bases are named for this build (a concurrent build makes its own) and
# removed at the end.
BASE=localhost/python-stand-in:3.11-slim-bookworm-${work##*.}
BUILD_BASE=localhost/python-stand-in:3.11-bookworm-dev-${work##*.}
cleanup() {
  buildah rmi "$BASE" "$BUILD_BASE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
# buildah keeps a CNI lock in /etc/cni/net.d (made if missing) even for host networking:
# here it goes to the build's own folder, so the build leaves nothing on the host (unless
# the caller has a containers.conf of its own).
printf '[network]\nnetwork_config_dir = "%s/cni"\n' "$work" > "$work/containers.conf"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$work/containers.conf}

# The build machine's CA bundle and apt settings go into the stand-in bases, so that apt
# and pip inside the build reach the same mirrors as this machine (a TLS-intercepting
# proxy's CA included). The hooks are single-quoted on purpose: mmdebstrap runs them with the
# root file system's path as $1.
# shellcheck disable=SC2016  # $1 is the hook's argument, expanded when mmdebstrap runs it
base() {  # base IMAGE PACKAGES: a stand-in base image with these packages
  # merged-usr: /usr merged as in Debian's images, without the usrmerge package (and perl)
  mmdebstrap --variant=minbase --include="$2" --aptopt='APT::Install-Recommends "false"' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/"' \
    --customize-hook='cp /etc/apt/apt.conf.d/* "$1/etc/apt/apt.conf.d/" 2>/dev/null || true' \
    --customize-hook='rm -f "$1"/var/cache/apt/*.bin' \
    bookworm "$work/rootfs.tar" "$MIRROR"
  local container
  container=$(buildah from scratch)
  buildah add "$container" "$work/rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 "$container"
  buildah commit -q --rm "$container" "$1" >/dev/null
  rm "$work/rootfs.tar"
}
base "$BASE" python3,python-is-python3,ca-certificates
base "$BUILD_BASE" python3,python3-dev,python3-venv,python3-pip,python-is-python3,ca-certificates

buildah bud --layers=false --network host -f deploy/Dockerfile \
  --ignorefile deploy/Dockerfile.dockerignore --build-arg PYTHON_IMAGE="$BASE" \
  --build-arg BUILD_IMAGE="$BUILD_BASE" -t "$TAG" .

container=$(buildah from -q "$TAG")
trap 'buildah rm "$container" >/dev/null; cleanup' EXIT
buildah run "$container" -- gpu-dra demo | tail -1
echo "entrypoint: $(buildah inspect --format '{{.OCIv1.Config.Entrypoint}}' "$TAG")"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$TAG"
