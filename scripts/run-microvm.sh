#!/usr/bin/env bash
# husk's main job as far as it goes today: boot one pod microVM (husk's guest
# kernel + husk-agent as PID 1) under husk-vmm on /dev/kvm, reach the agent over
# vsock, and shut it down, reporting the boot milestones. The CRI server
# (huskd) that will do this per RunPodSandbox is not built yet.
# Run as root: `sudo bash scripts/run-microvm.sh`.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
bash guest-image/build.sh
cargo build --release --workspace --bins
HUSK_BOOT_BENCH_RUNS=${HUSK_BOOT_BENCH_RUNS:-1} cargo bench -p husk-e2e --bench boot
