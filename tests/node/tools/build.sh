#!/usr/bin/env bash
# Build what the node tier (tests/node: a real kubelet, containerd and runc on this
# machine) runs, from the pins in versions.env, into one cache folder:
#
#   bin/kubelet                   k8s.io/kubernetes K8S_VERSION, built from the control
#                                 plane's build module (../../e2e/control-plane/kube) with
#                                 its version stamp
#   bin/containerd, bin/ctr,      github.com/containerd/containerd/v2 CONTAINERD_VERSION
#   bin/containerd-shim-runc-v2   (build module ./containerd), static
#   bin/runc                      Debian's runc (links libseccomp.so.2: Debian's apt depends
#                                 on libseccomp2, so every Debian machine has it)
#   bin/pause                     gcc -static of build/pause/linux/pause.c of k8s.io/kubernetes
#   bin/busybox                   Debian's busybox-static (also the shell of the runc tests'
#                                 root file systems, tests/support/container.py)
#   cni/bin/                      Debian's containernetworking-plugins (bridge, host-local,
#                                 loopback, portmap, ...)
#   images/pause.tar              registry.k8s.io/pause:PAUSE_VERSION (bin/pause as /pause)
#   images/busybox.tar            gpu-dra.local/busybox:<busybox-static's upstream version>
#                                 (/bin/busybox, every applet a symlink in /bin)
#   node.env                      KEY=VALUE lines: the versions and both image names
# The images are OCI archives written by oci_image.py, for `ctr -n k8s.io images import`.
# Debian packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`: the
# system's packages are not changed (`apt-get update` runs, as root, only when a download
# fails).
#
# Output: ${GPU_DRA_CACHE:-$HOME/.cache/gpu-dra}/node-<key>/ (older node-* folders are
# removed), where <key> hashes the Go and gcc versions, this script, the shared prelude,
# versions.env, oci_image.py, the containerd module's go.mod and go.sum and the control
# plane's versions.env, kube/go.mod and kube/go.sum. The folder appears whole (a staging
# folder renamed) and a second run with it present returns at once. The last line on
# stdout is always the folder; the log goes to stderr.
#
#   build.sh            build, or reuse the cache
#   build.sh --print    print the folder; exit 0 if it is complete, 1 otherwise
#
# Exit codes: 2 usage; 3 a tool is missing (Go, gcc, python3, apt-get, dpkg-deb);
# 4 a pinned input cannot be had or disagrees with versions.env.
# Cold (Go's build cache empty, modules downloaded): about 6 minutes on 2 cores, 4.5 of
# them the kubelet; with Go's build cache warm: 10-30 s.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONTROL_PLANE="$(cd "${HERE}/../../e2e/control-plane" && pwd)"
# shellcheck source=versions.env
source "${HERE}/versions.env"
# shellcheck source=../../e2e/control-plane/versions.env
source "${CONTROL_PLANE}/versions.env"
: "${K8S_VERSION:?}" "${CONTAINERD_VERSION:?}" "${RUNC_DEB_VERSION:?}" \
  "${CNI_PLUGINS_DEB_VERSION:?}" "${BUSYBOX_DEB_VERSION:?}" "${PAUSE_VERSION:?}"

# CACHE_ROOT, log, the Go environment, the lock and the staging folder.
GO_BUILD_LOG_PREFIX="[node tools build]"
# shellcheck source=../../../scripts/lib/go-build.sh
source "${HERE}/../../../scripts/lib/go-build.sh"

go_build_require_go "install Go >= 1.26"
for tool in gcc python3 apt-get dpkg-deb; do
  command -v "${tool}" >/dev/null || {
    log "${tool} is not on PATH (apt-get install gcc libc6-dev python3)"; exit 3; }
done
export GOFLAGS="${GO_BUILD_GOFLAGS}"

key() {
  {
    go env GOVERSION
    gcc --version | sed -n 1p
    sha256sum "${BASH_SOURCE[0]}" "${GO_BUILD_PRELUDE}" "${HERE}/versions.env" \
      "${HERE}/oci_image.py" "${HERE}/containerd/go.mod" "${HERE}/containerd/go.sum" \
      "${CONTROL_PLANE}/versions.env" "${CONTROL_PLANE}/kube/go.mod" \
      "${CONTROL_PLANE}/kube/go.sum" | cut -d' ' -f1
  } | sha256sum | cut -c1-16
}

DEST="${CACHE_ROOT}/node-$(key)"
FILES=(bin/kubelet bin/containerd bin/ctr bin/containerd-shim-runc-v2 bin/runc bin/pause bin/busybox
       cni/bin/bridge cni/bin/host-local cni/bin/loopback images/pause.tar
       images/busybox.tar node.env)
complete() {
  local f
  for f in "${FILES[@]}"; do [[ -s "${DEST}/${f}" ]] || return 1; done
}

go_build_cached "${DEST}" "$@"

go_build_lock node
if [[ "${GO_BUILD_LOCKED}" == 1 ]] && complete; then
  log "built by a concurrent run: ${DEST}"; echo "${DEST}"; exit 0
fi

# module_dir DIR MODULE WANT: MODULE's folder in Go's module cache (downloaded if needed),
# after checking that the build module DIR requires it at WANT.
module_dir() {
  local have
  have="$(cd "$1" && go list -m -f '{{.Version}}' "$2")"
  if [[ "${have}" != "$3" ]]; then
    log "$1/go.mod requires $2 ${have}, versions.env says $3"
    exit 4
  fi
  (cd "$1" && go mod download -json "$2") | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}

START=${SECONDS}
go_build_stage node
mkdir -p "${STAGE}/bin" "${STAGE}/cni/bin" "${STAGE}/images"
KUBE_DIR="$(module_dir "${CONTROL_PLANE}/kube" k8s.io/kubernetes "${K8S_VERSION}")"
CONTAINERD_DIR="$(module_dir "${HERE}/containerd" github.com/containerd/containerd/v2 \
  "${CONTAINERD_VERSION}")"

# --- Debian packages: runc, the CNI plugins, busybox-static (first: a version Debian no
# longer serves fails the build in seconds, not after the Go builds) ----------------------
DEBS=("runc=${RUNC_DEB_VERSION}" "containernetworking-plugins=${CNI_PLUGINS_DEB_VERSION}"
      "busybox-static=${BUSYBOX_DEB_VERSION}")
log "fetching Debian packages: ${DEBS[*]}"
mkdir "${STAGE}/debs" "${STAGE}/debs/root"
apt_opts=(-q)
# apt drops root to its _apt user for downloads, who cannot write into the cache folder.
if [[ "${EUID}" == 0 ]]; then apt_opts+=(-o APT::Sandbox::User=root); fi
download() { (cd "${STAGE}/debs" && apt-get "${apt_opts[@]}" download "${DEBS[@]}") >&2; }
if ! download; then
  if [[ "${EUID}" == 0 ]]; then
    log "download failed: updating apt's package lists and trying again"
    apt-get -q update >&2
  fi
  download || {
    log "cannot download ${DEBS[*]}: if Debian replaced a version, pin the one that"
    log "'apt-cache policy runc containernetworking-plugins busybox-static' offers in versions.env"
    exit 4
  }
fi
for deb in "${STAGE}"/debs/*.deb; do dpkg-deb -x "${deb}" "${STAGE}/debs/root"; done
cp "${STAGE}/debs/root/usr/sbin/runc" "${STAGE}/bin/runc"
cp "${STAGE}"/debs/root/usr/lib/cni/* "${STAGE}/cni/bin/"
for bin in "${STAGE}/bin/runc" "${STAGE}"/cni/bin/*; do
  if ldd "${bin}" 2>/dev/null | grep 'not found' >/dev/null; then
    log "${bin##*/} needs a library this machine lacks:"; ldd "${bin}" >&2; exit 4
  fi
done

# --- pause's tag: what k8s.io/kubernetes builds and containerd runs as its sandbox -----
pause_tag="$(sed -n 's/^TAG ?= //p' "${KUBE_DIR}/build/pause/Makefile")"
if [[ "${pause_tag}" != "${PAUSE_VERSION}" ]]; then
  log "k8s.io/kubernetes ${K8S_VERSION} builds pause ${pause_tag},"\
    "versions.env says ${PAUSE_VERSION}"
  exit 4
fi
PAUSE_IMAGE="registry.k8s.io/pause:${PAUSE_VERSION}"
if ! grep -q "DefaultSandboxImage = \"${PAUSE_IMAGE}\"" \
    "${CONTAINERD_DIR}/internal/cri/config/config.go"; then
  log "warning: containerd ${CONTAINERD_VERSION}'s default sandbox image is not ${PAUSE_IMAGE}:"
  log "  set it in containerd's config ([plugins.'io.containerd.cri.v1.images'.pinned_images])"
fi

# --- kubelet: the control plane's build module, the control plane's version stamp --------
log "building kubelet ${K8S_VERSION} (cold: about 4.5 minutes; warm: seconds)"
(
  cd "${CONTROL_PLANE}/kube"
  go build -trimpath -ldflags="$(go_build_kube_ldflags "${K8S_VERSION}")" \
    -o "${STAGE}/bin/kubelet" k8s.io/kubernetes/cmd/kubelet
) >&2

# --- containerd, ctr, the runc shim: static, without the snapshotters that need cgo -------
# The tags and the version stamp of containerd's Makefile (the shim adds no_grpc there too).
log "building containerd ${CONTAINERD_VERSION} (cold: 1-3 minutes; warm: seconds)"
ctd=github.com/containerd/containerd/v2
ctd_ldflags="-s -w -X ${ctd}/version.Version=${CONTAINERD_VERSION} -X ${ctd}/version.Package=${ctd}"
ctd_tags="urfave_cli_no_docs no_btrfs no_devmapper no_zfs"
(
  cd "${HERE}/containerd"
  go build -trimpath -tags "${ctd_tags}" -ldflags="${ctd_ldflags}" -o "${STAGE}/bin/" \
    "${ctd}/cmd/containerd" "${ctd}/cmd/ctr"
  go build -trimpath -tags "${ctd_tags} no_grpc" -ldflags="${ctd_ldflags}" \
    -o "${STAGE}/bin/containerd-shim-runc-v2" "${ctd}/cmd/containerd-shim-runc-v2"
) >&2

# --- pause: built the way build/pause/Makefile builds it ---------------------------------
log "building pause ${PAUSE_VERSION}"
gcc -Os -Wall -Werror -static -DVERSION="v${PAUSE_VERSION}-${K8S_VERSION}" \
  -o "${STAGE}/bin/pause" "${KUBE_DIR}/build/pause/linux/pause.c"
strip "${STAGE}/bin/pause"

# --- images -----------------------------------------------------------------------------
busybox_version="${BUSYBOX_DEB_VERSION#*:}"
BUSYBOX_IMAGE="gpu-dra.local/busybox:${busybox_version%%-*}"
log "writing images ${PAUSE_IMAGE} and ${BUSYBOX_IMAGE}"
# The pause image as build/pause/Dockerfile makes it.
mkdir "${STAGE}/rootfs-pause"
cp "${STAGE}/bin/pause" "${STAGE}/rootfs-pause/pause"
python3 "${HERE}/oci_image.py" --rootfs "${STAGE}/rootfs-pause" --name "${PAUSE_IMAGE}" \
  --entrypoint '["/pause"]' --user 65535:65535 --out "${STAGE}/images/pause.tar"
mkdir -p "${STAGE}/rootfs-busybox/bin" "${STAGE}/rootfs-busybox/etc" \
  "${STAGE}/rootfs-busybox/root" "${STAGE}/rootfs-busybox/tmp"
chmod 1777 "${STAGE}/rootfs-busybox/tmp"
cp "${STAGE}/debs/root/bin/busybox" "${STAGE}/rootfs-busybox/bin/busybox"
cp "${STAGE}/debs/root/bin/busybox" "${STAGE}/bin/busybox"  # the runc tests' root file systems
while IFS= read -r applet; do
  [[ "${applet}" == busybox ]] || ln -s busybox "${STAGE}/rootfs-busybox/bin/${applet}"
done < <("${STAGE}/rootfs-busybox/bin/busybox" --list)
python3 "${HERE}/oci_image.py" --rootfs "${STAGE}/rootfs-busybox" --name "${BUSYBOX_IMAGE}" \
  --cmd '["sh"]' --out "${STAGE}/images/busybox.tar"
rm -rf "${STAGE}/debs" "${STAGE}/rootfs-pause" "${STAGE}/rootfs-busybox"

cat > "${STAGE}/node.env" <<EOF
K8S_VERSION=${K8S_VERSION}
CONTAINERD_VERSION=${CONTAINERD_VERSION}
RUNC_DEB_VERSION=${RUNC_DEB_VERSION}
CNI_PLUGINS_DEB_VERSION=${CNI_PLUGINS_DEB_VERSION}
PAUSE_IMAGE=${PAUSE_IMAGE}
BUSYBOX_IMAGE=${BUSYBOX_IMAGE}
EOF
# Builds of other pins or script versions: Go's build cache rebuilds them fast if needed.
go_build_publish "${DEST}" 'node-*'
log "done in $((SECONDS - START))s: ${DEST}"
echo "${DEST}"
