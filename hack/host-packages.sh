#!/usr/bin/env bash
# The Debian packages the image build (hack/image.sh) and the local node (e2e/controlplane.py) need.
# Idempotent: installs only what is missing, so a set-up machine pays one dpkg-query per package.
#
# Debian's own builds on purpose: docker.io (20.10, BuildKit built into its client), containerd 1.6
# and runc, which kubelet 1.35 accepts, the CNI plugins in /usr/lib/cni, debootstrap for the base
# image, gcc + libc6-dev for the static pause binary, iptables (nft backend), conntrack and iproute2
# for the node's pod network and kube-proxy, busybox-static for the node's test image.
set -euo pipefail

packages=(
  docker.io debootstrap containerd runc containernetworking-plugins iptables conntrack
  gcc libc6-dev iproute2 busybox-static
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "==> host packages: installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "capgate: these Debian packages are missing and only root can install them: ${missing[*]}" >&2
  echo "         run: sudo bash hack/host-packages.sh   (or apt-get install them yourself)" >&2
  exit 1
fi
echo "==> host packages: apt-get install ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
