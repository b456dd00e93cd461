#!/usr/bin/env bash
# Build the driver's image from deploy/Dockerfile with buildah (deploy/build-image-nodocker.sh,
# which needs no image registry) and export it as an OCI archive, the node tier's way to
# hand it to containerd (`ctr -n k8s.io images import`) without a registry.
#
# Output: ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/driver-image-<key>/
#   image.tar   the image localhost/gpu-dra-driver:<key>
#   image.env   IMAGE=localhost/gpu-dra-driver:<key>, IMAGE_REPOSITORY=..., IMAGE_TAG=<key>
# Install the chart with image.repository=localhost/gpu-dra-driver, image.tag=<key>,
# image.pullPolicy=Never. <key> hashes, as they are on disk (uncommitted changes count),
# what the Dockerfile copies after deploy/Dockerfile.dockerignore (pyproject.toml, setup.py,
# README.md, native/*.pyx, native/*.pxd, driver/ less __pycache__ and *.so,
# deploy/slim-venv.sh), the
# Dockerfile, the dockerignore, build-image-nodocker.sh and this script. A cached image
# returns at once; older driver-image-* folders are removed. The image and the containers
# the build added to buildah's storage are removed once it is exported. The last line on
# stdout is always the archive; the log goes to stderr.
#
#   driver-image.sh            build, or reuse the cache
#   driver-image.sh --print    print the archive; exit 0 if it exists, 1 otherwise
#
# Needs root, buildah and mmdebstrap (apt-get install buildah mmdebstrap uidmap), a Debian
# mirror and PyPI. Exit codes: 2 usage, 3 buildah or mmdebstrap is missing, else the
# build's. Cold: about 2 minutes on 2 cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/../../.." && pwd)"
REPOSITORY=localhost/gpu-dra-driver
# The storage build-image-nodocker.sh builds into; the export and the clean-up read it.
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"

# CACHE_ROOT, log, the lock and the staging folder.
GO_BUILD_LOG_PREFIX="[driver image]"
# shellcheck source=../../../scripts/lib/go-build.sh
source "${ROOT}/scripts/lib/go-build.sh"

# The image's inputs, relative to ROOT, sorted: what the Dockerfile's COPY lines take after
# the dockerignore, and what builds it.
inputs() {
  (
    cd "${ROOT}"
    printf '%s\n' pyproject.toml setup.py README.md deploy/Dockerfile \
      deploy/Dockerfile.dockerignore deploy/build-image-nodocker.sh deploy/slim-venv.sh \
      "${HERE#"${ROOT}/"}/driver-image.sh"
    find native -maxdepth 1 -type f \( -name '*.pyx' -o -name '*.pxd' \)
    find driver -type f ! -path '*/__pycache__/*' ! -name '*.so'
  ) | LC_ALL=C sort
}

key() {
  inputs | (cd "${ROOT}" && xargs -d '\n' sha256sum --) | sha256sum | cut -c1-16
}

KEY="$(key)"
DEST="${CACHE_ROOT}/driver-image-${KEY}"
ARCHIVE="${DEST}/image.tar"
TAG="${REPOSITORY}:${KEY}"
complete() { [[ -s "${ARCHIVE}" && -s "${DEST}/image.env" ]]; }

go_build_cached "${ARCHIVE}" "$@"

for tool in buildah mmdebstrap; do
  command -v "${tool}" >/dev/null || {
    log "${tool} is not installed (apt-get install buildah mmdebstrap uidmap)"; exit 3; }
done

go_build_lock driver-image
if [[ "${GO_BUILD_LOCKED}" == 1 ]] && complete; then
  log "built by a concurrent run: ${ARCHIVE}"; echo "${ARCHIVE}"; exit 0
fi

START=${SECONDS}
go_build_stage driver-image
# What this build adds to buildah's storage (the image, the stand-in base image, the build
# stage, a container a failed step leaves) is removed when the script ends.
listed() { buildah "$@" | sort -u; }
IMAGES_BEFORE="$(listed images --all --quiet --no-trunc)"
CONTAINERS_BEFORE="$(listed containers --all --quiet --notruncate)"
clean_buildah() {
  comm -13 <(echo "${CONTAINERS_BEFORE}") <(listed containers --all --quiet --notruncate) \
    | xargs -r buildah rm >/dev/null || true
  comm -13 <(echo "${IMAGES_BEFORE}") <(listed images --all --quiet --no-trunc) \
    | xargs -r buildah rmi --force >/dev/null || true
}
trap 'clean_buildah; rm -rf "${STAGE}"' EXIT

log "building ${TAG} (deploy/build-image-nodocker.sh: about 2 minutes)"
bash "${ROOT}/deploy/build-image-nodocker.sh" "${TAG}" >&2
log "exporting ${TAG}"
buildah push --quiet "${TAG}" "oci-archive:${STAGE}/image.tar:${TAG}" >&2
cat > "${STAGE}/image.env" <<EOF
IMAGE=${TAG}
IMAGE_REPOSITORY=${REPOSITORY}
IMAGE_TAG=${KEY}
EOF
# Images of other source states: a rebuild makes them again.
go_build_publish "${DEST}" 'driver-image-*'
log "done in $((SECONDS - START))s: ${ARCHIVE} (${TAG})"
echo "${ARCHIVE}"
