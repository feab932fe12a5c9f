#!/usr/bin/env bash
# Installs what building and testing husk needs on a fresh Debian 12 machine:
# protoc for the agent protocol, and the guest kernel's build dependencies
# (guest-image/build.sh checks those again itself), and huskd's image store's
# tools and test fixtures: mkfs.erofs/fsck.erofs, a loopback OCI registry and a
# static busybox to build test images from; pod networking: the CNI plugins,
# iptables (portmap) and iproute2 (huskd's taps, the tests' namespaces). Idempotent; needs root.
set -euo pipefail

PACKAGES=(
	protobuf-compiler
	linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils build-essential
	erofs-utils docker-registry busybox-static
	containernetworking-plugins iptables iproute2
)

missing=()
for p in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || true
	[[ $status == 'install ok installed' ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
	echo "[install-deps] all packages present"
	exit 0
fi
sudo=()
((EUID == 0)) || sudo=(sudo)
echo "[install-deps] installing: ${missing[*]}"
"${sudo[@]}" apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${missing[@]}" >/dev/null
