#!/usr/bin/env bash
# The test command: installs what is missing, builds the guest image (cached
# under /var/cache/husk), builds every binary, checks format and lints, and
# runs the whole test suite, the microVM tests on /dev/kvm included, then the
# microVM tests on standard KVM in the TCG bed.
# Run as root (KVM, namespaces): `bash scripts/test.sh` (or with sudo in front).
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
bash guest-image/build.sh
cargo fmt --all --check
cargo build --workspace --bins
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The microVM tests again, on standard KVM: a QEMU TCG guest with emulated
# AMD SVM loads kvm_amd (see the README's "Standard KVM" section).
bash scripts/test-stdkvm.sh
