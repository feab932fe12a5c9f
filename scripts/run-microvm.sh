#!/usr/bin/env bash
# husk's main job: start huskd, pull a busybox image from a registry on
# loopback (Debian's docker-registry, filled with an image built from
# busybox-static), run a pod in its own microVM (husk-vmm, husk's guest kernel,
# husk-agent as PID 1) over CRI as kubelet does, run a container in it, read its
# first line from the CRI log file, and tear it all down, printing how long
# each step took. This is the pod_start benchmark with one run.
# Run as root: `bash scripts/run-microvm.sh` (or with sudo in front).
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

# Each step's name and seconds, for the summary at the end.
SUMMARY=()
step() {
	local name=$1
	shift
	echo "[main job] $name ..."
	local start=$SECONDS
	"$@"
	SUMMARY+=("$(printf '%-44s %5d s' "$name" $((SECONDS - start)))")
}

step "dependencies (scripts/install-deps.sh)" bash scripts/install-deps.sh
step "guest kernel and initramfs (guest-image/)" bash guest-image/build.sh
# The bench profile, not release: the benchmark below builds in it, so the
# binaries' dependencies are mostly shared with it. Not all: bench targets
# and what they link unwind on panic while the binaries abort (the release
# profile's panic = "abort", which husk-vmm relies on), so the benchmark
# step still compiles about 200 crates again.
step "husk's binaries (cargo, bench profile)" cargo build --profile bench --workspace --bins
step "one pod on a microVM (pod_start bench)" \
	env HUSK_POD_BENCH_RUNS="${HUSK_POD_BENCH_RUNS:-1}" cargo bench -p husk-runtime --bench pod_start

echo
echo "[main job] done; the steps took:"
printf '  %s\n' "${SUMMARY[@]}"
echo "  total                                        $(printf '%5d' "$SECONDS") s"
