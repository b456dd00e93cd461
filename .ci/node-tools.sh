#!/usr/bin/env bash
# Install what the node tier's builds need (Debian packages, only those missing), then
# build (or reuse from the cache) the node tools (tests/node/tools/build.sh: kubelet,
# containerd, runc, CNI plugins, the pause and busybox images) and the driver's image
# (tests/node/tools/driver-image.sh), and print the export line the tests read:
#
#   export GPU_DRA_NODE_ASSETS=<the node tools folder>
#
# (the tests find the image with driver-image.sh --print, which checks it is the working
# tree's)
#
#   node_env="$(.ci/node-tools.sh)" && eval "${node_env}"   # (not eval "$(...)": that
#                                                           # would hide a failure)
#
# The log goes to stderr. Both builds take their own lock, write only to the cache outside
# the clone and return at once when cached. Needs root for apt-get and buildah.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# gcc, libc6-dev: the static pause binary; buildah, mmdebstrap, uidmap: the driver's image;
# iptables: called by the kubelet and the CNI bridge plugin when the node runs. runc, the
# CNI plugins and busybox are not installed: build.sh unpacks pinned packages into its cache.
packages=(gcc libc6-dev python3 buildah mmdebstrap uidmap iptables)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q 'ok installed' || missing+=("${p}")
done
if ((${#missing[@]} > 0)); then
  echo "node tools: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -q -o DPkg::Lock::Timeout=300 update >&2
  apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends "${missing[@]}" >&2
fi

assets="$(nice -n 5 bash "${repo}/tests/node/tools/build.sh" | tail -n 1)"
image="$(nice -n 5 bash "${repo}/tests/node/tools/driver-image.sh" | tail -n 1)"
ref="$(sed -n 's/^IMAGE=//p' "$(dirname "${image}")/image.env")"
echo "node tools: ${assets}; driver image: ${image} (${ref})" >&2
printf 'export GPU_DRA_NODE_ASSETS=%q\n' "${assets}"
