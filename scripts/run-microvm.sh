#!/usr/bin/env bash
# husk's main job: start huskd, pull a busybox image from a registry on
# loopback (Debian's docker-registry, filled with an image built from
# busybox-static), run a pod in its own microVM (husk-vmm, husk's guest kernel,
# husk-agent as PID 1) over CRI as kubelet does, run a container in it, read its
# first line from the CRI log file, and tear it all down, printing how long
# each step took. This is the pod_start benchmark with one run.
# Run as root: `sudo bash scripts/run-microvm.sh`.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
bash guest-image/build.sh
cargo build --release --workspace --bins
HUSK_POD_BENCH_RUNS=${HUSK_POD_BENCH_RUNS:-1} cargo bench -p husk-runtime --bench pod_start
