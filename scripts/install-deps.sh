#!/usr/bin/env bash
# Installs what building and testing husk needs on a fresh Debian 12 machine:
# protoc for the agent protocol, and the guest kernel's build dependencies
# (guest-image/build.sh checks those again itself), and huskd's image store's
# tools and test fixtures: mkfs.erofs/fsck.erofs, a loopback OCI registry and a
# static busybox to build test images from; pod networking: the CNI plugins,
# iptables (portmap) and iproute2 (huskd's taps, the tests' namespaces); a
# Python venv with grpcio for runtime/tests/cri_grpcio.rs; and virtiofsd, which
# serves microVM pods' volumes (Debian 12 has no package of it: built from
# crates.io, pinned, into /usr/local/bin). Idempotent; needs root.
set -euo pipefail

PACKAGES=(
	protobuf-compiler
	linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils build-essential
	erofs-utils docker-registry busybox-static
	containernetworking-plugins iptables iproute2
	libcap-ng-dev libseccomp-dev
)

# A gRPC client on gRPC's C core, which names a unix socket's path as
# :authority (runtime/tests/cri_grpcio.rs), pinned, in a venv of its own.
GRPCIO_VENV=/var/cache/husk/grpcio-venv
GRPCIO_PINS="grpcio==1.85.4 grpcio-tools==1.85.4 protobuf==7.36.2"

sudo=()
((EUID == 0)) || sudo=(sudo)

apt_install() {
	"${sudo[@]}" apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "$@" >/dev/null
}

grpcio_venv() {
	local stamp=$GRPCIO_VENV/husk-pins
	if [[ -f $stamp && $(<"$stamp") == "$GRPCIO_PINS" ]] &&
		"$GRPCIO_VENV/bin/python" -c 'import grpc, grpc_tools.protoc' 2>/dev/null; then
		echo "[install-deps] grpcio venv present"
		return
	fi
	echo "[install-deps] creating $GRPCIO_VENV: $GRPCIO_PINS"
	"${sudo[@]}" rm -rf "$GRPCIO_VENV"
	if ! "${sudo[@]}" python3 -m venv "$GRPCIO_VENV" >/dev/null 2>&1; then
		# Debian's python3 has venv (and ensurepip) in a package of its own.
		apt_install python3-venv
		"${sudo[@]}" rm -rf "$GRPCIO_VENV"
		"${sudo[@]}" /usr/bin/python3 -m venv "$GRPCIO_VENV"
	fi
	# shellcheck disable=SC2086 # the pins are words
	"${sudo[@]}" "$GRPCIO_VENV/bin/pip" install -q --disable-pip-version-check $GRPCIO_PINS
	echo "$GRPCIO_PINS" | "${sudo[@]}" tee "$stamp" >/dev/null
}

VIRTIOFSD_VERSION=1.14.0

virtiofsd() {
	if [[ $(/usr/local/bin/virtiofsd --version 2>/dev/null) == *" $VIRTIOFSD_VERSION" ]]; then
		echo "[install-deps] virtiofsd $VIRTIOFSD_VERSION present"
		return
	fi
	echo "[install-deps] building virtiofsd $VIRTIOFSD_VERSION (about a minute)"
	"${sudo[@]}" env "PATH=$PATH" cargo install --quiet --locked --root /usr/local \
		--version "$VIRTIOFSD_VERSION" virtiofsd
}

missing=()
for p in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) || true
	[[ $status == 'install ok installed' ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
	echo "[install-deps] all packages present"
else
	echo "[install-deps] installing: ${missing[*]}"
	apt_install "${missing[@]}"
fi
grpcio_venv
virtiofsd
