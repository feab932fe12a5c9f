#!/bin/bash
# PID 1 of the standard-KVM bed's L1 guest, after the initramfs switched to the
# host's root (read-only 9p under a tmpfs overlay; see scripts/test-stdkvm.sh).
# Mounts what a Debian system has, loads kvm_amd, runs the job's tests, prints
# one result line for the host to read, and powers the guest off.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8

result() {
	echo "HUSK-STDKVM-RESULT rc=$1 passed=${passed:-0} failed=${failed:-0} ran=${ran:-0}"
	sync
	echo o >/proc/sysrq-trigger
	# Nothing from the root may run now: it goes away with the power.
	while :; do :; done
}
trap 'result 98' ERR

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
# /run starts empty, as on a booted system (the host's would show its
# namespaces and sockets). /tmp stays the host's, under the overlay: the
# checkout and its test binaries may live there (CI clones anywhere).
mount -t tmpfs -o mode=0755 run /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo 1 >/proc/sys/kernel/sysrq
hostname husk-l1
ip link set lo up

job=
for word in $(cat /proc/cmdline); do
	case $word in husk.job=*) job=${word#husk.job=} ;; esac
done
[[ -n $job && -f $job ]] || { echo "l1: no job file (husk.job=$job)"; result 97; }
# The job sets MODULES (the L1 kernel's /lib/modules/VERSION on the host) and
# TESTS (lines of "KIND DIR EXE [ARGS...]", KIND `test` or `bench`), and may
# export variables for them.
# shellcheck source=/dev/null
source "$job"
trap - ERR

mkdir -p "/lib/modules/$(uname -r)"
mount --bind "$MODULES" "/lib/modules/$(uname -r)"
for module in kvm_amd tun veth bridge br_netfilter overlay erofs loop; do
	modprobe "$module" || echo "l1: modprobe $module failed"
done
if [[ ! -c /dev/kvm ]]; then
	echo "l1: /dev/kvm is missing after modprobe kvm_amd: the CPU model lacks SVM"
	result 96
fi
echo "l1: $(nproc) vCPUs, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB," \
	"kvm_amd npt=$(cat /sys/module/kvm_amd/parameters/npt)"

passed=0 failed=0 ran=0 rc=0
while read -r kind dir exe args; do
	[[ -n $kind && $kind != \#* ]] || continue
	name=$(basename "$exe")
	echo "l1: ==> $name $args"
	began=$SECONDS
	log=/tmp/$name.log
	# Each test binary as cargo runs it: from its package's directory.
	# shellcheck disable=SC2086
	(cd "$dir" && timeout --kill-after=10 "${HUSK_STDKVM_TEST_TIMEOUT:-900}" "$exe" $args) 2>&1 | tee "$log"
	status=${PIPESTATUS[0]}
	ran=$((ran + 1))
	while read -r p f; do
		passed=$((passed + p)) failed=$((failed + f))
	done < <(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$log")
	if [[ $kind == bench ]]; then
		# A benchmark passes by finishing.
		if ((status == 0)); then passed=$((passed + 1)); else failed=$((failed + 1)); fi
	elif ((status != 0)) && ! grep -q '^test result:' "$log"; then
		failed=$((failed + 1))
	fi
	((status == 0)) || rc=1
	echo "l1: <== $name exit $status after $((SECONDS - began)) s"
done <<<"$TESTS"
result "$rc"
