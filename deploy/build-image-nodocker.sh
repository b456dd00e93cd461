#!/usr/bin/env bash
# Build deploy/Dockerfile where no image registry is reachable (only a Debian mirror and
# PyPI): the base image python:3.11-slim-bookworm is stood in for by a Debian bookworm
# root file system with the same Python (3.11, headers, venv, pip) made by mmdebstrap,
# and the Dockerfile is built unchanged by buildah, then the image's demo is run.
# Needs root, buildah and mmdebstrap (apt-get install buildah mmdebstrap uidmap).
# With a registry, use `docker build -f deploy/Dockerfile .` instead.
#
#   deploy/build-image-nodocker.sh [TAG]      # default localhost/gpu-dra-driver:dev
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-localhost/gpu-dra-driver:dev}
BASE=localhost/python:3.11-slim-bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 3; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# buildah keeps a CNI lock in /etc/cni/net.d (made if missing) even for host networking:
# here it goes to the build's own folder, so the build leaves nothing on the host (unless
# the caller has a containers.conf of its own).
printf '[network]\nnetwork_config_dir = "%s/cni"\n' "$work" > "$work/containers.conf"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$work/containers.conf}

# The build machine's CA bundle and apt settings go into the stand-in base, so that apt
# and pip inside the build reach the same mirrors as this machine (a TLS-intercepting
# proxy's CA included). The hooks are single-quoted on purpose: mmdebstrap runs them with the
# root file system's path as $1.
# shellcheck disable=SC2016  # $1 is the hook's argument, expanded when mmdebstrap runs it
mmdebstrap --variant=minbase \
  --include=python3,python3-dev,python3-venv,python3-pip,python-is-python3,ca-certificates \
  --customize-hook='cp /etc/ssl/certs/ca-certificates.crt "$1/etc/ssl/certs/"' \
  --customize-hook='cp /etc/apt/apt.conf.d/* "$1/etc/apt/apt.conf.d/" 2>/dev/null || true' \
  bookworm "$work/rootfs.tar" "$MIRROR"
container=$(buildah from scratch)
buildah add "$container" "$work/rootfs.tar" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd python3 "$container"
buildah commit -q --rm "$container" "$BASE" >/dev/null

buildah bud --layers=false --network host -f deploy/Dockerfile \
  --ignorefile deploy/Dockerfile.dockerignore --build-arg PYTHON_IMAGE="$BASE" -t "$TAG" .

container=$(buildah from -q "$TAG")
trap 'buildah rm "$container" >/dev/null; rm -rf "$work"' EXIT
buildah run "$container" -- gpu-dra demo | tail -1
echo "entrypoint: $(buildah inspect --format '{{.OCIv1.Config.Entrypoint}}' "$TAG")"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$TAG"
