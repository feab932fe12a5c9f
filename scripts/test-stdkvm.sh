#!/usr/bin/env bash
# The standard-KVM test bed: husk's microVM tests on the KVM users run
# (kvm_amd with nested paging, full CPUID, several vCPUs), on any machine.
#
# QEMU's TCG emulates AMD SVM, so a Linux guest (L1) under
# `qemu-system-x86_64 -accel tcg -cpu max` loads kvm_amd and offers a standard
# /dev/kvm; husk-vmm inside it boots husk's guests (L2) exactly as on
# hardware. L1 is Debian's generic amd64 kernel with a small busybox
# initramfs whose /init mounts this machine's own root read-only over 9p under
# a tmpfs overlay: L1 runs the test binaries built here, with every tool
# installed here, and nothing it writes reaches the host. Results come back
# on L1's serial console.
#
#   bash scripts/test-stdkvm.sh                   # the microVM tests
#   HUSK_STDKVM_TESTS="husk-e2e:microvm_boot" ...  # a chosen list (PACKAGE:TEST[:ARGS,...])
#   HUSK_STDKVM_BENCHES="husk-e2e:boot" ...        # benchmarks instead (PACKAGE:BENCH),
#                                                  # built with --release as cargo bench does
#   HUSK_STDKVM_SMP=1 HUSK_STDKVM_MEM_MIB=6144    # L1's size
#
# Variables named HUSK_BOOT_BENCH_*, HUSK_POD_BENCH_*, HUSK_EXEC_BENCH_*, HUSK_VOLUME_BENCH_*, HUSK_IDLE_BENCH_*, HUSK_JAIL_BENCH_*,
# HUSK_SOAK_BOOTS, HUSK_BOOT_TIMEOUT_SECS and HUSK_GUEST_* reach the tests in L1.
# Exits 0 only if everything ran in L1 on kvm_amd and passed; the last line
# says how many ran and on what. Cached under $HUSK_STDKVM_CACHE
# (default /var/cache/husk/stdkvm).
set -Eeuo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$HERE/.." && pwd)
CACHE=${HUSK_STDKVM_CACHE:-/var/cache/husk/stdkvm}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/stdkvm
# One L1 vCPU: with two (multi-threaded TCG) nested guests with 4 vCPUs
# died now and then in ways no guest can cause (an L2 triple fault in a
# running kernel, an L2 task never woken, and once L1's own kernel) and
# never with one; L2's several vCPUs still run, time-shared. One L1 vCPU is
# as fast here, and leaves the host's other core free.
SMP=${HUSK_STDKVM_SMP:-1}
MEM_MIB=${HUSK_STDKVM_MEM_MIB:-6144}
# L1 boots in seconds; the budget is for the tests inside it.
BED_TIMEOUT=${HUSK_STDKVM_TIMEOUT_SECS:-1500}
# AMD SVM with nested paging. Without 5-level paging: L1 once died with
# its own page fault handler faulting on every access (the vCPU thread of a
# 4-vCPU guest, after a nested exit) under `-cpu max`, whose LA57 makes L1
# use 5-level page tables; real AMD hosts mostly use 4 levels.
L1_CPU=${HUSK_STDKVM_CPU:-max,la57=off}
L1_ACCEL=${HUSK_STDKVM_ACCEL:-tcg}
DEFAULT_TESTS=(
	husk-e2e:microvm_boot
	husk-e2e:microvm_vcpus
	husk-e2e:microvm_devices
	husk-e2e:microvm_containers
	husk-e2e:microvm_net
	husk-runtime:cri_microvm
	husk-runtime:cri_cancel
)
if [[ -n ${HUSK_STDKVM_BENCHES:-} ]]; then
	KIND=bench
	read -r -a TESTS <<<"$HUSK_STDKVM_BENCHES"
else
	KIND=test
	read -r -a TESTS <<<"${HUSK_STDKVM_TESTS:-${DEFAULT_TESTS[*]}}"
fi

START_NS=$(date +%s%N)
elapsed() { local now; now=$(date +%s%N); printf '%d.%01d' $(((now - START_NS) / 1000000000)) $(((now - START_NS) / 100000000 % 10)); }
step() { printf '[stdkvm %6ss] %s\n' "$(elapsed)" "$*"; }
die() { printf '[stdkvm %6ss] ERROR: %s\n' "$(elapsed)" "$*" >&2; exit 1; }
trap 'die "command failed (exit $?) at test-stdkvm.sh line $LINENO: $BASH_COMMAND"' ERR

((EUID == 0)) || die "run as root (it installs packages and boots guests): sudo bash $0"
mkdir -p -- "$CACHE" "$OUT"

# --- 1. QEMU >= 8.2 (bookworm's 7.2 ignores SVM's XSETBV intercept) ----------
qemu_ok() {
	local v
	v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
	[[ -n $v ]] && read -r major minor <<<"$v" && ((major > 8 || (major == 8 && minor >= 2)))
}
# What every husk test needs (registry, CNI plugins, mkfs.erofs, busybox,
# cpio...) and the guest image: both cached, so cheap after scripts/test.sh.
bash "$ROOT/scripts/install-deps.sh"
bash "$ROOT/guest-image/build.sh"
if ! qemu_ok; then
	if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
		step "adding Debian's bookworm-backports suite (QEMU 10)"
		cat >/etc/apt/sources.list.d/bookworm-backports.sources <<-'SOURCES'
			Types: deb
			URIs: http://deb.debian.org/debian
			Suites: bookworm-backports
			Components: main
			Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
		SOURCES
	fi
	step "installing qemu-system-x86 from bookworm-backports"
	apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		-t bookworm-backports qemu-system-x86 >/dev/null
	qemu_ok || die "qemu-system-x86_64 is still older than 8.2: $(qemu-system-x86_64 --version | head -1)"
fi
QEMU_VERSION=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([^ ]*\).*/\1/p')
step "QEMU $QEMU_VERSION"

# --- 2. L1 kernel: Debian's generic amd64 (kvm_amd, 9p, overlay as modules) ----
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [[ -z $kpkg ]]; then
	apt-get update -q >/dev/null
	kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[[ -n $kpkg ]] || die "apt knows no linux-image-amd64"
KVER=${kpkg#linux-image-}
KDIR=$CACHE/kernel-$KVER
if [[ ! -f $KDIR/.ready ]]; then
	step "L1 kernel: downloading $kpkg"
	rm -rf -- "$KDIR" && mkdir -p -- "$KDIR/deb"
	(cd "$KDIR/deb" && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
	deb=$(ls "$KDIR"/deb/*.deb 2>/dev/null | head -1) || true
	[[ -n $deb ]] || die "apt-get download $kpkg gave no package"
	dpkg-deb -x "$deb" "$KDIR/root"
	rm -rf -- "$KDIR/deb"
	depmod -b "$KDIR/root" "$KVER"
	touch "$KDIR/.ready"
fi
VMLINUZ=$KDIR/root/boot/vmlinuz-$KVER
MODULES=$KDIR/root/lib/modules/$KVER
step "L1 kernel $KVER"

# --- 3. L1 initramfs: busybox, the modules to reach the host's root, /init ------
INIT_MODULES=(virtio_pci 9pnet_virtio 9p overlay)
IHASH=$({
	sha256sum <"$HERE/stdkvm/initramfs-init"
	sha256sum <"$0"
	sha256sum </bin/busybox
	echo "$KVER ${INIT_MODULES[*]}"
} | sha256sum | cut -c1-16)
INITRD=$CACHE/initramfs-$KVER-$IHASH.cpio.gz
if [[ ! -f $INITRD ]]; then
	step "L1 initramfs: busybox and ${INIT_MODULES[*]}"
	staging=$(mktemp -d)
	mkdir -p "$staging"/{bin,dev,proc,sys,modules}
	cp /bin/busybox "$staging/bin/busybox"
	cp "$HERE/stdkvm/initramfs-init" "$staging/init"
	chmod 0755 "$staging/init"
	for module in "${INIT_MODULES[@]}"; do
		modprobe -d "$KDIR/root" -S "$KVER" --show-depends "$module" | awk '$1 == "insmod" {print $2}'
	done | awk '!seen[$0]++' | while read -r ko; do
		cp "$ko" "$staging/modules/"
		basename "$ko" >>"$staging/modules.order"
	done
	(cd "$staging" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp"
	mv "$INITRD.tmp" "$INITRD"
	rm -rf -- "$staging"
fi

# --- 4. The test binaries, built here, run there -------------------------------
step "building the workspace binaries and the ${KIND}s (${TESTS[*]})"
if [[ $KIND == bench ]]; then
	cargo build --release --workspace --bins --quiet
	build=(cargo bench --no-run --message-format=json)
else
	cargo build --workspace --bins --quiet
	build=(cargo test --no-run --message-format=json)
fi
JOB=$OUT/job.sh
{
	echo "# written by scripts/test-stdkvm.sh for scripts/stdkvm/l1-run.sh"
	printf 'MODULES=%q\n' "$MODULES"
	echo "export HUSK_EXPECT_KVM=standard RUST_BACKTRACE=1"
	while IFS='=' read -r var value; do
		printf 'export %s=%q\n' "$var" "$value"
	done < <(env | grep -E '^HUSK_(BOOT_BENCH|POD_BENCH|EXEC_BENCH|NET_BENCH|VOLUME_BENCH|IDLE_BENCH|JAIL_BENCH|SOAK|BOOT_TIMEOUT|GUEST|STDKVM_TEST_TIMEOUT)[A-Z_]*=' || true)
	echo "TESTS='"
	for spec in "${TESTS[@]}"; do
		IFS=: read -r package target args <<<"$spec"
		[[ -n $package && -n $target ]] || die "bad spec '$spec' (PACKAGE:TARGET[:ARGS,...])"
		exe=$("${build[@]}" -p "$package" "--$KIND" "$target" 2>/dev/null |
			python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == [sys.argv[1]]:
        print(m["executable"], m["manifest_path"])' "$KIND")
		[[ -n $exe ]] || die "cargo built no $KIND binary for $spec (${build[*]} -p $package --$KIND $target)"
		read -r binary manifest <<<"$exe"
		if [[ $KIND == bench ]]; then
			echo "bench $(dirname "$manifest") $binary ${args//,/ } --bench"
		else
			# Ignored tests too: those that need standard KVM are ignored elsewhere.
			echo "test $(dirname "$manifest") $binary ${args//,/ } --test-threads=1 --nocapture --include-ignored"
		fi
	done
	echo "'"
} >"$JOB"

# --- 5. Boot L1 and run them ---------------------------------------------------
CONSOLE=$OUT/console.log
step "booting L1: QEMU -accel $L1_ACCEL, -cpu $L1_CPU (AMD SVM + NPT), $SMP vCPUs, $MEM_MIB MiB; console in $CONSOLE"
set +e
timeout --kill-after=10 "$BED_TIMEOUT" qemu-system-x86_64 \
	-accel "$L1_ACCEL" -M q35 -cpu "$L1_CPU" -smp "$SMP" -m "$MEM_MIB" \
	-nodefaults -display none -monitor none -serial stdio -no-reboot \
	-kernel "$VMLINUZ" -initrd "$INITRD" \
	-append "console=ttyS0 quiet loglevel=1 panic=-1 husk.run=$HERE/stdkvm/l1-run.sh husk.job=$JOB" \
	-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
	</dev/null 2>&1 | tee "$CONSOLE"
qemu_status=${PIPESTATUS[0]}
set -e
result=$(grep -a '^HUSK-STDKVM-RESULT' "$CONSOLE" | tail -1 | tr -d '\r') || true
if [[ -z $result ]] && grep -aq 'Kernel panic' "$CONSOLE"; then
	die "L1's own kernel crashed (not a husk guest; the bed's QEMU or L1 kernel): $(grep -a -m1 -E 'BUG:|Oops|general protection|Kernel panic' "$CONSOLE" | tr -d '\r'); console: $CONSOLE"
fi
[[ -n $result ]] || die "L1 gave no result (QEMU exit $qemu_status$( ((qemu_status == 124)) && echo ": timed out after ${BED_TIMEOUT}s")); console: $CONSOLE"
eval "${result#HUSK-STDKVM-RESULT }"
where="standard KVM (kvm_amd, npt) in a QEMU $QEMU_VERSION TCG guest (-accel $L1_ACCEL, -cpu $L1_CPU, $SMP vCPUs, $MEM_MIB MiB, kernel $KVER)"
summary="stdkvm: $passed passed, $failed failed in $ran test binaries on $where; $(elapsed) s"
echo "$summary"
((rc == 0 && failed == 0 && passed > 0)) || exit 1
